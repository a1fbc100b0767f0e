"""Prepare LLaVA visual instruction data: templated, tokenized conversations with answer-only labels.

    python scripts/prepare_llava_instruct.py --tokenizer_dir checkpoints/microsoft/phi-2 --download_llava true
    python scripts/prepare_llava_instruct.py --tokenizer_dir out/demo/pretrain-moe/final \\
        --map_missing_to data/coco/val2017            # the bundled LLaVA-Bench rows on bundled images (demo)

Reads `llava_instruct_150k.json` (or any file in its schema, or a LLaVA-Bench `.jsonl`), keeps the conversations of
a seeded subset of images (40,000 by default, as in the original capstone), renders them through a template
(`phi2` or `llava_v1`), and writes `<out_dir>/{train,val}.jsonl` with `ids` and `labels` per sample, `meta.json`
and `summary.json`. Rows with a missing image, an empty answer, no `<image>`, a tokenisation that does not line up,
or cut before their first answer are counted and reported by id; samples cut after it (their later answers lost) are
counted, with the answer tokens cut, per split.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from litgpt_mm import REPO_ROOT, prompts
from litgpt_mm.data import coco, llava
from litgpt_mm.data.download import download
from litgpt_mm.training.checkpoint import load_tokenizer

ROOT = REPO_ROOT
SAMPLE = ROOT / "data" / "llava_instruct" / "llava_bench_coco_45_llava_format.json"


def prepare(
    tokenizer_dir: Path = Path("checkpoints/microsoft/phi-2"),
    data_path: Path = SAMPLE,
    download_llava: bool = False,
    cache_dir: Path = Path("data/cache/llava"),
    images_dir: Path | None = None,
    map_missing_to: Path | None = None,
    template: str = "phi2",
    max_tokens: int = 512,
    subset_images: int | None = 40_000,
    val_fraction: float = 0.05,
    seed: int = 42,
    out_dir: Path = Path("data/prepared/llava_instruct"),
) -> dict:
    """Build the instruction-tuning set.

    Args:
        tokenizer_dir: the LM's checkpoint directory (its tokenizer).
        data_path: LLaVA-schema JSON or LLaVA-Bench jsonl (the bundled LLaVA-Bench rows by default).
        download_llava: download `llava_instruct_150k.json` and the subset's COCO train2017 images into `cache_dir`.
        cache_dir: download cache.
        images_dir: where the rows' images are (default: `cache_dir/train2017` when downloading, else next to
            `data_path`).
        map_missing_to: assign rows whose image is missing to the images of this directory, deterministically
            (the demo runs the LLaVA-Bench rows, whose COCO val2014 images are not bundled, on bundled photos).
        template: prompt template (`phi2` or `llava_v1`).
        max_tokens: text tokens per sample (the image prefix comes on top).
        subset_images: images to keep (seeded; None = all).
        val_fraction: share of images held out for validation (whole images).
        seed: subset and split seed.
        out_dir: output directory.
    """
    if template not in prompts.TEMPLATES:
        raise SystemExit(f"--template {template!r} unknown: choose from {sorted(prompts.TEMPLATES)}")
    tokenizer = load_tokenizer(tokenizer_dir, "`litgpt download` or recipes/pretrain_moe.py (its final/)")
    if download_llava:
        data_path = download(llava.LLAVA_INSTRUCT_URL, Path(cache_dir) / "llava_instruct_150k.json")
        images_dir = images_dir or Path(cache_dir) / "train2017"
    images_dir = Path(images_dir or Path(data_path).parent)
    rows, images = _subset(llava.read_rows(Path(data_path)), subset_images, seed)
    if download_llava:
        summary_coco = coco.CocoSummary()
        records = [coco.CaptionRecord(0, f"train2017/{name}", []) for name in images]
        coco.download_images(records, Path(cache_dir), summary_coco, workers=8)

    skipped: list[tuple[str, str]] = []
    counts: Counter = Counter()
    image_path, mapped = _resolve_images(images, images_dir, map_missing_to, skipped)
    counts["images_mapped"] = mapped
    val_images = set(random.Random(seed + 1).sample(sorted(image_path), max(1, round(val_fraction * len(image_path)))))
    t = prompts.TEMPLATES[template]
    out = _encode_rows(rows, image_path, val_images, t, tokenizer, max_tokens, skipped, counts)

    out_dir = Path(out_dir)
    meta = {"template": template, "tokenizer_dir": str(Path(tokenizer_dir).resolve()), "max_tokens": max_tokens}
    summary = {**counts, "skipped": [{"id": i, "reason": r} for i, r in skipped]}
    _write(out_dir, out, meta, summary)
    print(f"{'split':<6}{'images':>8}{'samples':>9}{'answer tokens':>15}")
    for split, samples in out.items():
        n_images = len({sample["image"] for sample in samples})
        print(f"{split:<6}{n_images:>8,}{len(samples):>9,}{counts[f'{split}_answer_tokens']:>15,}")
    for split in out:
        if counts[f"{split}_truncated_samples"]:
            print(
                f"warning: {counts[f'{split}_truncated_samples']:,} {split} samples are longer than --max_tokens "
                f"{max_tokens}: {counts[f'{split}_answer_tokens_cut']:,} answer tokens cut (raise --max_tokens to "
                "keep them)"
            )
    if mapped:
        print(f"{mapped} missing image(s) mapped onto {map_missing_to}")
    print(f"skipped: {len(skipped)}" + "".join(f"\n  - {i}: {r}" for i, r in skipped))
    print(f"Wrote {out_dir}/train.jsonl and {out_dir}/val.jsonl")
    return summary


def _subset(rows: list[dict], subset_images: int | None, seed: int) -> tuple[list[dict], list[str]]:
    """The rows of a seeded subset of `subset_images` images (None: all), and those images' names, sorted."""
    images = sorted({str(r.get("image")) for r in rows if r.get("image")})
    if subset_images is not None and subset_images < len(images):
        images = sorted(random.Random(seed).sample(images, subset_images))
    chosen = set(images)
    return [r for r in rows if str(r.get("image")) in chosen], images


