"""Answering benchmark questions with a trained model, always beside two baselines, and writing the results.

Every multimodal task answers each question three times in one run:

* `image`: with its own image;
* `blind`: with no image at all (what the language model guesses from the text alone);
* `shuffled`: with another question's image (a fixed derangement of the distinct images), so the prefix has the
  same statistics as a real image but the wrong content.

A score counts as *grounded* only when its 95 % bootstrap interval lies above both baselines' intervals.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from litgpt_mm.deploy.inference import Assistant, GenerationSettings, open_image
from litgpt_mm.eval.metrics import Result, bootstrap_ci, format_results, mean_ci
from litgpt_mm.multimodal import generate_batch
from litgpt_mm.training.checkpoint import atomic_write

CONDITIONS = ("image", "blind", "shuffled")


@dataclass
class Item:
    """One question: an id, the image files it is about, and the user prompt."""

    id: str
    images: list[Path]
    prompt: str


@dataclass
class Scored:
    """A metric under each condition: the value with its 95 % interval, plus whether `image` beats both baselines."""

    metric: str
    conditions: dict[str, Result]
    chance: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def grounded(self) -> bool:
        if "image" not in self.conditions:
            return False
        image = self.conditions["image"]
        others = [self.conditions[c] for c in ("blind", "shuffled") if c in self.conditions]
        if not others or image.low is None or any(o.high is None for o in others):
            return False  # no interval, no claim
        return all(image.low > o.high for o in others)

    def to_dict(self) -> dict:
        out = {"metric": self.metric, "grounded": self.grounded, "chance": self.chance, **self.extra}
        out["conditions"] = {c: r.to_dict() for c, r in self.conditions.items()}
        return out


def derangement(keys: Sequence, seed: int) -> dict:
    """A seeded map from each distinct key to a different one (identity when there is only one)."""
    distinct = sorted(set(keys), key=str)
    order = distinct[:]
    random.Random(seed).shuffle(order)
    return {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}


def condition_images(items: Sequence[Item], condition: str, seed: int) -> list[list[Path]]:
    """The images each item is asked with under `condition`: its own, none (`blind`) or another's (`shuffled`)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r}: choose from {CONDITIONS}")
    if condition == "blind":
        return [[] for _ in items]
    swap = derangement([p for it in items for p in it.images], seed) if condition == "shuffled" else {}
    return [[swap.get(p, p) for p in it.images] for it in items]


