"""Evaluate what a stage learned: one sub-command per task, each writing `results.json` and `predictions.jsonl`.

    python recipes/evaluate.py lm --checkpoint_dir out/pretrain/final --data_dir data/prepared/gutenberg
    python recipes/evaluate.py lm --checkpoint_dir checkpoints/microsoft/phi-2 --tasks "[hellaswag, arc_easy]"
    python recipes/evaluate.py pope --checkpoint_dir out/qlora_instruct/merged --questions "[coco_pope_random.json]" \
        --images_root data/coco/val2014
    python recipes/evaluate.py caption --checkpoint_dir out/align/final --captions captions_val2017.json
    python recipes/evaluate.py vqa --checkpoint_dir out/qlora_instruct/merged --questions vqa.jsonl
    python recipes/evaluate.py speech --clips clips.jsonl --whisper_model large-v3

Every multimodal task answers each question with its image, with no image (blind) and with another question's image
(shuffled), and marks a score grounded only when its 95 % bootstrap interval lies above both baselines'.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.eval import tasks as eval_tasks
from litgpt_mm.eval.metrics import format_results
from litgpt_mm.eval.runner import Answerer, ApiAnswerer, checkpoint_hash, write_results


@dataclass(frozen=True)
class AnswerSettings:
    """The flags `pope`, `vqa` and `caption` share: how answers are produced (a checkpoint or a server) and where
    the results go. `from_flags` picks them out of a sub-command's arguments; see `pope` for each one."""

    checkpoint_dir: Path
    template: str
    device: str | None
    quantize: str | None
    batch_size: int
    max_new_tokens: int
    seed: int
    api_base: str | None
    api_key: str | None
    out_dir: Path | None

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> AnswerSettings:
        """The shared settings out of a sub-command's `locals()`."""
        return cls(**{f.name: flags[f.name] for f in fields(cls)})

    def answerer(self) -> tuple[Answerer | ApiAnswerer, str]:
        """Load a checkpoint of any kind (`template="auto"` is `plain` for an aligned projector, else `phi2`), or
        talk to the server at `api_base`, which renders its own template; returns the answerer and the template."""
        generation = GenerationSettings(max_new_tokens=self.max_new_tokens)
        if self.api_base:
            return ApiAnswerer(self.api_base, self.api_key, generation, self.batch_size, self.seed), "server"
        checkpoint_dir, template = Path(self.checkpoint_dir), self.template
        if template == "auto":
            tuned = any((checkpoint_dir / f).is_file() for f in ("lit_model.pth", "lora.pth"))
            template = "phi2" if tuned else "plain"
        assistant = Assistant.load(checkpoint_dir, device=self.device, quantize=self.quantize, template=template)
        return Answerer(assistant, generation, self.batch_size, self.seed), template

    def write(self, task: str, scores: list, predictions: list[dict], started: float, template: str, **meta) -> dict:
        """Write `results.json` and `predictions.jsonl` under the task's output directory, with the run's settings
        (`meta`: the task's own) beside the scores."""
        meta = _meta(self.checkpoint_dir, template, self.seed, **meta, api_base=self.api_base)
        return write_results(_out(self.out_dir, task, self.checkpoint_dir), task, scores, predictions, meta, started)


def _out(out_dir: Path | None, task: str, checkpoint_dir: Path) -> Path:
    return Path(out_dir) if out_dir else Path("out/eval") / task / Path(checkpoint_dir).resolve().name


