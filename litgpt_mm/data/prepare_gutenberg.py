"""Prepare Project Gutenberg books for pretraining: clean, split by book, tokenize, write streaming token shards.

    python scripts/prepare_gutenberg.py                                   # the 13 bundled books (offline)
    python scripts/prepare_gutenberg.py --ids "[1342, 84, 2701]"          # download by ebook id
    python scripts/prepare_gutenberg.py --catalog_language en --catalog_count 2000   # a seeded catalogue sample
    python scripts/prepare_gutenberg.py --tokenizer_dir checkpoints/microsoft/phi-2  # reuse phi-2's tokenizer
    python scripts/prepare_gutenberg.py --num_workers 16 --out_dir s3://bucket/gutenberg   # many processes, S3
    # several machines: a shared --work_dir (and a shared or s3:// --out_dir); on machine i of N:
    python scripts/prepare_gutenberg.py --num_nodes N --node_rank i --work_dir /shared/prep --out_dir s3://...

Writes `<out_dir>/train`, `<out_dir>/val` (litdata token shards), `<out_dir>/tokenizer`, `<out_dir>/books.txt` and
`<out_dir>/summary.json`. A book whose encoding is unreadable or whose header/footer markers cannot be found is
reported by name and skipped. Rerunning after a kill continues: downloaded and cleaned books are kept, and litdata's
checkpoints resume the tokenization (`litgpt_mm/data/prepare.py`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from litgpt_mm import REPO_ROOT
from litgpt_mm.data import gutenberg as pg
from litgpt_mm.data.prepare import (
    Scale,
    cached_document,
    check_scale,
    plan_or_join,
    prepare_tokenizer,
    run_pool,
    tokenizer_fingerprint,
    work_dir_for,
    write_and_report,
)
from litgpt_mm.data.tokens import PrepSummary, split_by_document

SAMPLE_DIR = REPO_ROOT / "data" / "gutenberg"


def prepare(
    input_dir: Path | None = None,
    ids: list[int] | None = None,
    catalog_language: str | None = None,
    catalog_count: int = 0,
    cache_dir: Path = Path("data/cache/gutenberg"),
    mirror: str = pg.MIRROR,
    delay: float = 2.0,
    max_downloads: int = 2,
    out_dir: str = "data/prepared/gutenberg",
    languages: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 42,
    vocab_size: int = 32000,
    tokenizer_dir: Path | None = None,
    num_workers: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    work_dir: Path | None = None,
    chunk_bytes: str = "64MB",
    overwrite: bool = False,
) -> PrepSummary:
    """Build the Gutenberg pretraining corpus.

    Args:
        input_dir: a directory of raw PG `.txt` files (default: the bundled sample unless `ids`/catalogue are given).
        ids: ebook ids to download from `mirror`.
        catalog_language: language code to select from PG's catalogue (with `catalog_count`).
        catalog_count: how many catalogue books to sample (seeded).
        cache_dir: download cache (raw files; partial downloads resume).
        mirror: PG mirror base URL (for bulk downloads use a mirror, as Gutenberg's robot policy asks).
        delay: seconds each download connection waits between two books.
        max_downloads: concurrent download connections.
        out_dir: output folder, or an `s3://bucket/prefix`.
        languages: keep only books whose header language is in this list (e.g. `[en]`); all when unset.
        val_fraction: share of books held out for validation (whole books).
        seed: split and sampling seed.
        vocab_size: size of the byte-level BPE vocabulary trained on the training books.
        tokenizer_dir: reuse this tokenizer (e.g. phi-2's checkpoint dir) instead of training one.
        num_workers: processes on this machine that clean and tokenize books.
        num_nodes: machines sharing the tokenization (each takes a contiguous share; `work_dir` must be shared).
        node_rank: this machine's rank.
        work_dir: cleaned books, tokenizer and resume state (default `<out_dir>/.prepare`; shared by all machines).
        chunk_bytes: target size of a shard chunk.
        overwrite: start again when `work_dir` holds a preparation with other settings.
    """
    start = time.perf_counter()
    scale = Scale(num_workers, num_nodes, node_rank, work_dir, chunk_bytes, overwrite)
    check_scale(scale, out_dir=out_dir)
    work = work_dir_for(scale, out_dir)
    settings = {
        "inputs": [str(input_dir), sorted(set(ids or [])), catalog_language, catalog_count, mirror],
        "languages": languages,
        "val_fraction": val_fraction,
        "seed": seed,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "chunk_bytes": chunk_bytes,
        "num_workers": num_workers,
        "num_nodes": num_nodes,
        "out_dir": str(out_dir),
    }
    summary = PrepSummary()

    def plan() -> dict:
        files = _gather(
            input_dir, ids, catalog_language, catalog_count, cache_dir, mirror, delay, max_downloads, seed, summary
        )
        check_scale(scale, len(files))
        manifest = _clean_and_split(files, work, languages, val_fraction, seed, num_workers, summary)
        train = [d["path"] for d in manifest["docs"] if d["name"] in manifest["train"]]
        texts = lambda: (Path(p).read_text(encoding="utf-8") for p in train)  # noqa: E731
        prepare_tokenizer(work, texts, len(train), vocab_size, tokenizer_dir)
        return manifest

    manifest = plan_or_join(work, settings, scale, plan, summary)
    docs = {d["name"]: d for d in manifest["docs"]}
    splits = {split: [docs[name]["path"] for name in manifest[split]] for split in ("train", "val")}
    counts = {s: (len(manifest[s]), sum(docs[name]["chars"] for name in manifest[s])) for s in ("train", "val")}
    books = "".join(
        f"{'val' if d['name'] in manifest['val'] else 'train'}\t{d['language']}\t{d['name']}\n" for d in docs.values()
    )
    return write_and_report(splits, counts, out_dir, work, scale, summary, start, {"books.txt": books})


def _clean_one(path: str, work_dir: Path) -> dict:
    def make() -> tuple[str, dict]:
        book = pg.load_book(Path(path))
        return book.text, {"language": book.language}

    return cached_document(Path(path).name, work_dir, make)


def _clean_and_split(files, work, languages, val_fraction, seed, num_workers, summary: PrepSummary) -> dict:
    """Clean every book (in parallel, kept in `work/clean`), drop the unusable ones, split the rest by book."""
    docs = run_pool(partial(_clean_one, work_dir=work), [str(f) for f in files], num_workers, "clean", "book")
    usable = []
    for doc in docs:
        if "skip" in doc:
            summary.skip(doc["name"], doc["skip"])
        elif languages and doc["language"] not in languages:
            summary.skip(doc["name"], f"language {doc['language']!r} not in {languages}")
        else:
            usable.append(doc)
    if not usable:
        raise SystemExit(f"No usable books among {len(files)} files:\n{summary.report()}")
    train, val = split_by_document([d["name"] for d in usable], val_fraction, seed)
    return {
        "docs": usable,
        "train": [d["name"] for d in usable if d["name"] in train],
        "val": [d["name"] for d in usable if d["name"] in val],
        "skipped": summary.skipped,
    }


def _gather(
    input_dir, ids, catalog_language, catalog_count, cache_dir, mirror, delay, max_downloads, seed, summary
) -> list[Path]:
    downloads: list[int] = list(ids or [])
    if catalog_count:
        catalog = Path(cache_dir) / "pg_catalog.csv"
        if not catalog.exists():
            pg.download(pg.CATALOG_URL if mirror == pg.MIRROR else f"{mirror}/cache/epub/feeds/pg_catalog.csv", catalog)
        downloads += pg.select_from_catalog(catalog.read_text(encoding="utf-8"), catalog_language, catalog_count, seed)
    files: list[Path] = []
    if downloads:
        paths, failures = pg.download_books(
            sorted(set(downloads)), Path(cache_dir), mirror=mirror, delay=delay, concurrency=max_downloads
        )
        files += paths
        for name, reason in failures:
            summary.skip(name, reason)
    if input_dir is not None or not downloads:
        directory = Path(input_dir or SAMPLE_DIR)
        if not directory.is_dir():
            raise SystemExit(f"--input_dir {directory} is not a directory of raw Project Gutenberg .txt files")
        files += sorted(directory.glob("*.txt"))
    return files
