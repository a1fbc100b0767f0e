"""Can the demo's LM configuration learn to read its own context? Two text-only checks, no image, no projector.

* `--task world`: a fresh `phi-2-moe-tiny` (litgpt's pretraining initialisation) trained with the LM loss on every
  token of shapes-world documents: an image's full caption, then each of its questions with the answer
  ("there are two shapes: a red circle at the top left and a blue square in the centre / What colour is the
  square? blue / ..."); then it answers the questions of 300 held-out images of another world (seed 7) from the
  caption, greedy, exact match, by type. Every answer is in the prompt's words. `--loss answers`: the loss on the
  answers' tokens only (as instruction tuning); `--eval_interval`: answer 100 held-out images along the way;
  `--arch vanilla`: a plain GPT of the same size instead (sequential residual, rotary on every dimension, no
  experts), to tell the architecture from the task.
* `--task copy`: the same LM on random token strings repeated once (the second half predicted from the first:
  what an induction head does), reporting the copy accuracy as it trains: that it can learn to read its context
  at all.

    python reports/eval-cpu-shapes/text_lm.py --task copy --steps 500       # after `make demo` (its tokenizer)
    python reports/eval-cpu-shapes/text_lm.py --task world --steps 1000
    python reports/eval-cpu-shapes/text_lm.py --task world --copy_steps 500 --steps 1000 --save out/lm_copy_world
    python reports/eval-cpu-shapes/text_lm.py --task world --loss answers --steps 3000 --eval_interval 500

Appends one JSON line per run to `text_lm.jsonl` beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from litgpt.generate.base import generate

from litgpt_mm.config import Config
from litgpt_mm.data import shapes
from litgpt_mm.model import GPT, save_checkpoint
from litgpt_mm.pretrain import init_model
from litgpt_mm.training.checkpoint import load_tokenizer

HERE = Path(__file__).parent
BATCH = 16
LOG_EVERY = 50  # steps


def document(example: shapes.Example, rng: random.Random, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of "<caption>\n<question> <answer>\n...<question> <answer><eos>" (questions shuffled), and a mask of
    the answers' ids (tokenized piece by piece: the same ids as the whole text, whose pieces meet at spaces and
    newlines)."""
    questions = rng.sample(example.questions, len(example.questions))
    pieces = [(shapes.describe(example.scene.shapes) + "\n", False)]
    for n, q in enumerate(questions):
        pieces += [(q.text, False), (f" {q.answer}" + ("\n" if n < len(questions) - 1 else ""), True)]
    ids = [tokenizer.encode(text, bos=False, eos=False) for text, _ in pieces]
    mask = [torch.full((len(i),), answer) for i, (_, answer) in zip(ids, pieces, strict=True)]
    eos = torch.tensor([tokenizer.eos_id])
    return torch.cat([*ids, eos]), torch.cat([*mask, torch.tensor([True])])


