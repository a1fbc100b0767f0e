"""Pretrain Phi-2 + MoE on TPUs: `recipes/pretrain_moe.py`'s loop on an XLA Fabric.

    PJRT_DEVICE=TPU python xla/pretrain_moe.py --data gutenberg --model_name phi-2-moe

What differs from the GPU recipe: `XLAFSDPStrategy` (one unit per block, full state dict, sequential save), bf16
weights, the MoE's `static` path (fixed shapes), and the TPU's datasheet peak for MFU. Token blocks already have a
fixed length and the loaders drop the last partial batch, so every step has the same shapes.
"""

from __future__ import annotations

from pathlib import Path

from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import find_multiple
from litgpt.tokenizer import Tokenizer

from litgpt_mm.cli import run_cli
from litgpt_mm.config import Config
from litgpt_mm.training.loop import PRETRAIN_EVAL, PRETRAIN_TRAIN, optimizer_spec
from litgpt_mm.training.xla import xla_fabric


def setup(
    model_name: str = "phi-2-moe",
    model_config: Path | None = None,
    data: str = "gutenberg",
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    devices: int | str = "auto",
    num_nodes: int = 1,
    fsdp: bool = True,
    precision: str = "bf16-true",
    train: TrainArgs = PRETRAIN_TRAIN,
    eval: EvalArgs = PRETRAIN_EVAL,
    optimizer: str | dict = "AdamW",
    resume: bool | str | Path = False,
    seed: int = 42,
    num_workers: int = 4,
) -> None:
    """Arguments as in `recipes/pretrain_moe.py`; `fsdp=False` runs plain data parallelism (`XLAStrategy`)."""
    optimizer = optimizer_spec(optimizer)
    config = Config.from_file(model_config) if model_config else Config.from_name(model_name)
    config = config.replace(moe_impl="static")
    data_dir = Path(data_dir or f"data/prepared/{data}")
    vocab = Tokenizer(data_dir / "tokenizer").vocab_size
    config = config.replace(vocab_size=vocab, padded_vocab_size=find_multiple(vocab, 128))
    fabric = xla_fabric(devices, fsdp, precision, num_nodes)
    from litgpt_mm import pretrain as recipe

    fabric.launch(
        recipe.main,
        config,
        data_dir,
        Path(out_dir or f"out/pretrain/{config.name}-{data}-xla"),
        Tokenizer(data_dir / "tokenizer"),
        train,
        eval,
        optimizer,
        False,
        False,
        resume,
        seed,
        num_workers,
    )


if __name__ == "__main__":
    run_cli(setup)
