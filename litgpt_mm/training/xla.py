"""What differs on TPUs (XLA): static shapes, the FSDP wrap policy, sequential checkpoint loading, and MFU.

XLA compiles one graph per distinct set of input shapes, so every batch is padded to a fixed batch size and one of a
few sequence-length buckets, the MoE runs its `static` path (every expert on every token, no data-dependent
shapes or host syncs), and host syncs (`.item()`) happen only at log intervals. Nothing here imports `torch_xla`
at module level: the logic is testable on any machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

BUCKETS = (64, 128, 256, 512, 1024, 2048)


def bucket(length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `length` (a `ValueError` past the largest)."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}: add a bucket or cut the input")


def pad_batch(
    ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | None,
    batch_size: int,
    pad_id: int,
    ignore_index: int = -100,
    buckets: Sequence[int] = BUCKETS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token rows to a length bucket and the batch to `batch_size` rows.

    Returns ids (batch_size, L), labels (padding and filler rows are `ignore_index`, so they add nothing to the
    loss) and the number of real tokens per row.
    """
    if len(ids) > batch_size:
        raise ValueError(f"{len(ids)} rows do not fit a static batch of {batch_size}")
    L = bucket(max(len(r) for r in ids), buckets)
    labels = labels if labels is not None else ids
    out_ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
    out_labels = torch.full((batch_size, L), ignore_index, dtype=torch.long)
    lengths = torch.zeros(batch_size, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels, strict=True)):
        out_ids[i, : len(row)] = row
        out_labels[i, : len(lab)] = lab
        lengths[i] = len(row)
    return out_ids, out_labels, lengths


def block_wrap_policy(block_classes: set[type] | None = None):
    """`XLAFSDPStrategy(auto_wrap_policy=...)`: one FSDP unit per transformer block (ours and litgpt's)."""
    from litgpt.model import Block as LitBlock
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from litgpt_mm.model import Block

    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes or {Block, LitBlock})


def xla_fabric(devices: int | str = "auto", fsdp: bool = True, precision: str = "bf16-true", num_nodes: int = 1):
    """Lightning Fabric on TPU: `XLAFSDPStrategy` (block wrap policy, full state dict, sequential save) or
    `XLAStrategy` (data parallel). With `PJRT_DEVICE=CPU` it runs on XLA's CPU device, one process, for smoke runs
    of the same code path on machines without a TPU."""
    import lightning as L
    from lightning.fabric.strategies import XLAFSDPStrategy, XLAStrategy

    if os.environ.get("PJRT_DEVICE") == "CPU":
        return L.Fabric(accelerator=_xla_cpu_accelerator(), devices=1, precision=precision)
    if fsdp:
        strategy = XLAFSDPStrategy(auto_wrap_policy=block_wrap_policy(), state_dict_type="full", sequential_save=True)
    else:
        strategy = XLAStrategy(sync_module_states=True)
    return L.Fabric(accelerator="tpu", devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision)


def _xla_cpu_accelerator():
    """Fabric's `XLAAccelerator` counts TPU chips through the TPU metadata service; this one is XLA's CPU device."""
    from lightning.fabric.accelerators.xla import XLAAccelerator

    class XLACPUAccelerator(XLAAccelerator):
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def auto_device_count() -> int:
            return 1

        @staticmethod
        def parse_devices(devices) -> int:
            return 1

        @staticmethod
        def get_parallel_devices(devices) -> list:
            import torch_xla

            return [torch_xla.device()]

    return XLACPUAccelerator()


def load_sequentially(fabric, path: Path) -> dict:
    """Load a checkpoint on every process of a host one after another (host RAM holds one copy at a time);
    the model is then sharded from it by `fabric.setup`."""
    state: dict = {}
    local_world = max(1, fabric.world_size // max(1, getattr(fabric, "num_nodes", 1)))
    for turn in range(local_world):
        if fabric.local_rank == turn:
            state = torch.load(Path(path), map_location="cpu", mmap=True, weights_only=True)
            state = state.get("model", state)
        fabric.barrier()
    return state


def memory_per_chip_gb(params: float, chips: int, seq: int, micro_batch: int, n_layer: int, n_embd: int) -> float:
    """Paper estimate for FSDP training in bf16 with fp32 AdamW state: weights (2) + grads (2) + master and two
    moments (12) bytes per parameter, sharded over `chips`, plus checkpointed activations (one bf16 block input per
    layer) kept per chip."""
    sharded = params * 16 / chips
    activations = 2 * micro_batch * seq * n_embd * n_layer
    return (sharded + activations) / 1e9


def recipe_arguments(setup_fn, config: Path | None, overrides: dict) -> dict:
    """A recipe's `setup` arguments: its defaults, updated by its YAML config (as `--config` gives them) and
    `overrides`; `train` and `eval` become litgpt's `TrainArgs` / `EvalArgs`, `*_dir` entries paths."""
    import dataclasses
    import inspect

    import yaml

    args = {k: p.default for k, p in inspect.signature(setup_fn).parameters.items()}
    given = yaml.safe_load(Path(config).read_text()) if config else {}
    for key, value in {**(given or {}), **overrides}.items():
        if key not in args:
            raise ValueError(f"{config}: {key!r} is not an argument of {setup_fn.__module__}.setup")
        default = args[key]
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = dataclasses.replace(default, **value)
        args[key] = value
    return {k: Path(v) if k.endswith("_dir") and isinstance(v, str) else v for k, v in args.items()}


def static_caption_collate(length: int, pad_id: int = 0):
    """`CaptionPairs` collate with every caption padded (or cut) to `length` tokens and the padding ignored."""

    def collate(items: list[dict]) -> dict:
        ids = [it["ids"][:length] for it in items]
        padded, labels, _ = pad_batch(ids, None, len(items), pad_id, buckets=(length,))
        batch = {"image_id": [it["image_id"] for it in items], "ids": list(padded), "labels": list(labels)}
        for key in ("features", "pixels"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch

    return collate
