"""Forward+backward of one MoE layer: our loop, our grouped path, litgpt's LLaMAMoE, and the dense floor.

The dense floor is one GELU MLP of width k * moe_intermediate_size over the same tokens: the active expert FLOPs
with no routing at all. litgpt's LLaMAMoE experts are SwiGLU MLPs (three matrices instead of two), so its raw
time is also given per active FLOP.

    python benchmarks/moe_layer.py                  # CPU, fp32
    python benchmarks/moe_layer.py --device cuda    # bf16, phi-2 shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
from litgpt.config import Config as LitConfig
from litgpt.model import GptNeoxMLP, LLaMAMoE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timeit_interleaved  # noqa: E402

from litgpt_mm.config import Config  # noqa: E402
from litgpt_mm.moe import MoE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--n_embd", type=int, default=None, help="default 512 on CPU, 2560 (phi-2) on CUDA")
    p.add_argument("--moe_intermediate_size", type=int, default=None, help="default 2 * n_embd on CPU, 2560 on CUDA")
    p.add_argument("--n_expert", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
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
    ours = {
        impl: MoE(Config(**common, moe_intermediate_size=H, moe_impl=impl, gelu_approximate="tanh"))
        for impl in ("loop", "grouped")
    }
    ours["grouped"].load_state_dict(ours["loop"].state_dict())
    lit = LLaMAMoE(LitConfig(**common, moe_intermediate_size=H, mlp_class_name="LLaMAMoE", intermediate_size=H))
    dense = GptNeoxMLP(LitConfig(n_embd=D, n_head=common["n_head"], intermediate_size=k * H, gelu_approximate="tanh"))
    modules: dict[str, nn.Module] = {
        "ours_loop": ours["loop"],
        "ours_grouped": ours["grouped"],
        "litgpt_LLaMAMoE": lit,
        "dense_floor": dense,
    }
    expert_flops = {  # forward FLOPs of the active expert matmuls per token
        "ours_loop": k * 2 * 2 * D * H,
        "ours_grouped": k * 2 * 2 * D * H,
        "litgpt_LLaMAMoE": k * 3 * 2 * D * H,
        "dense_floor": 2 * 2 * D * k * H,
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
    g = times["ours_grouped"]
    notes = [
        f"grouped is {times['litgpt_LLaMAMoE'] / g:.2f}x faster than litgpt's LLaMAMoE (target >= 1.5x)",
        f"grouped takes {g / times['dense_floor']:.2f}x the dense floor (target <= {'1.3' if cuda else '2'}x)",
        f"grouped vs our loop: {times['ours_loop'] / g:.2f}x",
        f"ceiling: the dense floor itself is {times['litgpt_LLaMAMoE'] / times['dense_floor']:.2f}x faster than "
        "litgpt's LLaMAMoE",
        "litgpt's experts are SwiGLU (1.5x the matmul FLOPs of ours at the same width); TFLOP_s_experts counts each "
        "variant's own expert FLOPs (forward + backward = 3x forward)",
    ]
    params = dict(tokens=N, n_embd=D, moe_intermediate_size=H, n_expert=E, top_k=k, dtype=str(dtype))
    save("moe_layer", device, rows, notes, params)


if __name__ == "__main__":
    main()
