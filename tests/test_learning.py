"""The pipeline learns to see: on the shapes world, with the small CLIP pretrained on it (the demo's stage 0), a
short alignment and QLoRA run answers held-out colour questions better with the image than blind or with another
image (the demo's stages 2, 3 and 5, smaller)."""

import json

import pytest
from litgpt.args import EvalArgs, TrainArgs

import litgpt_mm.align
import litgpt_mm.data.prepare_coco
import litgpt_mm.data.prepare_llava_instruct
import litgpt_mm.finetune.qlora
from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.eval.runner import Answerer
from litgpt_mm.eval.tasks import vqa
from litgpt_mm.models.qlora import LoRASettings


@pytest.mark.slow
def test_colour_answers_are_grounded_after_a_short_run(pretrained_tiny, shapes_clip, tmp_path):
    lm_dir = pretrained_tiny[0] / "final"
    shapes, clip_dir = shapes_clip
    clip = {"clip_model": "shapes-ViT-T-16", "clip_pretrained": str(clip_dir / "final" / "open_clip_model.safetensors")}
    coco_dir, features = tmp_path / "coco", tmp_path / "features"
    litgpt_mm.data.prepare_coco.prepare(
        source_dir=shapes, out_dir=coco_dir, subset=None, val_subset=None, features=True, feature_dir=features, **clip
    )
    litgpt_mm.align.setup(
        lm_checkpoint_dir=lm_dir,
        data_dir=coco_dir,
        out_dir=tmp_path / "align",
        **clip,
        feature_dir=features,
        max_caption_tokens=32,
        precision="32-true",
        num_workers=0,
        num_sample_images=0,
        feature_norm="standardize",
        train=TrainArgs(
            save_interval=1000,
            log_interval=10,
            global_batch_size=16,
            micro_batch_size=16,
            max_steps=10,
            lr_warmup_steps=2,
            max_norm=1.0,
            min_lr=1e-4,
        ),
        eval=EvalArgs(interval=1000, max_iters=1, initial_validation=False, max_new_tokens=4),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-3, "weight_decay": 0.0}},
    )
    litgpt_mm.data.prepare_llava_instruct.prepare(
        tokenizer_dir=lm_dir,
        data_path=shapes / "llava_train.json",
        images_dir=shapes / "train2017",
        subset_images=None,
        max_tokens=64,
        val_fraction=0.05,
        out_dir=tmp_path / "llava",
    )
    steps = 360
    litgpt_mm.finetune.qlora.setup(
        align_dir=tmp_path / "align" / "final",
        data_dir=tmp_path / "llava",
        out_dir=tmp_path / "instruct",
        feature_dir=features,
        projector_lr_scale=1.0,
        precision="32-true",
        lora=LoRASettings(r=16, alpha=32, dropout=0.0, query=True, key=True, value=True, projection=True, mlp=True),
        train=TrainArgs(
            save_interval=1000,
            log_interval=20,
            global_batch_size=16,
            micro_batch_size=16,
            max_steps=steps,
            lr_warmup_steps=10,
            max_norm=1.0,
            min_lr=1e-4,
        ),
        eval=EvalArgs(interval=1000, max_iters=1, initial_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.0}},
    )

    assistant = Assistant.load(tmp_path / "instruct" / "merged", device="cpu")
    answerer = Answerer(assistant, GenerationSettings(max_new_tokens=4), batch_size=32)
    scores, _ = vqa(answerer, shapes / "eval" / "vqa_test.jsonl", shapes, prompt_suffix="")
    colour = next(s for s in scores if s.metric == "accuracy/colour")
    c = {k: r.value for k, r in colour.conditions.items()}
    summary = json.dumps({s.metric: {k: round(r.value, 3) for k, r in s.conditions.items()} for s in scores})
    assert colour.conditions["image"].n >= 100, summary
    # with the random ViT-B/32 of earlier versions: above both baselines by 0.1 and above twice chance (0.33); with
    # the pretrained tower this run reaches 0.57 against 0.13 blind and 0.18 shuffled
    assert c["image"] > c["blind"] + 0.25 and c["image"] > c["shuffled"] + 0.25, summary
    assert c["image"] >= 0.45, summary

    # the trained model leaves the project: exported (MoE + resblock: the remote-code package), transformers gives
    # our fp32 logits over a held-out image and its question
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from litgpt_mm.export.hf import export_hf

    hf_dir = tmp_path / "hf"
    assert export_hf(tmp_path / "instruct" / "merged", hf_dir) == "remote"
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    row = json.loads((shapes / "eval" / "vqa_test.jsonl").read_text().splitlines()[0])
    image = Image.open(shapes / row["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    with torch.no_grad():
        want, _ = assistant.model([assistant.features([image])], [assistant.prompt_ids(row["question"], 1, 4)])
        got = model(**inputs).logits
    torch.testing.assert_close(got[..., : want.size(-1)], want, rtol=0, atol=1e-4)
