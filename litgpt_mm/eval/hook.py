"""Evaluation during training: VQA accuracy with the image and with the baselines, at every validation of `fit`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from litgpt_mm.eval.runner import CONDITIONS, Answerer
from litgpt_mm.inference import Assistant, GenerationSettings


def vqa_on_eval(
    model, encoder, tokenizer, template: str, questions: Path, images_root: Path | None = None, limit: int = 200,
    batch_size: int = 16, max_new_tokens: int = 6, prompt_suffix: str = "", conditions: Sequence[str] = CONDITIONS,
    seed: int = 0,
) -> Callable[[int], dict]:  # fmt: skip
    """An `on_eval(step) -> dict` for `Stage`: `vqa_<condition>` and `<type>_<condition>` accuracies on the first
    `limit` questions of `questions` (a `recipes/evaluate.py vqa` file). The model is put in eval mode and its
    `max_seq_length` restored afterwards; CLIP features are computed once."""
    from litgpt_mm.eval import tasks

    answerer = Answerer(Assistant(model, encoder, tokenizer, template), GenerationSettings(max_new_tokens),
                        batch_size, seed)  # fmt: skip

    def on_eval(step: int) -> dict:
        lm, was_training = model.lm, model.training
        saved = lm.max_seq_length
        model.eval()
        try:
            scores, _ = tasks.vqa(answerer, questions, images_root, None, prompt_suffix, limit, seed, conditions)
        finally:
            lm.max_seq_length = saved
            model.train(was_training)
        row = {}
        for s in scores:
            name = "vqa" if s.metric == "vqa_accuracy" else s.metric.split("/", 1)[1]
            row.update({f"{name}_{c}": r.value for c, r in s.conditions.items()})
        return row

    return on_eval
