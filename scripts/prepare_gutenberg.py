"""Prepare Project Gutenberg books for pretraining: clean, split by book, tokenize, write streaming token shards.

    python scripts/prepare_gutenberg.py                                   # the 13 bundled books (offline)
    python scripts/prepare_gutenberg.py --ids "[1342, 84, 2701]"          # download by ebook id
    python scripts/prepare_gutenberg.py --catalog_language en --catalog_count 2000   # a seeded catalogue sample
    python scripts/prepare_gutenberg.py --tokenizer_dir checkpoints/microsoft/phi-2  # reuse phi-2's tokenizer

Writes `<out_dir>/train`, `<out_dir>/val` (litdata token shards), `<out_dir>/tokenizer` and `<out_dir>/summary.json`.
A book whose encoding is unreadable or whose header/footer markers cannot be found is reported by name and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_mm.cli import run_cli  # noqa: E402
from litgpt_mm.data import gutenberg as pg  # noqa: E402
from litgpt_mm.data.tokens import PrepSummary, build_tokenizer, split_by_document, write_split  # noqa: E402

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "gutenberg"


def prepare(
    input_dir: Path | None = None,
    ids: list[int] | None = None,
    catalog_language: str | None = None,
    catalog_count: int = 0,
    cache_dir: Path = Path("data/cache/gutenberg"),
    mirror: str = pg.MIRROR,
    delay: float = 2.0,
    out_dir: Path = Path("data/prepared/gutenberg"),
    languages: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 42,
    vocab_size: int = 32000,
    tokenizer_dir: Path | None = None,
    batch_docs: int = 64,
) -> PrepSummary:
    """Build the Gutenberg pretraining corpus.

    Args:
        input_dir: a directory of raw PG `.txt` files (default: the bundled sample unless `ids`/catalogue are given).
        ids: ebook ids to download from `mirror`.
        catalog_language: language code to select from PG's catalogue (with `catalog_count`).
        catalog_count: how many catalogue books to sample (seeded).
        cache_dir: download cache (raw files; partial downloads resume).
        mirror: PG mirror base URL.
        delay: seconds between downloads (be polite to the mirror).
        out_dir: output directory.
        languages: keep only books whose header language is in this list (e.g. `[en]`); all when unset.
        val_fraction: share of books held out for validation (whole books).
        seed: split and sampling seed.
        vocab_size: size of the byte-level BPE vocabulary trained on the training books.
        tokenizer_dir: reuse this tokenizer (e.g. phi-2's checkpoint dir) instead of training one.
        batch_docs: books tokenized per batch (the Rust tokenizer runs a batch in parallel).
    """
    summary = PrepSummary()
    files = _gather(input_dir, ids, catalog_language, catalog_count, cache_dir, mirror, delay, seed, summary)
    books = []
    for path in tqdm(files, desc="clean", unit="book"):
        try:
            book = pg.load_book(path)
        except (OSError, UnicodeDecodeError, pg.BoilerplateError) as err:
            summary.skip(path.name, str(err) if not isinstance(err, UnicodeDecodeError) else err.reason)
            continue
        if languages and book.language not in languages:
            summary.skip(path.name, f"language {book.language!r} not in {languages}")
            continue
        books.append(book)
    if not books:
        raise SystemExit(f"No usable books among {len(files)} files:\n{summary.report()}")

    train_names, val_names = split_by_document([b.name for b in books], val_fraction, seed)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer([b.text for b in books if b.name in train_names], out_dir, vocab_size, tokenizer_dir)
    for split, names in (("train", train_names), ("val", val_names)):
        write_split([b.text for b in books if b.name in names], split, tokenizer, out_dir, summary, batch_docs)
    (out_dir / "books.txt").write_text(
        "".join(f"{'val' if b.name in val_names else 'train'}\t{b.language}\t{b.name}\n" for b in books)
    )
    summary.save(out_dir / "summary.json")
    print(summary.report())
    print(f"Wrote {out_dir}/train, {out_dir}/val and {out_dir}/tokenizer")
    return summary


def _gather(input_dir, ids, catalog_language, catalog_count, cache_dir, mirror, delay, seed, summary) -> list[Path]:
    downloads: list[int] = list(ids or [])
    if catalog_count:
        catalog = Path(cache_dir) / "pg_catalog.csv"
        if not catalog.exists():
            pg.download(pg.CATALOG_URL if mirror == pg.MIRROR else f"{mirror}/cache/epub/feeds/pg_catalog.csv", catalog)
        downloads += pg.select_from_catalog(catalog.read_text(encoding="utf-8"), catalog_language, catalog_count, seed)
    files: list[Path] = []
    if downloads:
        paths, failures = pg.download_books(sorted(set(downloads)), Path(cache_dir), mirror=mirror, delay=delay)
        files += paths
        for name, reason in failures:
            summary.skip(name, reason)
    if input_dir is not None or not downloads:
        directory = Path(input_dir or SAMPLE_DIR)
        if not directory.is_dir():
            raise SystemExit(f"--input_dir {directory} is not a directory of raw Project Gutenberg .txt files")
        files += sorted(directory.glob("*.txt"))
    return files


if __name__ == "__main__":
    run_cli(prepare)
