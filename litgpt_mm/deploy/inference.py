"""Loading a trained multimodal model and answering prompts with images (and speech, through `litgpt_mm.deploy.audio`).

`Assistant.load` accepts the three kinds of directory the recipes write:

* a merged model (`qlora_instruct.py`'s `merged/`): `lit_model.pth` + `projector.pth` + `multimodal_config.yaml`;
* base + LoRA + projector (`qlora_instruct.py`'s `final/` or `step-*/`): `lora.pth`, `lora_config.yaml`, the
  projector, and the base LM named in `multimodal_config.yaml`;
* an aligned projector only (`align.py`'s `final/`), with the LM it names.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from litgpt.tokenizer import Tokenizer
from PIL import Image

from litgpt_mm.data.coco import load_rgb
from litgpt_mm.deploy.chat import PromptBuilder, TextStream, Turn
from litgpt_mm.model import load_model
from litgpt_mm.models.qlora import LoRASettings, add_lora, quantize_nf4
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, generate, generate_batch, separator_token_id
from litgpt_mm.prompts import TEMPLATES
from litgpt_mm.training.checkpoint import load_tokenizer


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, or one clear `ValueError` naming the file when it is missing or cannot be decoded."""
    if not path.is_file():
        raise ValueError(f"image {path}: no such file")
    try:
        return load_rgb(path)[0]
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"image {path}: cannot be decoded ({type(err).__name__}: {err}); pass a JPEG, PNG, WebP, BMP or GIF file"
        ) from None


@dataclass
class GenerationSettings:
    """Decoding settings (greedy when `temperature` is 0)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0


class Assistant:
    """A loaded multimodal model with its CLIP encoder, tokenizer and prompt template."""

    def __init__(self, model: MultimodalGPT, encoder: CLIPPatchEncoder, tokenizer: Tokenizer, template: str) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} unknown: choose from {sorted(TEMPLATES)}")
        self.model, self.encoder, self.tokenizer, self.template = model, encoder, tokenizer, TEMPLATES[template]
        self.device = model.lm.transformer.wte.weight.device

    @classmethod
    def load(
        cls, checkpoint_dir: Path, device: str | None = None, quantize: str | None = None, template: str = "phi2"
    ) -> Assistant:
        """Load any of the three checkpoint kinds; `quantize="nf4"` stores the LM's linear weights in nf4."""
        model, encoder, tokenizer = load_multimodal(checkpoint_dir, device, quantize)
        return cls(model, encoder, tokenizer, template)

    def features(self, images: Sequence[Path | Image.Image]) -> torch.Tensor | None:
        """Patch features (n_images, num_patches, width) of image files or PIL images, or None without images."""
        if not images:
            return None
        pil = [img.convert("RGB") if isinstance(img, Image.Image) else open_image(Path(img)) for img in images]
        return self.encoder.encode_images(pil)

    @property
    def prompts(self) -> PromptBuilder:
        lm = self.model.lm
        return PromptBuilder(self.tokenizer, self.template, lm.config.block_size, self.model.config.num_patches)

    def prompt_ids(self, prompt: str | Sequence[Turn], n_images: int, max_new_tokens: int) -> torch.Tensor:
        """Template-rendered ids of a question (or of a conversation's turns) cut to fit the context with the
        images and `max_new_tokens` (see `PromptBuilder`); what was cut is noticed on stderr."""
        turns = [Turn("user", prompt)] if isinstance(prompt, str) else list(prompt)
        built = self.prompts.build(turns, n_images, max_new_tokens)
        if built.notice:
            print(f"notice: {built.notice}", file=sys.stderr)
        self.model.lm.max_seq_length = self.model.lm.config.block_size
        return built.ids.to(self.device)

    def stream(
        self,
        prompt: str | Sequence[Turn],
        images: Sequence[Path | Image.Image] = (),
        settings: GenerationSettings | None = None,
    ) -> Iterator[str]:
        """Yield the answer to a question (or to the last turn of a conversation) as text pieces while it is
        generated (stops at EOS)."""
        settings = settings or GenerationSettings()
        feats = self.features(images)
        ids = self.prompt_ids(prompt, len(images), settings.max_new_tokens)
        text = TextStream(self.tokenizer)
        for token in generate(
            self.model,
            feats,
            ids,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            eos_id=self.tokenizer.eos_id,
        ):
            if token == self.tokenizer.eos_id:
                break
            if piece := text.push(token):
                yield piece

    def answer(
        self, prompt: str, images: Sequence[Path | Image.Image] = (), settings: GenerationSettings | None = None
    ) -> str:
        return "".join(self.stream(prompt, images, settings)).strip()

    def answer_batch(
        self, prompts: Sequence[str], images: Sequence[Sequence[Path]], settings: GenerationSettings | None = None
    ) -> list[str]:
        """Answers of several prompts decoded together (same greedy answers as one by one)."""
        settings = settings or GenerationSettings()
        feats = [self.features(imgs) for imgs in images]
        ids = [self.prompt_ids(p, len(imgs), settings.max_new_tokens) for p, imgs in zip(prompts, images, strict=True)]
        out = generate_batch(
            self.model,
            feats,
            ids,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            eos_id=self.tokenizer.eos_id,
        )
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode(torch.tensor([t for t in row if t != eos])).strip() for row in out]


