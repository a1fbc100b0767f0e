"""The `litgpt-mm` command: every stage as a subcommand, in litgpt's style (`litgpt pretrain|finetune|...`).

    litgpt-mm --help                         # the stages
    litgpt-mm align --help                   # one stage's flags (the same as `python recipes/align.py --help`)
    litgpt-mm prepare gutenberg --vocab_size 4096

The scripts users already know (`recipes/*.py`, `scripts/*.py`, `generate/mm.py`) call `run_command` with their
stage's name, so a script and its subcommand parse the same flags and run the same code.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

import torch

from litgpt_mm.cli import run_cli

# subcommand -> "module:function" (or a group of them); imported only when that subcommand runs (or for `--help`)
COMMANDS: dict[str, Any] = {
    "pretrain": "litgpt_mm.pretrain:setup",
    "pretrain_dense": "litgpt_mm.pretrain_dense:setup",
    "pretrain_clip": "litgpt_mm.pretrain_clip:setup",
    "align": "litgpt_mm.align:setup",
    "finetune": "litgpt_mm.finetune.qlora:setup",
    "generate": "litgpt_mm.generate:main",
    "chat": "litgpt_mm.deploy.app:main",
    "serve": "litgpt_mm.deploy.serve:main",
    "evaluate": {
        "_help": "Evaluate a checkpoint beside blind and shuffled-image baselines.",
        **{task: f"litgpt_mm.eval.evaluate:{task}" for task in ("lm", "pope", "caption", "vqa", "speech")},
    },
    "export": "litgpt_mm.export.convert:export",
    "prepare": {
        "_help": "Download (or take the bundled sample of) a dataset and write its training files.",
        **{
            name: f"litgpt_mm.data.prepare_{name}:prepare"
            for name in ("gutenberg", "coco", "llava_instruct", "redpajama", "shapes")
        },
    },
    "compare": "litgpt_mm.compare:main",
    "capacity": "litgpt_mm.analysis.capacity_plan:main",
    "experts": "litgpt_mm.analysis.experts:analyse",
    "consolidate": "litgpt_mm.training.consolidate:consolidate",
    "tiny_whisper": "litgpt_mm.deploy.tiny_whisper:main",
    "demo": "litgpt_mm.demo:main",
    "gpu-check": "litgpt_mm.gpu_check:main",
}
# training stages compute fp32 matmuls in TF32 on GPUs that have it, as litgpt's recipes do
TF32 = {"pretrain", "pretrain_dense", "pretrain_clip", "align", "finetune"}


def resolve(spec: Any) -> Any:
    """The function named by `"module:function"`, or a dict of them for a group."""
    if isinstance(spec, dict):
        return {name: sub if name == "_help" else resolve(sub) for name, sub in spec.items()}
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def bare_bools(fn: Any, args: list[str]) -> list[str]:
    """`--flag` with no value means `--flag true` for a bool parameter (`scripts/demo.py --long`)."""
    if not callable(fn):
        return args
    flags = {f"--{n}" for n, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    return [
        f"{arg}=true" if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("--")) else arg
        for i, arg in enumerate(args)
    ]


def run_command(*path: str, args: list[str] | None = None) -> Any:
    """Run the stage `path` (`"align"`, or `"prepare", "coco"`) on `args` (default `sys.argv[1:]`), as its script."""
    spec = COMMANDS
    for name in path:
        spec = spec[name]
    component = resolve(spec)
    if isinstance(component, dict):  # the script is the group: its subcommands are the script's
        component = {name: fn for name, fn in component.items() if name != "_help"}
    if path[0] in TF32:
        torch.set_float32_matmul_precision("high")
    args = bare_bools(component, list(sys.argv[1:] if args is None else args))
    # bitsandbytes' optimizers have an untyped `params`
    return run_cli(component, args=args, fail_untyped=False)


def main(args: list[str] | None = None) -> Any:
    """`litgpt-mm <stage> [flags]`: only the named stage's code is imported (all of them for the full `--help`)."""
    args = list(sys.argv[1:] if args is None else args)
    name = args[0] if args and args[0] in COMMANDS else None
    component = resolve({name: COMMANDS[name]} if name else COMMANDS)
    if name in TF32:
        torch.set_float32_matmul_precision("high")
    if name:
        args = [name, *bare_bools(component[name], args[1:])]
    return run_cli(component, args=args, fail_untyped=False)


def cli() -> None:
    """The console script: `gpu-check`'s result is the exit status, as `python scripts/gpu_check.py`'s."""
    result = main()
    if sys.argv[1:2] == ["gpu-check"]:
        sys.exit(result)


if __name__ == "__main__":
    cli()
