"""Tokenizers and streamable token shards (litdata's `TokensLoader` format, as litgpt's pretraining data uses).

Preparation scripts produce `<out>/train` and `<out>/val` shard directories plus `<out>/tokenizer`, and
`TokenShards` serves fixed-length blocks from them to `recipes/pretrain_moe.py` and to `litgpt.pretrain`. `<out>` may
be a local folder or an object-storage prefix (`s3://bucket/prefix`, `gs://...`) that litdata streams through a
bounded local cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from litgpt_mm.data import remote

EOS = "<|endoftext|>"


@dataclass
class PrepSummary:
    """What a preparation run read, wrote and skipped (skips carry the file name and the reason), and how fast."""

    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    characters: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))
        tqdm.write(f"skipped {name}: {reason}")

    def report(self) -> str:
        lines = [
            f"{'split':<6}{'docs':>8}{'characters':>14}{'tokens':>12}",
            *(f"{s:<6}{self.documents[s]:>8}{self.characters[s]:>14,}{self.tokens[s]:>12,}" for s in ("train", "val")),
            f"skipped: {len(self.skipped)}",
            *(f"  - {name}: {reason}" for name, reason in self.skipped),
        ]
        if self.seconds:
            total = sum(self.tokens.values())
            lines.append(f"{self.seconds:.1f} s with {self.workers} worker(s): {total / self.seconds:,.0f} tokens/s")
        return "\n".join(lines)

    def to_json(self) -> str:
        payload = {k: getattr(self, k) for k in ("documents", "characters", "tokens", "seconds", "workers")}
        payload["skipped"] = [{"name": n, "reason": r} for n, r in self.skipped]
        return json.dumps(payload, indent=2)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())


def split_by_document(names: list[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Seeded split of whole documents: no document lands in both splits; at least one each when possible."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order)))) if len(order) > 1 else 0
    return set(order[n_val:]), set(order[:n_val])


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the `tokenizers` library and save it so `litgpt.Tokenizer` loads it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "add_bos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Tokenizer(out_dir)


def copy_tokenizer(src: Path, out_dir: Path) -> Tokenizer:
    """Reuse an existing tokenizer directory (e.g. phi-2's checkpoint dir): copy its tokenizer files."""
    from litgpt_mm.training.checkpoint import copy_tokenizer_files

    found = copy_tokenizer_files(src, out_dir) if Path(src).is_dir() else []
    if not any(n in found for n in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{src} has no tokenizer.json or tokenizer.model: pass a litgpt checkpoint directory")
    return Tokenizer(out_dir)


def build_tokenizer(
    train_texts: Iterable[str], out_dir: Path, vocab_size: int, tokenizer_dir: Path | None, length: int | None = None
) -> Tokenizer:
    """`out_dir/tokenizer`: a copy of `tokenizer_dir` when given, else a byte-level BPE trained on `train_texts`."""
    if tokenizer_dir is not None:
        return copy_tokenizer(tokenizer_dir, Path(out_dir) / "tokenizer")
    if length is None and isinstance(train_texts, list):
        length = len(train_texts)
    return train_bpe_tokenizer(train_texts, vocab_size, Path(out_dir) / "tokenizer", length=length)


class ShardWriter:
    """Append token sequences to a litdata `TokensLoader` dataset directory."""

    def __init__(self, out_dir: Path, chunk_bytes: str = "64MB") -> None:
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.writer import BinaryWriter

        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True)
        self._writer = BinaryWriter(str(self.out_dir), chunk_bytes=chunk_bytes, item_loader=TokensLoader())
        self._n = 0

    def add(self, ids: list[int]) -> None:
        self._writer.add_item(self._n, torch.tensor(ids, dtype=torch.int32))
        self._n += 1

    def close(self) -> None:
        self._writer.done()
        self._writer.merge()


@dataclass
class StreamArgs:
    """How token shards are read. Only `shuffle` matters for a local folder; the rest is for object storage.

    Args:
        cache_dir: where streamed chunks (and the tokenizer) are kept; default `~/.cache/litgpt-mm/shards`.
        max_cache_size: bound on the chunk cache (litdata evicts chunks already read beyond it).
        shuffle: `global`: one permutation of all blocks per epoch (random reads; the default for local folders).
            `chunks`: a permutation of the chunks, then of the blocks within each window of `shuffle_window` chunks,
            so a streaming run reads a few chunks at a time (the default for `s3://`/`gs://`). `auto` picks.
        shuffle_window: chunks whose blocks are mixed together in `chunks` mode.
        storage_options: keyword arguments of `boto3.client("s3", ...)` (e.g. `endpoint_url`), as litdata takes;
            otherwise credentials and endpoint come from the standard environment variables.
    """

    cache_dir: str | None = None
    max_cache_size: str = "50GB"
    shuffle: Literal["auto", "global", "chunks"] = "auto"
    shuffle_window: int = 4
    storage_options: dict | None = None


def _cache_root(cache_dir: str | None, url: str) -> Path:
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "litgpt-mm" / "shards"
    return root / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]


