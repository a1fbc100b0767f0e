"""Pretraining-stage benchmarks, each measured side by side in one run.

1. Data preparation throughput (MB/s of cleaned text to token shards) of `scripts/prepare_gutenberg.py`'s batched
   path against a plain single-process Python loop that encodes one book at a time with the same tokenizer and
   writes one `.npy` per book.
2. Training tokens/s of the tiny MoE (`phi-2-moe-tiny`) against its dense twin with equal active FLOPs
   (`phi-2-tiny-twin`): full optimizer steps (forward, loss incl. MoE losses, backward, AdamW), fp32 on CPU.
   Target >= 0.85x.
3. The recipe itself (`recipes/pretrain_moe.py`, the tiny config's 150 steps, in a fresh process): set-up (process
   start to the first step: imports, data, model, peak FLOP/s) against the whole run. Target: set-up <= 10 %.

    python benchmarks/pretrain.py                   # CPU
    python benchmarks/pretrain.py --device cuda     # same, on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from litgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timeit_interleaved  # noqa: E402

from litgpt_mm.config import Config  # noqa: E402
from litgpt_mm.data import gutenberg as pg  # noqa: E402
from litgpt_mm.data.tokens import PrepSummary, train_bpe_tokenizer, write_split  # noqa: E402
from litgpt_mm.flops import active_params  # noqa: E402
from litgpt_mm.model import GPT  # noqa: E402


def prep_throughput(repeats: int) -> dict:
    books = [pg.load_book(p).text for p in sorted((ROOT / "data" / "gutenberg").glob("*.txt"))] * repeats
    mb = sum(len(t.encode()) for t in books) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        train_bpe_tokenizer(books[:13], 4096, Path(tmp) / "tok")
        tok = Tokenizer(Path(tmp) / "tok")  # a fresh instance per path: BPE's word cache would favour the second
        start = time.perf_counter()
        write_split(books, "train", tok, Path(tmp) / "ours", PrepSummary(), batch_docs=64)
        ours = time.perf_counter() - start
        tok = Tokenizer(Path(tmp) / "tok")
        start = time.perf_counter()
        plain = Path(tmp) / "plain"
        plain.mkdir()
        for i, text in enumerate(books):
            ids = tok.encode(text).tolist() + [tok.eos_id]
            np.save(plain / f"{i}.npy", np.asarray(ids, dtype=np.int32))
        loop = time.perf_counter() - start
    return {"MB": mb, "ours_MB_s": mb / ours, "plain_loop_MB_s": mb / loop, "speedup": loop / ours}


def recipe_run(device: torch.device) -> dict:
    """Wall clock of the tiny pretraining recipe in a new process, and its own set-up time (printed by `fit`)."""
    import re
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gutenberg"
        prep = [sys.executable, "scripts/prepare_gutenberg.py", "--vocab_size", "4096", "--out_dir", str(data)]
        subprocess.run(prep, cwd=ROOT, check=True, capture_output=True)
        cmd = [sys.executable, "recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml",
               "--data_dir", str(data), "--out_dir", str(Path(tmp) / "run")]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        total = time.perf_counter() - start
    setup = float(re.search(r"Set-up: ([\d.]+) s", proc.stdout).group(1))
    return {"total_s": total, "setup_s": setup, "share": setup / total}


def train_step_fn(name: str, device: torch.device, batch: int, seq: int):
    torch.manual_seed(0)
    config = Config.from_name(name, block_size=seq)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        aux, z = model.moe_losses()
        (loss + config.moe_aux_loss_coef * aux + config.moe_z_loss_coef * z).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--prep_repeats", type=int, default=1, help="the 13 books repeated this many times")
    args = p.parse_args()
    device = torch.device(args.device)

    prep = prep_throughput(args.prep_repeats)
    run = recipe_run(device) if device.type == "cpu" else None
    fns, models = {}, {}
    for name in ("phi-2-moe-tiny", "phi-2-tiny-twin"):
        fns[name], models[name] = train_step_fn(name, device, args.batch, args.seq_len)
    times = timeit_interleaved(fns, device, warmup=3, iters=args.iters)
    tokens = args.batch * args.seq_len
    moe_tps, dense_tps = tokens / times["phi-2-moe-tiny"], tokens / times["phi-2-tiny-twin"]
    rows = [
        {"what": "prepare: ours (batched Rust encode + litdata shards)", "value": prep["ours_MB_s"], "unit": "MB/s"},
        {"what": "prepare: plain Python loop, one book at a time", "value": prep["plain_loop_MB_s"], "unit": "MB/s"},
        {"what": "prepare speed-up", "value": prep["speedup"], "unit": "x"},
        {"what": "train: phi-2-moe-tiny", "value": moe_tps, "unit": "tokens/s"},
        {"what": "train: phi-2-tiny-twin (dense, equal active FLOPs)", "value": dense_tps, "unit": "tokens/s"},
        {"what": "MoE / dense twin tokens/s (target >= 0.85)", "value": moe_tps / dense_tps, "unit": "x"},
    ]
    if run:
        rows += [
            {"what": "recipe: set-up before the first step", "value": run["setup_s"], "unit": "s"},
            {"what": "recipe: whole 150-step tiny run (fresh process)", "value": run["total_s"], "unit": "s"},
            {"what": "recipe: set-up share of the run (target <= 0.10)", "value": run["share"], "unit": "x"},
        ]
    active = {n: active_params(m) for n, m in models.items()}
    notes = [
        f"prep corpus: the 13 bundled books x {args.prep_repeats} = {prep['MB']:.1f} MB of cleaned text",
        f"active params (no embeddings): moe {active['phi-2-moe-tiny']:,}, twin {active['phi-2-tiny-twin']:,}",
        f"train: batch {args.batch} x seq {args.seq_len}, median of {args.iters} interleaved steps, "
        + ("bf16 autocast" if device.type == "cuda" else "fp32"),
    ]
    save("pretrain", device, rows, notes, vars(args))


if __name__ == "__main__":
    main()