def _meta(checkpoint_dir: Path, template: str, seed: int, **extra) -> dict:
    digest = checkpoint_hash(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
    return {"checkpoint": str(checkpoint_dir), "checkpoint_hash": digest, "template": template, "seed": seed, **extra}


def pope(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    questions: list[Path] | None = None,
    instances: Path | None = None,
    strategies: list[str] = ["random", "popular", "adversarial"],  # noqa: B006
    n_per_image: int = 3,
    images_root: Path | None = None,
    prompt_suffix: str = eval_tasks.SHORT_ANSWER,
    template: str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    device: str | None = None,
    quantize: str | None = None,
    out_dir: Path | None = None,
    seed: int = 0,
    api_base: str | None = None,
    api_key: str | None = None,
) -> dict:
    """POPE object-hallucination probe: yes/no questions about objects present in or absent from the image.

    Args:
        checkpoint_dir: merged model, base + LoRA + projector, or aligned projector.
        questions: official POPE files (`coco_pope_{random,popular,adversarial}.json`), one split each.
        instances: instead, a COCO `instances_*.json` to build POPE questions from (its images under `images_root`).
        strategies: negative sampling for built questions (`random`, `popular`, `adversarial`).
        n_per_image: objects asked about per image when building (and as many absent ones).
        images_root: where the questions' images are (default: next to the question or instances file).
        prompt_suffix: appended to each question (LLaVA-1.5's short-answer instruction by default).
        template: prompt template (`auto`: `plain` for an aligned projector, `phi2` otherwise).
        limit: first N questions per split.
        batch_size: questions decoded together.
        max_new_tokens: answer length cap.
        device: `cuda` or `cpu` (default: CUDA when available).
        quantize: `nf4` to store the LM in 4 bits.
        out_dir: where results go (default `out/eval/pope/<checkpoint name>`).
        seed: question building, shuffled-image pairing and bootstrap seed.
        api_base: evaluate through an OpenAI-compatible server (e.g. `http://127.0.0.1:8000/v1` of
            `python -m litgpt_mm.serve`) instead of loading `checkpoint_dir`, which then only names the results.
        api_key: the server's key, if it wants one.
    """
    settings = AnswerSettings.from_flags(locals())
    started = time.perf_counter()
    answerer, template = settings.answerer()
    scores, predictions = eval_tasks.pope(
        answerer, questions or [], instances, strategies, n_per_image, images_root, prompt_suffix, limit, seed
    )
    return settings.write(
        "pope",
        scores,
        predictions,
        started,
        template,
        prompt_suffix=prompt_suffix,
        questions=[str(q) for q in questions or []],
        instances=str(instances) if instances else None,
    )


def vqa(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    questions: Path | None = None,
    images_root: Path | None = None,
    answers: Path | None = None,
    prompt_suffix: str = eval_tasks.SHORT_ANSWER,
    template: str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 10,
    device: str | None = None,
    quantize: str | None = None,
    out_dir: Path | None = None,
    seed: int = 0,
    api_base: str | None = None,
    api_key: str | None = None,
) -> dict:
    """VQA-style accuracy (VQAv2 normalisation; exact match for one reference; letter match for multiple choice).

    Args:
        checkpoint_dir: merged model, base + LoRA + projector, or aligned projector.
        questions: generic jsonl `{id, image, question, answers}`, LLaVA eval question files (GQA, MME) with
            `answers`, or ScienceQA-IMG in LLaVA's `llava_test_CQM-I.json` layout.
        images_root: where the images are (default: next to the question file).
        answers: separate answers file for LLaVA eval question files (question_id -> answer(s)).
        prompt_suffix: appended to each question (LLaVA-1.5's short-answer instruction by default).
        template: prompt template (`auto`: `plain` for an aligned projector, `phi2` otherwise).
        limit: first N questions.
        batch_size: questions decoded together.
        max_new_tokens: answer length cap.
        device: `cuda` or `cpu` (default: CUDA when available).
        quantize: `nf4` to store the LM in 4 bits.
        out_dir: where results go (default `out/eval/vqa/<checkpoint name>`).
        seed: shuffled-image pairing and bootstrap seed.
        api_base: evaluate through an OpenAI-compatible server (e.g. `http://127.0.0.1:8000/v1` of
            `python -m litgpt_mm.serve`) instead of loading `checkpoint_dir`, which then only names the results.
        api_key: the server's key, if it wants one.
    """
    settings = AnswerSettings.from_flags(locals())
    if questions is None:
        raise ValueError("vqa: pass --questions (a jsonl of {id, image, question, answers}, or a LLaVA eval file)")
    started = time.perf_counter()
    answerer, template = settings.answerer()
    scores, predictions = eval_tasks.vqa(answerer, questions, images_root, answers, prompt_suffix, limit, seed)
    return settings.write(
        "vqa", scores, predictions, started, template, prompt_suffix=prompt_suffix, questions=str(questions)
    )


def caption(
    checkpoint_dir: Path = Path("out/align/final"),
    captions: Path = Path("data/coco/annotations/captions_val2017_sample.json"),
    images_root: Path | None = None,
    prompt: str | None = None,
    template: str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    device: str | None = None,
    quantize: str | None = None,
    out_dir: Path | None = None,
    seed: int = 0,
    api_base: str | None = None,
    api_key: str | None = None,
) -> dict:
    """Greedy captions scored with CIDEr, BLEU-4 and ROUGE-L (pycocoevalcap's scorers, the `eval` extra).

    Scores on a small subset are not comparable to the 5,000-image Karpathy test split: CIDEr's IDF comes from the
    evaluated set.

    Args:
        checkpoint_dir: aligned projector (captions right after the image, as alignment trains) or a tuned model.
        captions: COCO `captions_*.json` with the references.
        images_root: where the images are (default: next to the captions file).
        prompt: the user prompt (default: none for an aligned projector; LLaVA's caption request otherwise).
        template: prompt template (`auto`: `plain` for an aligned projector, `phi2` otherwise).
        limit: first N images (at least 2).
        batch_size: images captioned together.
        max_new_tokens: caption length cap.
        device: `cuda` or `cpu` (default: CUDA when available).
        quantize: `nf4` to store the LM in 4 bits.
        out_dir: where results go (default `out/eval/caption/<checkpoint name>`).
        seed: shuffled-image pairing and bootstrap seed.
        api_base: evaluate through an OpenAI-compatible server (e.g. `http://127.0.0.1:8000/v1` of
            `python -m litgpt_mm.serve`) instead of loading `checkpoint_dir`, which then only names the results.
        api_key: the server's key, if it wants one.
    """
    settings = AnswerSettings.from_flags(locals())
    started = time.perf_counter()
    answerer, template = settings.answerer()
    if prompt is None:
        prompt = "" if template == "plain" else "Provide a one-sentence caption for the provided image."
    scores, predictions = eval_tasks.caption(answerer, captions, images_root, prompt, limit, seed)
    return settings.write("caption", scores, predictions, started, template, prompt=prompt, captions=str(captions))


def lm(
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    data_dir: Path | None = None,
    split: str = "val",
    text: list[Path] | None = None,
    seq_len: int | None = None,
    max_blocks: int | None = 256,
    tasks: list[str] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
    out_dir: Path | None = None,
    seed: int = 0,
) -> dict:
    """Held-out loss, perplexity and bits per byte, and lm-evaluation-harness tasks, of a language model checkpoint.

    Args:
        checkpoint_dir: a litgpt-layout LM (ours with experts, litgpt's dense run, `litgpt download`'s Phi-2).
        data_dir: prepared token shards (`scripts/prepare_*.py` output); `split` is read from it.
        split: the shard split (`val` by default).
        text: raw UTF-8 text files instead (tokenized with the checkpoint's tokenizer).
        seq_len: tokens per window (default: the model's block size).
        max_blocks: windows evaluated, spread evenly over the split (None: all).
        tasks: lm-evaluation-harness task names (`--tasks "[hellaswag]"`); their data come from the Hub unless
            `include_path` holds local task YAMLs.
        limit: examples per lm-eval task (an int, or a fraction).
        num_fewshot: lm-eval few-shot examples.
        include_path: a directory of extra lm-eval task YAMLs.
        batch_size: windows / requests per forward pass.
        device: `cuda` or `cpu` (default: CUDA when available).
        out_dir: where results go (default `out/eval/lm/<checkpoint name>`).
        seed: bootstrap and lm-eval seed.
    """
    from litgpt_mm.eval import lm as lm_lib
    from litgpt_mm.model import load_model
    from litgpt_mm.training.checkpoint import atomic_write, load_tokenizer

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint_dir, device=device).eval()
    tokenizer = load_tokenizer(checkpoint_dir)
    seq_len = seq_len or model.config.block_size
    model.max_seq_length = seq_len
    if data_dir is None and not text and not tasks:
        raise ValueError("lm: pass --data_dir (prepared shards), --text (raw files) or --tasks (lm-eval tasks)")
    results: dict = {"task": "lm", **_meta(checkpoint_dir, "none", seed, seq_len=seq_len)}
    if data_dir is not None or text:
        windows = _lm_windows(tokenizer, data_dir, split, text, seq_len, max_blocks)
        rows = lm_lib.bits_per_byte(model, tokenizer, windows, batch_size, seed)
        results["held_out"] = {r.metric: r.to_dict() for r in rows}
        print(format_results(rows, markdown=False))
    if tasks:
        results["lm_eval"] = _lm_eval_tasks(model, tokenizer, tasks, limit, num_fewshot, include_path, batch_size, seed)
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = _out(out_dir, "lm", checkpoint_dir)
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(f"Wrote {out / 'results.json'}")
    return results


