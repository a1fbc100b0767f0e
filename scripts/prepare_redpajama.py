"""Prepare RedPajama (cc + c4 by default) for pretraining: a byte-budgeted subset, tokenized into token shards.

    python scripts/prepare_redpajama.py --download true                  # RedPajama-1T-Sample cc + c4 files
    python scripts/prepare_redpajama.py --input_dir /data/RedPajama-Data-1T --max_bytes 100_000_000
    python scripts/prepare_redpajama.py --tokenizer_dir checkpoints/microsoft/phi-2

Reads `*.jsonl` and `*.jsonl.zst` files (schema `{"text": ..., "meta": ...}`) under `input_dir`, assigning each to
a source by its name or folder. The byte budget is split evenly over the requested sources and documents are
taken in file order until a source's share is used. Writes the same layout as `prepare_gutenberg.py`:
`<out_dir>/train`, `<out_dir>/val`, `<out_dir>/tokenizer`, `<out_dir>/summary.json`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_mm.cli import run_cli  # noqa: E402
from litgpt_mm.data import redpajama as rp  # noqa: E402
from litgpt_mm.data.download import download  # noqa: E402
from litgpt_mm.data.tokens import PrepSummary, build_tokenizer, write_split  # noqa: E402


def prepare(
    input_dir: Path = Path("data/cache/redpajama"),
    download_sample: bool = False,
    sources: list[str] = ["cc", "c4"],  # noqa: B006
    max_bytes: int = 100_000_000,
    out_dir: Path = Path("data/prepared/redpajama"),
    val_fraction: float = 0.01,
    seed: int = 42,
    vocab_size: int = 32000,
    tokenizer_dir: Path | None = None,
    batch_docs: int = 256,
) -> PrepSummary:
    """Build the RedPajama pretraining corpus.

    Args:
        input_dir: directory searched recursively for `.jsonl` / `.jsonl.zst` files (also the download target).
        download_sample: fetch the RedPajama-1T-Sample files of `sources` into `input_dir` first (resumable).
        sources: RedPajama sources to use (`cc`, `c4`, `arxiv`, `book`, `github`, `stackexchange`, `wikipedia`).
        max_bytes: UTF-8 bytes of text to take in total, split evenly over `sources` (0 = everything).
        out_dir: output directory.
        val_fraction: share of documents held out for validation (seeded, whole documents).
        seed: split seed.
        vocab_size: size of the byte-level BPE trained on the training documents.
        tokenizer_dir: reuse this tokenizer (e.g. phi-2's checkpoint dir) instead of training one.
        batch_docs: documents tokenized per batch.
    """
    unknown = sorted(set(sources) - set(rp.SOURCES))
    if unknown:
        raise SystemExit(f"--sources {unknown} unknown: choose from {list(rp.SOURCES)}")
    input_dir = Path(input_dir)
    if download_sample:
        for source in sources:
            for name in tqdm(rp.SAMPLE_FILES[source], desc=f"download {source}", unit="file"):
                download(f"{rp.SAMPLE_URL}/{name}", input_dir / name)
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and rp.is_jsonl(p)) if input_dir.is_dir() else []
    by_source = {s: [p for p in files if rp.source_of(p.relative_to(input_dir)) == s] for s in sources}
    if not any(by_source.values()):
        raise SystemExit(
            f"No RedPajama .jsonl/.jsonl.zst files for {sources} under {input_dir}: pass --input_dir or "
            "--download_sample true"
        )

    summary = PrepSummary()
    budget = max_bytes // len(sources) if max_bytes else None
    docs: list[str] = []
    with tqdm(total=max_bytes or None, desc="read", unit="B", unit_scale=True) as bar:
        for source, paths in by_source.items():
            if not paths:
                summary.skip(source, f"no files for source {source!r} under {input_dir}")
            used = 0
            for path in paths:
                for text in rp.iter_documents(path, summary.skip):
                    size = len(text.encode("utf-8"))
                    docs.append(text)
                    used += size
                    bar.update(size)
                    if budget is not None and used >= budget:
                        break
                if budget is not None and used >= budget:
                    break
    if not docs:
        raise SystemExit(f"No usable documents in {len(files)} files:\n{summary.report()}")

    rng = random.Random(seed)
    is_val = [rng.random() < val_fraction for _ in docs]
    if len(docs) > 1 and not any(is_val):
        is_val[-1] = True
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(train, out_dir, vocab_size, tokenizer_dir)
    write_split(train, "train", tokenizer, out_dir, summary, batch_docs)
    write_split(val, "val", tokenizer, out_dir, summary, batch_docs)
    summary.save(out_dir / "summary.json")
    print(summary.report())
    print(f"Wrote {out_dir}/train, {out_dir}/val and {out_dir}/tokenizer")
    return summary


if __name__ == "__main__":
    run_cli(prepare)
