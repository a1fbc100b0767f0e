"""The whole pipeline end to end on the bundled sample data with tiny presets, on CPU, in minutes.

    python scripts/demo.py            # or: make demo

1. Prepare the 13 bundled Gutenberg books (cleaning, split by book, a 4,096-token BPE, token shards), then
   pretrain the tiny Phi-2 + MoE-after-MLP model on them.
2. Prepare the 20 bundled COCO images (validated index, CLIP ViT-B/32 patch-feature cache), then align CLIP to the
   pretrained LM by training the projector. Without internet the CLIP weights are a seeded random initialisation;
   with it, pass `--clip_pretrained openai` to the two commands.
3. Prepare the bundled LLaVA-Bench conversations (their COCO val2014 images are not bundled, so they are mapped onto
   bundled photos), then instruction-tune the aligned model with QLoRA (LoRA on nf4 linear layers + the projector)
   and write the merged model.
4. Answer a question about a bundled photo and the JFK speech clip with the merged model: WhisperX transcribes the
   first 10 s of speech into the prompt. Offline, Whisper is a random tiny model built locally (its transcript is
   gibberish; pass `--whisper_model large-v3` to generate/mm.py for the real one).

Everything goes under `out/demo/` (replaced on each run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# no torch_xla import through transformers/accelerate (see litgpt_mm/__init__.py), no Gradio/HF telemetry calls
ENV = {**os.environ, "USE_TORCH_XLA": os.environ.get("USE_TORCH_XLA", "0"), "HF_HUB_OFFLINE": "1"}


def run(title: str, *args: str) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, env=ENV)
    print(f"=== {title}: done in {time.perf_counter() - start:.0f} s", flush=True)


def main(out: Path = ROOT / "out" / "demo") -> None:
    if out.exists():
        shutil.rmtree(out)
    data = out / "data" / "gutenberg"
    pretrain = out / "pretrain-moe"
    run("prepare Gutenberg", "scripts/prepare_gutenberg.py", "--vocab_size", "4096", "--out_dir", str(data))
    run(
        "pretrain Phi-2 + MoE (tiny)",
        "recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml",
        "--data_dir", str(data), "--out_dir", str(pretrain),
    )  # fmt: skip
    coco_data, features, align = out / "data" / "coco", out / "data" / "clip_features", out / "align"
    run(
        "prepare COCO captions + CLIP features",
        "scripts/prepare_coco.py", "--out_dir", str(coco_data), "--features", "true", "--clip_pretrained", "null",
        "--feature_dir", str(features),
    )  # fmt: skip
    run(
        "align CLIP patches to the LM (projector only)",
        "recipes/align.py", "--config", "recipes/configs/align_tiny.yaml", "--lm_checkpoint_dir",
        str(pretrain / "final"), "--data_dir", str(coco_data), "--feature_dir", str(features), "--out_dir", str(align),
    )  # fmt: skip
    llava_data, instruct = out / "data" / "llava_instruct", out / "qlora_instruct"
    run(
        "prepare LLaVA instructions",
        "scripts/prepare_llava_instruct.py", "--tokenizer_dir", str(pretrain / "final"), "--map_missing_to",
        "data/coco/val2017", "--max_tokens", "200", "--val_fraction", "0.2", "--out_dir", str(llava_data),
    )  # fmt: skip
    run(
        "QLoRA instruction tuning",
        "recipes/qlora_instruct.py", "--config", "recipes/configs/qlora_instruct_tiny.yaml", "--align_dir",
        str(align / "final"), "--data_dir", str(llava_data), "--feature_dir", str(features), "--out_dir", str(instruct),
    )  # fmt: skip
    whisper = out / "whisper-tiny-random"
    run("build a random tiny Whisper (offline stand-in)", "scripts/build_tiny_whisper.py", "--out_dir", str(whisper))
    run(
        "answer about a photo and a speech clip",
        "generate/mm.py", "--checkpoint_dir", str(instruct / "merged"), "--image", "data/images/astronaut.png",
        "--audio", "data/audio/jfk.flac", "--prompt", "What does the picture show, and what was said?",
        "--whisper_model", str(whisper), "--max_new_tokens", "48", "--device", "cpu",
    )  # fmt: skip
    print("\nArtefacts:")
    print(f"  token shards + tokenizer : {data}")
    print(f"  pretrained MoE checkpoint: {pretrain / 'final'}  (litgpt layout)")
    print(f"  pretraining logs, plots  : {pretrain / 'logs'}  (CSV, TensorBoard, loss.png, expert_load.png)")
    print(f"  COCO index, CLIP features: {coco_data}, {features}")
    print(f"  aligned projector        : {align / 'final'}  (projector.pth, multimodal_config.yaml)")
    print(f"  alignment logs, captions : {align / 'logs'}  (samples.md: captions of fixed validation images)")
    print(f"  instruction data         : {llava_data}  (train/val.jsonl with answer-only labels, summary.json)")
    print(f"  LoRA + projector         : {instruct / 'final'}  (lora.pth, projector.pth)")
    print(f"  merged multimodal model  : {instruct / 'merged'}  (litgpt layout + projector)")


if __name__ == "__main__":
    main()
