"""Preflight: before a training recipe allocates anything, does the run fit the memory of the devices it will use?

The estimate is the capacity plan's (`litgpt_mm.analysis.capacity`, checked against measured peaks in
tests/analysis/test_capacity_plan.py): `capacity.plan(...).memory.peak` for pretraining; for the stages that train a
small part of a frozen model (alignment, QLoRA) the same plan's pieces - `param_tensors`, `activation_bytes`,
`PRECISION_BYTES` and `Memory.peak` - with the frozen weights held without gradients or optimizer state (nf4 where
quantised); for CLIP pretraining, each tower as the plan's pre-LayerNorm GPT block stack. Nothing is built: a 6
B-parameter estimate takes milliseconds and needs no device.

When the estimate exceeds what the device has, `check_fits` raises `SystemExit` with one line (which
`litgpt_mm.cli.run_cli` prints as `error: ...`): the estimated peak per device, what the device has, what would fit
(each alternative estimated by the same plan) and the override flag, `--preflight false`.

What "has" means: on CUDA the free memory of the device this process will use (`torch.cuda.mem_get_info`); on CPU
the RAM the kernel reports available (`psutil.virtual_memory().available`), shared by the processes of one node.
`MARGIN` (10 %) of it is kept free: the plan's peaks came within 15 % of measured ones, and its 2 GB runtime overhead
(CUDA context, workspaces, allocator fragmentation) already sits in the estimate, so a run refused here would at
best have run at the edge of memory.

Known limits: the alignment and QLoRA estimates count the activations of a fully trained LM (autograd keeps fewer
for frozen linears: conservative); QLoRA's `--method autoregressive` with `--decode_dequantized` holds a dequantised
copy of the LM during its decoding pass, not counted; CLIP's image and text embeddings are approximated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Literal

import psutil
import torch

from litgpt_mm.analysis import capacity
from litgpt_mm.config import Config

GiB = 1024**3
MARGIN = 0.10  # fraction of the device's available memory kept free
OVERRIDE_FLAG = "--preflight false"
TINY_CONFIG = "phi-2-moe-tiny"
FSDP_GPU = "h100"  # the GPU the "more GPUs" alternative is sized for on a CPU-only machine (80 GB)
MAX_GPUS = 512
# bitsandbytes nf4: half a byte per weight plus one fp32 absmax per block of 64 (no double quantisation: an upper bound)
NF4_BYTES = 0.5 + 4 / 64
Stage = Literal["pretrain", "align", "qlora", "clip"]
STAGE_NAMES = {"pretrain": "pretraining", "align": "alignment", "qlora": "QLoRA finetuning", "clip": "CLIP pretraining"}


@dataclass(frozen=True)
class DeviceMemory:
    """What one device of the run has: `available` bytes now, of `total`; `name` says which device."""

    available: int
    total: int
    name: str


def device_memory(accelerator: str, index: int | None = None) -> DeviceMemory:
    """Free and total memory of CUDA device `index` (default: this process's `LOCAL_RANK`, else 0), or the available
    and total RAM of this machine for `cpu`."""
    if accelerator == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0)) if index is None else index
        free, total = torch.cuda.mem_get_info(index)
        return DeviceMemory(free, total, f"GPU {index} ({torch.cuda.get_device_name(index)})")
    vm = psutil.virtual_memory()
    return DeviceMemory(vm.available, vm.total, "CPU RAM")


@dataclass(frozen=True)
class Run:
    """The settings of a run that the estimate depends on (see `check_fits` for their meaning)."""

    stage: Stage
    config: Config | None
    accelerator: str
    devices: int
    num_nodes: int
    micro_batch_size: int
    seq_len: int
    precision: str
    strategy: str = "auto"
    expert_parallel: int = 1
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    quantize: str = "none"
    lora: Any = None
    clip_model: str | None = None
    projector: str = "resblock"

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes

    @property
    def cpu(self) -> bool:
        return self.accelerator != "cuda"

    @property
    def fsdp_size(self) -> int:
        """Ranks sharding the state, as recipes/pretrain_moe.py builds its strategy: FSDP over all ranks with
        `--strategy fsdp` (FSDP2) or on several GPUs (within a node under HYBRID_SHARD), DDP otherwise."""
        if self.stage != "pretrain" or (self.world == 1 and self.strategy != "fsdp"):
            return 1
        if self.strategy == "fsdp" and (self.cpu or self.expert_parallel > 1):
            return self.world
        if self.expert_parallel > 1 or self.cpu:
            return 1
        return self.devices

    def describe(self) -> str:
        parts = [self.precision]
        if self.stage != "clip":
            parts.append(self.optimizer)
        if self.quantize == "nf4":
            parts.append("nf4 base weights")
        per = "image-caption pairs" if self.stage == "clip" else f"x {self.seq_len} tokens"
        parts.append(f"micro-batch {self.micro_batch_size} {per}")
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        unit = ("process", "processes") if self.cpu else ("GPU", "GPUs")
        parts.append(f"{self.world} {unit[self.world > 1]}")
        if self.fsdp_size > 1:
            parts.append(f"FSDP over {self.fsdp_size}")
        if self.expert_parallel > 1:
            parts.append(f"experts over {self.expert_parallel}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """A run's estimated peak per device against what the device has (bytes)."""

    peak: float
    available: int
    usable: float
    device: str
    memory: capacity.Memory

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def optimizer_kind(optimizer: str | dict | None) -> str:
    """The capacity plan's optimizer for a recipe's `--optimizer`: `adamw8bit` for bitsandbytes' 8-bit optimizers,
    `adamw` (two states in the weights' dtype) for anything else (SGD keeps fewer: conservative)."""
    if isinstance(optimizer, dict):
        optimizer = optimizer.get("class_path", "")
    return "adamw8bit" if "8bit" in str(optimizer or "").lower() else "adamw"


# ------------------------------------------------------------------------------------------------------- estimates


def _pretrain_memory(run: Run, config: Config) -> capacity.Memory:
    p = capacity.plan(
        config,
        1.0,
        gpus=run.world,
        gpu="cpu" if run.cpu else "cuda",
        precision=run.precision,
        optimizer=run.optimizer,
        micro_batch=run.micro_batch_size,
        seq_len=run.seq_len,
        activation_checkpointing=run.activation_checkpointing,
        fsdp_size=run.fsdp_size,
        expert_parallel=run.expert_parallel,
        mfu=0.5,
        peak_tflops=1.0,
        gpu_memory_gb=1.0,
        link_gbps=1.0,
        # CPU: the segment MoE path (one expert hidden copy) and torch's single-tensor AdamW, as measured
        expert_hidden_copies=1 if run.cpu else 2,
        fused_adamw=not run.cpu,
    )
    return p.memory


def _state_bytes(numel: float, pb: capacity.PrecisionBytes, optimizer: str) -> tuple[float, float, float]:
    """Weights, gradients and optimizer state of `numel` trained parameters (fp32 master weights under mixed
    precision), as `capacity.plan` counts them."""
    opt = 2 * pb.weight * numel if optimizer == "adamw" else (2 + 2 * 4 / capacity.BNB_BLOCKSIZE) * numel
    return pb.weight * numel, pb.grad * numel, opt


def lora_params(config: Config, lora: Any) -> int:
    """Parameters of litgpt's LoRA adapters (`litgpt_mm.models.qlora.LoRASettings`) on every block of `config`."""
    d, r = config.n_embd, lora.r
    dq, dkv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    per_block = 0
    qkv = [dq] * lora.query + [dkv] * lora.key + [dkv] * lora.value
    if qkv:
        per_block += r * d * len(qkv) + r * sum(qkv)
    if lora.projection:
        per_block += r * (dq + d)
    if lora.mlp:
        inter = config.intermediate_size
        n_in = 2 if config.mlp_class_name in ("LLaMAMLP", "GemmaMLP") else 1
        per_block += n_in * r * (d + inter) + r * (inter + d)
    head = r * (d + config.padded_vocab_size) if lora.head else 0
    return config.n_layer * per_block + head


def _clip_configs(clip_model: str) -> tuple[Config, Config, dict]:
    """The vision and text towers of an open_clip model config as the plan's pre-LayerNorm GPT block stacks (GELU
    MLP, biases, LayerNorm; no parallel residual). The vocabulary stands for the tower's output projection, so the
    plan's head term stays the size of the features, not of a language-model head."""
    import open_clip

    from litgpt_mm.models.vision import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(clip_model)
    if cfg is None:
        raise ValueError(f"{clip_model!r}: not an open_clip model config")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v["image_size"] if isinstance(v["image_size"], int) else max(v["image_size"])
    grid = (size // v["patch_size"]) ** 2
    common = dict(
        parallel_residual=False,
        bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        rotary_percentage=0.0,
        lm_head_bias=False,
    )
    embed = cfg["embed_dim"]

    def tower(name: str, width: int, layers: int, heads: int, mlp_ratio: float, block: int) -> Config:
        shape = dict(n_embd=width, n_layer=layers, n_head=heads, block_size=block, vocab_size=embed)
        inter = int(width * mlp_ratio)
        return Config(name=f"{clip_model}-{name}", intermediate_size=inter, padded_vocab_size=embed, **shape, **common)

    vision = tower(
        "vision", v["width"], v["layers"], v["width"] // v.get("head_width", 64), v.get("mlp_ratio", 4.0), grid + 1
    )
    text = tower("text", t["width"], t["layers"], t["heads"], t.get("mlp_ratio", 4.0), t.get("context_length", 77))
    return vision, text, dict(grid=grid, text_embedding=t.get("vocab_size", 49408) * t["width"])


def _frozen_lm_memory(run: Run, config: Config) -> capacity.Memory:
    """Alignment or QLoRA: a frozen LM (nf4 linear weights under `quantize nf4`), trained adapters and projector."""
    pb = capacity.PRECISION_BYTES[run.precision]
    frozen_bytes = pb.weight
    if run.stage == "align" and not run.cpu and run.precision.startswith("bf16"):
        frozen_bytes = 2  # recipes/align.py casts the frozen LM to bf16 on CUDA
    tensors = capacity.param_tensors(config)
    frozen = 0.0
    for t in tensors:
        nf4 = run.quantize == "nf4" and t.kind == "linear" and t.name.endswith(".weight")
        frozen += t.numel * (NF4_BYTES if nf4 and not t.name.startswith("lm_head") else frozen_bytes)
    trained = lora_params(config, run.lora) if run.stage == "qlora" and run.lora is not None else 0
    prefix = 0
    if run.clip_model is not None:
        vision, _, info = _clip_configs(run.clip_model)
        prefix = info["grid"] + 1
        if run.stage == "align":  # the frozen CLIP tower, fp32
            frozen += 4 * capacity.count_params(vision).total
        v = vision.n_embd
        d = config.n_embd
        trained += v * d + d + (2 * d * d + 4 * d if run.projector != "linear" else 0) + d  # projector, separator
    weights, grads, opt = _state_bytes(trained, pb, run.optimizer)
    seq = run.seq_len + prefix
    copies = 1 if run.cpu else 2
    acts = capacity.activation_bytes(
        config, run.precision, run.micro_batch_size, seq, run.activation_checkpointing, copies
    )
    largest = max(t.numel for t in tensors if t.kind in ("linear", "embedding"))
    working = pb.compute * largest if (run.quantize == "nf4" or pb.mixed) else 0.0  # one dequantised / cast weight
    return capacity.Memory(frozen + weights, grads, opt, acts.start, acts.recompute, 0.0, working, 2e9)


def _clip_memory(run: Run) -> capacity.Memory:
    """Both CLIP towers trained: the plan's memory of each, summed, with one runtime overhead."""
    vision, text, info = _clip_configs(run.clip_model)
    runs = ((vision, info["grid"] + 1), (text, text.block_size))
    mems = [_pretrain_memory(replace(run, seq_len=seq), cfg) for cfg, seq in runs]
    pb = capacity.PRECISION_BYTES[run.precision]
    w, g, o = _state_bytes(info["text_embedding"], pb, run.optimizer)  # the token embedding the stand-in lacks
    total = {f: sum(getattr(m, f) for m in mems) for f in capacity.Memory.__dataclass_fields__}
    total.update(weights=total["weights"] + w, grads=total["grads"] + g, optimizer=total["optimizer"] + o)
    total["overhead"] = mems[0].overhead
    return capacity.Memory(**total)


def memory(run: Run) -> capacity.Memory:
    """The capacity plan's memory per device of `run` (see the module docstring for each stage)."""
    if run.stage == "pretrain":
        return _pretrain_memory(run, run.config)
    if run.stage in ("align", "qlora"):
        return _frozen_lm_memory(run, run.config)
    if run.stage == "clip":
        return _clip_memory(run)
    raise ValueError(f"stage must be one of {tuple(STAGE_NAMES)}, got {run.stage!r}")


def _per_process(run: Run, available: int) -> int:
    """A CPU node's processes share its RAM."""
    return available // run.devices if run.cpu else available


def estimate(run: Run, available: DeviceMemory) -> Estimate:
    have = _per_process(run, available.available)
    mem = memory(run)
    return Estimate(mem.peak, have, have * (1 - MARGIN), available.name, mem)


# ---------------------------------------------------------------------------------------------------- alternatives


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def alternatives(run: Run, usable: float) -> list[str]:
    """Changes of the command line that fit `usable` bytes per device, each estimated by the same plan."""

    def fits(r: Run) -> float | None:
        try:
            peak = memory(r).peak
        except ValueError:
            return None
        return peak if peak <= usable else None

    found = []
    mb = next((m for m in range(run.micro_batch_size - 1, 0, -1) if fits(replace(run, micro_batch_size=m))), None)
    if mb is not None:
        found.append(f"--train.micro_batch_size {mb} ({_gib(memory(replace(run, micro_batch_size=mb)).peak)})")
    if run.stage in ("pretrain", "qlora") and not run.activation_checkpointing:
        ckpt = replace(run, activation_checkpointing=True)
        if fits(ckpt):
            found.append(f"--activation_checkpointing true ({_gib(memory(ckpt).peak)})")
    if run.stage == "qlora" and run.quantize != "nf4":
        nf4 = replace(run, quantize="nf4")
        if fits(nf4):
            found.append(f"QLoRA: --quantize nf4 ({_gib(memory(nf4).peak)})")
    if run.optimizer != "adamw8bit" and run.stage != "clip":
        bnb = replace(run, optimizer="adamw8bit")
        if fits(bnb):
            found.append(f"--optimizer bitsandbytes.optim.AdamW8bit ({_gib(memory(bnb).peak)})")
    if run.stage == "pretrain":
        found += _fsdp_alternative(run, usable)
        if run.config is not None and run.config.name != TINY_CONFIG:
            tiny = Config.from_name(TINY_CONFIG)
            tiny_run = replace(
                run, config=tiny, seq_len=min(run.seq_len, tiny.block_size), strategy="auto", expert_parallel=1
            )
            if fits(tiny_run):
                found.append(
                    f"the tiny config: --model_name {TINY_CONFIG} --train.max_seq_length {tiny_run.seq_len} "
                    f"({_gib(memory(tiny_run).peak)}; or --config recipes/configs/pretrain_moe_tiny.yaml)"
                )
    return found


def _fsdp_alternative(run: Run, usable: float) -> list[str]:
    """The fewest GPUs (powers of two) that hold the run with FSDP: GPUs like this one on CUDA, 80 GB ones on CPU."""
    gpu_bytes = usable if not run.cpu else capacity.GPUS[FSDP_GPU].memory_gb * 1e9 * (1 - MARGIN)
    n = max(2, run.world * 2) if not run.cpu else 1
    while n <= MAX_GPUS:
        per_node = min(n, capacity.GPUS_PER_NODE)
        cand = replace(
            run,
            accelerator="cuda",
            devices=per_node,
            num_nodes=n // per_node,
            strategy="fsdp",
            precision="bf16-mixed" if run.cpu else run.precision,
            expert_parallel=1,
        )
        if cand.world == n and memory(cand).peak <= gpu_bytes:
            flags = f"--devices {per_node}" + (f" --num_nodes {n // per_node}" if n > per_node else "")
            each = _gib(memory(cand).peak)
            if run.cpu:
                gb = capacity.GPUS[FSDP_GPU].memory_gb
                return [f"{n} GPUs of {gb:g} GB with FSDP (on a GPU machine: {flags} --strategy fsdp; {each} each)"]
            return [f"{n} GPUs like this one with FSDP: {flags} --strategy fsdp ({each} each)"]
        n *= 2
    return []


# ------------------------------------------------------------------------------------------------------ the check


def check_fits(
    config: Config | None,
    *,
    stage: Stage = "pretrain",
    micro_batch_size: int,
    seq_len: int | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str | None = None,
    precision: str | None = None,
    strategy: str = "auto",
    expert_parallel: int = 1,
    activation_checkpointing: bool = False,
    optimizer: str | dict | None = "adamw",
    quantize: str = "none",
    lora: Any = None,
    clip_model: str | None = None,
    projector: str = "resblock",
    enabled: bool = True,
) -> Estimate | None:
    """Refuse, before anything is allocated, a run whose estimated peak memory per device exceeds what it has.

    Args:
        config: the model (for alignment and QLoRA the frozen LM's config; `None` for CLIP pretraining).
        stage: `pretrain` (recipes/pretrain_moe.py), `align` (recipes/align.py), `qlora`
            (recipes/qlora_instruct.py) or `clip` (scripts/pretrain_clip.py).
        micro_batch_size: sequences (images) per device per step.
        seq_len: tokens per sequence: the training length (default the config's block size); for `align` and
            `qlora` the text tokens, to which the image prefix of `clip_model` (patches + separator) is added;
            ignored for `clip` (the towers' own lengths).
        devices: devices per node (`auto`: every visible GPU, or 1 on CPU).
        num_nodes: nodes.
        accelerator: `cuda` or `cpu` (default: `cuda` where available, as the recipes choose).
        precision: Fabric precision (default as the recipes: `bf16-mixed` on CUDA, `32-true` on CPU).
        strategy: pretraining's `--strategy` (`auto` or `fsdp`); it decides how many ranks shard the state.
        expert_parallel: pretraining's `--expert_parallel`.
        activation_checkpointing: the recipe's `--activation_checkpointing`.
        optimizer: the recipe's `--optimizer` (bitsandbytes' 8-bit ones keep about 2 bytes per parameter).
        quantize: QLoRA's `--quantize` (`nf4`: the frozen linear weights in 4 bits).
        lora: QLoRA's `LoRASettings` (its adapters are what trains).
        clip_model: the open_clip model (the frozen tower of `align`, the towers `qlora` reads features of, the
            model `clip` trains).
        projector: alignment's `--projector`.
        enabled: `False` (the recipes' `--preflight false`) skips the check.

    Returns:
        The estimate when the run fits (None when skipped).

    Raises:
        SystemExit: one line - the estimated peak per device, what the device has, what would fit, the override.
    """
    if not enabled:
        return None
    accelerator = accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = accelerator == "cuda"
    n_devices = (torch.cuda.device_count() if cuda else 1) if devices == "auto" else int(devices)
    if stage != "clip" and config is None:
        raise ValueError(f"the {stage} preflight needs the model config")
    if stage == "clip" and clip_model is None:
        raise ValueError("the clip preflight needs the open_clip model name")
    run = Run(
        stage=stage,
        config=config,
        accelerator=accelerator,
        devices=max(n_devices, 1),
        num_nodes=num_nodes,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len or (config.block_size if config is not None else 0),
        precision=precision or ("bf16-mixed" if cuda else "32-true"),
        strategy=strategy,
        expert_parallel=expert_parallel,
        activation_checkpointing=activation_checkpointing,
        optimizer=optimizer_kind(optimizer),
        quantize=quantize,
        lora=lora,
        clip_model=clip_model,
        projector=projector,
    )
    est = estimate(run, device_memory(accelerator))
    if est.fits:
        return est
    raise SystemExit(refusal(run, est))


def refusal(run: Run, est: Estimate) -> str:
    """The one line `check_fits` exits with (without run_cli's `error: ` prefix)."""
    what = run.config.name if run.stage != "clip" else run.clip_model
    shared = ""
    if run.cpu and run.devices > 1:
        shared = f" each ({_gib(run.devices * est.available)} shared by {run.devices} processes)"
    has = "available" if run.cpu else "free"
    fixes = alternatives(run, est.usable)
    would = "would fit: " + "; ".join(fixes) if fixes else "nothing the preflight knows of fits here"
    return (
        f"preflight: {what} {STAGE_NAMES[run.stage]} needs about {_gib(est.peak)} per device "
        f"(capacity plan: {run.describe()}) but {est.device} has {_gib(est.available)} {has}{shared} "
        f"({_gib(est.usable)} usable with a {MARGIN:.0%} margin); {would}. "
        f"Pass {OVERRIDE_FLAG} to run anyway."
    )


__all__ = ["DeviceMemory", "Estimate", "Run", "check_fits", "device_memory", "estimate", "memory", "refusal"]
