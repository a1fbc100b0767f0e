"""Frozen CLIP vision tower (open_clip) that returns patch embeddings without the class token.

ViT-B/32 at 224 px gives a 7 x 7 grid: 49 patch embeddings of width 768 per image. Any open_clip model name works
(`ViT-B-16`: 196 patches, `ViT-L-14-336`: 576). Features come from the last transformer block by default (before
`ln_post`, like Hugging Face's `last_hidden_state`), or from any block (`layer=-2` is LLaVA's choice).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from PIL import Image


class CLIPPatchEncoder(nn.Module):
    """open_clip vision transformer, frozen and in eval mode, returning `(B, num_patches, width)` patch features.

    Args:
        model_name: open_clip model name, e.g. `ViT-B-32`.
        pretrained: open_clip pretrained tag (`openai`, `laion2b_s34b_b79k`, ...), a local weights file, or `None`
            for a random initialisation with a fixed seed (offline tests, demo, benchmarks).
        layer: transformer block to read (negative counts from the end; -1 is the last block).
        normalize: apply the final `ln_post` to the features (what open_clip's `output_tokens` returns).
        cache_dir: where open_clip keeps downloaded weights.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        layer: int = -1,
        normalize: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"Unknown open_clip model {model_name!r}; choose from open_clip.list_models()")
        with torch.random.fork_rng(devices=[]), _without_random_init_warning():
            torch.manual_seed(0)  # without pretrained weights: the same random CLIP in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, cache_dir=cache_dir
            )
        self.visual = model.visual
        self.preprocess = preprocess
        self.model_name, self.pretrained, self.normalize = model_name, pretrained, normalize
        n_blocks = len(self.visual.transformer.resblocks)
        if not -n_blocks <= layer < n_blocks:
            raise ValueError(f"layer {layer} out of range for {model_name}'s {n_blocks} blocks")
        self.layer = layer % n_blocks
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CLIPPatchEncoder:
        return super().train(False)  # always frozen

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def num_patches(self) -> int:
        h, w = self.visual.grid_size
        return h * w

    def key(self) -> str:
        """Identifies the features: model, weights, layer and norm (the feature cache is rebuilt when it changes)."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.visual.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().flatten()[:4096].cpu().numpy().tobytes())
        tag = str(self.pretrained).replace("/", "_")
        return f"{self.model_name}-{tag}-L{self.layer}{'-ln' if self.normalize else ''}-{digest.hexdigest()[:10]}"

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's own preprocessing (resize, centre crop, normalise) of RGB PIL images: (B, 3, H, W)."""
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features (B, num_patches, width) of preprocessed images."""
        param = next(self.visual.parameters())
        out = self.visual.forward_intermediates(
            pixels.to(device=param.device, dtype=param.dtype),
            indices=[self.layer],
            stop_early=True,
            normalize_intermediates=self.normalize,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"][0]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Patch features of PIL images, in batches."""
        chunks = [self(self.pixels(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(chunks)


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning for `pretrained=None`: random weights are what was asked for (offline
    tests and the demo), and the choice is recorded in the feature-cache key and `multimodal_config.yaml`."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    logging.root.addFilter(keep)
    try:
        yield
    finally:
        logging.root.removeFilter(keep)
