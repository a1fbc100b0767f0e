"""Prepare COCO-2017 captions for alignment: a seeded image subset, a validated index, an optional CLIP feature cache.

    python scripts/prepare_coco.py                                  # the 20 bundled images (offline)
    python scripts/prepare_coco.py --download true                  # 40,000 train + 1,000 val images from COCO
    python scripts/prepare_coco.py --download true --image_source zip --subset 118287    # whole train2017.zip
    python scripts/prepare_coco.py --features true --clip_pretrained openai              # + CLIP feature cache

Writes `<out_dir>/{train,val}.jsonl` (one image with its captions per line), `<out_dir>/meta.json` (where the
images are) and `<out_dir>/summary.json`. Missing or corrupt images, empty captions and annotations pointing to
unknown images are reported by name and left out; CMYK, grey, palette and alpha images are converted to RGB.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from litgpt_mm import REPO_ROOT
from litgpt_mm.data import coco
from litgpt_mm.data.download import download

SAMPLE_DIR = REPO_ROOT / "data" / "coco"


def prepare(
    source_dir: Path = SAMPLE_DIR,
    download_coco: bool = False,
    cache_dir: Path = Path("data/cache/coco"),
    image_source: Literal["per_image", "zip"] = "per_image",
    base_url: str = coco.COCO_URL,
    annotations_md5: str | None = coco.ANNOTATIONS_ZIP[1],
    subset: int | None = 40_000,
    val_subset: int | None = 1_000,
    seed: int = 42,
    out_dir: Path = Path("data/prepared/coco"),
    features: bool = False,
    feature_dir: Path = Path("data/cache/clip_features"),
    clip_model: str = "ViT-B-32",
    clip_pretrained: str | None = "openai",
    clip_layer: int = -1,
    batch_size: int = 32,
) -> coco.CocoSummary:
    """Build the caption index (and feature cache).

    Args:
        source_dir: a COCO layout (`annotations/captions_{train,val}2017*.json`, `{train,val}2017/*.jpg`);
            the bundled sample by default.
        download_coco: download from COCO into `cache_dir` instead (annotations zip md5-checked, resumable).
        cache_dir: download cache.
        image_source: `per_image` fetches only the subset's images; `zip` fetches the full md5-checked zips.
        base_url: COCO download host.
        annotations_md5: expected md5 of the annotations zip (the official file's by default).
        subset: training images to keep (seeded; None = all).
        val_subset: validation images to keep (seeded; None = all).
        seed: subset seed.
        out_dir: output directory.
        features: also build the fp16 CLIP patch-feature cache (recipes/align.py then skips CLIP entirely).
        feature_dir: root of the feature cache (one subdirectory per CLIP model/weights/layer).
        clip_model: open_clip model for the cache.
        clip_pretrained: open_clip weights tag (None: random initialisation, for offline tests).
        clip_layer: vision block whose output is cached.
        batch_size: images per CLIP batch.
    """
    summary = coco.CocoSummary()
    root = Path(cache_dir) if download_coco else Path(source_dir)
    if download_coco:
        coco.download_annotations(root, base_url, annotations_md5)
    splits = {"train": subset, "val": val_subset}
    records = {}
    for split, n in splits.items():
        ann = _annotation_file(root / "annotations", split)
        chosen = coco.seeded_subset(coco.read_annotations(ann, f"{split}2017", summary), n, seed)
        if download_coco:
            _download_split(chosen, split, root, image_source, base_url, summary)
        records[split] = coco.validate_images(chosen, root, split, summary)
    if not records["train"]:
        raise SystemExit(f"No usable training images under {root}:\n{summary.report()}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, recs in records.items():
        coco.write_index(recs, out_dir / f"{split}.jsonl")
    (out_dir / "meta.json").write_text(json.dumps({"images_root": str(root.resolve())}, indent=2))
    if features:
        from litgpt_mm.models.vision import CLIPPatchEncoder

        encoder = CLIPPatchEncoder(clip_model, clip_pretrained, layer=clip_layer)
        cache = coco.FeatureCache(feature_dir, encoder.key())
        added = cache.build(encoder, records["train"] + records["val"], root, summary, batch_size)
        print(f"CLIP feature cache {cache.dir}: {added} images added, {len(cache)} cached")
    summary.save(out_dir / "summary.json")
    print(summary.report())
    print(f"Wrote {out_dir}/train.jsonl and {out_dir}/val.jsonl")
    return summary


def _annotation_file(directory: Path, split: str) -> Path:
    for name in (f"captions_{split}2017.json", f"captions_{split}2017_sample.json"):
        if (directory / name).is_file():
            return directory / name
    raise SystemExit(f"{directory} has no captions_{split}2017.json: pass --source_dir or --download_coco true")


def _download_split(records, split, root, image_source, base_url, summary) -> None:
    if image_source == "per_image":
        coco.download_images(records, root, summary, base_url)
        return
    rel, md5 = coco.IMAGES_ZIP[split]
    zpath = download(f"{base_url}/{rel}", root / Path(rel).name, md5=md5)
    with zipfile.ZipFile(zpath) as zf:
        for rec in tqdm(records, desc=f"extract {split}", unit="img"):
            if not (root / rec.file).is_file():
                try:
                    zf.extract(rec.file, root)
                except KeyError:
                    summary.skip(rec.file, f"not in {zpath.name}")
