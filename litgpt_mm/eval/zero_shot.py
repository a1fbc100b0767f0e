"""Zero-shot accuracy of a CLIP model on the shapes world's questions, by ranking caption-style prompts.

Every question of a held-out image (`shapes.Example.questions`, the rows of `eval/vqa_<split>.jsonl`) is turned
into prompts that differ only in what it asks, and the prompt most similar to the image is the tower's answer:

* colour / kind / position of a shape: the image's full caption (`shapes.describe`) with that shape's colour, kind
  or cell set to each possible answer;
* count: the full caption with each possible number of shapes stated;
* yes/no ("Is there a green triangle?"): "yes" when "a green triangle" ranks among the image's top n of all
  colour-kind prompts, n being the tower's own count answer.

This is what the vision tower itself can tell apart, the ceiling of what an LM reading its patches can be taught.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from litgpt_mm.data import shapes
from litgpt_mm.eval.metrics import mean_ci

CHANCE = {"colour": 1 / len(shapes.COLOURS), "kind": 1 / len(shapes.KINDS), "position": 1 / len(shapes.POSITIONS),
          "yesno": 0.5}  # fmt: skip
PAIRS = [(c, k) for c in shapes.COLOURS for k in shapes.KINDS]


@dataclass
class Choice:
    """A question as prompts to rank: `prompts[answer]` is the right one."""

    type: str
    prompts: list[str]
    answer: int


def choices(example: shapes.Example, max_shapes: int) -> list[Choice | shapes.Question]:
    """The ranking form of each question of an example (yes/no questions are returned as they are)."""
    scene = example.scene
    out: list[Choice | shapes.Question] = []

    def varied(index: int, field: str, values) -> list[str]:
        return [
            shapes.describe([replace(s, **{field: v}) if i == index else s for i, s in enumerate(scene.shapes)])
            for v in values
        ]

    for q in example.questions:
        if q.type == "yesno":
            out.append(q)
        elif q.type == "count":
            counts = range(1, max_shapes + 1)
            out.append(Choice("count", [shapes.describe(scene.shapes, count=n) for n in counts], len(scene.shapes) - 1))
        else:
            shape = scene.shapes[q.shape]
            field, values = {
                "colour": ("colour", list(shapes.COLOURS)),
                "kind": ("kind", list(shapes.KINDS)),
                "position": ("cell", range(len(shapes.POSITIONS))),
            }[q.type]
            out.append(Choice(q.type, varied(q.shape, field, values), list(values).index(getattr(shape, field))))
    return out


def _asked_pair(text: str) -> tuple[str, str]:
    words = text.lower().rstrip("?").split()
    return next(w for w in words if w in shapes.COLOURS), next(w for w in words if w in shapes.KINDS)


@torch.no_grad()
def zero_shot(
    model,
    tokenizer,
    preprocess,
    world_dir: Path,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per question type (and over all questions) on a split of a shapes world.

    Args:
        model: an open_clip CLIP model (`encode_image`, `encode_text`).
        tokenizer: its open_clip tokenizer.
        preprocess: its image transform.
        world_dir: a shapes world written by `scripts/prepare_shapes.py` (its `summary.json` regenerates every
            image's scene and questions).
        split: `train`, `val` or `test`.
        limit: the first `limit` images of the split (None: all).
        batch_size: images or prompts per forward pass.

    Returns:
        `{type: {"accuracy", "low", "high", "n", "chance"}}` with 95 % bootstrap intervals, types in
        `shapes.QUESTION_TYPES` order, then `all`.
    """
    world_dir = Path(world_dir)
    summary = json.loads((world_dir / "summary.json").read_text())
    examples, files = _split_examples(world_dir, summary, split, limit)
    max_shapes = summary["max_shapes"]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
    image = _batched(lambda chunk: model.encode_image(chunk.to(device), normalize=True), pixels, batch_size)
    per_image = [choices(e, max_shapes) for e in examples]
    prompts = sorted({p for qs in per_image for q in qs if isinstance(q, Choice) for p in q.prompts})
    prompts += [f"{shapes.article(c)} {c} {k}" for c, k in PAIRS]
    text = _batched(lambda chunk: model.encode_text(tokenizer(chunk).to(device), normalize=True), prompts, batch_size)
    correct = _answer(image, text, per_image, prompts)
    model.train(was_training)
    return _accuracies(correct, max_shapes)


