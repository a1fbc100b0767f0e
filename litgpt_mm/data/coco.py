"""COCO-2017 captions: validated annotations, robust image loading, downloads, and a CLIP patch-feature cache."""

from __future__ import annotations

import json
import random
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from tqdm import tqdm

from litgpt_mm.data.download import download
from litgpt_mm.training.checkpoint import atomic_torch_save, atomic_write

COCO_URL = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = ("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c")
IMAGES_ZIP = {
    "train": ("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val": ("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
}


@dataclass
class CaptionRecord:
    """One image (path relative to the images root) and its captions."""

    image_id: int
    file: str
    captions: list[str]


@dataclass
class CocoSummary:
    """Counts per split and every skip with its file name and reason."""

    images: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    captions: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    converted: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))
        tqdm.write(f"skipped {name}: {reason}")

    def report(self) -> str:
        lines = [f"{s:<6} images {self.images[s]:>7,}  captions {self.captions[s]:>8,}" for s in ("train", "val")]
        if self.converted:
            lines.append("converted to RGB: " + ", ".join(f"{k} {v}" for k, v in sorted(self.converted.items())))
        lines.append(f"skipped: {len(self.skipped)}")
        lines += [f"  - {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        payload = asdict(self)
        payload["skipped"] = [{"name": n, "reason": r} for n, r in self.skipped]
        Path(path).write_text(json.dumps(payload, indent=2))


def load_coco_json(path: Path, kind: str, keys: tuple[str, ...]) -> dict:
    """A COCO annotation file (`kind`: "captions" or "instances") as a dict holding `keys`, or one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO {kind} file {path} does not exist (expected {kind}_*.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{path}: not a COCO {kind} file; expected the keys {', '.join(repr(k) for k in keys)}")
    return data


def read_annotations(path: Path, split_dir: str, summary: CocoSummary) -> list[CaptionRecord]:
    """Parse a `captions_*.json` file. Empty or missing captions, captions of unknown images, and images left with no
    caption are reported through `summary.skip` and left out."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annotations"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: not a COCO captions file ({type(err).__name__}: {err}); expected the official "
            "captions_*.json schema with 'images' and 'annotations'"
        ) from None
    files = {img["id"]: f"{split_dir}/{img['file_name']}" for img in images}
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in annotations:
        image_id, caption = ann.get("image_id"), ann.get("caption")
        where = f"{path.name}: annotation {ann.get('id')}"
        if image_id not in files:
            summary.skip(where, f"image_id {image_id} is not in 'images'")
        elif not isinstance(caption, str) or not caption.strip():
            summary.skip(where, f"empty or missing caption for image {image_id}")
        else:
            captions[image_id].append(" ".join(caption.split()))
    records = []
    for image_id, file in files.items():
        if captions[image_id]:
            records.append(CaptionRecord(image_id, file, captions[image_id]))
        else:
            summary.skip(file, "no usable caption")
    return records


def load_rgb(path: Path) -> tuple[Image.Image, str]:
    """Open an image as RGB: CMYK, grey, palette and alpha images are converted (alpha over white).

    Returns the image and its original mode; raises `OSError` (or `ValueError`) for a missing or corrupt file.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out, mode
        return img.convert("RGB"), mode


def validate_images(records: list[CaptionRecord], root: Path, split: str, summary: CocoSummary) -> list[CaptionRecord]:
    """Keep records whose image exists and decodes; count the modes that need conversion."""
    kept = []
    for rec in tqdm(records, desc=f"check {split} images", unit="img"):
        try:
            _, mode = load_rgb(Path(root) / rec.file)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            summary.skip(rec.file, f"missing or unreadable image ({type(err).__name__}: {err})")
            continue
        if mode != "RGB":
            summary.converted[mode] = summary.converted.get(mode, 0) + 1
        kept.append(rec)
        summary.images[split] += 1
        summary.captions[split] += len(rec.captions)
    return kept


def seeded_subset(records: list[CaptionRecord], n: int | None, seed: int) -> list[CaptionRecord]:
    """`n` records drawn with a fixed seed (all of them when `n` is None or larger), in image-id order."""
    if n is None or n >= len(records):
        return sorted(records, key=lambda r: r.image_id)
    return sorted(random.Random(seed).sample(records, n), key=lambda r: r.image_id)


def write_index(records: list[CaptionRecord], path: Path) -> None:
    text = "".join(json.dumps(asdict(r)) + "\n" for r in records)
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def read_index(path: Path) -> list[CaptionRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run scripts/prepare_coco.py first")
    return [CaptionRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def download_annotations(cache_dir: Path, base_url: str = COCO_URL, md5: str | None = ANNOTATIONS_ZIP[1]) -> Path:
    """Fetch (resumable, md5-checked) and unpack the caption files; returns the `annotations/` directory."""
    zpath = download(f"{base_url}/{ANNOTATIONS_ZIP[0]}", Path(cache_dir) / "annotations_trainval2017.zip", md5=md5)
    out = Path(cache_dir)
    with zipfile.ZipFile(zpath) as zf:
        for name in ("annotations/captions_train2017.json", "annotations/captions_val2017.json"):
            if not (out / name).is_file():
                zf.extract(name, out)
    return out / "annotations"


def download_images(
    records: list[CaptionRecord], cache_dir: Path, summary: CocoSummary, base_url: str = COCO_URL, workers: int = 8
) -> None:
    """Fetch each record's image from `base_url/<split>2017/<file>` into `cache_dir` (cached, resumable, retried)."""

    def fetch(rec: CaptionRecord) -> tuple[CaptionRecord, Exception | None]:
        try:
            download(f"{base_url}/{rec.file}", Path(cache_dir) / rec.file, retries=3, backoff=1.0)
            return rec, None
        except Exception as err:  # noqa: BLE001 - reported per image, the run goes on
            return rec, err

    with ThreadPoolExecutor(workers) as pool:
        for rec, err in tqdm(pool.map(fetch, records), total=len(records), desc="download images", unit="img"):
            if err is not None:
                summary.skip(rec.file, f"download failed: {err}")


