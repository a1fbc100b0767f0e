"""Parallel, resumable preparation of token shards with litdata's `optimize`.

A preparation runs in steps that each survive a kill:

1. documents are obtained and cleaned by a pool of worker processes into `work_dir/clean/` (one file per document
   plus its metadata; a rerun skips those already there);
2. the tokenizer is trained once (or copied) into `work_dir/tokenizer/`;
3. each split's documents are tokenized by litdata's `optimize` (`num_workers` processes per machine; with
   `num_nodes` machines each takes a contiguous share), with litdata's checkpoints, so a killed run continues where
   its workers stopped; a finished split is not redone. The shards go to a local folder or to an `s3://` prefix.

`work_dir/state.json` records the settings: a rerun with other settings (another tokenizer, vocabulary, inputs)
stops with one line instead of mixing two preparations. With several machines, `work_dir` must be shared (node 0
cleans and trains the tokenizer; the others wait for its manifest), and so must a local `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from litgpt_mm.data import remote
from litgpt_mm.data.tokens import PrepSummary, build_tokenizer, read_index

MANIFEST = "manifest.json"
_TOKENIZERS: dict[str, object] = {}


@dataclass
class Scale:
    """How a preparation spreads its work.

    Args:
        num_workers: worker processes on this machine (cleaning and tokenizing).
        num_nodes: machines sharing the tokenization (each takes a contiguous share of every split).
        node_rank: this machine's rank, 0..num_nodes-1.
        work_dir: cleaned documents, tokenizer and resume state (default `<out_dir>/.prepare` for a local output,
            `data/cache/prepare/<name>-<hash>` for a remote one; shared by all machines when `num_nodes > 1`).
        chunk_bytes: target size of a shard chunk.
        overwrite: start again when `work_dir` holds a preparation with other settings.
        storage_options: `boto3.client("s3", ...)` arguments for an `s3://` output (else the standard variables).
    """

    num_workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    work_dir: Path | None = None
    chunk_bytes: str = "64MB"
    overwrite: bool = False
    storage_options: dict | None = None


def check_scale(scale: Scale, n_inputs: int | None = None, out_dir: str | Path | None = None) -> None:
    """One line for a setting that cannot work, before any work (the worker count once the inputs are known; an
    `s3://` output whose bucket is missing or whose credentials are refused)."""
    if out_dir is not None and remote.is_remote(out_dir):
        remote.check_writable(str(out_dir), scale.storage_options)
    if scale.num_workers < 1 or scale.num_nodes < 1 or not 0 <= scale.node_rank < scale.num_nodes:
        raise ValueError(
            f"--num_workers {scale.num_workers}, --num_nodes {scale.num_nodes}, --node_rank {scale.node_rank}: "
            "need num_workers >= 1 and 0 <= node_rank < num_nodes"
        )
    if n_inputs is not None and scale.num_workers * scale.num_nodes > n_inputs:
        raise ValueError(
            f"{scale.num_workers * scale.num_nodes} workers ({scale.num_nodes} node(s) x {scale.num_workers}) for "
            f"{n_inputs} input(s): some would have nothing to do; lower --num_workers to at most "
            f"{max(1, n_inputs // scale.num_nodes)}"
        )


def tokenizer_fingerprint(tokenizer_dir: Path | None) -> str | None:
    """SHA-256 of a tokenizer folder's tokenizer files (None: a tokenizer will be trained)."""
    if tokenizer_dir is None:
        return None
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (Path(tokenizer_dir) / name).is_file():
            digest.update(name.encode() + (Path(tokenizer_dir) / name).read_bytes())
    return digest.hexdigest()


def work_dir_for(scale: Scale, out_dir: str | Path) -> Path:
    if scale.work_dir is not None:
        return Path(scale.work_dir)
    if not remote.is_remote(out_dir):
        return Path(out_dir) / ".prepare"
    digest = hashlib.sha1(str(out_dir).rstrip("/").encode()).hexdigest()[:12]
    return Path("data/cache/prepare") / f"{Path(str(out_dir)).name}-{digest}"


