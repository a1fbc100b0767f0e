"""FLOP counts on active parameters only, for throughput and MFU of dense and MoE models."""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

from litgpt_mm.moe import MoE

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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


# bf16 dense peak per TPU chip (Google Cloud TPU documentation)
TPU_PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v6e": 918e12}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Datasheet peak for known GPUs and TPUs; on other devices a measured large-matmul throughput in `dtype`."""
    if device.type == "xla" and os.environ.get("PJRT_DEVICE") == "CPU":
        return peak_flops(torch.device("cpu"), torch.float32)  # XLA's CPU backend runs on the host
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
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
