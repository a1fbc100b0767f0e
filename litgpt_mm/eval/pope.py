"""POPE, polling-based object probing (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large
Vision-Language Models"): reading the official question files, building questions from COCO instance annotations,
the reference yes/no answer parser, and the metrics.

The parser and the metrics follow `evaluate.py` of github.com/AoiDragon/POPE and LLaVA's `llava/eval/eval_pope.py`
(the same code); question building follows POPE's `utils.py` (`pope`, `compute_co_occurrence`).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from litgpt_mm.data.coco import load_coco_json

log = logging.getLogger(__name__)

TEMPLATE = "Is there a {} in the image?"
STRATEGIES = ("random", "popular", "adversarial")


@dataclass
class PopeQuestion:
    """One POPE question. `category` is the sampling strategy in LLaVA's files ("random", "popular",
    "adversarial"); `object_name` is the probed COCO category (set by `build_pope`, absent from the official files)."""

    question_id: int | str
    image: str
    text: str
    label: str
    category: str | None = None
    object_name: str | None = None


def read_pope(path: str | Path) -> list[PopeQuestion]:
    """Read a POPE question file: JSON lines `{"question_id", "image", "text", "label"}` plus optional `category`.

    This is the layout of the official `coco_pope_{random,popular,adversarial}.json` files (JSON lines despite the
    extension). LLaVA's merged `llava_pope_test.jsonl` has no `label`; read the official files for the labels.
    Blank lines are skipped; labels are matched case-insensitively and stored as "yes"/"no".

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a line is not a JSON object, lacks a field, has a label other than yes/no, or repeats a
            question_id; the message names the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file {path} does not exist")
    questions: list[PopeQuestion] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err}); POPE files have one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            for key in ("question_id", "image", "text", "label"):
                if key not in row:
                    raise ValueError(
                        f"{where}: missing field {key!r}; each line needs question_id, image, text and label "
                        "(LLaVA's llava_pope_test.jsonl has no labels: read the official coco_pope_*.json files)"
                    )
            label = str(row["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: field 'label' is {row['label']!r}; it must be 'yes' or 'no'")
            qid = row["question_id"]
            if str(qid) in seen:
                raise ValueError(
                    f"{where}: question_id {qid!r} already used on line {seen[str(qid)]}; ids must be unique"
                )
            seen[str(qid)] = lineno
            questions.append(PopeQuestion(qid, str(row["image"]), str(row["text"]), label, row.get("category")))
    if not questions:
        raise ValueError(f"{path}: no questions (the file is empty)")
    return questions


def _read_instances(path: Path) -> tuple[dict[int, str], dict[int, str], dict[int, set[int]]]:
    """Image file names, category names and the set of category ids present in each image."""
    data = load_coco_json(path, "instances", ("images", "annotations", "categories"))
    files, names = {}, {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        files[img["id"]] = img["file_name"]
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ValueError(f"{path}: categories[{i}] lacks 'id' or 'name'")
        names[cat["id"]] = cat["name"]
    objects: dict[int, set[int]] = {image_id: set() for image_id in files}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else None})"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise ValueError(f"{where} lacks 'image_id' or 'category_id'")
        if ann["image_id"] not in files:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in names:
            raise ValueError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        objects[ann["image_id"]].add(ann["category_id"])
    return files, names, objects


