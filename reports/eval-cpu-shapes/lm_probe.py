"""Which patch features can the instruction stage learn to read, and how fast? A probe of the LM side.

Trains the demo's multimodal model on freshly generated shapes-world images (ids far above the world's, so none is a
validation or test image) with one kind of patch features, then answers the world's validation questions (greedy,
exact match, with the image) by type. The features are, one at a time:

* `tower`: a CLIP tower's patch tokens at a block (default: the demo's tower and block);
* `random`: the same architecture with random weights;
* `oracle`: each patch's exact content as codes (the colour, kind and cell of the shapes overlapping it, weighted by
  the overlap, and the patch's row and column), randomly rotated to fill every channel;
* `text`: no image at all: the scene written out before the first question, as the world's own full caption
  (`shapes.describe`: "there are two shapes: a red circle at the top left and a blue square in the centre"), so
  the answer is in the prompt's words and only the LM's reading of its context is tested.

The LM is the demo's pretrained one or a fresh initialisation of the same config (`fresh`: PyTorch's default of every
layer; `fresh_litgpt`: litgpt's pretraining initialisation, as stage 1 starts from), trained in full, with LoRA, or with
QLoRA (nf4); the projector is always re-initialised (new features), with feature statistics of the training images.
A batch mixes the world's conversations with "Describe the image." turns answered by a caption (`--captions`).

    python reports/eval-cpu-shapes/lm_probe.py --features oracle      # after `make demo` (out/demo)

Appends one JSON line per run to `lm_probe.jsonl` beside this file. Numbers in the report come from this script.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from litgpt_mm.data import llava, shapes
from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.eval import runner, tasks
from litgpt_mm.model import load_model
from litgpt_mm.models.qlora import LoRASettings, add_lora, quantize_nf4
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, target_cross_entropy
from litgpt_mm.pretrain import init_model
from litgpt_mm.prompts import TEMPLATES
from litgpt_mm.training.checkpoint import load_tokenizer

HERE = Path(__file__).parent
FIRST_ID = 1_000_000  # training images of the probe: ids no world split uses
GRID = 7
MAX_TOKENS = 128  # text tokens of a sample, as the demo prepares them (every conversation whole)


def oracle_features(scene: shapes.Scene, width: int, rotation: torch.Tensor) -> torch.Tensor:
    """(GRID * GRID, width) codes of what each patch holds, rotated by `rotation` (width x width)."""
    n_col, n_kind, n_cell = len(shapes.COLOURS), len(shapes.KINDS), len(shapes.POSITIONS)
    base = n_col + n_kind + n_cell
    codes = torch.zeros(GRID * GRID, width)
    for p in range(GRID * GRID):
        row, col = divmod(p, GRID)
        codes[p, base + row] = codes[p, base + GRID + col] = 1
        for s in scene.shapes:
            ox = max(0.0, min((col + 1) / GRID, s.cx + s.r) - max(col / GRID, s.cx - s.r)) * GRID
            oy = max(0.0, min((row + 1) / GRID, s.cy + s.r) - max(row / GRID, s.cy - s.r)) * GRID
            if ox * oy > 0:
                codes[p, list(shapes.COLOURS).index(s.colour)] += ox * oy
                codes[p, n_col + shapes.KINDS.index(s.kind)] += ox * oy
                codes[p, n_col + n_kind + s.cell] += ox * oy
    return codes @ rotation


def build_model(a, demo: Path) -> tuple[MultimodalGPT, MultimodalConfig]:
    config = MultimodalConfig.load(demo / "align" / "final")
    lm = load_model(a.lm_dir or demo / "pretrain-moe" / "final", device="cpu")
    if a.lm == "fresh":
        torch.manual_seed(a.seed)
        lm = type(lm)(lm.config)  # PyTorch's default initialisation of every layer
    elif a.lm == "fresh_litgpt":
        torch.manual_seed(a.seed)
        lm = init_model(L.Fabric(accelerator="cpu", devices=1), lm.config, lm.config.block_size, False)
    if a.tune != "full":
        lm.requires_grad_(False)
        add_lora(lm, LoRASettings(r=16, alpha=32, dropout=0.0, key=True, projection=True, mlp=True, head=a.lora_head))
        if a.tune == "qlora":
            quantize_nf4(lm, torch.float32)
        for name, param in lm.named_parameters():
            if any(part in name for part in a.also_train):
                param.requires_grad_(True)
    torch.manual_seed(a.seed)
    return MultimodalGPT(lm, config), config


def encoder_for(a, config: MultimodalConfig) -> CLIPPatchEncoder:
    if a.features == "random":
        return CLIPPatchEncoder(config.clip_model, None, layer=a.layer if a.layer is not None else config.clip_layer)
    return CLIPPatchEncoder(
        config.clip_model,
        a.tower or config.clip_pretrained,
        layer=a.layer if a.layer is not None else config.clip_layer,
        quick_gelu=config.clip_quick_gelu,
    )


def make_data(a, world: Path, encoder, tokenizer, width: int, rotation: torch.Tensor):
    """Training samples (conversations and caption turns) of `a.images` fresh images, with their features."""
    summary = json.loads((world / "summary.json").read_text())
    template = TEMPLATES["phi2"]
    feats, convs, caps = {}, [], []
    examples = [
        (i, shapes.make_example(summary["seed"], i, summary["max_shapes"], summary["noise"]))
        for i in range(FIRST_ID, FIRST_ID + a.images)
    ]
    for i, ex in examples:
        for turns in ex.conversations:
            rows = shapes.llava_turns(turns)
            if a.features == "text":
                rows[0]["value"] = rows[0]["value"].replace("<image>\n", shapes.describe(ex.scene.shapes) + "\n")
            ids, labels = llava.encode(rows, template, tokenizer, MAX_TOKENS + 32 * (a.features == "text"))
            convs.append((i, ids, labels))
        for caption in ex.captions:
            turns = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]
            ids, labels = llava.encode(turns, template, tokenizer, MAX_TOKENS)
            caps.append((i, ids, labels))
    for start in range(0, len(examples) if a.features != "text" else 0, 64):
        chunk = examples[start : start + 64]
        if a.features == "oracle":
            out = [oracle_features(ex.scene, width, rotation) for _, ex in chunk]
        else:
            images = [shapes.draw(ex.scene, summary["size"], np.random.default_rng(ex.noise_seed)) for _, ex in chunk]
            out = list(encoder.encode_images(images).float())
        feats.update({i: f for (i, _), f in zip(chunk, out, strict=True)})
    return feats, convs, caps


def train(a, mm: MultimodalGPT, feats, convs, caps) -> list[float]:
    params = [p for p in mm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rng = random.Random(a.seed)
    n_caps = round(a.captions * a.batch_size)
    losses = []
    for step in range(1, a.steps + 1):
        batch = rng.sample(convs, a.batch_size - n_caps) + rng.sample(caps, n_caps)
        scale = min(1.0, step / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        mm.train()
        images = [feats[i][None] if i in feats else None for i, _, _ in batch]
        logits, targets = mm(images, [b[1] for b in batch], [b[2] for b in batch], True)
        loss = target_cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: loss {sum(losses[-100:]) / 100:.3f}", flush=True)
    return losses


def answer(a, mm, encoder, tokenizer, world: Path, rotation: torch.Tensor, width: int) -> dict[str, float]:
    """Accuracy per question type on `a.eval_split` of `world`, with the image (or its description)."""
    summary = json.loads((world / "summary.json").read_text())
    if a.features == "text":
        return answer_described(a, mm, encoder, tokenizer, world, summary)
    answerer = runner.Answerer(Assistant(mm, encoder, tokenizer, "phi2"), GenerationSettings(6), 32, 0)
    if a.features == "oracle":

        def features(paths) -> None:
            for p in paths:
                ex = shapes.make_example(summary["seed"], int(Path(p).stem), summary["max_shapes"], summary["noise"])
                answerer._features[Path(p)] = oracle_features(ex.scene, width, rotation)

        answerer.features = features
    mm.eval()
    questions = world / "eval" / f"vqa_{a.eval_split}.jsonl"
    scores, _ = tasks.vqa(answerer, questions, world, None, "", a.limit, 0, ("image",))
    return {s.metric.removeprefix("accuracy/"): s.conditions["image"].value for s in scores}


def answer_described(a, mm, encoder, tokenizer, world: Path, summary: dict) -> dict[str, float]:
    """Accuracy per question type with the scene described before each question and no image."""
    assistant = Assistant(mm, encoder, tokenizer, "phi2")
    rows = [json.loads(line) for line in (world / "eval" / f"vqa_{a.eval_split}.jsonl").open()][: a.limit]
    scenes = {}
    for r in rows:
        image_id = int(Path(r["image"]).stem)
        if image_id not in scenes:
            scenes[image_id] = shapes.make_example(summary["seed"], image_id, summary["max_shapes"], summary["noise"])
    prompts = [f"{shapes.describe(scenes[int(Path(r['image']).stem)].scene.shapes)}\n{r['question']}" for r in rows]
    right: dict[str, list[bool]] = {}
    mm.eval()
    for start in range(0, len(rows), 64):
        chunk = prompts[start : start + 64]
        answers = assistant.answer_batch(chunk, [[]] * len(chunk), GenerationSettings(6))
        for r, answer in zip(rows[start : start + 64], answers, strict=True):
            right.setdefault(r["type"], []).append(answer.strip().lower().rstrip(".") == r["answers"][0])
    return {kind: sum(v) / len(v) for kind, v in sorted(right.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", type=Path, default=Path("out/demo"))
    p.add_argument("--features", choices=("tower", "random", "oracle", "text"), default="tower")
    p.add_argument("--tower", help="another tower's weights (the demo's CLIP model name)")
    p.add_argument("--layer", type=int, help="tower block to read (default: the demo's)")
    p.add_argument("--lm", choices=("pretrained", "fresh", "fresh_litgpt"), default="fresh")
    p.add_argument("--lm_dir", type=Path, help="`pretrained`: another LM than the demo's (e.g. text_lm.py --save)")
    p.add_argument("--tune", choices=("full", "lora", "qlora"), default="full")
    p.add_argument("--also_train", nargs="*", default=[], help="with LoRA: also train parameters whose name has one")
    p.add_argument("--lora_head", action="store_true", help="LoRA on the LM head too")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--captions", type=float, default=0.5, help="fraction of each batch that are caption turns")
    p.add_argument("--limit", type=int, default=300, help="questions answered")
    p.add_argument("--eval_world", type=Path, help="answer another shapes world's questions (default: the demo's)")
    p.add_argument("--eval_split", default="val", help="the split whose questions are answered")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.features == "text" and a.captions:
        p.error("--features text has no image to describe: pass --captions 0")
    start = time.perf_counter()
    demo, world = a.demo_dir, a.demo_dir / "data" / "shapes"
    mm, config = build_model(a, demo)
    encoder = encoder_for(a, config)
    tokenizer = load_tokenizer(a.lm_dir or demo / "pretrain-moe" / "final")
    width = config.vision_width
    rotation = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(0)))[0] * 4
    feats, convs, caps = make_data(a, world, encoder, tokenizer, width, rotation)
    if feats:
        mm.set_feature_statistics(torch.stack(list(feats.values())))
    longest = max(len(c[1]) for c in convs + caps) + (config.num_patches + 1 if feats else 0)
    mm.lm.max_seq_length = min(mm.lm.config.block_size, longest)
    losses = train(a, mm, feats, convs, caps)
    accuracy = answer(a, mm, encoder, tokenizer, a.eval_world or world, rotation, width)
    row = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "accuracy": accuracy}
    row |= {"final_loss": sum(losses[-50:]) / 50, "seconds": round(time.perf_counter() - start)}
    row |= {"max_tokens": MAX_TOKENS}  # rows without it: conversations cut at 64 tokens, grouped as before the fix
    row |= {"pope_style_turns": True}  # rows without it: no POPE-style question in the training conversations
    print(json.dumps(row))
    with open(HERE / "lm_probe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
