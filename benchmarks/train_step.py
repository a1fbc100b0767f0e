"""One optimizer step (forward, loss, backward, AdamW) of our dense Phi-2 vs Hugging Face `PhiForCausalLM`.

Both models get the same config and the same weights (converted with litgpt's own `copy_weights_phi`), and their
logits are compared before timing. The MoE model with the same trunk is timed too, with its tokens/s and its
FLOPs utilisation counted on active parameters only.

    python benchmarks/train_step.py                           # CPU, fp32, small phi-2-shaped model
    python benchmarks/train_step.py --device cuda --n_layer 32 --compile   # full phi-2 shape, bf16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from litgpt_mm.analysis.bench import save, timeit_interleaved
from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.training.flops import active_params, peak_flops, training_flops_per_token


def hf_phi(cfg: Config, lit_state: dict):
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_phi
    from transformers import PhiConfig, PhiForCausalLM

    hf_cfg = PhiConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_query_groups,
        partial_rotary_factor=cfg.rotary_percentage,
        max_position_embeddings=cfg.block_size,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu_new",
        rope_theta=cfg.rope_base,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    model = PhiForCausalLM(hf_cfg)
    state: dict = {}
    copy_weights_phi(cfg, state, lit_state)
    model.load_state_dict(state)
    return model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n_layer", type=int, default=None, help="default 4 on CPU, 32 on CUDA")
    p.add_argument("--n_embd", type=int, default=None, help="multiple of 80; default 320 (CPU), 2560 (CUDA)")
    p.add_argument("--seq_len", type=int, default=None, help="default 256 on CPU, 2048 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 4 on CUDA")
    p.add_argument("--moe_n_layer", type=int, default=None, help="MoE model depth; default n_layer (CPU), 16 (CUDA)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of our models")
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args()


def sizes(args: argparse.Namespace, cuda: bool) -> dict[str, int]:
    """The flags with the device's defaults filled in."""
    n_layer = args.n_layer or (32 if cuda else 4)
    return dict(
        n_layer=n_layer,
        moe_n_layer=args.moe_n_layer or (min(n_layer, 16) if cuda else n_layer),
        n_embd=args.n_embd or (2560 if cuda else 320),
        seq_len=args.seq_len or (2048 if cuda else 256),
        batch=args.batch or 4,
        vocab=51200 if cuda else 4096,
    )


def configs(size: dict[str, int]) -> tuple[Config, Config]:
    """The dense phi-2 of these sizes, and the phi-2-moe with the same trunk (and its own depth)."""
    D, vocab = size["n_embd"], size["vocab"]
    base = dict(
        n_layer=size["n_layer"],
        n_embd=D,
        n_head=D // 80,
        block_size=size["seq_len"],
        vocab_size=vocab,
        padded_vocab_size=vocab,
    )
    dense_cfg = Config.from_name("phi-2", **base)
    moe_cfg = Config.from_name("phi-2-moe", **dict(base, n_layer=size["moe_n_layer"]), moe_intermediate_size=D)
    return dense_cfg, moe_cfg


def build(cfg: Config, device: torch.device) -> GPT:
    """Our model of `cfg`, built and initialised in place: the phi-2 shape is slow to initialise on a CPU."""
    with device:
        model = GPT(cfg)
        model.apply(model._init_weights)
    return model


def make_step(model, inp: torch.Tensor, tgt: torch.Tensor, is_hf: bool, fused: bool):
    """One full optimizer step (forward, loss, backward, AdamW) of `model`."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)

    def step():
        out = model(inp)
        logits = out.logits if is_hf else out
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
        if not is_hf and model.config.n_expert:
            loss = loss + model.moe_aux_objective()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: dict, device: torch.device, iters: int, warmup: int = 2) -> dict[str, float]:
    """Interleaved median step times; NaN for every variant if they run out of memory."""
    try:
        return timeit_interleaved(steps, device, warmup=warmup, iters=iters)
    except torch.OutOfMemoryError:
        return {name: float("nan") for name in steps}
    finally:
        steps.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def result_rows(times: dict[str, float], flops: dict[str, float], tokens: int, peak: float) -> list[dict]:
    """Per variant: step time, tokens/s, speed against HF's step, and the utilisation of `peak` FLOP/s."""
    rows = []
    for name, t in times.items():
        tps = tokens / t
        rows.append(
            {
                "variant": name,
                "ms_per_step": t * 1e3,
                "tokens_per_s": tps,
                "x_vs_hf": times["hf_PhiForCausalLM"] / t,
                "MFU_active": tps * flops[name] / peak,
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = sizes(args, cuda)
    B, T = size["batch"], size["seq_len"]
    dtype = torch.bfloat16 if cuda else torch.float32
    dense_cfg, moe_cfg = configs(size)

    # ours and HF's dense model with the same weights, and how far apart their logits are
    torch.manual_seed(0)
    ours = build(dense_cfg, device)
    with device:
        hf = hf_phi(dense_cfg, ours.state_dict())
    x = torch.randint(0, size["vocab"], (B, T + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]
    ours.to(device=device, dtype=dtype)
    hf.to(device=device, dtype=dtype)
    with torch.no_grad():
        diff = (ours(inp[:1]).float() - hf(inp[:1]).logits.float()).abs().max().item()

    # each model is timed, then let go of, before the next one is built
    peak = peak_flops(device, dtype)
    dense_flops = training_flops_per_token(ours, T)
    times = measure(
        {
            "ours_dense": make_step(ours, inp, tgt, False, cuda),
            "hf_PhiForCausalLM": make_step(hf, inp, tgt, True, cuda),
        },
        device,
        args.iters,
    )
    flops = {"ours_dense": dense_flops, "hf_PhiForCausalLM": dense_flops}
    del hf
    if args.compile:
        compiled = make_step(torch.compile(ours), inp, tgt, False, cuda)
        times.update(measure({"ours_dense_compiled": compiled}, device, args.iters, warmup=3))
        flops["ours_dense_compiled"] = dense_flops
    del ours
    torch.manual_seed(0)
    moe = build(moe_cfg, device)
    moe.to(dtype=dtype)
    times.update(measure({"ours_moe": make_step(moe, inp, tgt, False, cuda)}, device, args.iters))
    flops["ours_moe"] = training_flops_per_token(moe, T)

    notes = [
        f"ours vs HF PhiForCausalLM, same weights: max |logit diff| = {diff:.2e}",
        f"ours dense is {times['hf_PhiForCausalLM'] / times['ours_dense']:.2f}x HF's step time (target >= 1.2x)",
        f"MoE active params {active_params(moe) / 1e6:.1f}M; MFU counts 6*N_active + 12*L*d*T FLOPs per token "
        f"against a peak of {peak / 1e12:.1f} TFLOP/s ({'datasheet' if cuda else 'measured matmul on this CPU'})",
    ]
    params = dict(size, dtype=str(dtype), n_expert=moe_cfg.n_expert)
    save("train_step", device, result_rows(times, flops, B * T, peak), notes, params)


if __name__ == "__main__":
    main()
