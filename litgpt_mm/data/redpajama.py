"""RedPajama-1T jsonl documents: source detection by path, `.jsonl` / `.jsonl.zst` streaming, bad lines counted."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import zstandard

SAMPLE_URL = "https://huggingface.co/datasets/togethercomputer/RedPajama-Data-1T-Sample/resolve/main"
SAMPLE_FILES = {
    "cc": [f"cc_{v}_sample.jsonl" for v in ("2019-30", "2020-05", "2021-04", "2022-05", "2023-06")],
    "c4": ["c4_sample.jsonl"],
    "arxiv": ["arxiv_sample.jsonl"],
    "book": ["book_sample.jsonl"],
    "github": ["github_sample.jsonl"],
    "stackexchange": ["stackexchange_sample.jsonl"],
    "wikipedia": ["wikipedia_sample.jsonl"],
}
SOURCES = tuple(SAMPLE_FILES)
_ALIASES = {"common_crawl": "cc"}


def source_of(path: Path) -> str | None:
    """The RedPajama source a file belongs to, from its name or folder (`cc_2023-06_sample.jsonl`,
    `common_crawl/2023-06/en_head_0000.json.gz.dedup.classifier.jsonl.zst`, `c4/c4-train.00000-of-01024.jsonl`)."""
    for part in (Path(path).name, *reversed(Path(path).parts[:-1])):
        head = part.lower().split("_")[0].split("-")[0].split(".")[0]
        if part.lower() in _ALIASES:
            return _ALIASES[part.lower()]
        if head in SOURCES:
            return head
    return None


def is_jsonl(path: Path) -> bool:
    return Path(path).name.endswith((".jsonl", ".jsonl.zst"))


def open_text(path: Path) -> io.TextIOBase:
    """Open a `.jsonl` or zstandard-compressed `.jsonl.zst` file as UTF-8 text (streaming)."""
    path = Path(path)
    if path.name.endswith(".zst"):
        raw = open(path, "rb")
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def iter_documents(path: Path, skip) -> Iterator[str]:
    """Texts of a jsonl file. A line that is not a JSON object with a non-empty string `text` (a truncated last
    line, bad JSON, missing field), and a file that cannot be read or decoded, are reported through
    `skip(name, reason)` and the iteration goes on with the next line or file."""
    name = Path(path).name
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    kind = "truncated line" if not line.endswith("\n") else "invalid JSON"
                    skip(f"{name}:{number}", f"{kind} ({err.msg})")
                    continue
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str) or not text.strip():
                    skip(f"{name}:{number}", "no non-empty string field 'text'")
                    continue
                yield text
    except (OSError, UnicodeDecodeError, EOFError, zstandard.ZstdError) as err:
        skip(name, f"unreadable ({type(err).__name__}: {err}); the lines before it were kept")