def _question_text(template: str, name: str) -> str:
    # The official files say "an" before a vowel ("Is there an umbrella in the image?").
    if name[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(name)


def build_pope(
    instances_path: str | Path,
    strategy: str,
    n_per_image: int = 3,
    image_ids: list[int] | None = None,
    seed: int = 0,
    image_prefix: str = "",
    min_objects: int = 1,
    template: str = TEMPLATE,
) -> list[PopeQuestion]:
    """Build POPE questions from a COCO `instances_*.json` file, as POPE's `utils.pope` does.

    For each image, up to `n_per_image` present categories are drawn at random (seeded; the reference takes the first
    ones of its object list) as positives ("yes"), and each positive is followed by one absent category ("no"), so
    every image is balanced. Negatives:

    - random: uniform over all categories of the file absent from the image and not yet asked.
    - popular: the most frequent categories, by the number of selected images they appear in, absent from the image.
    - adversarial: for each positive, the category that co-occurs with it in the most selected images, absent from
      the image (POPE pairs each negative with one positive, it does not pool the image's objects).

    When popular or adversarial has no candidate left (no co-occurring category is absent), the negative is drawn as
    in random, like the reference. Frequencies and co-occurrences are counted over the selected images, as the
    reference does over its 500 sampled images. Ties are broken by category id; the reference draws random
    negatives from the objects seen in its images, which for 500 COCO images are all 80 categories.

    Args:
        instances_path: COCO instances file (images, annotations with image_id/category_id, categories).
        strategy: "random", "popular" or "adversarial".
        n_per_image: Positives (and negatives) per image; POPE uses 3.
        image_ids: Images to use, in this order; default all images of the file, in file order.
        seed: Seeds the positive draw and the random negatives; same seed, same questions.
        image_prefix: Prepended to each `file_name` to form `image` (e.g. "COCO_val2014_" or a folder).
        min_objects: Images with fewer present categories are skipped (the reference uses `n_per_image`).
        template: Question template; "a {}" becomes "an {}" before a vowel.

    Returns:
        Questions numbered from 1, positive and negative alternating per image, `category` set to the strategy.
        Images skipped for having no (or fewer than `min_objects`) objects are counted in a logged warning.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    path = Path(instances_path)
    files, names, objects = _read_instances(path)
    selected = _select_images(path, files, objects, image_ids, min_objects)
    negatives = _NegativeSampler.count(strategy, selected, objects, sorted(names))

    rng = random.Random(seed)
    questions: list[PopeQuestion] = []

    def add(image_id: int, category_id: int, label: str) -> None:
        name = names[category_id]
        questions.append(
            PopeQuestion(
                question_id=len(questions) + 1,
                image=image_prefix + files[image_id],
                text=_question_text(template, name),
                label=label,
                category=strategy,
                object_name=name,
            )
        )

    for image_id in selected:
        present = objects[image_id]
        positives = rng.sample(sorted(present), min(n_per_image, len(present)))
        asked = set(present)
        for positive in positives:
            add(image_id, positive, "yes")
            negative = negatives.pick(positive, asked, rng, f"{path}: image {image_id}")
            asked.add(negative)
            add(image_id, negative, "no")
    return questions


def _select_images(
    path: Path, files: dict[int, str], objects: dict[int, set[int]], image_ids: list[int] | None, min_objects: int
) -> list[int]:
    """The images to ask about: `image_ids` (default all, in file order) with at least `min_objects` categories; the
    skipped ones are counted in a logged warning."""
    if image_ids is None:
        image_ids = list(files)
    else:
        missing = [i for i in image_ids if i not in files]
        if missing:
            raise ValueError(f"{path}: image ids {missing[:10]} are not in the file ({len(missing)} missing)")
    selected = [i for i in image_ids if len(objects[i]) >= max(1, min_objects)]
    skipped = len(image_ids) - len(selected)
    if skipped:
        why = "no object" if min_objects <= 1 else f"fewer than {min_objects} object categories"
        log.warning(f"build_pope: skipped {skipped} of {len(image_ids)} images with {why}")
    return selected


@dataclass(frozen=True)
class _NegativeSampler:
    """Picks the absent category asked about after each positive, by a POPE strategy (see `build_pope`).

    Args:
        by_frequency: categories by how many selected images they appear in, most first, ties by id.
        co_occurrence: per category, how many selected images every other category shares with it.
        all_categories: every category id of the file, sorted.
    """

    strategy: str
    by_frequency: list[int]
    co_occurrence: dict[int, Counter[int]]
    all_categories: list[int]

    @classmethod
    def count(
        cls, strategy: str, selected: list[int], objects: dict[int, set[int]], all_categories: list[int]
    ) -> _NegativeSampler:
        """Frequencies and co-occurrences over the selected images (POPE's `compute_co_occurrence`)."""
        frequency: Counter[int] = Counter()
        co_occurrence: dict[int, Counter[int]] = defaultdict(Counter)
        for image_id in selected:
            present = objects[image_id]
            frequency.update(present)
            for c in present:
                co_occurrence[c].update(present - {c})
        by_frequency = sorted(frequency, key=lambda c: (-frequency[c], c))
        return cls(strategy, by_frequency, co_occurrence, all_categories)

    def pick(self, positive: int, asked: set[int], rng: random.Random, where: str) -> int:
        """The negative for `positive`: the strategy's first candidate not `asked` yet, else a random one."""
        if self.strategy == "popular":
            ranked = self.by_frequency
        elif self.strategy == "adversarial":
            counts = self.co_occurrence[positive]
            ranked = sorted(counts, key=lambda c: (-counts[c], c))
        else:
            ranked = []
        negative = next((c for c in ranked if c not in asked), None)
        if negative is None:
            pool = [c for c in self.all_categories if c not in asked]
            if not pool:
                raise ValueError(f"{where} leaves no absent category to ask about")
            negative = rng.choice(pool)
        return negative


def normalize_answer(text: str) -> str:
    """Map a free-form answer to "yes" or "no" exactly as POPE's `evaluate.py` and LLaVA's `eval_pope.py` do.

    Keep the text before the first '.', remove commas, split on single spaces; "no" if one of the words is `No`,
    `not` or `no`, else "yes". The rule is case-sensitive and splits on ' ' only ("NO" and "Not really" give "yes"),
    and an empty answer counts as "yes"; use `normalize_answers` to count such answers.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")


def is_yes_no(text: str) -> bool:
    """Whether an answer starts with the word yes or no (any case), i.e. the reference rule reads it as intended."""
    m = _FIRST_WORD.match(text)
    return m is not None and m.group(1).lower() in ("yes", "no")


def normalize_answers(texts: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """`normalize_answer` on every answer, plus the positions of answers worth reporting.

    Returns:
        `(labels, flags)`: labels are "yes"/"no"; `flags["empty"]` lists the empty or blank answers (scored "yes"),
        `flags["not_yes_no"]` the other answers that do not start with yes/no (scored by the word rule anyway).
    """
    flags: dict[str, list[int]] = {"empty": [], "not_yes_no": []}
    for i, text in enumerate(texts):
        if not text.strip():
            flags["empty"].append(i)
        elif not is_yes_no(text):
            flags["not_yes_no"].append(i)
    return [normalize_answer(t) for t in texts], flags


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall and F1 of the "yes" class, and the yes ratio, as POPE reports them.

    Args:
        predictions: "yes"/"no" per question (run `normalize_answer` first).
        labels: "yes"/"no" per question, in the same order.

    Returns:
        `accuracy`, `precision`, `recall`, `f1`, `yes_ratio`, `tp`, `fp`, `tn`, `fn`, `n`. Where the reference would
        divide by zero, the value is 0: precision with no "yes" prediction, recall with no "yes" label, F1 when
        precision + recall is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics: no questions")
    for name, values in (("predictions", predictions), ("labels", labels)):
        bad = next((i for i, v in enumerate(values) if v not in ("yes", "no")), None)
        if bad is not None:
            raise ValueError(
                f"pope_metrics: {name}[{bad}] is {values[bad]!r}; expected 'yes' or 'no' (map free-form answers with "
                "normalize_answer)"
            )
    pairs = Counter(zip(predictions, labels, strict=True))
    tp, fp, tn, fn = pairs["yes", "yes"], pairs["yes", "no"], pairs["no", "no"], pairs["no", "yes"]
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def pope_f1(pairs: list[tuple[str, str]]) -> float:
    """F1 from `(prediction, label)` pairs; the statistic for `bootstrap_ci` over questions."""
    predictions, labels = zip(*pairs, strict=True)
    return pope_metrics(list(predictions), list(labels))["f1"]
