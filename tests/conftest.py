import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_TORCH_XLA", "0")  # see litgpt_mm/__init__.py; child processes inherit it
# `make test` runs two pytest-xdist workers: each (and every child process it starts) gets its share of the cores
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gutenberg_dir() -> Path:
    return DATA / "gutenberg"


def require_tool(name: str, apt_package: str) -> str:
    """Path of a system executable. Missing: skip with a reason, or fail in CI (`.ci/run` installs it)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs it with apt-get ({apt_package})")
        pytest.skip(f"needs the system package {apt_package} (apt-get install {apt_package})")
    return path


def script_command(script: str) -> tuple[str, ...]:
    """The `litgpt-mm` subcommand an entry script runs: the names in its `run_command(...)` call."""
    import ast

    call = re.search(r"run_command\(([^)]*)\)", (REPO / script).read_text())
    assert call, f"{script} does not call run_command"
    return tuple(ast.literal_eval(f"[{call[1]}]"))


def run_python(args: list[str], timeout: float = 600, **kwargs):
    """Run `python <args>` from the repo root in a child process with a fixed thread count; raise on failure."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONHASHSEED": "0", **kwargs.pop("env", {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    return proc


def cli_here(capfd, fn, args: list[str], **kwargs) -> tuple[int, str, str]:
    """`python <script> <args>` without a new interpreter: `run_cli(fn, args)` here, or the entry script's own
    `run_command` where `fn` is the script's path; (exit status, stdout, stderr)."""
    from litgpt_mm.__main__ import run_command
    from litgpt_mm.cli import run_cli

    capfd.readouterr()
    cwd = os.getcwd()
    os.chdir(REPO)  # as `run_python`: relative paths (`--config recipes/configs/...`) are from the repo root
    try:
        if isinstance(fn, str):
            run_command(*script_command(fn), args=args)
        else:
            run_cli(fn, args=args, **kwargs)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(cwd)
    out, err = capfd.readouterr()
    return code, out, err


def run_recipe_here(capfd, args: list[str]) -> subprocess.CompletedProcess:
    """`run_python(["recipes/<x>.py", ...])` for a single-process run, in this process (no interpreter start-up and
    imports: seconds per run on 2 cores). Only what must be a child process (SIGKILL, several ranks) needs one."""
    code, out, err = cli_here(capfd, args[0], args[1:])
    return subprocess.CompletedProcess(args, code, out, err)


class NoBf16OnCpu(TorchDispatchMode):
    """Records every operator that reads or writes a bf16 tensor on the CPU while active: on CPUs without native bf16
    such an operator is emulated, up to 100x slower than fp32, so no default CPU path may run one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in leaves):
            self.seen.add(str(func))
        return out


@pytest.fixture(scope="session")
def prepared_gutenberg(tmp_path_factory) -> Path:
    """The 13 bundled books prepared with a small BPE vocabulary (shared by the pretraining tests)."""
    out = tmp_path_factory.mktemp("prepared") / "gutenberg"
    import litgpt_mm.data.prepare_gutenberg

    litgpt_mm.data.prepare_gutenberg.prepare(out_dir=out, vocab_size=1024)
    return out


def pretrain_setup(**kwargs):
    """`recipes/pretrain_moe.py`'s `setup` with plain dicts for `train` and `eval`."""
    from litgpt.args import EvalArgs, TrainArgs

    kwargs["train"] = TrainArgs(**kwargs["train"])
    kwargs["eval"] = EvalArgs(**kwargs["eval"])
    import litgpt_mm.pretrain

    return litgpt_mm.pretrain.setup(**kwargs)


@pytest.fixture(scope="session")
def pretrained_tiny(prepared_gutenberg, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny MoE LM pretrained for 120 steps on the bundled books: (run directory, setup's result)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    result = pretrain_setup(
        data_dir=prepared_gutenberg,
        out_dir=out,
        model_name="phi-2-moe-tiny",
        precision="32-true",
        devices=1,
        num_workers=0,
        train=dict(
            global_batch_size=16,
            micro_batch_size=8,
            max_steps=120,
            max_seq_length=64,
            save_interval=60,
            log_interval=1,
            lr_warmup_steps=1,
            max_norm=1.0,
            min_lr=1e-4,
        ),
        eval=dict(interval=60, max_iters=8, initial_validation=True),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.1}},
    )
    return out, result


@pytest.fixture(scope="session")
def shapes_clip(tmp_path_factory) -> tuple[Path, Path]:
    """A shapes world and a small CLIP pretrained on its training images, as the demo's stage 0 (shorter):
    (world directory, CLIP run directory with `final/`)."""
    from litgpt.args import EvalArgs, TrainArgs

    root = tmp_path_factory.mktemp("shapes_clip")
    world, clip = root / "shapes", root / "clip"
    import litgpt_mm.data.prepare_shapes
    import litgpt_mm.pretrain_clip

    litgpt_mm.data.prepare_shapes.prepare(out_dir=world, n_train=CLIP_IMAGES, n_val=8, n_test=60, seed=5)
    litgpt_mm.pretrain_clip.setup(
        data_dir=world,
        out_dir=clip,
        zero_shot_images=0,
        train=TrainArgs(
            save_interval=1000,
            log_interval=10,
            global_batch_size=128,
            micro_batch_size=128,
            max_steps=CLIP_STEPS,
            lr_warmup_steps=10,
            max_norm=1.0,
            min_lr=1e-5,
        ),
        eval=EvalArgs(interval=1000, max_iters=1, initial_validation=False),
    )
    return world, clip


CLIP_IMAGES, CLIP_STEPS = 400, 60


# a short pretraining run with checkpoints every 4 steps, for kill-and-resume tests (`--key value` overrides)
SHORT_RUN = {
    "train.max_steps": 12,
    "train.lr_warmup_steps": 2,
    "train.save_interval": 4,
    "train.log_interval": 1,
    "train.micro_batch_size": 4,
    "train.global_batch_size": 8,
    "train.max_seq_length": 32,
    "eval.interval": 6,
    "eval.max_iters": 2,
}


def kill_while_saving(checkpoint_name: str, torn: bool = True) -> str:
    """`python -c` code (or a script) that runs a recipe (argv[1:]) and SIGKILLs itself when it starts writing a
    checkpoint: with `torn`, half-way through (a partial temporary directory is left behind)."""
    import textwrap

    return textwrap.dedent(
        f"""
        import os, signal, sys, runpy
        import litgpt_mm.training.loop as training
        real = training.save_checkpoint
        def save_then_die(fabric, stage, state, ckpt_dir):
            if ckpt_dir.name == {checkpoint_name!r}:
                if {torn!r}:
                    tmp = ckpt_dir.with_name("." + ckpt_dir.name + ".tmp")
                    tmp.mkdir()
                    (tmp / "torn.pth").write_bytes(b"torn")
                os.kill(os.getpid(), signal.SIGKILL)
            real(fabric, stage, state, ckpt_dir)
        training.save_checkpoint = save_then_die
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )


@pytest.fixture(scope="session")
def checkpoints(prepared_gutenberg, tmp_path_factory) -> dict:
    """A tiny LM, an aligned projector on it, a QLoRA checkpoint and its merged export (random weights)."""
    import shutil

    import yaml

    from litgpt_mm.config import Config
    from litgpt_mm.model import GPT, save_checkpoint
    from litgpt_mm.models.qlora import LoRASettings, add_lora, lora_state_dict, quantize_nf4
    from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT

    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=1024, padded_vocab_size=1024))
    save_checkpoint(lm, root / "lm")
    for f in (prepared_gutenberg / "tokenizer").iterdir():
        shutil.copy(f, root / "lm" / f.name)
    config = MultimodalConfig(clip_pretrained=None, lm_checkpoint_dir=str(root / "lm"))
    mm = MultimodalGPT(lm, config)
    torch.nn.init.normal_(mm.separator, std=1.0)
    mm.save_adapter(root / "align")
    settings = LoRASettings(dropout=0.0, mlp=True)
    add_lora(lm, settings)
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    quantize_nf4(lm)
    (root / "lora").mkdir()
    torch.save(lora_state_dict(lm), root / "lora" / "lora.pth")
    (root / "lora" / "lora_config.yaml").write_text(yaml.safe_dump({**vars(settings), "quantize": "nf4"}))
    mm.save_adapter(root / "lora")
    import litgpt_mm.finetune.qlora

    litgpt_mm.finetune.qlora.export_merged(mm, root / "lm", root / "merged")
    return {k: root / k for k in ("lm", "align", "lora", "merged")}


TIMING_COLUMNS = {"tokens_per_s", "mfu", "elapsed_s", "peak_memory_gb"}


def check_kill_and_resume(args_for, tmp_path: Path, kill_at: str, resumed_at: str, weights: str) -> None:
    """Run a recipe uninterrupted, then SIGKILL another run while it writes `kill_at`, resume it with
    `--resume auto`, and require the same logs (timing columns aside) and bit-identical `final/<weights>`.

    `args_for(out_dir)` gives the recipe's command line (script path first) for an output directory.
    """
    import csv
    import signal

    ref = run_python([*args_for(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_python(["-c", kill_while_saving(kill_at), *args_for(tmp_path / "run")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "run" / f".{kill_at}.tmp").is_dir() and not (tmp_path / "run" / "final").exists()
    resumed = run_python([*args_for(tmp_path / "run"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and resumed_at in resumed.stdout
    for name in ("train_log.csv", "val_log.csv", "expert_load.csv"):
        if not (tmp_path / "ref" / "logs" / name).is_file():
            continue
        runs = []
        for run in ("ref", "run"):
            with open(tmp_path / run / "logs" / name, newline="") as f:
                runs.append([{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)])
        assert runs[1] == runs[0], name
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file as load
    else:
        load = torch.load
    a, b = load(tmp_path / "ref" / "final" / weights), load(tmp_path / "run" / "final" / weights)
    a, b = a.get("model", a), b.get("model", b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_log(path) -> list[dict[str, str]]:
    """Rows of a training log CSV (`train_log.csv`, `val_log.csv`)."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pretrain_args(data_dir, out_dir, **overrides) -> list[str]:
    """`recipes/pretrain_moe.py` on the tiny config with `--key value` overrides, for `run_python`."""
    args = ["recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml", "--num_workers", "0"]
    args += ["--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def assert_rows_close(got: list[dict], want: list[dict], columns: tuple[str, ...], abs_tol: float = 1e-4) -> None:
    """Two logs with the same steps and `columns` equal within `abs_tol`."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for c in columns:
            assert float(g[c]) == pytest.approx(float(w[c]), abs=abs_tol), (g["step"], c, g[c], w[c])


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on the loopback address; the standard AWS variables point at it. Yields its
    endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def shard_tokens(shard_dir) -> "torch.Tensor":
    """All token ids of a local litdata `TokensLoader` shard folder, in index order (read from the chunk files)."""
    import json

    import numpy as np

    ids = []
    for chunk in json.loads((Path(shard_dir) / "index.json").read_text())["chunks"]:
        raw = (Path(shard_dir) / chunk["filename"]).read_bytes()
        n = int(np.frombuffer(raw[:4], np.uint32)[0])
        offsets = np.frombuffer(raw[4 : 4 + 4 * (n + 1)], np.uint32)
        ids.append(torch.from_numpy(np.frombuffer(raw[offsets[0] : offsets[-1]], np.int32).copy()))
    return torch.cat(ids)


# the longest tests (minutes each on 2 cores), started first: with `--dist worksteal` no worker is left alone with one
# of them at the end of the run
LONG_FIRST = (
    "test_learning.py::test_colour_answers_are_grounded_after_a_short_run",
    "test_clip.py::test_clip_pretraining_loss_falls_and_resumes_exactly_after_sigkill",
    "test_xla.py::test_generate_launcher_on_the_xla_cpu_device_matches_cpu",
    "test_sharded_checkpoint.py::test_sharded_checkpoint_resumes_on_two_and_on_one_rank_and_consolidates",
    "test_xla.py::test_pretrain_launcher_runs_on_the_xla_cpu_device",
    "test_gpu_check.py::test_cpu_dry_run",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))  # stable: the rest keep their order