def _encode_rows(
    rows: list[dict],
    image_path: dict[str, str],
    val_images: set[str],
    template: prompts.Template,
    tokenizer,
    max_tokens: int,
    skipped: list[tuple[str, str]],
    counts: Counter,
) -> dict[str, list[dict]]:
    """Per split (`val` for the rows of `val_images`), the samples with `ids` and answer-only `labels`; rows that
    cannot be encoded go to `skipped`, samples and answer tokens are counted in `counts`."""
    out = {"train": [], "val": []}
    counts.update({f"{split}_{what}": 0 for split in out for what in ("truncated_samples", "answer_tokens_cut")})
    for row in tqdm(rows, desc="encode", unit="row"):
        rid = str(row.get("id"))
        try:
            if str(row.get("image")) not in image_path:
                raise llava.BadRow(f"image {row.get('image')} missing or unreadable")
            full_ids, full_labels = llava.encode_full(llava.validate(row), template, tokenizer)
            ids, labels = llava.truncate(full_ids, full_labels, max_tokens)
        except llava.BadRow as err:
            skipped.append((rid, str(err)))
            tqdm.write(f"skipped {rid}: {err}")
            continue
        split = "val" if row["image"] in val_images else "train"
        sample = {"id": rid, "image": image_path[row["image"]], "ids": ids.tolist(), "labels": labels.tolist()}
        out[split].append(sample)
        counts[f"{split}_samples"] += 1
        counts[f"{split}_answer_tokens"] += int((labels != llava.IGNORE_INDEX).sum())
        if len(full_ids) > max_tokens:
            counts[f"{split}_truncated_samples"] += 1
            cut = full_labels[max_tokens:]
            counts[f"{split}_answer_tokens_cut"] += sum(label != llava.IGNORE_INDEX for label in cut)
    return out


def _write(out_dir: Path, out: dict[str, list[dict]], meta: dict, summary: dict) -> None:
    """`{train,val}.jsonl`, `meta.json` and `summary.json` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, samples in out.items():
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _resolve_images(images, images_dir, map_missing_to, skipped) -> tuple[dict[str, str], int]:
    """Image name -> readable file path; missing ones mapped onto `map_missing_to` images or reported."""
    found, missing = {}, []
    for name in images:
        path = Path(images_dir) / name
        try:
            coco.load_rgb(path)
            found[name] = str(path.resolve())
        except (OSError, ValueError):
            missing.append(name)
    mapped = 0
    if missing and map_missing_to is not None:
        pool = sorted(p for p in Path(map_missing_to).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not pool:
            raise SystemExit(f"--map_missing_to {map_missing_to} holds no images")
        for i, name in enumerate(missing):
            found[name] = str(pool[i % len(pool)].resolve())
            mapped += 1
    elif missing:
        skipped += [(name, f"image not found or unreadable under {images_dir}") for name in missing]
    return found, mapped