def open_state(work_dir: Path, settings: dict, overwrite: bool) -> None:
    """Record `settings` in `work_dir/state.json`; a preparation there with other settings stops with one line (or,
    with `overwrite`, is deleted and started again)."""
    path = work_dir / "state.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in {*settings, *saved} if settings.get(k) != saved.get(k))
        if not changed:
            return
        if not overwrite:
            raise ValueError(
                f"{work_dir} holds a preparation with other settings (changed: {', '.join(changed)}): pass "
                "--overwrite true to start again, or another --out_dir or --work_dir"
            )
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


def _write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def splits_done(work_dir: Path, node_rank: int) -> list[str]:
    path = work_dir / f"done-node{node_rank}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def run_pool(fn: Callable, items: list, num_workers: int, desc: str, unit: str) -> list:
    """`fn` over `items` in `num_workers` processes (in order), with a progress bar."""
    if num_workers <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, unit=unit)]
    with get_context("fork").Pool(num_workers) as pool:
        return list(tqdm(pool.imap(fn, items), total=len(items), desc=desc, unit=unit))


def cached_document(name: str, work_dir: Path, make: Callable[[], tuple[str, dict]]) -> dict:
    """A cleaned document as `{"name", "path", "chars", ...}` (or `{"name", "skip": reason}`), made once.

    `make()` returns the text and extra metadata, or raises `ValueError`/`OSError`/`UnicodeDecodeError` whose
    message becomes the skip reason.
    """
    meta_path = work_dir / "clean" / f"{name}.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text, extra = make()
        text_path = meta_path.with_suffix(".txt")
        tmp = text_path.with_name(text_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, text_path)
        meta = {"name": name, "path": str(text_path.resolve()), "chars": len(text), **extra}
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        meta = {"name": name, "skip": getattr(err, "reason", None) or str(err)}
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)
    return meta


def publish_manifest(work_dir: Path, manifest: dict) -> None:
    _write_json(work_dir / MANIFEST, manifest)


def wait_for_manifest(work_dir: Path, timeout_s: float = 7 * 24 * 3600, poll_s: float = 5.0) -> dict:
    """Node > 0: wait until node 0 has cleaned the documents and built the tokenizer in the shared `work_dir`."""
    path = work_dir / MANIFEST
    start = time.monotonic()
    with tqdm(desc=f"waiting for node 0 ({path})", unit="s", bar_format="{desc}: {elapsed}") as bar:
        while not path.is_file():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{path} did not appear: is node 0 running with the same --work_dir?")
            time.sleep(poll_s)
            bar.update(poll_s)
    return json.loads(path.read_text())


def prepare_tokenizer(
    work_dir: Path, texts: Callable[[], Iterable[str]], length: int, vocab_size: int, tokenizer_dir: Path | None
) -> tuple[Path, str]:
    """`work_dir/tokenizer` (a byte-level BPE trained on `texts()`, or a copy of `tokenizer_dir`) and its SHA-256."""
    target = work_dir / "tokenizer"
    if not (target / "tokenizer.json").is_file() and not (target / "tokenizer.model").is_file():
        tmp = work_dir / ".tokenizer-build"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tokenizer(texts() if tokenizer_dir is None else [], tmp, vocab_size, tokenizer_dir, length)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp / "tokenizer", target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target, tokenizer_fingerprint(target)


def read_documents(path: str | Path) -> Iterable[str]:
    """The documents of a cleaned file: one per line of a `.jsonl` part (JSON strings), else the whole file."""
    if str(path).endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)
    else:
        yield Path(path).read_text(encoding="utf-8")


def encode_file(path: str, tokenizer_dir: str) -> torch.Tensor:
    """Token ids (int32) of the documents of one cleaned file, each closed by EOS: `optimize`'s per-input function."""
    from litgpt.tokenizer import Tokenizer

    tokenizer = _TOKENIZERS.get(tokenizer_dir) or _TOKENIZERS.setdefault(tokenizer_dir, Tokenizer(tokenizer_dir))
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = list(read_documents(path))
    if tokenizer.backend == "huggingface":
        docs = [e.ids for e in tokenizer.processor.encode_batch(texts, add_special_tokens=False)]
    else:
        docs = [tokenizer.encode(t).tolist() for t in texts]
    return torch.tensor([i for ids in docs for i in ids + eos], dtype=torch.int32)


