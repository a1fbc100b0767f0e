"""Cost per training sample of the two instruction-tuning methods, measured side by side in one run.

* `standard`: one forward over the whole sequence (teacher forcing everywhere) + backward.
* `autoregressive p=..`: ours, scheduled teacher forcing through the grad-keeping KV cache; ground-truth runs are
  fed as chunks, so the cost grows with the number of model-fed tokens, (1 - p) * answer length.
* `capstone O(n^2) p=..`: the original capstone's loop, one full re-forward of the sequence so far per answer
  token, each scored.

Target: ours <= 2x standard. The model is the tiny MoE LM with LoRA on nf4 linear layers and a 49-patch image.

    python benchmarks/instruct.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timeit_interleaved  # noqa: E402

from litgpt_mm.config import Config  # noqa: E402
from litgpt_mm.model import GPT, embed_tokens, forward_embeds  # noqa: E402
from litgpt_mm.multimodal import IGNORE_INDEX, MultimodalConfig, MultimodalGPT, shifted_cross_entropy  # noqa: E402
from litgpt_mm.qlora import LoRASettings, add_lora, quantize_nf4  # noqa: E402
from litgpt_mm.scheduled import autoregressive_loss  # noqa: E402


def capstone_loss(model, feats, ids, labels, p, generator):
    """The original capstone's loop: for every answer token, re-forward the whole sequence so far and score its
    last position; the next input is the truth with probability p, else the prediction."""
    embeds, lab, _ = model.build_inputs([feats], [ids], [labels])
    lab = lab[0]
    predict_at = (lab[1:] != IGNORE_INDEX).nonzero().flatten().tolist()
    seq, losses = embeds[:, : predict_at[0] + 1], []
    for j in predict_at:
        last = forward_embeds(model.lm, seq)[:, -1]
        losses.append(torch.nn.functional.cross_entropy(last.float(), lab[j + 1].view(1)))
        nxt = embeds[:, j + 1 : j + 2]
        if torch.rand((), generator=generator).item() >= p:
            nxt = embed_tokens(model.lm, last.argmax(-1).view(1, 1).detach())
        seq = torch.cat([seq, nxt], dim=1)
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt_tokens", type=int, default=32)
    ap.add_argument("--answer_tokens", type=int, default=96)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--lm", default="phi-2-moe-tiny", help="a preset; `phi-2` is shrunk by --n_layer/--n_embd")
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--n_embd", type=int, default=1280)
    ap.add_argument("--capstone", type=int, default=1, help="0 skips the O(n^2) loop (it keeps n graphs in memory)")
    args = ap.parse_args()
    device = torch.device("cpu")
    torch.manual_seed(0)
    if args.lm == "phi-2":
        cfg = Config.from_name(
            "phi-2", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 80,
            n_query_groups=args.n_embd // 80, intermediate_size=4 * args.n_embd, vocab_size=4096,
            padded_vocab_size=4096, block_size=512,
        )  # fmt: skip
    else:
        cfg = Config.from_name(args.lm)
    lm = GPT(cfg)
    add_lora(lm, LoRASettings(dropout=0.0, mlp=True, projection=True))
    quantize_nf4(lm)
    model = MultimodalGPT(lm, MultimodalConfig()).train()
    n = args.prompt_tokens + args.answer_tokens
    ids = torch.randint(0, lm.config.vocab_size, (n,))
    labels = ids.clone()
    labels[: args.prompt_tokens] = IGNORE_INDEX
    feats = torch.randn(1, 49, 768)

    def run(fn):
        def step():
            loss = fn()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    def standard():
        logits, lab = model([feats], [ids], [labels])
        return shifted_cross_entropy(logits, lab)

    def ours(p):
        def f():
            total, count = autoregressive_loss(model, feats, ids, labels, p, torch.Generator().manual_seed(0))
            return total / count

        return f

    def capstone(p):
        return lambda: capstone_loss(model, feats, ids, labels, p, torch.Generator().manual_seed(0))

    fns = {"standard": run(standard)}
    for p in (1.0, 0.9, 0.5):
        fns[f"ours_autoregressive_p{p}"] = run(ours(p))
    for p in (0.9, 0.5) if args.capstone else ():
        fns[f"capstone_O(n^2)_p{p}"] = run(capstone(p))
    times = timeit_interleaved(fns, device, warmup=1, iters=args.iters)
    base = times["standard"]
    rows = [{"variant": k, "ms_per_sample": t * 1e3, "x_of_standard": t / base} for k, t in times.items()]
    notes = [
        f"ours at p=0.9 costs {times['ours_autoregressive_p0.9'] / base:.2f}x standard (target <= 2x); "
        f"at p=0.5 {times['ours_autoregressive_p0.5'] / base:.2f}x",
        f"capstone-style loop at p=0.9: {times['capstone_O(n^2)_p0.9'] / times['ours_autoregressive_p0.9']:.1f}x ours"
        if args.capstone
        else "capstone-style loop skipped (--capstone 0)",
        f"sequence: 50 image positions + {args.prompt_tokens} prompt + {args.answer_tokens} answer tokens; "
        f"LM {args.lm}"
        + (f" {args.n_layer} x {args.n_embd}" if args.lm == "phi-2" else "")
        + " with LoRA on nf4 linears, forward + backward, CPU",
    ]
    save("instruct", device, rows, notes, vars(args))


if __name__ == "__main__":
    main()