def batch_world(docs: list, rng: random.Random, answers_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = rng.sample(docs, BATCH)
    T = max(len(d) for d, _ in chosen)
    x, y = torch.zeros(BATCH, T, dtype=torch.long), torch.full((BATCH, T), -100, dtype=torch.long)
    for k, (d, answer) in enumerate(chosen):
        x[k, : len(d)], y[k, : len(d) - 1] = d, d[1:]
        if answers_only:
            y[k, : len(d) - 1][~answer[1:]] = -100
    return x, y


def batch_copy(generator: torch.Generator, vocab: int, half: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    first = torch.randint(100, vocab, (BATCH, half), generator=generator)
    x = torch.cat([first, first], 1)
    y = torch.full_like(x, -100)
    y[:, half - 1 : -1] = x[:, half:]
    return x, y


def answer_world(lm, tokenizer, limit_images: int = 300) -> dict[str, float]:
    """Greedy answers (exact match, by type) to the questions of held-out images (world seed 7), each asked alone
    after the image's caption."""
    right: dict[str, list[bool]] = {}
    lm.eval()
    lm.set_kv_cache(batch_size=1)
    for image_id in range(1, limit_images + 1):
        example = shapes.make_example(7, image_id)
        for q in example.questions:
            ids = tokenizer.encode(shapes.describe(example.scene.shapes) + "\n" + q.text, bos=False, eos=False)
            out = generate(lm, ids, len(ids) + 6, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False)
            answer = tokenizer.decode(out[out != tokenizer.eos_id]).split("\n")[0].strip()
            right.setdefault(q.type, []).append(answer == q.answer)
    lm.clear_kv_cache()
    lm.train()
    return {kind: round(sum(v) / len(v), 3) for kind, v in sorted(right.items())}


def build_lm(demo_dir: Path, arch: str) -> GPT:
    """A fresh LM with litgpt's pretraining initialisation: the demo's config, or (`vanilla`) a GPT of the same
    width, depth and heads with litgpt's defaults (sequential residual, rotary on every dimension, no experts)."""
    config = Config.from_file(demo_dir / "pretrain-moe" / "final" / "model_config.yaml")
    if arch == "vanilla":
        keep = ("vocab_size", "padded_vocab_size", "block_size", "n_layer", "n_embd", "n_head", "intermediate_size")
        config = Config(
            name="vanilla",
            bias=True,
            parallel_residual=False,
            rotary_percentage=1.0,
            **{k: getattr(config, k) for k in keep},
        )
    return init_model(L.Fabric(accelerator="cpu", devices=1), config, config.block_size, False)


def save_lm(lm, out: Path, tokenizer_dir: Path) -> None:
    save_checkpoint(lm, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", type=Path, default=Path("out/demo"))
    p.add_argument("--task", choices=("world", "copy"), default="world")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--images", type=int, default=20000, help="training images of `world` (ids no split uses)")
    p.add_argument("--copy_steps", type=int, default=0, help="`world`: first train this many steps of `copy`")
    p.add_argument(
        "--loss",
        choices=("all", "answers"),
        default="all",
        help="`world`: the LM loss on every token or on the answers'",
    )
    p.add_argument("--arch", choices=("demo", "vanilla"), default="demo")
    p.add_argument(
        "--eval_interval",
        type=int,
        default=0,
        help="`world`: answer 100 held-out images' questions every this many steps",
    )
    p.add_argument("--save", type=Path, help="write the trained LM here (litgpt layout, with the demo's tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.eval_interval % LOG_EVERY:
        p.error(f"--eval_interval {a.eval_interval}: use a multiple of {LOG_EVERY} (the steps that are logged)")
    start = time.perf_counter()
    tokenizer = load_tokenizer(a.demo_dir / "pretrain-moe" / "final")
    torch.manual_seed(a.seed)
    lm = build_lm(a.demo_dir, a.arch)
    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng, generator = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    if a.task == "world":
        docs = [
            document(shapes.make_example(42, i), random.Random(i), tokenizer)
            for i in range(1_000_000, 1_000_000 + a.images)
        ]
    log = []
    total = a.steps + a.copy_steps * (a.task == "world")
    for step in range(1, total + 1):
        copy = a.task == "copy" or step <= a.copy_steps
        x, y = batch_copy(generator, lm.config.vocab_size) if copy else batch_world(docs, rng, a.loss == "answers")
        scale = min(1.0, step / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        lm.train()
        logits = lm(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % LOG_EVERY == 0:
            row = {"step": step, "loss": round(loss.item(), 4)}
            if copy:
                keep = y != -100
                row["copy_accuracy"] = round((logits.argmax(-1)[keep] == y[keep]).float().mean().item(), 3)
            if not copy and a.eval_interval and (step - a.copy_steps * (a.task == "world")) % a.eval_interval == 0:
                row["accuracy_100"] = answer_world(lm, tokenizer, 100)
            log.append(row)
            print(row, flush=True)
    if a.save:
        save_lm(lm, a.save, a.demo_dir / "pretrain-moe" / "final")
    result = {**vars(a), "demo_dir": str(a.demo_dir), "save": str(a.save), "log": log}
    result["seconds"] = round(time.perf_counter() - start)
    if a.task == "world":
        result["accuracy"] = answer_world(lm, tokenizer)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    with open(HERE / "text_lm.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
