"""Atomic checkpoint files in litgpt's layout (`lit_model.pth`, `model_config.yaml`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch
import yaml


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temporary file in the same directory and `os.replace` it into place.

    A reader (or a resumed run) sees either the old file or the complete new one, never a torn write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` that never leaves a partial file behind."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_config(config: Any, checkpoint_dir: Path) -> None:
    """Write `model_config.yaml` like `litgpt.utils.save_config`, atomically."""
    text = yaml.dump(asdict(config))
    atomic_write(Path(checkpoint_dir) / "model_config.yaml", lambda f: f.write(text.encode("utf-8")))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever tokenizer files `src` has into `dst`; returns their names."""
    import shutil

    found = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return found


def load_tokenizer(directory: Path, made_by: str = "`litgpt download` or one of our recipes"):
    """litgpt's `Tokenizer` for `directory`, or one clear error naming the directory and what writes it."""
    from litgpt.tokenizer import Tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist: expected a tokenizer directory written by {made_by}")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"{directory} holds no tokenizer (tokenizer.json or tokenizer.model): pass a directory written by {made_by}"
        )
    return Tokenizer(directory)