class FeatureCache:
    """fp16 CLIP patch features keyed by image id, in shards under `root/<encoder key>/`.

    The key names the CLIP model, weights, layer and norm, so runs with the same encoder reuse the cache across
    epochs and runs, and a different encoder builds a new one. Shards are written atomically and the index after
    each shard, so an interrupted build resumes where it stopped. Every image is also found by its resolved file path,
    so instruction data (which names images by path) reuses the features the caption preparation computed.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.dir = Path(root) / key
        self.index_path = self.dir / "index.json"
        self.index: dict[str, list[int]] = json.loads(self.index_path.read_text()) if self.index_path.is_file() else {}
        self._shards: dict[int, torch.Tensor] = {}

    def __contains__(self, image_id: int) -> bool:
        return str(image_id) in self.index

    def __len__(self) -> int:
        return len({tuple(v) for v in self.index.values()})  # images, not keys (an image has an id and a path)

    def build(
        self,
        encoder,
        records: list[CaptionRecord],
        images_root: Path,
        summary: CocoSummary,
        batch_size: int = 32,
        shard_size: int = 1024,
    ) -> int:
        """Encode the images not cached yet. Returns how many were added."""
        todo = [r for r in records if r.image_id not in self and _path_key(images_root, r.file) not in self]
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = max((s for s, _ in self.index.values()), default=-1) + 1
        added = 0
        with tqdm(total=len(todo), desc=f"CLIP features ({self.dir.name})", unit="img") as bar:
            for start in range(0, len(todo), shard_size):
                ids, paths, feats = [], [], []
                chunk = todo[start : start + shard_size]
                for b in range(0, len(chunk), batch_size):
                    images, batch_ids, batch_paths = [], [], []
                    for rec in chunk[b : b + batch_size]:
                        try:
                            images.append(load_rgb(Path(images_root) / rec.file)[0])
                            batch_ids.append(rec.image_id)
                            batch_paths.append(_path_key(images_root, rec.file))
                        except (OSError, ValueError) as err:
                            summary.skip(rec.file, f"unreadable image while caching features: {err}")
                    if images:
                        feats.append(encoder.encode_images(images).half().cpu())
                        ids += batch_ids
                        paths += batch_paths
                    bar.update(len(chunk[b : b + batch_size]))
                if not ids:
                    continue
                atomic_torch_save(torch.cat(feats), self.dir / f"shard-{shard:05d}.pt")
                self.index.update({str(i): [shard, row] for row, i in enumerate(ids)})
                self.index.update({path: [shard, row] for row, path in enumerate(paths)})
                text = json.dumps(self.index)
                atomic_write(self.index_path, lambda f, t=text: f.write(t.encode()))
                shard += 1
                added += len(ids)
        return added

    def get(self, image_id: int) -> torch.Tensor:
        shard, row = self.index[str(image_id)]
        if shard not in self._shards:
            self._shards[shard] = torch.load(self.dir / f"shard-{shard:05d}.pt", mmap=True, weights_only=True)
        return self._shards[shard][row]


def _path_key(images_root: Path, file: str) -> str:
    return str((Path(images_root) / file).resolve())


class CaptionPairs(Dataset):
    """(image, caption) pairs: every caption of every image is one sample.

    Items hold the image's cached CLIP features (`features`, fp16 (num_patches, width)) when a cache is given, else
    its preprocessed pixels (`pixels`), and `ids`: the caption's tokens followed by EOS, cut at `max_tokens`.
    """

    def __init__(
        self, records, tokenizer, max_tokens: int, images_root: Path, cache: FeatureCache | None = None, preprocess=None
    ) -> None:
        if cache is None and preprocess is None:
            raise ValueError("pass a feature cache or the CLIP preprocessing")
        self.records, self.tokenizer, self.max_tokens = records, tokenizer, max_tokens
        self.images_root, self.cache, self.preprocess = Path(images_root), cache, preprocess
        self.pairs = [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        i, j = self.pairs[index]
        rec = self.records[i]
        ids = self.tokenizer.encode(rec.captions[j], bos=False, eos=True)[: self.max_tokens]
        item = {"image_id": rec.image_id, "ids": ids.long()}
        if self.cache is not None:
            item["features"] = self.cache.get(rec.image_id)
        else:
            item["pixels"] = self.preprocess(load_rgb(self.images_root / rec.file)[0])
        return item


def collate_pairs(items: list[dict]) -> dict:
    """Batch of `CaptionPairs` items: stacked features or pixels, a list of variable-length `ids`."""
    batch = {"image_id": [it["image_id"] for it in items], "ids": [it["ids"] for it in items]}
    for key in ("features", "pixels"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch
