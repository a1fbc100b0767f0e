"""Prepare RedPajama (cc + c4 by default) for pretraining: a byte-budgeted subset, tokenized into token shards.

    python scripts/prepare_redpajama.py --download_sample true           # RedPajama-1T-Sample cc + c4 files
    python scripts/prepare_redpajama.py --input_dir /data/RedPajama-Data-1T --max_bytes 100_000_000
    python scripts/prepare_redpajama.py --tokenizer_dir checkpoints/microsoft/phi-2 --num_workers 16 \\
        --out_dir s3://bucket/redpajama                                    # many processes, shards in S3

Reads `*.jsonl` and `*.jsonl.zst` files (schema `{"text": ..., "meta": ...}`) under `input_dir`, assigning each to
a source by its name or folder. The byte budget is split evenly over the requested sources and documents are
taken in file order until a source's share is used. The selected documents are written to `.jsonl` parts in a work
folder (one pass), then tokenized in parallel by litdata's `optimize` (`litgpt_mm/data/prepare.py`: resumable after
a kill, several machines with `--num_nodes/--node_rank`). Writes the same layout as `prepare_gutenberg.py`:
`<out_dir>/train`, `<out_dir>/val`, `<out_dir>/tokenizer`, `<out_dir>/summary.json`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from litgpt_mm.data import redpajama as rp
from litgpt_mm.data.download import download
from litgpt_mm.data.prepare import (
    Scale,
    check_scale,
    plan_or_join,
    prepare_tokenizer,
    read_documents,
    tokenizer_fingerprint,
    work_dir_for,
    write_and_report,
)
from litgpt_mm.data.tokens import PrepSummary


def prepare(
    input_dir: Path = Path("data/cache/redpajama"),
    download_sample: bool = False,
    sources: list[str] = ["cc", "c4"],  # noqa: B006
    max_bytes: int = 100_000_000,
    out_dir: str = "data/prepared/redpajama",
    val_fraction: float = 0.01,
    seed: int = 42,
    vocab_size: int = 32000,
    tokenizer_dir: Path | None = None,
    part_bytes: int = 32_000_000,
    num_workers: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    work_dir: Path | None = None,
    chunk_bytes: str = "64MB",
    overwrite: bool = False,
) -> PrepSummary:
    """Build the RedPajama pretraining corpus.

    Args:
        input_dir: directory searched recursively for `.jsonl` / `.jsonl.zst` files (also the download target).
        download_sample: fetch the RedPajama-1T-Sample files of `sources` into `input_dir` first (resumable).
        sources: RedPajama sources to use (`cc`, `c4`, `arxiv`, `book`, `github`, `stackexchange`, `wikipedia`).
        max_bytes: UTF-8 bytes of text to take in total, split evenly over `sources` (0 = everything).
        out_dir: output folder, or an `s3://bucket/prefix`.
        val_fraction: share of documents held out for validation (seeded, whole documents).
        seed: split seed.
        vocab_size: size of the byte-level BPE trained on the training documents.
        tokenizer_dir: reuse this tokenizer (e.g. phi-2's checkpoint dir) instead of training one.
        part_bytes: UTF-8 bytes of documents per `.jsonl` part (the unit a tokenizing worker takes).
        num_workers: processes on this machine that tokenize parts.
        num_nodes: machines sharing the tokenization (each takes a contiguous share; `work_dir` must be shared).
        node_rank: this machine's rank.
        work_dir: selected documents, tokenizer and resume state (default `<out_dir>/.prepare`).
        chunk_bytes: target size of a shard chunk.
        overwrite: start again when `work_dir` holds a preparation with other settings.
    """
    start = time.perf_counter()
    unknown = sorted(set(sources) - set(rp.SOURCES))
    if unknown:
        raise SystemExit(f"--sources {unknown} unknown: choose from {list(rp.SOURCES)}")
    scale = Scale(num_workers, num_nodes, node_rank, work_dir, chunk_bytes, overwrite)
    check_scale(scale, out_dir=out_dir)
    work = work_dir_for(scale, out_dir)
    settings = {
        "inputs": [str(input_dir), sources, max_bytes],
        "val_fraction": val_fraction,
        "seed": seed,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "part_bytes": part_bytes,
        "chunk_bytes": chunk_bytes,
        "num_workers": num_workers,
        "num_nodes": num_nodes,
        "out_dir": str(out_dir),
    }
    summary = PrepSummary()

    def plan() -> dict:
        files = _input_files(Path(input_dir), sources, download_sample)
        check_scale(scale, len(files))
        manifest = _select_and_split(
            files, Path(input_dir), sources, max_bytes, val_fraction, seed, part_bytes, work, summary
        )
        train = manifest["parts"]["train"]
        texts = lambda: (d for p in train for d in read_documents(p))  # noqa: E731
        prepare_tokenizer(work, texts, manifest["documents"]["train"], vocab_size, tokenizer_dir)
        return manifest

    manifest = plan_or_join(work, settings, scale, plan, summary)
    counts = {s: (manifest["documents"][s], manifest["characters"][s]) for s in ("train", "val")}
    return write_and_report(manifest["parts"], counts, out_dir, work, scale, summary, start, {})


def _input_files(input_dir: Path, sources: list[str], download_sample: bool) -> list[Path]:
    if download_sample:
        for source in sources:
            for name in tqdm(rp.SAMPLE_FILES[source], desc=f"download {source}", unit="file"):
                download(f"{rp.SAMPLE_URL}/{name}", input_dir / name)
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and rp.is_jsonl(p)) if input_dir.is_dir() else []
    files = [p for p in files if rp.source_of(p.relative_to(input_dir)) in sources]
    if not files:
        raise SystemExit(
            f"No RedPajama .jsonl/.jsonl.zst files for {sources} under {input_dir}: pass --input_dir or "
            "--download_sample true"
        )
    return files


class _Parts:
    """Documents appended to numbered `.jsonl` parts of about `part_bytes` each (one JSON string per line)."""

    def __init__(self, folder: Path, split: str, part_bytes: int) -> None:
        self.folder, self.split, self.part_bytes = folder, split, part_bytes
        self.paths: list[str] = []
        self._file, self._size = None, 0
        self.documents = self.characters = 0

    def add(self, text: str) -> None:
        if self._file is None or self._size >= self.part_bytes:
            self.close()
            path = self.folder / f"{self.split}-{len(self.paths):05d}.jsonl"
            self._file, self._size = open(path, "w", encoding="utf-8"), 0
            self.paths.append(str(path.resolve()))
        self._file.write(json.dumps(text, ensure_ascii=False) + "\n")
        self._size += len(text.encode("utf-8"))
        self.documents, self.characters = self.documents + 1, self.characters + len(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _select_and_split(
    files, input_dir, sources, max_bytes, val_fraction, seed, part_bytes, work, summary: PrepSummary
) -> dict:
    """One pass over the inputs: the budgeted documents, split by a seeded draw per document, into `.jsonl` parts."""
    folder = work / "clean"
    shutil.rmtree(folder, ignore_errors=True)  # a killed selection pass starts again (it is one fast read)
    folder.mkdir(parents=True)
    parts = {split: _Parts(folder, split, part_bytes) for split in ("train", "val")}
    budget = max_bytes // len(sources) if max_bytes else None
    rng = random.Random(seed)
    with tqdm(total=max_bytes or None, desc="read", unit="B", unit_scale=True) as bar:
        for source in sources:
            paths = [p for p in files if rp.source_of(p.relative_to(input_dir)) == source]
            if not paths:
                summary.skip(source, f"no files for source {source!r} under {input_dir}")
            used = 0
            for path in paths:
                for text in rp.iter_documents(path, summary.skip):
                    size = len(text.encode("utf-8"))
                    parts["val" if rng.random() < val_fraction else "train"].add(text)
                    used += size
                    bar.update(size)
                    if budget is not None and used >= budget:
                        break
                if budget is not None and used >= budget:
                    break
    for p in parts.values():
        p.close()
    if not parts["train"].documents:
        raise SystemExit(f"No usable documents in {len(files)} files:\n{summary.report()}")
    if not parts["val"].documents:  # at least one validation document: move the last training one
        last = parts["train"].paths[-1]
        lines = Path(last).read_text(encoding="utf-8").splitlines(keepends=True)
        Path(last).write_text("".join(lines[:-1]), encoding="utf-8")
        parts["val"].add(json.loads(lines[-1]))
        parts["val"].close()
        parts["train"].documents -= 1
        parts["train"].characters -= parts["val"].characters
    return {
        "parts": {s: [p for p in parts[s].paths if Path(p).stat().st_size] for s in parts},
        "documents": {s: parts[s].documents for s in parts},
        "characters": {s: parts[s].characters for s in parts},
        "skipped": summary.skipped,
    }