def read_index(shard_dir: str | Path, storage_options: dict | None = None) -> dict:
    """litdata's `index.json` of a shard directory (local or remote), or one error saying how to write it."""
    hint = "run the matching scripts/prepare_*.py first (its --out_dir takes s3:// too)"
    if remote.is_remote(shard_dir):
        try:
            return remote.read_json(str(remote.join(shard_dir, "index.json")), storage_options)
        except remote.RemoteDataError as e:
            raise remote.RemoteDataError(f"{e}: {hint}" if "not found" in str(e) else str(e)) from None
    index = Path(shard_dir) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: {hint}")
    return json.loads(index.read_text())


def chunk_blocks(index: dict, block_size: int) -> list[int]:
    """Blocks of `block_size` tokens in each chunk, in index order (litdata's `TokensLoader` never spans chunks)."""
    return [c["dim"] // block_size for c in index["chunks"]]


def num_blocks(shard_dir: str | Path, block_size: int, storage_options: dict | None = None) -> int:
    """Number of non-overlapping `block_size` windows litdata's `TokensLoader` serves."""
    return sum(chunk_blocks(read_index(shard_dir, storage_options), block_size))


def shard_tokenizer(data_dir: str | Path, stream: StreamArgs | None = None) -> Path:
    """Local folder with the tokenizer of prepared shards: `data_dir/tokenizer`, downloaded first when remote."""
    if not remote.is_remote(data_dir):
        return Path(data_dir) / "tokenizer"
    stream = stream or StreamArgs()
    url = str(remote.join(data_dir, "tokenizer"))
    local = _cache_root(stream.cache_dir, url) / "tokenizer"
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
    found = remote.fetch_files(url, local, names, stream.storage_options)
    if not {"tokenizer.json", "tokenizer.model"} & set(found):
        raise remote.RemoteDataError(f"{url} holds no tokenizer.json or tokenizer.model: prepare the corpus there")
    return local


class TokenBlocks(Dataset):
    """Fixed-length token blocks (inputs and targets overlap by one: `block_size = max_seq_length + 1`).

    `shard_dir` is a local folder or an object-storage prefix; remote chunks are streamed into a bounded cache.
    """

    def __init__(self, shard_dir: str | Path, block_size: int, stream: StreamArgs | None = None) -> None:
        self.shard_dir, self.block_size, self.stream = shard_dir, block_size, stream or StreamArgs()
        self.chunk_sizes = chunk_blocks(read_index(shard_dir, self.stream.storage_options), block_size)
        self.length = sum(self.chunk_sizes)
        if self.length == 0:
            raise ValueError(f"{shard_dir} holds fewer than {block_size} tokens per chunk: lower max_seq_length")
        self._ds = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"block {index} out of range for {self.length} blocks")
        if self._ds is None:  # opened lazily so each DataLoader worker has its own reader
            from litdata import StreamingDataset
            from litdata.streaming.item_loader import TokensLoader

            cache = {}
            if remote.is_remote(self.shard_dir):
                remote.allow_plain_http(self.stream.storage_options)
                cache = {
                    "cache_dir": str(_cache_root(self.stream.cache_dir, str(self.shard_dir)) / "chunks"),
                    "max_cache_size": self.stream.max_cache_size,
                    "storage_options": self.stream.storage_options or {},
                }
            self._ds = StreamingDataset(
                str(self.shard_dir), item_loader=TokensLoader(block_size=self.block_size), shuffle=False, **cache
            )
        try:
            return self._ds[index].long()
        except KeyError:
            # litdata (0.2.76) races with itself when its bounded cache evicts: its download thread deletes the
            # previous chunk's memory map between the reader's membership check and its `del` (`TokensLoader.close`).
            # The read stopped before loading anything, and a second read finds the map gone and goes on.
            return self._ds[index].long()


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, dealt to ranks in micro-batches, that resumes at an exact position.

    The permutation is cut into micro-batches of `batch_size`; an optimizer step takes `world_size * accumulation`
    consecutive ones, rank `r` the `accumulation` consecutive micro-batches at `r * accumulation` of each step. So
    one process accumulating N micro-batches and N ranks (or any split of the same global batch) see the same
    micro-batches in every step, and their mean-of-micro-batch-means loss is the same whatever the sequence
    lengths. Each epoch yields the same whole number of steps on every rank (the remainder is dropped), so a step
    never straddles two epochs and the position after `n` batches is `divmod(n, batches_per_epoch)`. It is a
    `DistributedSampler` so that Fabric's `setup_dataloaders` (as `litgpt.pretrain` calls it) keeps it in place:
    it already shards by rank.

    With `chunk_sizes` (blocks per chunk) the permutation keeps reads local: chunks in a random order, blocks
    shuffled within each window of `window` consecutive chunks of that order.
    """

    def __init__(
        self,
        length: int,
        seed: int,
        batch_size: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chunk_sizes: list[int] | None = None,
        window: int = 4,
        accumulation: int = 1,
    ) -> None:
        Sampler.__init__(self)
        self.length, self.seed, self.shuffle, self.rank, self.world_size = length, seed, shuffle, rank, world_size
        self.batch_size, self.chunk_sizes, self.window = batch_size, chunk_sizes, max(1, window)
        self.accumulation = max(1, accumulation)
        self.batches_per_epoch = length // (batch_size * world_size * self.accumulation) * self.accumulation
        self.epoch, self.position = 0, 0  # position: samples of this rank already consumed in `epoch`

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        while True:
            order = self._order(torch.Generator().manual_seed(self.seed + self.epoch))
            micro = order[: len(self) * self.world_size].view(-1, self.batch_size)
            owner = torch.arange(len(micro)) // self.accumulation % self.world_size
            mine = micro[owner == self.rank].flatten().tolist()
            for i in mine[self.position :]:
                self.position += 1
                yield i
            self.epoch, self.position = self.epoch + 1, 0
            if not self.shuffle:
                return

    def _order(self, g: torch.Generator) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        if self.chunk_sizes is None:
            return torch.randperm(self.length, generator=g)
        starts = [0, *torch.tensor(self.chunk_sizes).cumsum(0).tolist()]
        chunks = torch.randperm(len(self.chunk_sizes), generator=g).tolist()
        windows = []
        for i in range(0, len(chunks), self.window):
            blocks = torch.cat([torch.arange(starts[c], starts[c + 1]) for c in chunks[i : i + self.window]])
            windows.append(blocks[torch.randperm(len(blocks), generator=g)])
        return torch.cat(windows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0


class ResumableLoader(DataLoader):
    """A DataLoader whose position survives checkpoints: `state_dict()` counts the batches handed out.

    With `track=False` (validation) every iteration starts from the beginning.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, track: bool = True, **kwargs) -> None:
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.track = track
        self.batches_served = 0

    def __iter__(self):
        # batches that workers prefetched are not consumed: restart the sampler at what was really served
        sampler: ResumableSampler = self.sampler
        epoch, batch = divmod(self.batches_served, sampler.batches_per_epoch)
        sampler.epoch, sampler.position = epoch, batch * sampler.batch_size
        for batch in super().__iter__():
            if self.track:
                self.batches_served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]