def _split_examples(
    world_dir: Path, summary: dict, split: str, limit: int | None
) -> tuple[list[shapes.Example], list[Path]]:
    """The regenerated examples of a split's first `limit` images, and their image files."""
    info = summary["splits"].get(split)
    if not info or not info["images"]:
        raise ValueError(f"{world_dir}/summary.json: no images in split {split!r}")
    first, last = info["image_ids"]
    ids = list(range(first, last + 1))[:limit]
    directory = {"train": "train2017", "val": "val2017", "test": "test"}[split]
    max_shapes, ext = summary["max_shapes"], summary["image_format"]
    examples = [
        shapes.make_example(summary["seed"], i, max_shapes, summary["noise"], summary["captions_per_image"])
        for i in ids
    ]
    return examples, [world_dir / directory / f"{i:012d}.{ext}" for i in ids]


def _batched(encode: Callable, items, batch_size: int) -> torch.Tensor:
    """`encode` applied to `items` `batch_size` at a time, concatenated."""
    return torch.cat([encode(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def _answer(
    image: torch.Tensor, text: torch.Tensor, per_image: list[list[Choice | shapes.Question]], prompts: list[str]
) -> dict[str, list[float]]:
    """Whether each question is answered right (1.0) or not, per question type: the prompt of a `Choice` most
    similar to the image, and for yes/no whether the asked pair is among the image's top n colour-kind prompts, n
    being its own count answer."""
    row = {p: i for i, p in enumerate(prompts)}
    pair_rows = torch.tensor([row[f"{shapes.article(c)} {c} {k}"] for c, k in PAIRS])
    correct: dict[str, list[float]] = {t: [] for t in shapes.QUESTION_TYPES}
    for img, qs in zip(image, per_image, strict=True):
        sims = text @ img
        ranked: dict[str, int] = {}
        for q in qs:
            if isinstance(q, Choice):
                pick = int(sims[torch.tensor([row[p] for p in q.prompts])].argmax())
                ranked[q.type] = pick  # the count answer, for the yes/no questions below
                correct[q.type].append(float(pick == q.answer))
        n_present = ranked["count"] + 1
        top = {PAIRS[i] for i in sims[pair_rows].topk(n_present).indices.tolist()}
        for q in qs:
            if isinstance(q, shapes.Question):
                said = "yes" if _asked_pair(q.text) in top else "no"
                correct["yesno"].append(float(said == q.answer))
    return correct


def _accuracies(correct: dict[str, list[float]], max_shapes: int) -> dict[str, dict[str, float]]:
    """Accuracy per question type and over all questions, with its 95 % bootstrap interval, count and chance."""
    chance = {**CHANCE, "count": 1 / max_shapes}
    out = {}
    for name, values in [*correct.items(), ("all", [v for vs in correct.values() for v in vs])]:
        low, high = mean_ci(values, seed=0)
        out[name] = {
            "accuracy": sum(values) / len(values),
            "low": low,
            "high": high,
            "n": len(values),
            "chance": chance.get(name),
        }
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of `zero_shot`'s results."""
    lines = ["| question type | zero-shot accuracy | 95 % interval | n | chance |", "|---|---|---|---|---|"]
    for name, r in results.items():
        chance = f"{r['chance']:.3f}" if r["chance"] is not None else "–"
        lines.append(f"| {name} | {r['accuracy']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {r['n']} | {chance} |")
    return "\n".join(lines)
