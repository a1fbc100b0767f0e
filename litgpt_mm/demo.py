"""The whole pipeline end to end on bundled and generated data with tiny presets, on CPU, in minutes.

    python scripts/demo.py            # or: make demo       (a few minutes)
    python scripts/demo.py --long     # or: make demo-long  (more images and steps)

1. Prepare the 13 bundled Gutenberg books (cleaning, split by book, a 4,096-token BPE, token shards), then
   pretrain the tiny Phi-2 + MoE-after-MLP model on them.
2. Generate the shapes world (`scripts/prepare_shapes.py`: images of coloured shapes with known content) and
   pretrain a small CLIP on its training images (`scripts/pretrain_clip.py`, stage 0: offline there are no OpenAI
   CLIP weights, so this tower stands in for them; it reports its own zero-shot answers on the held-out images).
   Prepare the world's COCO-format captions with a patch-feature cache of that frozen tower, then align it to the
   pretrained LM by training the projector (pass `--clip_model ViT-B-32 --clip_pretrained openai` to those commands
   where the weights can be downloaded).
3. Prepare the shapes world's LLaVA-format conversations and instruction-tune the aligned model with QLoRA (LoRA on
   nf4 linear layers and on the LM head, + the projector, the tower frozen), answering held-out questions at every
   validation; write the merged model.
4. Answer a question about a held-out shapes image and the JFK speech clip with the merged model: WhisperX
   transcribes the first 10 s of speech into the prompt. Offline, Whisper is a random tiny model built locally (its
   transcript is gibberish; pass `--whisper_model large-v3` to generate/mm.py for the real one). Then every question
   the world asks about that image, each answer beside the right one.
5. Evaluate on the held-out shapes questions: accuracy per question type, and POPE-style yes/no questions, with the
   image, blind and with another image, beside chance (`recipes/evaluate.py vqa` and `pope`).

Everything goes under `out/demo/` (or `out/demo-long/`), replaced on each run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from litgpt_mm import REPO_ROOT as ROOT
from litgpt_mm.__main__ import run_command
from litgpt_mm.data import shapes

# no torch_xla import through transformers/accelerate (see litgpt_mm/__init__.py), no Hub calls
os.environ.setdefault("USE_TORCH_XLA", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
CLIP_MODEL = "shapes-ViT-T-16"
SIZES = {  # shapes images, and the optimizer steps of each training stage
    False: dict(
        n_train=400,
        n_val=40,
        n_test=100,
        pretrain_steps=150,
        clip_steps=100,
        align_steps=40,
        instruct_steps=450,
        eval_limit=100,
    ),
    True: dict(
        n_train=1200,
        n_val=100,
        n_test=200,
        pretrain_steps=150,
        clip_steps=300,
        align_steps=200,
        instruct_steps=1200,
        eval_limit=200,
    ),
}


def run(title: str, command: str, *args: str) -> None:
    """Run `litgpt-mm <command> <args>` in this process (one interpreter start-up and one import of torch, Lightning
    and litgpt for the whole demo instead of one per stage)."""
    print(f"\n=== {title}\n$ litgpt-mm {command} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    try:
        run_command(*command.split(), args=list(args))
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            failed = f"demo: the stage '{title}' failed (exit status {exit_.code}); its output is above"
            raise SystemExit(failed) from None
    print(f"=== {title}: done in {time.perf_counter() - start:.0f} s", flush=True)


def main(long: bool = False) -> None:
    """Run every stage; `long` uses more shapes images and steps (see `make demo-long`)."""
    out = ROOT / "out" / ("demo-long" if long else "demo")
    size = SIZES[long]
    os.chdir(ROOT)
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    pretrain = pretrain_lm(out, size)
    world, features, align = align_clip(out, size, pretrain)
    merged = instruction_tune(out, size, pretrain, world, features, align) / "merged"
    answer_held_out(out, world, merged)
    evaluation = evaluate_held_out(out, world, merged)
    summary(out, evaluation, time.perf_counter() - started)


def pretrain_lm(out: Path, size: dict) -> Path:
    """Step 1: prepare the Gutenberg books and pretrain the tiny MoE LM on them; returns its output directory."""
    data, pretrain = out / "data" / "gutenberg", out / "pretrain-moe"
    run("prepare Gutenberg", "prepare gutenberg", "--vocab_size", "4096", "--out_dir", str(data))
    run(
        "pretrain Phi-2 + MoE (tiny)",
        "pretrain", "--config", "recipes/configs/pretrain_moe_tiny.yaml",
        "--data_dir", str(data), "--out_dir", str(pretrain), "--train.max_steps", str(size["pretrain_steps"]),
        "--eval.interval", "50",
    )  # fmt: skip
    return pretrain


def align_clip(out: Path, size: dict, pretrain: Path) -> tuple[Path, Path, Path]:
    """Step 2: generate the shapes world, pretrain a small CLIP on it, cache its features of the world's images and
    align it to the LM; returns the world's, the feature cache's and the alignment's directories."""
    world, coco_data, features = (out / "data" / n for n in ("shapes", "coco", "clip_features"))
    align = out / "align"
    run(
        "generate the shapes world",
        "prepare shapes", "--out_dir", str(world), "--n_train", str(size["n_train"]),
        "--n_val", str(size["n_val"]), "--n_test", str(size["n_test"]),
    )  # fmt: skip
    clip_dir = out / "clip"
    run(
        "pretrain a small CLIP on the shapes world (offline stand-in for OpenAI's CLIP)",
        "pretrain_clip", "--data_dir", str(world), "--out_dir", str(clip_dir),
        "--train.max_steps", str(size["clip_steps"]), "--eval.interval", str(size["clip_steps"]),
        "--eval.initial_validation", "false",
    )  # fmt: skip
    clip = ("--clip_model", CLIP_MODEL, "--clip_pretrained", str(clip_dir / "final" / "open_clip_model.safetensors"))
    run(
        "prepare captions + CLIP features",
        "prepare coco", "--source_dir", str(world), "--out_dir", str(coco_data), "--subset", "null",
        "--val_subset", "null", "--features", "true", *clip, "--feature_dir", str(features),
    )  # fmt: skip
    run(
        "align CLIP patches to the LM (projector only)",
        "align", "--config", "recipes/configs/align_tiny.yaml", *clip, "--lm_checkpoint_dir",
        str(pretrain / "final"), "--data_dir", str(coco_data), "--feature_dir", str(features), "--out_dir", str(align),
        "--train.max_steps", str(size["align_steps"]), "--feature_norm", "standardize",
        "--eval.interval", str(size["align_steps"] // 2), "--eval_captions",
        str(world / "annotations" / "captions_val2017.json"), "--eval_images_root", str(world / "val2017"),
        "--eval_limit", "8",
    )  # fmt: skip
    return world, features, align


def instruction_tune(out: Path, size: dict, pretrain: Path, world: Path, features: Path, align: Path) -> Path:
    """Step 3: prepare the world's conversations and instruction-tune the aligned model with QLoRA; returns its output
    directory (the merged model in `merged/`)."""
    llava_data, instruct = out / "data" / "llava_instruct", out / "qlora_instruct"
    run(
        "prepare instructions",
        "prepare llava_instruct", "--tokenizer_dir", str(pretrain / "final"), "--data_path",
        str(world / "llava_train.json"), "--images_dir", str(world / "train2017"), "--subset_images", "null",
        "--max_tokens", "128", "--val_fraction", "0.05", "--out_dir", str(llava_data),
    )  # fmt: skip
    run(
        "QLoRA instruction tuning",
        "finetune", "--config", "recipes/configs/qlora_instruct_tiny.yaml", "--align_dir",
        str(align / "final"), "--data_dir", str(llava_data), "--feature_dir", str(features), "--out_dir", str(instruct),
        "--train.max_steps", str(size["instruct_steps"]), "--eval.interval", str(size["instruct_steps"] // 2),
        "--train.global_batch_size", "16", "--train.micro_batch_size", "16", "--optimizer.init_args.lr", "3e-3",
        "--projector_lr_scale", "1.0", "--lora.r", "16", "--lora.alpha", "32", "--lora.key", "true",
        "--lora.head", "true", "--eval_questions", str(world / "eval" / "vqa_val.jsonl"),
        "--eval_images_root", str(world), "--eval_limit", str(size["eval_limit"]), "--eval.initial_validation", "false",
    )  # fmt: skip
    return instruct


def answer_held_out(out: Path, world: Path, merged: Path) -> None:
    """Step 4: answer a question about a held-out image and a speech clip, then every question about that image."""
    whisper = out / "whisper-tiny-random"
    image_id, example = held_out_example(world)
    test_image = world / "test" / f"{image_id:012d}.png"
    questions = list(example.questions)
    run("build a random tiny Whisper (offline stand-in)", "tiny_whisper", "--out_dir", str(whisper))
    run(
        "answer about a held-out image and a speech clip",
        "generate", "--checkpoint_dir", str(merged), "--image", str(test_image),
        "--audio", "data/audio/jfk.flac", "--prompt", questions[0].text, "--whisper_model", str(whisper),
        "--max_new_tokens", "8", "--device", "cpu",
    )  # fmt: skip
    print(f"(expected: {questions[0].answer}; the transcript of the random Whisper above is part of the prompt)")
    show_answers(merged, test_image, example, questions)


def evaluate_held_out(out: Path, world: Path, merged: Path) -> Path:
    """Step 5: accuracy per question type and POPE-style yes/no questions on the held-out images, with the image,
    blind and with another image; returns the evaluation's directory."""
    evaluation = out / "eval"
    run(
        "evaluate on held-out shapes questions (with the image, blind, with another image)",
        "evaluate", "vqa", "--checkpoint_dir", str(merged), "--questions",
        str(world / "eval" / "vqa_test.jsonl"), "--images_root", str(world), "--prompt_suffix", "",
        "--device", "cpu", "--out_dir", str(evaluation), "--batch_size", "64",
    )  # fmt: skip
    run(
        "POPE-style yes/no questions on the held-out shapes (with the image, blind, with another image)",
        "evaluate", "pope", "--checkpoint_dir", str(merged), "--questions",
        f"[{world / 'eval' / 'pope_test.jsonl'}]", "--images_root", str(world), "--prompt_suffix", "",
        "--device", "cpu", "--out_dir", str(evaluation / "pope"), "--batch_size", "64",
    )  # fmt: skip
    return evaluation


def held_out_example(shapes_dir: Path) -> tuple[int, shapes.Example]:
    """The first test image with three shapes (the richest scenes), regenerated from the world's seed: its id and
    everything true of it."""
    summary = json.loads((shapes_dir / "summary.json").read_text())
    first, last = summary["splits"]["test"]["image_ids"]
    for image_id in range(first, last + 1):
        example = shapes.make_example(
            summary["seed"], image_id, summary["max_shapes"], summary["noise"], summary["captions_per_image"]
        )
        if len(example.scene.shapes) == summary["max_shapes"]:
            return image_id, example
    return first, shapes.make_example(summary["seed"], first, summary["max_shapes"], summary["noise"])


def show_answers(checkpoint: Path, image: Path, example: shapes.Example, questions: list[shapes.Question]) -> None:
    """The merged model's answers to questions with one right answer about a held-out image, beside that answer."""
    from litgpt_mm.deploy.inference import Assistant, GenerationSettings

    assistant = Assistant.load(checkpoint, device="cpu")
    answers = assistant.answer_batch(
        [q.text for q in questions], [[image]] * len(questions), GenerationSettings(max_new_tokens=8)
    )
    background = example.scene.background.name
    print(
        f"\nHeld-out image {image.name}: {shapes.describe(example.scene.shapes)} "
        f"(on {shapes.article(background)} {background} background)"
    )
    width = max(len(q.text) for q in questions)
    print(f"  {'question':<{width}}  {'expected':<15}{'answer':<15}")
    for q, a in zip(questions, answers, strict=True):
        mark = "right" if a.strip().lower().rstrip(".") == q.answer else "wrong"
        print(f"  {q.text:<{width}}  {q.answer:<15}{a:<15}{mark}")


def summary(out: Path, evaluation: Path, seconds: float) -> None:
    """Held-out accuracy per question type against its baselines and the tower's own zero-shot answers, POPE's F1,
    and where everything went."""
    results = json.loads((evaluation / "results.json").read_text())
    tower = json.loads((out / "clip" / "final" / "zero_shot.json").read_text())
    print("\nHeld-out shapes questions (accuracy; the tower's zero-shot ranking of captions is its own ceiling):")
    print(f"  {'type':<10}{'image':>8}{'blind':>8}{'shuffled':>10}{'chance':>8}{'tower':>8}  grounded")
    for score in results["scores"]:
        kind = score["metric"].removeprefix("accuracy/")
        if kind not in tower:
            continue
        c, grounded = score["conditions"], "yes" if score["grounded"] else "no"
        print(
            f"  {kind:<10}{c['image']['value']:>8.2f}{c['blind']['value']:>8.2f}{c['shuffled']['value']:>10.2f}"
            f"{score['chance']:>8.2f}{tower[kind]['accuracy']:>8.2f}  {grounded}"
        )
    pope = json.loads((evaluation / "pope" / "results.json").read_text())["scores"][0]
    print(
        f"  POPE-style yes/no: F1 {pope['image']['f1']:.2f} with the image ({pope['blind']['f1']:.2f} blind), "
        f"'yes' ratio {pope['image']['yes_ratio']:.2f}"
    )
    print(f"\nAll stages done in {seconds / 60:.1f} min. Artefacts under {out}:")
    print("  pretrain-moe/final      pretrained MoE LM (litgpt layout); logs/: CSV, TensorBoard and plots")
    print("  clip/final              the shapes world's CLIP (open_clip layout), zero_shot.json on the test images")
    print("  data/shapes             the shapes world (images, captions, conversations, eval questions)")
    print("  align/final             aligned projector; logs/samples.md: captions of fixed validation images;")
    print("                          logs/accuracy.png: caption scores vs step, with the image, blind, another image")
    print("  qlora_instruct/merged   merged multimodal model; qlora_instruct/logs/accuracy.png: accuracy vs step")
    print("  eval/, eval/pope/       results.json and predictions.jsonl of the held-out evaluations")
