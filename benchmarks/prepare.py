"""Corpus preparation throughput, measured side by side in one run: the bundled books tokenized into litdata token
shards by `litgpt_mm.data.prepare.write_split` (litdata's `optimize`) with 1 and with 2 worker processes, and a
plain single-process Python loop (one book at a time, one `.npy` per book) as the floor.

    python benchmarks/prepare.py                     # the 13 books x 4
    python benchmarks/prepare.py --repeats 1 --rounds 1

Tokens/s counts the token ids written; each configuration runs `--rounds` times, interleaved, and the median is
reported. Process start-up of the workers is included (it is part of what a user waits for).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from litgpt.tokenizer import Tokenizer

from litgpt_mm.analysis.bench import save
from litgpt_mm.data import gutenberg as pg
from litgpt_mm.data.prepare import Scale, write_split
from litgpt_mm.data.tokens import num_blocks, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4, help="the 13 books repeated this many times")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab_size", type=int, default=4096)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        books = [pg.load_book(f).text for f in sorted((ROOT / "data" / "gutenberg").glob("*.txt"))]
        train_bpe_tokenizer(books, args.vocab_size, tmp / "tokenizer")
        paths = []
        for r in range(args.repeats):
            for i, text in enumerate(books):
                paths.append(tmp / "clean" / f"{r}-{i}.txt")
                paths[-1].parent.mkdir(exist_ok=True)
                paths[-1].write_text(text, encoding="utf-8")
        mb = sum(f.stat().st_size for f in paths) / 1e6
        times: dict[str, list[float]] = {"1 worker": [], "2 workers": [], "plain loop": []}
        n_tokens = 0
        for round_ in range(args.rounds):
            for name in list(times) if round_ % 2 == 0 else list(reversed(times)):
                out = tmp / "out" / f"{name}-{round_}"
                start = time.perf_counter()
                if name == "plain loop":
                    plain_loop(paths, tmp / "tokenizer", out)
                else:
                    workers = int(name[0])
                    work = tmp / "work" / f"{name}-{round_}"
                    shutil.copytree(tmp / "tokenizer", work / "tokenizer")
                    write_split("train", [str(f) for f in paths], out, work / "tokenizer", Scale(workers), work)
                    n_tokens = num_blocks(out / "train", 1)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_tokens / s for k, s in seconds.items()}
    rows = [
        {"what": "prepare: 1 worker (litdata optimize)", "value": rate["1 worker"], "unit": "tokens/s"},
        {"what": "prepare: 2 workers (litdata optimize)", "value": rate["2 workers"], "unit": "tokens/s"},
        {"what": "prepare: plain Python loop, one book at a time", "value": rate["plain loop"], "unit": "tokens/s"},
        {"what": "2 workers / 1 worker", "value": rate["2 workers"] / rate["1 worker"], "unit": "x"},
        {"what": "1 worker / plain loop", "value": rate["1 worker"] / rate["plain loop"], "unit": "x"},
    ]
    notes = [
        f"corpus: the 13 bundled books x {args.repeats} = {mb:.1f} MB of cleaned text, {n_tokens:,} tokens "
        f"({args.vocab_size}-token byte-level BPE)",
        f"median of {args.rounds} interleaved rounds; worker start-up included; {os.cpu_count()} cores",
    ]
    save("prepare", torch.device("cpu"), rows, notes, vars(args))


def plain_loop(paths: list[Path], tokenizer_dir: Path, out: Path) -> None:
    """The floor: one process, one book at a time, one `.npy` of token ids per book."""
    tok = Tokenizer(tokenizer_dir)
    out.mkdir(parents=True)
    for i, path in enumerate(paths):
        ids = tok.encode(path.read_text(encoding="utf-8")).tolist() + [tok.eos_id]
        np.save(out / f"{i}.npy", np.asarray(ids, dtype=np.int32))


if __name__ == "__main__":
    main()
