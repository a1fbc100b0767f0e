import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gutenberg_dir() -> Path:
    return DATA / "gutenberg"


def load_script(relative: str):
    """Import a script under `recipes/`, `scripts/` or `benchmarks/` as a module."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(args: list[str], timeout: float = 600, **kwargs):
    """Run `python <args>` from the repo root in a child process with a fixed thread count; raise on failure."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0", **kwargs.pop("env", {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    return proc


@pytest.fixture(scope="session")
def prepared_gutenberg(tmp_path_factory) -> Path:
    """The 13 bundled books prepared with a small BPE vocabulary (shared by the pretraining tests)."""
    out = tmp_path_factory.mktemp("prepared") / "gutenberg"
    load_script("scripts/prepare_gutenberg.py").prepare(out_dir=out, vocab_size=1024)
    return out
