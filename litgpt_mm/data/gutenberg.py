"""Project Gutenberg books: boilerplate removal, language, and polite resumable downloads."""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from litgpt_mm.data.download import download

MIRROR = "https://www.gutenberg.org"
CATALOG_URL = f"{MIRROR}/cache/epub/feeds/pg_catalog.csv"

LANGUAGES = {
    "english": "en",
    "french": "fr",
    "german": "de",
    "spanish": "es",
    "italian": "it",
    "portuguese": "pt",
    "dutch": "nl",
    "finnish": "fi",
    "swedish": "sv",
    "danish": "da",
    "norwegian": "no",
    "latin": "la",
    "greek": "el",
    "russian": "ru",
    "polish": "pl",
    "hungarian": "hu",
    "chinese": "zh",
    "japanese": "ja",
    "esperanto": "eo",
    "tagalog": "tl",
    "catalan": "ca",
    "czech": "cs",
    "welsh": "cy",
}

_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)", re.I)
_END = re.compile(r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)", re.I)
_END_OF_LINE = re.compile(r"^\s*End of (?:the )?Project Gutenberg", re.I)
_LEGACY_FOOTER = re.compile(r"^\s*The Project Gutenberg Etext of", re.I)
_LEGACY_LAST = re.compile(r"^\s*End of (?:the )?Project Gutenberg(?:'s|’s)? Etext", re.I)
_LANGUAGE = re.compile(r"^Language:\s*(.+?)\s*$", re.I | re.M)
_ENCODING = re.compile(rb"^Character set encoding:\s*([A-Za-z0-9_\-]+)", re.I | re.M)


class BoilerplateError(ValueError):
    """The Project Gutenberg header or footer of a book could not be located."""


@dataclass
class Book:
    """A cleaned book: its source name, ebook id (if known), language code and body text."""

    name: str
    ebook_id: int | None
    language: str
    text: str


def decode(raw: bytes, name: str) -> str:
    """Decode a PG file: UTF-8 (with or without BOM), else the encoding its header declares; CRLF -> LF."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        declared = _ENCODING.search(raw[:20000])
        encoding = declared.group(1).decode("ascii").lower() if declared else None
        if encoding is None or encoding.replace("-", "") == "utf8":
            raise UnicodeDecodeError(
                err.encoding,
                err.object,
                err.start,
                err.end,
                f"{name} is not valid UTF-8 and its header declares no other encoding; re-download the UTF-8 edition",
            ) from None
        text = raw.decode("latin-1" if encoding.startswith(("iso-646", "us-ascii")) else encoding)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def language_of(text: str) -> str:
    """Language code from the `Language:` header line ('unknown' if absent)."""
    match = _LANGUAGE.search(text[:20000])
    if not match:
        return "unknown"
    first = re.split(r"[,;]| and ", match.group(1))[0].strip().lower()
    return LANGUAGES.get(first, first)


def strip_boilerplate(text: str, name: str = "<text>") -> str:
    """Return the book body between the PG header and footer.

    Handles the `*** START/END OF THE|THIS PROJECT GUTENBERG EBOOK ***` markers (with or without a title, with or
    without spaces, a title wrapped onto the next line), an `End of (the) Project Gutenberg ...` line before the END
    marker, and the legacy 2002 "Etext" files that have no END marker and a footer opening with
    `The Project Gutenberg Etext of ...`. Raises `BoilerplateError` naming the book when a marker is missing.
    """
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line)), None)
    if start is None:
        raise BoilerplateError(f"{name}: no '*** START OF THE PROJECT GUTENBERG EBOOK' marker found")
    # a marker whose closing *** wrapped onto a following line
    for j in range(start, min(start + 3, len(lines))):
        if lines[j].rstrip().endswith("***"):
            start = j
            break
    end = next((i for i in range(start + 1, len(lines)) if _END.match(lines[i])), None)
    if end is None:
        footer = [i for i in range(start + 1, len(lines)) if _LEGACY_FOOTER.match(lines[i])]
        if not footer or not any(_LEGACY_LAST.match(line) for line in lines[footer[-1] :]):
            raise BoilerplateError(f"{name}: no '*** END OF' marker and no legacy 'Etext' footer found")
        end = footer[-1]
    else:
        for i in range(end - 1, max(start, end - 12), -1):
            if _END_OF_LINE.match(lines[i]):
                end = i
                break
    body = "\n".join(lines[start + 1 : end]).strip("\n")
    if not body.strip():
        raise BoilerplateError(f"{name}: the book body between the markers is empty")
    return body + "\n"


def ebook_id_from_name(name: str) -> int | None:
    match = re.search(r"(?:pg)?(\d+)", name)
    return int(match.group(1)) if match else None


def load_book(path: Path) -> Book:
    """Read, decode and clean one raw PG file. Raises OSError, UnicodeDecodeError or BoilerplateError."""
    text = decode(Path(path).read_bytes(), path.name)
    body = strip_boilerplate(text, path.name)
    return Book(path.name, ebook_id_from_name(path.stem), language_of(text), body)


def book_url(ebook_id: int, mirror: str = MIRROR) -> str:
    """URL of the UTF-8 plain-text edition of a book."""
    return f"{mirror.rstrip('/')}/cache/epub/{ebook_id}/pg{ebook_id}.txt"


def download_books(
    ids: Iterable[int], cache_dir: Path, mirror: str = MIRROR, delay: float = 2.0, concurrency: int = 1, **kwargs
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Fetch books by ebook id into `cache_dir` with at most `concurrency` downloads at a time, each connection
    waiting `delay` seconds between its fetches (cached books cost nothing). Returns (paths, failures) in id order."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    ids = list(ids)

    def fetch(ebook_id: int) -> tuple[Path | None, tuple[str, str] | None]:
        dest = Path(cache_dir) / f"pg{ebook_id}.txt"
        if dest.exists():
            return dest, None
        try:
            result = download(book_url(ebook_id, mirror), dest, **kwargs), None
        except Exception as err:  # noqa: BLE001 - reported per book, the run goes on
            result = None, (f"pg{ebook_id}", f"download failed: {err}")
        time.sleep(delay)  # this connection's pause before its next request
        return result

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        results = list(tqdm(pool.map(fetch, ids), total=len(ids), desc="download", unit="book"))
    return [p for p, _ in results if p is not None], [f for _, f in results if f is not None]


def select_from_catalog(csv_text: str, language: str | None, count: int, seed: int = 42) -> list[int]:
    """Ebook ids of `Text` entries in `language` (code, e.g. 'en') from PG's `pg_catalog.csv`, a seeded sample."""
    import random

    ids = []
    for row in csv.DictReader(io.StringIO(csv_text)):
        if row.get("Type") != "Text":
            continue
        langs = [code.strip() for code in (row.get("Language") or "").split(";")]
        if language is None or language in langs:
            ids.append(int(row["Text#"]))
    random.Random(seed).shuffle(ids)
    return sorted(ids[:count])