def _lm_windows(
    tokenizer, data_dir: Path | None, split: str, text: list[Path] | None, seq_len: int, max_blocks: int | None
) -> list[torch.Tensor]:
    """The held-out windows of `lm`: from the prepared shards of `data_dir/split`, else from the raw `text` files."""
    from litgpt_mm.eval import lm as lm_lib

    if data_dir is not None:
        windows = lm_lib.shard_windows(Path(data_dir) / split, seq_len, max_blocks)
    else:
        ids = torch.cat([tokenizer.encode(t, bos=False, eos=True) for _, t in lm_lib.iter_text_files(text)])
        windows = lm_lib.text_windows(ids.long(), seq_len)[:max_blocks]
    if not windows:
        raise ValueError(f"no window of {seq_len + 1} tokens in the data: lower --seq_len")
    return windows


def _lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: float | None,
    num_fewshot: int | None,
    include_path: Path | None,
    batch_size: int,
    seed: int,
) -> dict:
    """Run lm-evaluation-harness tasks, print lm-eval's table, and return each task's numeric and text results."""
    from lm_eval.utils import make_table

    from litgpt_mm.eval import lm as lm_lib

    harness = lm_lib.harness(model, tokenizer, tasks, limit, num_fewshot, include_path, batch_size, seed)
    results = {
        k: {m: v for m, v in r.items() if isinstance(v, (int, float, str))} for k, r in harness["results"].items()
    }
    print(make_table(harness))
    return results


