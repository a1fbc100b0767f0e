"""Evaluation during training, at every validation of `fit`: VQA accuracy (instruction tuning) or caption scores
(alignment), each with the image and with the blind and shuffled-image baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.eval.runner import CONDITIONS, Answerer


def vqa_on_eval(
    model,
    encoder,
    tokenizer,
    template: str,
    questions: Path,
    images_root: Path | None = None,
    limit: int = 200,
    batch_size: int = 16,
    max_new_tokens: int = 6,
    prompt_suffix: str = "",
    conditions: Sequence[str] = CONDITIONS,
    seed: int = 0,
) -> Callable[[int], dict]:
    """An `on_eval(step) -> dict` for `Stage`: `vqa_<condition>` and `<type>_<condition>` accuracies on the first
    `limit` questions of `questions` (a `recipes/evaluate.py vqa` file)."""
    from litgpt_mm.eval import tasks

    def run(answerer: Answerer) -> list:
        return tasks.vqa(answerer, questions, images_root, None, prompt_suffix, limit, seed, conditions)[0]

    return task_on_eval(model, encoder, tokenizer, template, run, batch_size, max_new_tokens, seed)


def caption_on_eval(
    model,
    encoder,
    tokenizer,
    captions: Path,
    images_root: Path | None = None,
    limit: int = 40,
    batch_size: int = 16,
    max_new_tokens: int = 20,
    seed: int = 0,
) -> Callable[[int], dict]:
    """An `on_eval(step) -> dict` for alignment: `CIDEr_<condition>` and `ROUGE_L_<condition>` of greedy captions
    of the first `limit` images of a COCO captions file (the raw text after the image, as alignment trains), tokenised
    in Python (no Java process per validation: the scores compare across steps, not with published PTB numbers)."""
    from litgpt_mm.eval import tasks

    def run(answerer: Answerer) -> list:
        return tasks.caption(answerer, captions, images_root, "", limit, seed, use_java=False)[0]

    return task_on_eval(model, encoder, tokenizer, "plain", run, batch_size, max_new_tokens, seed)


def task_on_eval(
    model,
    encoder,
    tokenizer,
    template: str,
    run: Callable[[Answerer], list],
    batch_size: int,
    max_new_tokens: int,
    seed: int,
) -> Callable[[int], dict]:
    """Wrap `run(answerer) -> scores` as an `on_eval`: the model is put in eval mode and its `max_seq_length`
    restored afterwards; CLIP features are computed once; each score becomes `<name>_<condition>` columns."""
    answerer = Answerer(
        Assistant(model, encoder, tokenizer, template), GenerationSettings(max_new_tokens), batch_size, seed
    )

    def on_eval(step: int) -> dict:
        lm, was_training = model.lm, model.training
        saved = lm.max_seq_length
        model.eval()
        try:
            scores = run(answerer)
        finally:
            lm.max_seq_length = saved
            model.train(was_training)
        row = {}
        for s in scores:
            if "image" not in s.conditions:
                continue
            name = "vqa" if s.metric == "vqa_accuracy" else s.metric.split("/", 1)[-1].split(" ")[0]
            row.update({f"{name}_{c}": r.value for c, r in s.conditions.items()})
        return row

    return on_eval
