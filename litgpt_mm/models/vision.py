"""Frozen CLIP vision tower (open_clip) that returns patch embeddings without the class token.

ViT-B/32 at 224 px gives a 7 x 7 grid: 49 patch embeddings of width 768 per image. Any open_clip model name works
(`ViT-B-16`: 196 patches, `ViT-L-14-336`: 576). Features come from the last transformer block by default (before
`ln_post`, like Hugging Face's `last_hidden_state`), or from any block (`layer=-2` is LLaVA's choice).

The tower runs the activation its weights were trained with: open_clip builds `ViT-B-32` with `nn.GELU`, while
OpenAI's weights (and every tag whose pretrained config says `quick_gelu`) were trained with QuickGELU, so the
activation is read from the tag's own config. A local weights file may come with its open_clip model config beside
it (`<model_name>.json`, as `scripts/pretrain_clip.py` writes), which is registered with open_clip before the model
is built; the configs in `clip_configs/` beside this module (the shapes world's small CLIP) are registered on import.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

CONFIG_DIR = Path(__file__).parent / "clip_configs"
_registered = False


def register_model_configs(weights: str | None = None, model_name: str | None = None) -> None:
    """Register our open_clip model configs (once), and `<model_name>.json` beside a local weights file if any."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    if weights and model_name and model_name not in open_clip.list_models():
        beside = Path(weights).parent / f"{model_name}.json"
        if beside.is_file():
            open_clip.add_model_config(beside)


def tag_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the open_clip pretrained tag's own config says its weights were trained with QuickGELU (`openai`
    does; a local file or no weights: False). Read from open_clip's local tables, no download."""
    import open_clip

    if not pretrained or Path(pretrained).is_file():
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


class CLIPPatchEncoder(nn.Module):
    """open_clip vision transformer, frozen and in eval mode, returning `(B, num_patches, width)` patch features.

    Args:
        model_name: open_clip model name, e.g. `ViT-B-32`.
        pretrained: open_clip pretrained tag (`openai`, `laion2b_s34b_b79k`, ...), a local weights file, or `None`
            for a random initialisation with a fixed seed (offline tests, demo, benchmarks).
        layer: transformer block to read (negative counts from the end; -1 is the last block).
        normalize: apply the final `ln_post` to the features (what open_clip's `output_tokens` returns).
        cache_dir: where open_clip keeps downloaded weights.
        quick_gelu: build the MLPs with QuickGELU; None: as the pretrained tag's config says (`True` for `openai`).
            Checkpoints record the activation they were trained with (`MultimodalConfig.clip_quick_gelu`).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        layer: int = -1,
        normalize: bool = False,
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        register_model_configs(pretrained, model_name)
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"Unknown open_clip model {model_name!r}: choose from open_clip.list_models(), or put its model config "
                f"{model_name}.json beside the local weights file"
            )
        if pretrained and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(
                    f"CLIP weights {pretrained!r}: neither a file nor an open_clip tag of {model_name} "
                    f"({', '.join(tags) or 'it has none'})"
                )
        if quick_gelu is None:
            quick_gelu = tag_quick_gelu(model_name, pretrained)
        with torch.random.fork_rng(devices=[]), _without_random_init_warning():
            torch.manual_seed(0)  # without pretrained weights: the same random CLIP in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, cache_dir=cache_dir, force_quick_gelu=quick_gelu
            )
        self.visual = model.visual
        self.preprocess = preprocess
        self.model_name, self.pretrained, self.normalize = model_name, pretrained, normalize
        self.quick_gelu = isinstance(self.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
        n_blocks = len(self.visual.transformer.resblocks)
        if not -n_blocks <= layer < n_blocks:
            raise ValueError(f"layer {layer} out of range for {model_name}'s {n_blocks} blocks")
        self.layer = layer % n_blocks
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, config) -> CLIPPatchEncoder:
        """The tower a `MultimodalConfig` names, with the activation it was trained with."""
        return cls(
            config.clip_model,
            config.clip_pretrained,
            layer=config.clip_layer,
            normalize=config.clip_normalize,
            quick_gelu=config.clip_quick_gelu,
        )

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
        tag = Path(str(self.pretrained)).name if Path(str(self.pretrained)).is_file() else str(self.pretrained)
        act = "-qgelu" if self.quick_gelu else ""
        return f"{self.model_name}-{tag}-L{self.layer}{'-ln' if self.normalize else ''}{act}-{digest.hexdigest()[:10]}"

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