def speech(
    clips: Path = Path("data/audio/clips.jsonl"),
    whisper_model: str = "large-v3",
    language: str | None = "en",
    max_speech_seconds: float = 30.0,
    limit: int | None = None,
    device: str | None = None,
    out_dir: Path = Path("out/eval/speech"),
    seed: int = 0,
) -> dict:
    """Word error rate of WhisperX on the first `max_speech_seconds` of speech of each clip (extra `audio`).

    Args:
        clips: jsonl `{"audio": path relative to the file, "text": reference transcript}`.
        whisper_model: Whisper size name or a local CTranslate2 directory.
        language: the clips' language (None: detect).
        max_speech_seconds: speech kept per clip (the assistant keeps 10 s; the reference must cover what is kept).
        limit: first N clips.
        device: `cuda` or `cpu` (default: CUDA when available).
        out_dir: where results go.
        seed: bootstrap seed.
    """
    from litgpt_mm.deploy.audio import SpeechToText

    started = time.perf_counter()
    stt = SpeechToText(whisper_model, device=device, language=language, max_speech_seconds=max_speech_seconds)
    scores, predictions = eval_tasks.speech(stt, clips, limit, seed)
    meta = {"whisper_model": whisper_model, "clips": str(clips), "seed": seed}
    return write_results(Path(out_dir), "speech", scores, predictions, meta, started)