class Answerer:
    """Batched greedy answers of an `Assistant` under the three conditions, with CLIP features computed once per
    image. Rows are sorted by prompt length before batching, so padding stays small."""

    def __init__(self, assistant: Assistant, settings: GenerationSettings, batch_size: int = 16, seed: int = 0):
        self.assistant, self.settings, self.batch_size, self.seed = assistant, settings, batch_size, seed
        self._features: dict[Path, torch.Tensor] = {}

    def features(self, paths: Sequence[Path]) -> None:
        """Encode the images not seen yet, in batches of `batch_size`, with a progress bar."""
        todo = sorted({Path(p) for p in paths} - set(self._features), key=str)
        for i in tqdm(range(0, len(todo), self.batch_size), desc="CLIP features", disable=len(todo) < 2, leave=False):
            chunk = todo[i : i + self.batch_size]
            feats = self.assistant.encoder.encode_images([open_image(p) for p in chunk])
            self._features.update(zip(chunk, feats, strict=True))

    def answer(self, items: Sequence[Item], condition: str) -> list[str]:
        """Answers to every item under `condition` (`image`, `blind` or `shuffled`), in the items' order."""
        if condition != "blind":
            self.features([p for it in items for p in it.images])
        inputs = []
        for it, images in zip(items, condition_images(items, condition, self.seed), strict=True):
            feats = torch.stack([self._features[Path(p)] for p in images]) if images else None
            ids = self.assistant.prompt_ids(it.prompt, len(images), self.settings.max_new_tokens)
            if ids.numel() == 0 and not images:  # nothing to condition on (blind, empty prompt): start a document
                ids = torch.tensor([self.assistant.tokenizer.eos_id], device=ids.device)
            inputs.append((feats, ids))
        order = sorted(range(len(items)), key=lambda i: inputs[i][1].numel())
        answers: list[str] = [""] * len(items)
        tok, s = self.assistant.tokenizer, self.settings
        with tqdm(total=len(items), desc=f"answer ({condition})", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                out = generate_batch(
                    self.assistant.model,
                    [inputs[i][0] for i in chunk],
                    [inputs[i][1] for i in chunk],
                    s.max_new_tokens,
                    s.temperature,
                    s.top_k,
                    s.top_p,
                    eos_id=tok.eos_id,
                )
                for i, row in zip(chunk, out, strict=True):
                    answers[i] = tok.decode(torch.tensor([t for t in row if t != tok.eos_id], dtype=torch.long))
                    answers[i] = answers[i].strip()
                bar.update(len(chunk))
        return answers

    def answer_all(self, items: Sequence[Item], conditions: Sequence[str] = CONDITIONS) -> dict[str, list[str]]:
        return {c: self.answer(items, c) for c in conditions}


class ApiAnswerer:
    """Greedy answers from an OpenAI-compatible chat-completions server (e.g. `python -m litgpt_mm.serve`) under the
    three conditions, with `concurrency` requests in flight so that the server can batch them. The server renders
    its own prompt template; with ours the answers equal `Answerer`'s for the same checkpoint and template."""

    def __init__(
        self, api_base: str, api_key: str | None, settings: GenerationSettings, concurrency: int = 16, seed: int = 0
    ) -> None:
        import openai

        self.client = openai.OpenAI(base_url=api_base, api_key=api_key or "none", max_retries=2, timeout=600)
        self.settings, self.concurrency, self.seed = settings, concurrency, seed

    def _ask(self, prompt: str, images: Sequence[Path]) -> str:
        import base64
        import mimetypes

        parts = [
            {
                "type": "image_url",
                "image_url": {
                    "url": f"data:{mimetypes.guess_type(str(p))[0] or 'image/jpeg'};base64,"
                    + base64.b64encode(Path(p).read_bytes()).decode()
                },
            }
            for p in images
        ]
        content = [*parts, {"type": "text", "text": prompt}]
        out = self.client.chat.completions.create(
            model="litgpt-mm",
            messages=[{"role": "user", "content": content}],
            temperature=0.0,
            max_tokens=self.settings.max_new_tokens,
        )
        return (out.choices[0].message.content or "").strip()

    def answer(self, items: Sequence[Item], condition: str) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        images = condition_images(items, condition, self.seed)
        with ThreadPoolExecutor(self.concurrency) as pool:
            jobs = pool.map(self._ask, [it.prompt for it in items], images)
            return list(tqdm(jobs, total=len(items), desc=f"answer ({condition}, server)", leave=False))

    def answer_all(self, items: Sequence[Item], conditions: Sequence[str] = CONDITIONS) -> dict[str, list[str]]:
        return {c: self.answer(items, c) for c in conditions}


def score_mean(metric: str, per_item: dict[str, list[float]], seed: int, chance: float | None = None) -> Scored:
    """A mean of per-item scores (accuracy, VQA score, CIDEr) with a bootstrap interval under each condition."""
    conditions = {}
    for c, values in per_item.items():
        low, high = mean_ci(values, seed=seed) if len(values) > 1 else (float("nan"), float("nan"))
        conditions[c] = Result(metric, sum(values) / max(len(values), 1), low, high, len(values))
    return Scored(metric, conditions, chance)


def score_statistic(
    metric: str, pairs: dict[str, list], statistic: Callable[[Sequence], float], seed: int, chance: float | None = None
) -> Scored:
    """A statistic over (prediction, reference) pairs (F1, corpus WER) with a bootstrap interval per condition."""
    conditions = {}
    for c, items in pairs.items():
        low, high = bootstrap_ci(items, statistic, seed=seed) if len(items) > 1 else (float("nan"), float("nan"))
        conditions[c] = Result(metric, statistic(items), low, high, len(items))
    return Scored(metric, conditions, chance)


def checkpoint_hash(directory: Path) -> str:
    """sha256 over the weight files of a checkpoint directory (names and contents), first 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.pth")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def write_results(
    out_dir: Path, task: str, scores: Sequence[Scored], predictions: list[dict], meta: dict, started: float
) -> dict:
    """Write `results.json` and `predictions.jsonl` atomically under `out_dir`, print the table, return the results."""
    out_dir = Path(out_dir)
    results = {"task": task, **meta, "seconds": round(time.perf_counter() - started, 1)}
    results["scores"] = [s.to_dict() for s in scores]
    atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    atomic_write(out_dir / "predictions.jsonl", lambda f: f.write(lines.encode()))
    print(results_table(scores))
    print(f"Wrote {out_dir / 'results.json'} and {out_dir / 'predictions.jsonl'}")
    return results


def results_table(scores: Sequence[Scored], markdown: bool = False) -> str:
    """One row per metric and condition, with the chance level and whether the image score is grounded."""
    rows = []
    for s in scores:
        for c, r in s.conditions.items():
            name = f"{s.metric} [{c}]"
            if c == "image" and len(s.conditions) > 1:
                name += " grounded" if s.grounded else " NOT grounded"
            rows.append(Result(name, r.value, r.low, r.high, r.n))
        if s.chance is not None:
            rows.append(Result(f"{s.metric} [chance]", s.chance))
    return format_results(rows, markdown=markdown)
