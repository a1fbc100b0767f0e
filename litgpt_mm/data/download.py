"""Resumable, cached HTTP downloads with retries (urllib only: no extra dependency for data preparation)."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from pathlib import Path

USER_AGENT = "litgpt-mm-prepare/0.1"


def download(
    url: str,
    dest: Path,
    retries: int = 4,
    backoff: float = 2.0,
    timeout: float = 60.0,
    sha256: str | None = None,
    md5: str | None = None,
) -> Path:
    """Download `url` to `dest`, resuming a partial `.part` file with an HTTP Range request; cached if present.

    With a checksum, the finished file is verified (a mismatch deletes it and raises `ValueError`).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                resumed = have and response.status == 206
                expected = response.headers.get("Content-Length")
                got = 0
                with open(part, "ab" if resumed else "wb") as f:
                    while chunk := response.read(1 << 16):
                        f.write(chunk)
                        got += len(chunk)
            if expected is not None and got < int(expected):
                raise ConnectionError(f"{url}: connection closed after {got} of {expected} bytes")
            verify(part, sha256=sha256, md5=md5, name=url)
            part.replace(dest)
            return dest
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # the partial file is already complete
                part.replace(dest)
                return dest
            if err.code == 404 or attempt == retries:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == retries:
                raise
        time.sleep(backoff * 2**attempt)
    raise RuntimeError("unreachable")


def verify(path: Path, sha256: str | None = None, md5: str | None = None, name: str | None = None) -> None:
    """Check a file's checksum; on mismatch delete it and raise `ValueError` naming it."""
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want is None:
            continue
        digest = hashlib.new(algo)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != want.lower():
            Path(path).unlink()
            raise ValueError(f"{name or path}: {algo} {digest.hexdigest()} != expected {want}; deleted, download again")
