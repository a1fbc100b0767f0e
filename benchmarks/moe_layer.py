"""Forward+backward of one MoE layer: our loop, our grouped path, litgpt's LLaMAMoE, and the dense floor.

The dense floor is one GELU MLP of width k * moe_intermediate_size over the same tokens: the active expert FLOPs
with no routing at all. litgpt's LLaMAMoE experts are SwiGLU MLPs (three matrices instead of two), so its raw
time is also given per active FLOP.

`ours_grouped` is the grouped path with its torch glue, `ours_grouped_fused` the same with the Triton glue of
`litgpt_mm/moe_kernels.py` (CUDA only; on CPU the kernels run only under Triton's interpreter, for tests). The
`gemms_*` rows time the six matmuls of forward + backward alone: grouped (`torch._grouped_mm`, or one matmul per
expert off CUDA) on the routed slots, and dense on the dense floor's shapes; what a variant spends beyond its GEMMs
is routing and glue.

    python benchmarks/moe_layer.py                  # CPU, fp32
    python benchmarks/moe_layer.py --device cuda    # bf16, phi-2 shapes
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn as nn
from litgpt.config import Config as LitConfig
from litgpt.model import GptNeoxMLP, LLaMAMoE

from litgpt_mm.analysis.bench import save, timeit_interleaved
from litgpt_mm.config import Config
from litgpt_mm.models import moe_kernels
from litgpt_mm.models.moe import MoE, grouped_matmul


def gemm_steps(
    moe: MoE, x: torch.Tensor, grad: torch.Tensor, k: int, dtype: torch.dtype
) -> dict[str, Callable[[], None]]:
    """Forward + backward of the two expert matmuls alone (six GEMMs): grouped over the slots `moe` routes `x` to,
    and dense over the dense floor's shapes (same FLOPs)."""
    N, D = x.shape[-2:]
    E, H = moe.w1.shape[:2]
    with torch.no_grad():
        _, top_idx = moe.route(x.reshape(N, D).float())
    offs = torch.cumsum(torch.bincount(top_idx.reshape(-1), minlength=E), 0, dtype=torch.int32)
    xs = torch.randn(N * k, D, device=x.device, dtype=dtype, requires_grad=True)
    w1, w2 = (moe.w1.detach().to(dtype).requires_grad_(), moe.w2.detach().to(dtype).requires_grad_())
    xd = x.detach().reshape(N, D).requires_grad_()
    wd1 = torch.randn(k * H, D, device=x.device, dtype=dtype, requires_grad=True)
    wd2 = torch.randn(D, k * H, device=x.device, dtype=dtype, requires_grad=True)
    grad_s = torch.randn(N * k, D, device=x.device, dtype=dtype)

    def grouped() -> None:
        grouped_matmul(grouped_matmul(xs, w1, offs), w2, offs).backward(grad_s)

    def dense() -> None:
        ((xd @ wd1.t()) @ wd2.t()).backward(grad.reshape(N, D))

    return {"gemms_grouped": grouped, "gemms_dense": dense}