def load_multimodal(
    checkpoint_dir: Path, device: str | None = None, quantize: str | None = None
) -> tuple[MultimodalGPT, CLIPPatchEncoder, Tokenizer]:
    """The model (in eval mode), its CLIP encoder and its tokenizer from any of the three checkpoint kinds.

    LoRA adapters trained on an nf4 base run on the nf4 base (the function they were trained with) unless `quantize`
    says otherwise; `quantize="nf4"` stores the LM's linear weights in nf4. On CUDA without quantisation the LM runs
    in bf16, elsewhere in fp32. Shared by `Assistant.load` and the exporters (`litgpt_mm.export.load`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = MultimodalConfig.load(checkpoint_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    merged = (checkpoint_dir / "lit_model.pth").is_file()
    lm_dir = checkpoint_dir if merged else Path(config.lm_checkpoint_dir)
    lm = load_model(lm_dir, device=device)
    lora_file = checkpoint_dir / "lora.pth"
    if not merged and lora_file.is_file():
        settings = yaml.safe_load((checkpoint_dir / "lora_config.yaml").read_text())
        trained_nf4 = settings.pop("quantize", None) == "nf4"
        add_lora(lm, LoRASettings(**{**settings, "dropout": 0.0}))
        lm.load_state_dict(torch.load(lora_file, map_location="cpu", weights_only=True), strict=False)
        quantize = quantize or ("nf4" if trained_nf4 else None)  # the function the adapters were trained on
    if quantize == "nf4":
        quantize_nf4(lm, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    elif quantize is not None:
        raise ValueError(f"--quantize {quantize!r}: only 'nf4' is supported")
    elif device.startswith("cuda"):
        lm = lm.to(torch.bfloat16)
    tokenizer = load_tokenizer(tokenizer_dir(checkpoint_dir, config))
    sep_id = separator_token_id(tokenizer, config.separator)
    model = MultimodalGPT(lm, config, separator_id=sep_id).to(device).eval()
    model.load_adapter(checkpoint_dir)
    model.projector.to(lm.transformer.wte.weight.dtype)
    encoder = CLIPPatchEncoder.from_config(config).to(device)
    return model, encoder, tokenizer


def tokenizer_dir(checkpoint_dir: Path, config: MultimodalConfig) -> Path:
    """Where a checkpoint's tokenizer lives: the checkpoint itself when it has `tokenizer.json` (a merged model), else
    the LM directory it names."""
    checkpoint_dir = Path(checkpoint_dir)
    merged = (checkpoint_dir / "lit_model.pth").is_file()
    if merged or (checkpoint_dir / "tokenizer.json").is_file():
        return checkpoint_dir
    return Path(config.lm_checkpoint_dir)
