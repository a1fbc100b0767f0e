"""Answer prompts about images on a TPU with fixed shapes: one prefill and one decode graph per prompt bucket.

    PJRT_DEVICE=TPU python xla/generate_mm.py --checkpoint_dir out/qlora_instruct/merged --input prompts.jsonl

What differs from `generate/mm.py`: prompts (with their image prefixes) are left-padded to a length bucket and
batches to a fixed size, decoding attends over the whole masked cache (no per-step slicing), inference runs under
`no_grad` (XLA does not support `inference_mode`), and the LM is stored in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from litgpt_mm.cli import run_cli
from litgpt_mm.deploy.inference import Assistant
from litgpt_mm.multimodal import generate_batch
from litgpt_mm.training.xla import bucket


def main(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    input: Path = Path("prompts.jsonl"),
    output: Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    template: str = "phi2",
    device: str | None = None,
) -> None:
    """Batch answers of a prompts jsonl (`{"id", "prompt", "image"}` rows) into `{"id", "answer"}` rows.

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory.
        input: prompts jsonl.
        output: answers jsonl (default `<input>.answers.jsonl`).
        batch_size: static batch size (the last batch is padded with empty prompts).
        max_new_tokens: tokens generated per prompt.
        template: prompt template.
        device: default: the XLA device.
    """
    if device is None:
        import torch_xla

        device = str(torch_xla.device())
    assistant = Assistant.load(checkpoint_dir, device=device, template=template)
    rows = [json.loads(line) for line in Path(input).read_text().splitlines() if line.strip()]
    out = open(output or f"{input}.answers.jsonl", "w")
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            images = [
                [Path(p) for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image") or [])]
                for r in chunk
            ]
            feats = [assistant.features(imgs) for imgs in images]
            ids = [
                assistant.prompt_ids(r.get("prompt", ""), len(imgs), max_new_tokens)
                for r, imgs in zip(chunk, images, strict=True)
            ]
            filler = batch_size - len(chunk)
            feats, ids = feats + [None] * filler, ids + [ids[0][:1]] * filler
            width = max(
                len(x) + (0 if f is None else f.size(0) * (assistant.model.config.num_patches + 1))
                for f, x in zip(feats, ids, strict=True)
            )
            answers = generate_batch(
                assistant.model,
                feats,
                ids,
                max_new_tokens,
                eos_id=assistant.tokenizer.eos_id,
                pad_to=bucket(width),
                static=True,
            )
            for row, toks in zip(chunk, answers, strict=False):
                text = assistant.tokenizer.decode(torch.tensor([t for t in toks if t != assistant.tokenizer.eos_id]))
                out.write(json.dumps({"id": row.get("id"), "answer": text.strip()}) + "\n")
    out.close()


if __name__ == "__main__":
    run_cli(main)
