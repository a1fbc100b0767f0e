"""Shared helpers for the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from litgpt_mm import REPO_ROOT

# `make gpu-check` points this elsewhere, so that the committed results stay untouched
RESULTS = Path(os.environ.get("LITGPT_MM_BENCH_RESULTS") or REPO_ROOT / "benchmarks" / "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median wall-clock seconds of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, iters: int = 5
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that drift in the machine hits all alike; each round
    runs them in a new (seeded) order, so that no function always follows the same one (a large one leaves the
    allocator and caches cold for whatever comes next)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iters):
        order = list(fns.items())
        random.Random(i).shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(device: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((k.lower() for k in ("H100", "H200", "A100") if k in name), "cuda")


def save(name: str, device: torch.device, rows: list[dict], notes: list[str], params: dict) -> Path:
    """Write `results/<name>_<device>.json` and `.md` and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}_{device_tag(device)}"
    payload = {"benchmark": name, "machine": machine(device), "params": params, "rows": rows, "notes": notes}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    cols = list(rows[0])
    lines = [f"# {name} ({device_tag(device)})", "", f"machine: `{json.dumps(payload['machine'])}`", ""]
    lines += [f"params: `{json.dumps(params)}`", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return stem


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
