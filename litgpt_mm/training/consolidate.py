"""Turn a sharded checkpoint (`step-*/sharded/`, written by FSDP runs of our recipes) into litgpt's single-file layout.

    python scripts/consolidate_checkpoint.py out/pretrain/run/step-001000       # writes step-001000/lit_model.pth
    python scripts/consolidate_checkpoint.py out/pretrain/run/final --out_dir out/phi-2-moe

The result (`lit_model.pth`, `model_config.yaml`, tokenizer files) is what `litgpt_mm.model.load_model`,
`generate/mm.py`, litgpt's tools and the Hugging Face export read. It runs in one process without a process group and
needs the whole model (not the optimizer) in CPU memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from litgpt_mm.training.checkpoint import atomic_torch_save, copy_tokenizer_files
from litgpt_mm.training.loop import SHARDED_DIR, consolidate_sharded


def consolidate(checkpoint_dir: Path, out_dir: Path | None = None) -> Path:
    """Write `out_dir/lit_model.pth` (default: into `checkpoint_dir`) from `checkpoint_dir/sharded/`.

    Args:
        checkpoint_dir: a `step-*` (or `final`) directory of a sharded run.
        out_dir: where the single-file checkpoint goes; its config and tokenizer files are copied along.
    """
    checkpoint_dir = Path(checkpoint_dir)
    sharded = checkpoint_dir / SHARDED_DIR
    if not sharded.is_dir():
        raise FileNotFoundError(
            f"{sharded} does not exist: pass a step-* or final directory of a sharded (--strategy fsdp) run"
        )
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir
    full = consolidate_sharded(sharded)
    if "model" not in full:
        raise ValueError(f"{sharded} holds no model weights: it was not written by litgpt-mm's training loop")
    atomic_torch_save({"model": full["model"]}, out_dir / "lit_model.pth")
    if out_dir.resolve() != checkpoint_dir.resolve():
        if (config := checkpoint_dir / "model_config.yaml").is_file():
            shutil.copy2(config, out_dir / config.name)
        copy_tokenizer_files(checkpoint_dir, out_dir)
    print(f"Wrote {out_dir / 'lit_model.pth'} ({len(full['model'])} tensors)")
    return out_dir / "lit_model.pth"