def write_split(
    split: str, paths: list[str], out_dir: str | Path, tokenizer_dir: Path, scale: Scale, work_dir: Path
) -> None:
    """Tokenize this machine's share of `paths` into `out_dir/split` with litdata's `optimize`; a killed run resumes
    from litdata's checkpoints and a finished split is kept.

    One machine writing a local folder writes there directly. Otherwise each machine writes its contiguous share of
    `paths` into a local staging folder, then copies or uploads its chunks (renamed `node<r>-chunk-*.bin`) and a
    partial index; the last machine waits for every partial index and writes the merged `index.json` last. The
    chunks follow `paths` in order whatever the number of machines and workers.
    """
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    done = splits_done(work_dir, scale.node_rank)
    if split in done:
        print(f"{split}: already written, kept")
        return
    if len(paths) < scale.num_nodes:
        raise ValueError(f"{split}: {len(paths)} document(s) for {scale.num_nodes} machines: use fewer machines")
    r, n = scale.node_rank, scale.num_nodes
    mine = paths[r * len(paths) // n : (r + 1) * len(paths) // n]
    destination = remote.join(out_dir, split)
    direct = n == 1 and not remote.is_remote(out_dir)
    target = Path(destination) if direct else work_dir / "staging" / f"node{r}" / split
    workers = max(1, min(scale.num_workers, len(mine)))  # a small split: fewer, busy workers
    print(f"{split}: tokenizing {len(mine)} of {len(paths)} document(s) with {workers} worker(s) into {target}")
    resumable = (target / ".checkpoints").is_dir()
    with _ShardProgress(target, sum(Path(p).stat().st_size for p in mine), split):
        optimize(
            fn=partial(encode_file, tokenizer_dir=str(tokenizer_dir.resolve())),
            inputs=mine,
            output_dir=str(target),
            num_workers=workers,
            chunk_bytes=scale.chunk_bytes,
            item_loader=TokensLoader(),
            use_checkpoint=True,
            keep_data_ordered=True,  # worker k writes the k-th slice of `mine`: the chunks follow `paths`
            reorder_files=False,
            mode=None if resumable else "overwrite",
            start_method="fork",
            verbose=False,
        )
    if not direct:
        _publish_shards(target, destination, r, n, scale.storage_options)
    _write_json(work_dir / f"done-node{r}.json", [*done, split])


def _publish_shards(staged: Path, destination: str | Path, rank: int, num_nodes: int, storage_options) -> None:
    """Copy or upload one machine's staged chunks and partial index; the last machine writes the merged index."""
    index = json.loads((staged / "index.json").read_text())
    for chunk in index["chunks"]:
        name = f"node{rank}-{chunk['filename']}"
        _put(staged / chunk["filename"], remote.join(destination, name), storage_options)
        chunk["filename"] = name
    partial_index = staged.parent / f"{rank}-index.json"
    partial_index.write_text(json.dumps(index))
    _put(partial_index, remote.join(destination, f"node{rank}-index.json"), storage_options)
    if rank != num_nodes - 1:
        return
    merged = None
    for other in range(num_nodes):
        part = _wait_and_read(remote.join(destination, f"node{other}-index.json"), storage_options)
        merged = part if merged is None else {**merged, "chunks": merged["chunks"] + part["chunks"]}
    final = staged.parent / "index.json"
    final.write_text(json.dumps(merged))
    _put(final, remote.join(destination, "index.json"), storage_options)


def _put(local: Path, destination: str | Path, storage_options) -> None:
    if remote.is_remote(destination):
        remote.upload_file(local, str(destination), storage_options)
        return
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(destination).with_name(Path(destination).name + ".tmp")
    shutil.copyfile(local, tmp)
    os.replace(tmp, destination)


def _wait_and_read(location: str | Path, storage_options, poll_s: float = 2.0) -> dict:
    """A JSON file another machine writes, read once it exists."""
    while True:
        try:
            if remote.is_remote(location):
                return remote.read_json(str(location), storage_options)
            return json.loads(Path(location).read_text())
        except (FileNotFoundError, remote.RemoteDataError) as err:
            if isinstance(err, remote.RemoteDataError) and "not found" not in str(err):
                raise
            time.sleep(poll_s)


class _ShardProgress:
    """A progress bar over the bytes of chunks appearing in a local shard folder while litdata's workers write them
    (litdata's own bar only moves when a worker finishes). `total` is the documents' UTF-8 size, so the bar reads
    in characters and ends near 100 % (about 4 bytes of text per token, 4 bytes per token id)."""

    def __init__(self, folder: Path | None, total: int | None, split: str) -> None:
        self.folder, self.total, self.split = folder, total, split
        self._stop = None

    def __enter__(self):
        import threading

        if self.folder is None:
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        with tqdm(total=self.total, desc=f"tokenize {self.split}", unit="B", unit_scale=True) as bar:
            while not self._stop.wait(1.0):
                done = sum(f.stat().st_size for f in self.folder.glob("chunk-*.bin") if f.is_file())
                bar.update(min(done, bar.total or done) - bar.n)
            bar.update((bar.total or bar.n) - bar.n)

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()


def count_split(
    summary: PrepSummary, split: str, out_dir: str | Path, documents: int, characters: int, scale: Scale
) -> None:
    """Tokens from the written index (exact); documents and characters as the cleaning counted them."""
    index = read_index(remote.join(out_dir, split), scale.storage_options)
    summary.tokens[split] = sum(c["dim"] for c in index["chunks"])
    summary.documents[split], summary.characters[split] = documents, characters


def plan_or_join(work_dir: Path, settings: dict, scale: Scale, plan: Callable[[], dict], summary: PrepSummary) -> dict:
    """Node 0 records the settings, runs `plan()` (obtain and clean the documents, build the tokenizer) and publishes
    its manifest; the other machines wait for that manifest. A manifest already there (a rerun) is reused."""
    if scale.node_rank == 0:
        open_state(work_dir, settings, scale.overwrite)
        if (work_dir / MANIFEST).is_file():
            manifest = json.loads((work_dir / MANIFEST).read_text())
            for name, reason in manifest["skipped"]:
                summary.skip(name, reason)
            return manifest
        manifest = plan()
        publish_manifest(work_dir, manifest)
        return manifest
    manifest = wait_for_manifest(work_dir)
    open_state(work_dir, settings, overwrite=False)
    for name, reason in manifest["skipped"]:
        summary.skip(name, reason)
    return manifest


def write_and_report(
    splits: dict[str, list[str]],
    counts: dict[str, tuple[int, int]],
    out_dir: str | Path,
    work_dir: Path,
    scale: Scale,
    summary: PrepSummary,
    start: float,
    files: dict[str, str],
) -> PrepSummary:
    """Write every split's shards, then (on the last machine) count, publish the tokenizer, `files` and
    `summary.json` next to the shards, and print the summary. `counts[split]` is (documents, characters)."""
    for split, paths in splits.items():
        write_split(split, paths, out_dir, work_dir / "tokenizer", scale, work_dir)
    if scale.node_rank < scale.num_nodes - 1:
        print(f"node {scale.node_rank}: shards written; node {scale.num_nodes - 1} merges the index and reports")
        return summary
    for split, (documents, characters) in counts.items():
        count_split(summary, split, out_dir, documents, characters, scale)
    summary.seconds, summary.workers = time.perf_counter() - start, scale.num_workers * scale.num_nodes
    publish(out_dir, work_dir, {**files, "summary.json": summary.to_json()}, scale)
    print(summary.report())
    print(f"Wrote {out_dir}/train, {out_dir}/val and {out_dir}/tokenizer")
    return summary


def publish(out_dir: str | Path, work_dir: Path, files: dict[str, str | bytes], scale: Scale) -> None:
    """The tokenizer and small report files next to the shards (copied, or uploaded to object storage)."""
    if remote.is_remote(out_dir):
        staging = work_dir / "publish"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(work_dir / "tokenizer", staging / "tokenizer")
        for name, content in files.items():
            (staging / name).write_text(content) if isinstance(content, str) else (staging / name).write_bytes(content)
        remote.upload_dir(staging, str(out_dir), scale.storage_options)
        return
    out = Path(out_dir)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    shutil.copytree(work_dir / "tokenizer", out / "tokenizer")
    for name, content in files.items():
        (out / name).write_text(content) if isinstance(content, str) else (out / name).write_bytes(content)
