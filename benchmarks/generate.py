"""Multimodal generation speed, measured side by side in one run: time to first token and tokens/s of 64 greedy new
tokens after a 49-patch image and a short prompt.

* `ours_kv_cache`: `litgpt_mm.multimodal.generate` (image prefix fed once, one position per new token).
* `capstone_app_loop`: the original capstone's app loop, a full re-forward of the whole sequence per new token.
* `hf_generate`: Hugging Face `PhiForCausalLM.generate(inputs_embeds=...)` on the same weights and prefix.

Targets: ours >= 5x the capstone loop, >= 1x HF generate. EOS is disabled so every variant makes 64 tokens.

    python benchmarks/generate.py                 # CPU: an 8-layer, 1280-wide Phi-2-shaped LM + ViT-B/32 features
    python benchmarks/generate.py --device cuda --n_layer 32 --n_embd 2560      # the Phi-2 shape in bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from train_step import hf_phi

from litgpt_mm.analysis.bench import save
from litgpt_mm.config import Config
from litgpt_mm.model import GPT, embed_tokens, forward_embeds
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, generate


def timed(fn, iters: int) -> tuple[float, float]:
    """Median (time to first token, total time) over `iters` runs of a generator of tokens."""
    firsts, totals = [], []
    for _ in range(iters):
        start = time.perf_counter()
        first = None
        for _ in fn():
            first = first or time.perf_counter()
        totals.append(time.perf_counter() - start)
        firsts.append(first - start)
    return sorted(firsts)[len(firsts) // 2], sorted(totals)[len(totals) // 2]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="phi-2", help="a dense config name, shrunk by --n_layer/--n_embd")
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--n_embd", type=int, default=1280, help="multiple of 80 (head size 80, as phi-2)")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompt_tokens", type=int, default=24)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    return ap.parse_args()


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MultimodalGPT:
    """The dense LM shrunk by the flags (vocabulary 4096), in eval mode inside the multimodal model."""
    cfg = Config.from_name(
        args.lm,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_embd // 80,
        n_query_groups=args.n_embd // 80,
        intermediate_size=4 * args.n_embd,
        vocab_size=4096,
        padded_vocab_size=4096,
        block_size=512,
    )
    lm = GPT(cfg).to(device, dtype).eval()
    return MultimodalGPT(lm, MultimodalConfig()).to(device).eval()


def decoders(mm: MultimodalGPT, hf, feats: torch.Tensor, prompt: torch.Tensor, n: int) -> dict:
    """Generators of `n` greedy tokens after the image and the prompt: ours, the capstone loop, HF `generate`; and
    `hf_first`, HF's 1-token generate (HF generate has no streaming hook here: its time to first token)."""
    lm = mm.lm

    def ours():
        yield from generate(mm, feats, prompt, n)

    @torch.no_grad()
    def capstone():
        seq, _, _ = mm.build_inputs([feats], [prompt])
        for _ in range(n):
            token = forward_embeds(lm, seq)[:, -1].argmax(-1)
            yield int(token)
            seq = torch.cat([seq, embed_tokens(lm, token.view(1, 1))], dim=1)

    with torch.no_grad():
        embeds, _, _ = mm.build_inputs([feats], [prompt])

    @torch.no_grad()
    def hf_generate():
        out = hf.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        yield from out[0].tolist()

    @torch.no_grad()
    def hf_first():
        yield from hf.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False, pad_token_id=0)[0].tolist()

    return {"ours": ours, "capstone": capstone, "hf_generate": hf_generate, "hf_first": hf_first}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    mm = build_model(args, device, dtype)
    feats = torch.randn(1, 49, 768, device=device)
    prompt = torch.randint(0, mm.lm.config.vocab_size, (args.prompt_tokens,), device=device)
    n = args.new_tokens
    hf = hf_phi(mm.lm.config, mm.lm.state_dict()).to(device, dtype).eval()
    fn = decoders(mm, hf, feats, prompt, n)

    # the tokens compared, then each variant timed
    ours_tokens = list(fn["ours"]())
    same_capstone = ours_tokens == list(fn["capstone"]())
    agree_hf = sum(a == b for a, b in zip(ours_tokens, list(fn["hf_generate"]())[-n:], strict=True))
    results = {"ours_kv_cache": timed(fn["ours"], args.iters), "capstone_app_loop": timed(fn["capstone"], args.iters)}
    hf_total = timed(fn["hf_generate"], args.iters)[1]
    results["hf_generate"] = (timed(fn["hf_first"], args.iters)[1], hf_total)

    ours_t = results["ours_kv_cache"][1]
    rows = [
        {"variant": k, "ttft_ms": f * 1e3, "total_ms": t * 1e3, "tokens_per_s": n / t, "x_ours_speedup": t / ours_t}
        for k, (f, t) in results.items()
    ]
    notes = [
        f"ours is {results['capstone_app_loop'][1] / ours_t:.1f}x the capstone loop (target >= 5x) and "
        f"{hf_total / ours_t:.2f}x HF generate (target >= 1x) at {n} new tokens",
        f"greedy tokens: ours == capstone loop: {same_capstone}; ours vs HF: {agree_hf}/{n} equal (random weights "
        "give near-tied logits, which the two implementations' rounding can order differently)",
        f"LM {args.lm} with {args.n_layer} layers x {args.n_embd} (dense, so HF PhiForCausalLM holds the same "
        f"weights), prefix 50 image + {args.prompt_tokens} "
        f"prompt positions, {device.type} {str(dtype).removeprefix('torch.')}, median of {args.iters}",
    ]
    save("generate", device, rows, notes, vars(args))


if __name__ == "__main__":
    main()
