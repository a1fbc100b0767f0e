"""Alignment training throughput (samples/s), measured side by side in one run on the bundled COCO images.

* `ours_cached`: our training step reading fp16 CLIP features from the feature cache (what `recipes/align.py`
  does by default): projector + frozen LM forward/backward, AdamW on the projector.
* `ours_recompute`: the same step, but loading, preprocessing and encoding the images with CLIP every step, as the
  original capstone did.
* `hf_pipeline`: Hugging Face transformers `CLIPVisionModel` + `PhiForCausalLM` (`inputs_embeds`) at the same
  sizes, recomputing CLIP every step, with the same projector and loss.

Target: `ours_cached` >= 3x `ours_recompute`. CLIP is ViT-B/32 (random weights: speed does not depend on them).

    python benchmarks/align.py                      # CPU
    python benchmarks/align.py --device cuda        # bf16 autocast; add --lm phi-2 for the phi-2 shape
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from litgpt_mm.analysis.bench import save, timeit_interleaved
from litgpt_mm.config import Config
from litgpt_mm.data.coco import load_rgb
from litgpt_mm.model import GPT
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, target_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def hf_models(cfg: Config, encoder: CLIPPatchEncoder, device: torch.device):
    from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

    vis = encoder.visual
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=vis.transformer.width,
            intermediate_size=4 * vis.transformer.width,
            num_hidden_layers=len(vis.transformer.resblocks),
            num_attention_heads=vis.transformer.width // 64,
            image_size=224,
            patch_size=32,
        )
    )
    lm = PhiForCausalLM(
        PhiConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            partial_rotary_factor=cfg.rotary_percentage,
            max_position_embeddings=cfg.block_size,
            hidden_act="gelu_new",
            attn_implementation="sdpa",
        )
    )
    return clip.to(device).eval().requires_grad_(False), lm.to(device).eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm", default="phi-2-tiny", help="a dense preset or litgpt name (phi-2 on a GPU)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--caption_tokens", type=int, default=24)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(0)

    encoder = CLIPPatchEncoder("ViT-B-32", pretrained=None).to(device)
    cfg = Config.from_name(args.lm)
    lm = GPT(cfg).to(device).requires_grad_(False).eval()
    mm = MultimodalGPT(lm, MultimodalConfig(vision_width=encoder.width, num_patches=encoder.num_patches)).to(device)
    opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-4)
    files = sorted((ROOT / "data" / "coco").glob("*2017/*.jpg"))
    files = (files * (args.batch // len(files) + 1))[: args.batch]
    ids = [torch.randint(0, cfg.vocab_size, (args.caption_tokens,), device=device) for _ in range(args.batch)]
    cached = encoder.encode_images([load_rgb(f)[0] for f in files]).half()

    def step(feats: torch.Tensor) -> None:
        with torch.autocast(**amp):
            loss = target_cross_entropy(*mm([f[None] for f in feats.float()], ids, targets_only=True))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_cached() -> None:
        step(cached)

    def ours_recompute() -> None:
        pixels = encoder.pixels([load_rgb(f)[0] for f in files]).to(device)
        with torch.autocast(**amp):
            step(encoder(pixels))

    hf_clip, hf_lm = hf_models(cfg, encoder, device)

    def hf_pipeline() -> None:
        pixels = encoder.pixels([load_rgb(f)[0] for f in files]).to(device)
        with torch.autocast(**amp):
            with torch.no_grad():
                feats = hf_clip(pixel_values=pixels).last_hidden_state[:, 1:]
            prefix = mm.image_prefix(feats.float())
            text = hf_lm.get_input_embeddings()(torch.stack(ids))
            embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
            labels = torch.cat([torch.full(prefix.shape[:2], -100, device=device), torch.stack(ids)], dim=1)
            loss = hf_lm(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"ours_cached": ours_cached, "ours_recompute": ours_recompute, "hf_pipeline": hf_pipeline}
    times = timeit_interleaved(fns, device, warmup=1, iters=args.iters)
    base = times["ours_recompute"]
    rows = [
        {"variant": k, "ms_per_step": t * 1e3, "samples_per_s": args.batch / t, "x_vs_capstone_style": base / t}
        for k, t in times.items()
    ]
    notes = [
        f"ours_cached is {base / times['ours_cached']:.1f}x the capstone-style recompute (target >= 3x)",
        f"ours_cached is {times['hf_pipeline'] / times['ours_cached']:.1f}x the HF pipeline",
        f"LM {args.lm} (frozen), CLIP ViT-B/32 (frozen), batch {args.batch} x ({encoder.num_patches + 1} image "
        f"+ {args.caption_tokens} caption positions); median of {args.iters} interleaved steps",
    ]
    if device.type == "cuda":
        notes.append(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB (all variants)")
    save("align", device, rows, notes, vars(args))


if __name__ == "__main__":
    main()
