"""The multimodal and speech tasks of `recipes/evaluate.py`: questions in, scored answers under every condition out.

Each task returns `(scores, predictions)`: a list of `Scored` metrics (image vs blind vs shuffled, with intervals)
and one prediction row per question. Questions whose image file is missing are counted and reported, never silently
dropped.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from litgpt_mm.eval import pope as pope_lib
from litgpt_mm.eval import vqa as vqa_lib
from litgpt_mm.eval.captions import caption_scores, read_coco_references
from litgpt_mm.eval.metrics import Result, corpus_wer, word_error_rate
from litgpt_mm.eval.runner import CONDITIONS, Answerer, Item, Scored, score_mean, score_statistic

# LLaVA-1.5's instruction for short answers (its VQAv2, GQA, POPE and MME prompts end with it)
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def resolve_images(rows: Sequence, image_of, images_root: Path, what: str) -> tuple[list, list[Path]]:
    """Keep the rows whose image exists under `images_root`; report how many were skipped (and the first few)."""
    kept, paths, missing = [], [], []
    for row in rows:
        path = Path(images_root) / image_of(row)
        (kept.append(row), paths.append(path)) if path.is_file() else missing.append(str(path))
    if missing:
        print(f"skipped {len(missing)} {what} whose image is missing, e.g. {missing[:3]}", file=sys.stderr)
    if not kept:
        raise FileNotFoundError(f"none of the {len(rows)} {what} has its image under {images_root}: set --images_root")
    return kept, paths


def vqa(
    answerer: Answerer,
    questions: Path,
    images_root: Path | None = None,
    answers: Path | None = None,
    prompt_suffix: str = SHORT_ANSWER,
    limit: int | None = None,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
) -> tuple[list[Scored], list[dict]]:
    """VQA accuracy (the official normalisation; exact match for a single reference), multiple-choice accuracy for
    rows with options, and a breakdown by question type with its chance level (one over the number of choices)."""
    rows = [r for r in vqa_lib.read_vqa(questions, answers_path=answers) if r.has_image][:limit]
    rows, paths = resolve_images(rows, lambda r: r.image, images_root or Path(questions).parent, "questions")
    items = [Item(str(r.id), [p], r.question + prompt_suffix) for r, p in zip(rows, paths, strict=True)]
    answered = answerer.answer_all(items, conditions)

    def score(row: vqa_lib.VQAItem, prediction: str) -> float:
        letters = row.choices and len(row.answers) == 1 and len(row.answers[0]) == 1 and row.answers[0].isalpha()
        if letters:
            return vqa_lib.multiple_choice_match(prediction, row.choices, row.answers[0])
        return vqa_lib.vqa_accuracy(prediction, row.answers)

    per_item = {c: [score(r, a) for r, a in zip(rows, answered[c], strict=True)] for c in answered}
    scores = [score_mean("vqa_accuracy", per_item, seed)]
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.type:
            by_type[r.type].append(i)
    for kind, idx in sorted(by_type.items()):
        choices = rows[idx[0]].choices
        chance = 1 / len(choices) if choices else None
        sub = {c: [v[i] for i in idx] for c, v in per_item.items()}
        scores.append(score_mean(f"accuracy/{kind}", sub, seed, chance))
    predictions = [
        {
            "id": r.id,
            "image": str(p),
            "question": r.question,
            "answers": r.answers,
            "type": r.type,
            **{f"answer_{c}": answered[c][i] for c in answered},
            **{f"score_{c}": per_item[c][i] for c in per_item},
        }
        for i, (r, p) in enumerate(zip(rows, paths, strict=True))
    ]
    return scores, predictions


def pope(
    answerer: Answerer,
    questions: Sequence[Path] = (),
    instances: Path | None = None,
    strategies: Sequence[str] = ("random", "popular", "adversarial"),
    n_per_image: int = 3,
    images_root: Path | None = None,
    prompt_suffix: str = SHORT_ANSWER,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[list[Scored], list[dict]]:
    """POPE per split (the official files, or questions built from COCO instance annotations) with the reference
    scorer: F1, accuracy, precision, recall and yes-ratio per split, and the mean F1 over splits (what LLaVA-style
    papers quote; always answering "yes" scores 0.667)."""
    if questions:
        splits = {Path(q).stem: pope_lib.read_pope(q) for q in questions}
        root = images_root or Path(questions[0]).parent
    elif instances is not None:
        splits = {s: pope_lib.build_pope(instances, s, n_per_image, seed=seed) for s in strategies}
        root = images_root or Path(instances).parent
    else:
        raise ValueError("pope: pass --questions (POPE files) or --instances (a COCO instances_*.json to build from)")
    scores, predictions, f1_by_split = [], [], defaultdict(list)
    for split, rows in splits.items():
        rows, paths = resolve_images(rows[:limit], lambda q: q.image, root, f"{split} questions")
        items = [Item(str(q.question_id), [p], q.text + prompt_suffix) for q, p in zip(rows, paths, strict=True)]
        answered = answerer.answer_all(items)
        labels = [q.label for q in rows]
        normalised, flags = {}, {}
        for c, texts in answered.items():
            normalised[c], flags[c] = pope_lib.normalize_answers(texts)
            f1_by_split[c].append(pope_lib.pope_metrics(normalised[c], labels)["f1"])
        pairs = {c: list(zip(normalised[c], labels, strict=True)) for c in normalised}
        f1 = score_statistic(f"pope_f1/{split}", pairs, pope_lib.pope_f1, seed, chance=2 / 3)
        f1.extra = {
            c: {k: v for k, v in pope_lib.pope_metrics(normalised[c], labels).items()}
            | {"empty_answers": len(flags[c]["empty"]), "not_yes_no": len(flags[c]["not_yes_no"])}
            for c in normalised
        }
        correct = {c: [float(p == lab) for p, lab in pairs[c]] for c in pairs}
        scores += [f1, score_mean(f"pope_accuracy/{split}", correct, seed, chance=0.5)]
        predictions += [
            {
                "split": split,
                "question_id": q.question_id,
                "image": str(p),
                "text": q.text,
                "label": q.label,
                **{f"answer_{c}": answered[c][i] for c in answered},
            }
            for i, (q, p) in enumerate(zip(rows, paths, strict=True))
        ]
    if len(splits) > 1:
        mean = {c: Result("pope_f1/mean", sum(v) / len(v), n=len(v)) for c, v in f1_by_split.items()}
        scores.append(Scored("pope_f1/mean (no interval: a mean over splits)", mean, 2 / 3))
    return scores, predictions


def caption(
    answerer: Answerer,
    captions: Path,
    images_root: Path | None = None,
    prompt: str = "",
    limit: int | None = None,
    seed: int = 0,
    use_java: bool | None = None,
) -> tuple[list[Scored], list[dict]]:
    """Greedy captions scored with pycocoevalcap's CIDEr, BLEU-4 and ROUGE-L against the references (intervals from
    per-image scores; CIDEr's IDF comes from the evaluated set itself). `use_java`: see `caption_scores`."""
    references, files = read_coco_references(captions)
    ids = sorted(references)[:limit]
    if len(ids) < 2:
        raise ValueError(f"{captions}: caption scores need at least 2 images (CIDEr's IDF comes from the set)")
    ids, paths = resolve_images(ids, lambda i: files[i], images_root or Path(captions).parent, "images")
    items = [Item(str(i), [p], prompt) for i, p in zip(ids, paths, strict=True)]
    answered = answerer.answer_all(items)
    scores, totals = [], {}
    for c, texts in answered.items():
        totals[c] = caption_scores(dict(zip(ids, texts, strict=True)), {i: references[i] for i in ids}, use_java)
    for metric in ("CIDEr", "ROUGE_L"):
        per_image = {c: [totals[c]["per_image"][metric][i] for i in ids] for c in totals}
        scored = score_mean(metric, per_image, seed)
        for c in totals:  # the corpus score, not the mean of per-image scores (they differ for BLEU only)
            scored.conditions[c].value = totals[c][metric]
        scores.append(scored)
    bleu = {c: Result("Bleu_4", totals[c]["Bleu_4"], n=len(ids)) for c in totals}
    scores.append(Scored("Bleu_4 (corpus; no interval)", bleu, extra={"note": totals["image"]["note"]}))
    predictions = [
        {"image_id": i, "image": str(p), "references": references[i]}
        | {f"answer_{c}": answered[c][k] for c in answered}
        for k, (i, p) in enumerate(zip(ids, paths, strict=True))
    ]
    return scores, predictions


def speech(stt, clips: Path, limit: int | None = None, seed: int = 0) -> tuple[list[Scored], list[dict]]:
    """Word error rate of the transcription of each clip (jsonl `{"audio", "text"}`, paths relative to the file)."""
    import json

    rows = []
    with open(clips, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((Path(clips).parent / row["audio"], str(row["text"])))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{clips}:{lineno}: expected {{'audio': path, 'text': reference}} ({err})") from None
    rows = rows[:limit]
    hypotheses = [stt.transcribe(path).text for path, _ in rows]
    wer = word_error_rate([t for _, t in rows], hypotheses)
    pairs = {"speech": list(zip(wer["utterance_errors"], wer["utterance_words"], strict=True))}
    scored = score_statistic("wer", pairs, corpus_wer, seed)
    scored.extra = {k: wer[k] for k in ("substitutions", "deletions", "insertions", "n_words")}
    scores = [scored]
    predictions = [
        {"audio": str(p), "reference": t, "hypothesis": h} for (p, t), h in zip(rows, hypotheses, strict=True)
    ]
    return scores, predictions