def split_loaders(
    datasets: dict[str, Dataset],
    micro_batch_size: int,
    accumulation: int,
    seed: int,
    rank: int,
    world_size: int,
    collate_fn,
    where: str,
    num_workers: int = 0,
) -> dict[str, ResumableLoader]:
    """A resumable shuffled `train` loader whose micro-batches are dealt to ranks in steps of `accumulation`, and an
    in-order `val` loader (batches of at most the micro-batch size); `where` names the data in the error raised when
    a split holds fewer samples than a micro-batch on every rank."""
    loaders = {}
    for split, shuffle in (("train", True), ("val", False)):
        data = datasets[split]
        batch = micro_batch_size if shuffle else min(micro_batch_size, len(data))
        sampler = ResumableSampler(
            len(data), seed, batch, shuffle, rank, world_size, accumulation=accumulation if shuffle else 1
        )
        if sampler.batches_per_epoch == 0:
            raise ValueError(f"{where}: {len(data)} {split} samples, fewer than a micro-batch on every device")
        loaders[split] = ResumableLoader(data, sampler, track=shuffle, num_workers=num_workers, collate_fn=collate_fn)
    return loaders


class TokenShards(DataModule):
    """litgpt `DataModule` over prepared token shards; works with `recipes/pretrain_moe.py` and `litgpt.pretrain`.

    Args:
        data_path: folder or `s3://`/`gs://` prefix with `train/`, `val/` (and `tokenizer/`) from a
            `scripts/prepare_*.py` run.
        seed: shuffling seed.
        num_workers: DataLoader worker processes.
        cache_dir, max_cache_size, shuffle, shuffle_window, storage_options: see `StreamArgs`.
    """

    def __init__(
        self,
        data_path: str | Path = "data/prepared/gutenberg",
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        shuffle: Literal["auto", "global", "chunks"] = "auto",
        shuffle_window: int = 4,
        storage_options: dict | None = None,
    ):
        super().__init__()
        self.data_path = str(data_path).rstrip("/") if remote.is_remote(data_path) else Path(data_path)
        self.seed, self.num_workers = seed, num_workers
        self.stream = StreamArgs(cache_dir, max_cache_size, shuffle, shuffle_window, storage_options)
        self.batch_size, self.max_seq_length = 1, 2048
        self.rank, self.world_size = 0, 1

    @classmethod
    def from_args(cls, data_path: str | Path, seed: int, num_workers: int, stream: StreamArgs) -> TokenShards:
        return cls(data_path, seed, num_workers, **asdict(stream))

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int = -1) -> None:
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length if max_seq_length > 0 else 2048

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def prepare_data(self) -> None:
        for split in ("train", "val"):  # clear error if the data was not prepared or cannot be reached
            read_index(remote.join(self.data_path, split), self.stream.storage_options)

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds = TokenBlocks(remote.join(self.data_path, split), self.max_seq_length + 1, self.stream)
        mode = self.stream.shuffle
        if mode == "auto":
            mode = "chunks" if remote.is_remote(self.data_path) else "global"
        sampler = ResumableSampler(
            len(ds),
            self.seed,
            self.batch_size,
            shuffle,
            self.rank,
            self.world_size,
            chunk_sizes=ds.chunk_sizes if mode == "chunks" else None,
            window=self.stream.shuffle_window,
        )
        if sampler.batches_per_epoch == 0:
            raise ValueError(
                f"{ds.shard_dir} gives {len(ds) // self.world_size} blocks of {self.max_seq_length + 1} "
                f"tokens per rank, fewer than the micro batch size {self.batch_size}: prepare more data or lower "
                "the sequence length"
            )
        return ResumableLoader(ds, sampler, track=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> ResumableLoader:
        return self._loader("val", shuffle=False)


def unigram_entropy(shard_dir: Path, vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution of a shard set: the loss of a model that ignores context."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    total = num_blocks(shard_dir, 1)
    ds = StreamingDataset(str(shard_dir), item_loader=TokensLoader(block_size=min(total, 4096)), shuffle=False)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for block in ds:
        counts += torch.bincount(block.long(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


__all__ = [
    "TokenShards",
    "StreamArgs",
    "shard_tokenizer",
    "ShardWriter",
    "PrepSummary",
    "train_bpe_tokenizer",
    "copy_tokenizer",
]
