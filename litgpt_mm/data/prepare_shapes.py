"""Prepare the shapes world: seeded images of coloured shapes with COCO captions and instances, LLaVA conversations,
and VQA/POPE evaluation files, all offline and in seconds, small enough for a CPU run to visibly learn.

    python scripts/prepare_shapes.py                                   # 2,000 / 200 / 300 images
    python scripts/prepare_shapes.py --n_train 20000 --noise 0.8 --image_format jpg
    python scripts/prepare_coco.py --source_dir data/prepared/shapes_world --subset null --val_subset null \\
        --out_dir data/prepared/shapes_coco                            # alignment on the shapes captions

Writes under `<out_dir>` (replaced as a whole, atomically):
    train2017/, val2017/, test/                  images, `<12-digit id>.png` (ids unique across splits)
    annotations/captions_{train2017,val2017,test}.json    COCO captions schema
    annotations/instances_{train2017,val2017,test}.json   COCO instances schema (category = shape kind)
    llava_train.json, llava_val.json             LLaVA Instruct-150K schema
    eval/vqa_{val,test}.jsonl                    one question per row with its answer, type and choices
    eval/pope_{val,test}.jsonl                   POPE's format, balanced yes/no
    summary.json                                 counts, seed, sizes, palette, answer vocabulary
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from litgpt_mm.data import shapes

SPLITS = {"train": "train2017", "val": "val2017", "test": "test"}
DATASET = "shapes_world"


def prepare(
    out_dir: Path = Path("data/prepared/shapes_world"),
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 300,
    size: int = 224,
    seed: int = 42,
    max_shapes: int = 3,
    noise: float = 0.5,
    image_format: Literal["png", "jpg"] = "png",
    captions_per_image: int = 4,
    workers: int = 2,
) -> dict:
    """Generate the shapes world.

    Args:
        out_dir: output directory; an existing one is replaced (only if it is empty or a previous shapes world).
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        size: image side in pixels (224: CLIP's input).
        seed: generation seed (image `i` depends only on the seed and its id).
        max_shapes: most shapes per image (1 to 9).
        noise: fraction of images with a noisy background (the others are plain white or light grey).
        image_format: `png` (lossless) or `jpg` (quality 95).
        captions_per_image: captions per image (1 to 5).
        workers: threads drawing and writing images (the output does not depend on it).
    """
    if not 1 <= max_shapes <= len(shapes.POSITIONS):
        raise SystemExit(f"--max_shapes must be between 1 and {len(shapes.POSITIONS)}, got {max_shapes}")
    if not 1 <= captions_per_image <= 5:
        raise SystemExit(f"--captions_per_image must be between 1 and 5, got {captions_per_image}")
    if size < 32:
        raise SystemExit(f"--size must be at least 32 pixels, got {size}")
    if not 0 <= noise <= 1:
        raise SystemExit(f"--noise is a fraction of images, between 0 and 1, got {noise}")
    if min(n_train, n_val, n_test) < 0 or n_train == 0:
        raise SystemExit("--n_train must be positive and --n_val, --n_test not negative")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    try:
        summary = _generate(tmp, counts, size, seed, max_shapes, noise, image_format, captions_per_image, workers)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(summary, out_dir, time.perf_counter() - start)
    return summary


def _generate(root, counts, size, seed, max_shapes, noise, ext, captions_per_image, workers) -> dict:
    (root / "annotations").mkdir(parents=True)
    (root / "eval").mkdir()
    summary = {
        "dataset": DATASET,
        "seed": seed,
        "size": size,
        "image_format": ext,
        "max_shapes": max_shapes,
        "noise": noise,
        "captions_per_image": captions_per_image,
        "colours": {k: list(v) for k, v in shapes.COLOURS.items()},
        "kinds": list(shapes.KINDS),
        "positions": list(shapes.POSITIONS),
        "answers": shapes.answer_choices(max_shapes),
        "splits": {},
    }

    def make(image_id: int, path: Path) -> shapes.Example:
        example = shapes.make_example(seed, image_id, max_shapes, noise, captions_per_image)
        image = shapes.draw(example.scene, size, np.random.default_rng(example.noise_seed))
        image.save(path, **({"quality": 95} if ext == "jpg" else {"compress_level": 1}))
        return example

    first = 1
    bar = tqdm(total=sum(counts.values()), desc="draw", unit="img")
    pool = ThreadPoolExecutor(max(1, workers))  # PIL's encoders release the GIL
    try:
        for split, directory in SPLITS.items():
            (root / directory).mkdir()
            ids = range(first, first + counts[split])
            first += counts[split]
            paths = [root / directory / f"{i:012d}.{ext}" for i in ids]
            examples = pool.map(make, ids, paths)
            summary["splits"][split] = _write_split(root, split, zip(ids, examples, strict=True), summary, bar)
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_split(root: Path, split: str, examples, summary: dict, bar: tqdm) -> dict:
    """Write a split's annotation and evaluation files from its `(image_id, Example)` pairs; returns its counts."""
    directory, size, ext = SPLITS[split], summary["size"], summary["image_format"]
    choices = summary["answers"]
    category_id = {k: i + 1 for i, k in enumerate(shapes.KINDS)}
    images, captions, instances, llava, vqa, pope = [], [], [], [], [], []
    stats: Counter = Counter()
    for image_id, example in examples:
        scene, qs, file_name = example.scene, example.questions, f"{image_id:012d}.{ext}"
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        stats.update(shapes=len(scene.shapes), noisy=scene.background.noise > 0)
        stats.update(f"questions_{q.type}" for q in qs)
        # annotation ids 10 * image id + k: unique across splits, and stable when other images change
        captions += [
            {"id": 10 * image_id + k, "image_id": image_id, "caption": t} for k, t in enumerate(example.captions)
        ]
        instances += _instances(image_id, scene, size, category_id)
        for k, turns in enumerate(example.conversations if split != "test" else []):
            llava.append({"id": f"{image_id}-{k}", "image": file_name, "conversations": shapes.llava_turns(turns)})
        if split != "train":
            image = f"{directory}/{file_name}"
            vqa += _vqa_rows(image_id, image, qs, choices)
            pope += [
                {"question_id": len(pope) + k + 1, "image": image, "text": text, "label": label}
                for k, (text, label) in enumerate(example.pope)
            ]
        bar.update()
    info = {"description": f"shapes world ({split}), seed {summary['seed']}", "version": "1.0"}
    categories = [{"id": i, "name": k, "supercategory": "shape"} for k, i in category_id.items()]
    files = {
        f"annotations/captions_{directory}.json": {"info": info, "images": images, "annotations": captions},
        f"annotations/instances_{directory}.json": {
            "info": info,
            "images": images,
            "annotations": instances,
            "categories": categories,
        },
    }
    if split != "test":
        files[f"llava_{split}.json"] = llava
    for rel, obj in files.items():
        (root / rel).write_text(json.dumps(obj, separators=(",", ":")))
    if split != "train":
        for name, rows in ((f"eval/vqa_{split}.jsonl", vqa), (f"eval/pope_{split}.jsonl", pope)):
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
            files[name] = rows
    pope_labels = Counter(r["label"] for r in pope)
    return {
        "images": len(images),
        "image_ids": [images[0]["id"], images[-1]["id"]] if images else [],
        "shapes": stats["shapes"],
        "noisy_images": stats["noisy"],
        "captions": len(captions),
        "llava_rows": len(llava),
        "llava_turns": sum(len(r["conversations"]) // 2 for r in llava),
        "questions": {t: stats[f"questions_{t}"] for t in shapes.QUESTION_TYPES},
        "pope": {"yes": pope_labels["yes"], "no": pope_labels["no"]},
        "files": [f"{directory}/", *files],
    }


def _instances(image_id: int, scene: shapes.Scene, size: int, category_id: dict[str, int]) -> list[dict]:
    """The COCO instance annotations of a scene's shapes (ids 10 * image id + k, as the captions')."""
    return [
        {
            "id": 10 * image_id + k,
            "image_id": image_id,
            "category_id": category_id[s.kind],
            "bbox": s.bbox(size),
            "area": round(s.area(size), 2),
            "iscrowd": 0,
            "colour": s.colour,
            "segmentation": [[round(v, 2) for xy in s.polygon(size) for v in xy]],
        }
        for k, s in enumerate(scene.shapes)
    ]


def _vqa_rows(image_id: int, image: str, questions: list[shapes.Question], choices: dict) -> list[dict]:
    """An image's rows of `eval/vqa_<split>.jsonl`: each question with its answer, type and answer choices."""
    return [
        {
            "id": f"{image_id}-{k}",
            "image": image,
            "question": q.text,
            "answers": [q.answer],
            "type": q.type,
            "choices": choices[q.type],
        }
        for k, q in enumerate(questions)
    ]


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor an earlier shapes world."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SystemExit(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    try:
        ours = json.loads((out_dir / "summary.json").read_text()).get("dataset") == DATASET
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(
            f"{out_dir} exists and is not a shapes world (no summary.json from this script): not replacing"
        )


def _replace(tmp: Path, out_dir: Path) -> None:
    """Swap the finished `tmp` in for `out_dir` (readers see the old or the new world, never a half-written one)."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _report(summary: dict, out_dir: Path, seconds: float) -> None:
    types = shapes.QUESTION_TYPES
    print(
        f"{'split':<6}{'images':>8}{'noisy':>7}{'shapes':>8}{'captions':>10}{'llava rows':>12}{'turns':>7}  "
        + "".join(f"{t:>10}" for t in types)
        + f"{'pope y/n':>12}"
    )
    for split, s in summary["splits"].items():
        rows, turns = (s["llava_rows"], s["llava_turns"]) if split != "test" else ("-", "-")
        pope = f"{s['pope']['yes']}/{s['pope']['no']}" if split != "train" else "-"
        print(
            f"{split:<6}{s['images']:>8}{s['noisy_images']:>7}{s['shapes']:>8}{s['captions']:>10}{rows:>12}"
            f"{turns:>7}  " + "".join(f"{s['questions'][t]:>10}" for t in types) + f"{pope:>12}"
        )
    print(f"Wrote {out_dir} in {seconds:.1f} s:")
    for split, s in summary["splits"].items():
        print(f"  {split:<6}" + ", ".join(s["files"]))
    print("  summary.json")