def max_rel_error(a: MoE, b: MoE, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Largest relative (norm) difference between two MoE layers' outputs and input, w1 and router gradients."""
    results = []
    for m in (a, b):
        m.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        y = m(xi)
        y.backward(grad)
        results.append([y, xi.grad, m.w1.grad, m.router.weight.grad])
        m.zero_grad(set_to_none=True)
    return max(((u.float() - v.float()).norm() / v.float().norm()).item() for u, v in zip(*results, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--n_embd", type=int, default=None, help="default 512 on CPU, 2560 (phi-2) on CUDA")
    p.add_argument("--moe_intermediate_size", type=int, default=None, help="default 2 * n_embd on CPU, 2560 on CUDA")
    p.add_argument("--n_expert", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--no_save", action="store_true", help="print the table without writing results/")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    N = args.tokens or (16384 if cuda else 4096)
    D = args.n_embd or (2560 if cuda else 512)
    H = args.moe_intermediate_size or (2560 if cuda else 2 * D)
    E, k = args.n_expert, args.top_k
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    common = dict(n_embd=D, n_head=max(1, D // 64), n_layer=1, n_expert=E, n_expert_per_token=k)
    fused = cuda and moe_kernels.kernels_available(device)
    ours = {
        name: MoE(Config(**common, moe_intermediate_size=H, moe_impl=name.split("_")[0], gelu_approximate="tanh"))
        for name in ["loop", "grouped"] + (["grouped_fused"] if fused else [])
    }
    for name, m in ours.items():
        m.fused_glue = name == "grouped_fused"
        m.load_state_dict(ours["loop"].state_dict())
    lit = LLaMAMoE(LitConfig(**common, moe_intermediate_size=H, mlp_class_name="LLaMAMoE", intermediate_size=H))
    dense = GptNeoxMLP(LitConfig(n_embd=D, n_head=common["n_head"], intermediate_size=k * H, gelu_approximate="tanh"))
    modules: dict[str, nn.Module] = {f"ours_{name}": m for name, m in ours.items()}
    modules |= {"litgpt_LLaMAMoE": lit, "dense_floor": dense}
    expert_flops = {  # forward FLOPs of the active expert matmuls per token
        "ours_loop": k * 2 * 2 * D * H,
        "ours_grouped": k * 2 * 2 * D * H,
        "ours_grouped_fused": k * 2 * 2 * D * H,
        "litgpt_LLaMAMoE": k * 3 * 2 * D * H,
        "dense_floor": 2 * 2 * D * k * H,
        "gemms_grouped": k * 2 * 2 * D * H,
        "gemms_dense": 2 * 2 * D * k * H,
    }
    x = torch.randn(1, N, D, device=device, dtype=dtype)
    grad = torch.randn_like(x)

    steps = {}
    for name, m in modules.items():
        m.to(device=device, dtype=dtype).train()

        def step(m=m):
            xi = x.detach().requires_grad_(True)
            m(xi).backward(grad)

        steps[name] = step
    steps |= gemm_steps(ours["grouped"], x, grad, k, dtype)
    fused_error = max_rel_error(ours["grouped_fused"], ours["grouped"], x, grad) if fused else None
    times = timeit_interleaved(steps, device, iters=args.iters)

    rows = []
    for name, t in times.items():
        rows.append(
            {
                "variant": name,
                "ms_fwd_bwd": t * 1e3,
                "tokens_per_s": N / t,
                "x_vs_litgpt": times["litgpt_LLaMAMoE"] / t,
                "x_of_dense_floor": t / times["dense_floor"],
                "TFLOP_s_experts": 3 * expert_flops[name] * N / t / 1e12,
            }
        )
    params = dict(tokens=N, n_embd=D, moe_intermediate_size=H, n_expert=E, top_k=k, dtype=str(dtype))
    notes = summary(times, cuda, fused_error)
    if args.no_save:
        print(json.dumps(dict(params=params, rows=rows, notes=notes), indent=1))
    else:
        save("moe_layer", device, rows, notes, params)


def summary(times: dict[str, float], cuda: bool, fused_error: float | None) -> list[str]:
    """The notes under the table: targets, the grouped GEMMs against the dense ones, the fused glue."""
    g, floor = times["ours_grouped"], times["dense_floor"]
    gemms, dense_gemms = times["gemms_grouped"], times["gemms_dense"]
    notes = [
        f"grouped is {times['litgpt_LLaMAMoE'] / g:.2f}x faster than litgpt's LLaMAMoE (target >= 1.5x)",
        f"grouped takes {g / floor:.2f}x the dense floor (target <= {'1.3' if cuda else '2'}x)",
        f"grouped vs our loop: {times['ours_loop'] / g:.2f}x",
        f"ceiling: the dense floor itself is {times['litgpt_LLaMAMoE'] / floor:.2f}x faster than litgpt's LLaMAMoE",
        f"the six grouped GEMMs alone take {gemms / dense_gemms:.2f}x the six dense ones ({gemms * 1e3:.3g} vs "
        f"{dense_gemms * 1e3:.3g} ms); beyond its GEMMs, ours_grouped spends {(g - gemms) * 1e3:.3g} ms on routing "
        f"and glue, the dense floor {(floor - dense_gemms) * 1e3:.3g} ms on bias and GELU"
        + (
            "" if cuda else " (off CUDA the grouped GEMMs are one autograd matmul per expert, ours_grouped a fused one)"
        ),
    ]
    if "ours_grouped_fused" in times:
        f = times["ours_grouped_fused"]
        notes += [
            f"grouped with the Triton glue takes {f / floor:.2f}x the dense floor, {g / f:.2f}x faster than with the "
            f"torch glue; routing and glue beyond the GEMMs: {(f - gemms) * 1e3:.3g} ms",
            f"Triton glue vs torch glue: largest relative difference of output and gradients {fused_error:.2e}",
        ]
    else:
        notes.append("ours_grouped_fused not timed: the Triton glue runs on CUDA (on CPU only under the interpreter)")
    notes.append(
        "litgpt's experts are SwiGLU (1.5x the matmul FLOPs of ours at the same width); TFLOP_s_experts counts each "
        "variant's own expert FLOPs (forward + backward = 3x forward)"
    )
    return notes


if __name__ == "__main__":
    main()
