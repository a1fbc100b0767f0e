"""FLOP counts on active parameters only, and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from litgpt_mm.models.moe import MoE

# Dense bf16 tensor-core peaks (no sparsity) for chips Lightning's table does not parse (e.g. "NVIDIA H200").
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# bf16 dense peak per TPU chip (Google Cloud TPU documentation), for generations Lightning's table lacks.
TPU_PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v6e": 918e12}
MEASURE_BUDGET_S = 0.5


def active_params(model: nn.Module) -> int:
    """Parameters touched by one token: everything but the embedding table and the (E - k) unused experts."""
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("wte.weight"))
    for m in model.modules():
        if isinstance(m, MoE):
            E, k = m.config.n_expert, m.config.n_expert_per_token
            per_expert = sum(p[0].numel() for p in (m.w1, m.w2, m.b1, m.b2) if p is not None)
            total -= (E - k) * per_expert
    return total


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 N_active + 12 L d T (PaLM appendix B): forward and backward of the matmuls plus attention."""
    cfg = model.config
    return 6 * active_params(model) + 12 * cfg.n_layer * cfg.n_embd * seq_len


def compute_dtype(precision: str | None) -> torch.dtype:
    """The dtype a Fabric precision setting (`32-true`, `bf16-mixed`, `16-true`, ...) runs its matmuls in."""
    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16); elsewhere bf16 is emulated
    and can be 100x slower than fp32."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().lower() in ("arm64",)  # Apple silicon
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_if_slow_bf16(device: torch.device | str, precision: str | None) -> None:
    """Warn once when a bf16 run is about to compute on a CPU that emulates bf16."""
    if torch.device(device).type == "cpu" and compute_dtype(precision) == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn(
            f"precision {precision!r} on a CPU without native bf16 (no avx512_bf16/AMX): bf16 matmuls are emulated "
            "and can be ~100x slower than fp32; use --precision 32-true",
            stacklevel=2,
        )


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device computing in `dtype`.

    GPUs and TPUs: Lightning's datasheet table (`get_available_flops`), then ours for chips it does not parse.
    CPUs (and unknown accelerators): the best large-matmul throughput in `dtype`, measured in well under a second
    and cached per machine, thread count and dtype under `~/.cache/litgpt-mm/`.
    """
    device = torch.device(device)
    if device.type == "xla" and os.environ.get("PJRT_DEVICE") == "CPU":
        return peak_flops(torch.device("cpu"), torch.float32)  # XLA's CPU backend runs on the host in fp32
    if device.type in ("cuda", "xla"):
        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "FLOPs not found for ...": our table covers those below
            found = get_available_flops(device, dtype)
        if found:
            return float(found)
    if device.type == "xla":
        from torch_xla._internal import tpu

        version = f"v{tpu.version()}"
        for key, value in TPU_PEAK_FLOPS.items():
            if version.startswith(key):
                return value
        raise ValueError(f"unknown TPU {version}: add its bf16 peak to TPU_PEAK_FLOPS")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return _cached_measurement(device, dtype)


def _cache_file() -> Path:
    root = os.environ.get("LITGPT_MM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "litgpt-mm" / "peak_flops.json"


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    threads = torch.get_num_threads()
    return f"{device.type}|{name}|{os.cpu_count()} cpus|{threads} threads|torch {torch.__version__}|{dtype}"


def refresh_peak_flops(device: torch.device, dtype: torch.dtype, at_least: float) -> float:
    """A run went faster than the cached CPU peak, so that measurement was taken on a busy machine: measure again and
    cache the larger of the new measurement and the throughput the run reached (a peak is never below it)."""
    value = max(measure_matmul_flops(device, dtype), at_least)
    _store(device, dtype, value)
    return value


def _cached_measurement(device: torch.device, dtype: torch.dtype) -> float:
    path, key = _cache_file(), _machine_key(device, dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    value = measure_matmul_flops(device, dtype)
    _store(device, dtype, value)
    return value


def _store(device: torch.device, dtype: torch.dtype, value: float) -> None:
    from litgpt_mm.training.checkpoint import atomic_write

    path, key = _cache_file(), _machine_key(device, dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    try:
        cache[key] = value
        atomic_write(path, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    except OSError:
        pass  # a read-only home only costs the next process another half second


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = MEASURE_BUDGET_S) -> float:
    """Best square-matmul FLOP/s within `budget_s`: the size doubles from 256 until one product takes ~10 ms (so an
    emulated dtype stays at small sizes), then the best of the remaining repetitions counts."""

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    deadline = time.perf_counter() + budget_s
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timed(a, b)  # warm-up
        seconds = timed(a, b)
        if seconds > 0.01 or n >= 4096 or time.perf_counter() + 8 * seconds > deadline:
            break
        n *= 2
    best = seconds
    while time.perf_counter() + best < deadline:
        best = min(best, timed(a, b))
    return 2 * n**3 / best
