"""Export a trained multimodal checkpoint for other engines: a Hugging Face directory or GGUF files.

    python scripts/export.py --checkpoint_dir out/qlora_instruct/merged --out_dir out/export/hf --format hf
    python scripts/export.py --checkpoint_dir out/qlora_instruct/final --out_dir out/hf-llava --template llava_v1
    python scripts/export.py --checkpoint_dir out/qlora_instruct/merged --out_dir out/export/gguf --format gguf

`--checkpoint_dir` is anything `generate/mm.py` answers from: a merged model, base + LoRA + projector, or an aligned
projector (with the LM it names). `hf` writes a stock `LlavaForConditionalGeneration` directory where stock classes
express the model (dense Phi, `linear` or `mlp2x_gelu` projector), else a `trust_remote_code` package; see
`docs/deploy.md`. The export is written into a temporary directory beside `--out_dir` and renamed into place when
complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal


def export(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    out_dir: Path | None = None,
    format: Literal["hf", "gguf"] = "hf",
    template: str = "phi2",
    layout: Literal["auto", "llava", "remote"] = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    overwrite: bool = False,
) -> Path:
    """Export `checkpoint_dir` into `out_dir`.

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory.
        out_dir: the directory to write (must not exist or be empty, unless `--overwrite true`; default
            `out/export/<format>`).
        format: `hf` (transformers / vLLM directory) or `gguf` (llama.cpp files).
        template: `hf`: the prompt template the model was tuned with (`phi2`, `llava_v1`, `plain`), rendered by the
            chat template.
        layout: `hf`: `llava` (stock classes), `remote` (trust_remote_code package) or `auto` (llava wherever it can
            express the model).
        dtype: `hf`: the weights' dtype (`float32` computes what our model computes; `bfloat16` halves the size).
        overwrite: replace an existing non-empty `out_dir` (only once the new export is complete).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir or f"out/export/{format}")
    if format not in ("hf", "gguf"):
        raise ValueError(f"--format {format!r}: choose hf or gguf")
    if not checkpoint_dir.is_dir():
        raise ValueError(f"--checkpoint_dir {checkpoint_dir} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"--out_dir {out_dir} exists and is not empty: choose another or pass --overwrite true")
    if format == "gguf":
        try:
            from litgpt_mm.export.gguf import export_gguf
        except ModuleNotFoundError as err:
            if err.name != "litgpt_mm.export.gguf":
                raise
            raise ValueError("--format gguf: this checkout has no GGUF exporter (litgpt_mm/export/gguf.py)") from None

        def write(tmp: Path) -> str:
            export_gguf(checkpoint_dir, tmp)
            return "gguf"
    else:
        from litgpt_mm.export.hf import export_hf

        def write(tmp: Path) -> str:
            return export_hf(checkpoint_dir, tmp, template=template, layout=layout, dtype=dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        written = write(tmp)
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Wrote {out_dir} ({format}, {written})")
    if format == "hf":
        remote = "" if written == "llava" else " (needs trust_remote_code=True)"
        print(f"Load: AutoModelForImageTextToText.from_pretrained({str(out_dir)!r}, trust_remote_code=True){remote}")
    return out_dir


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`; an existing `target` is removed only after the move."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
