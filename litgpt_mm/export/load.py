"""What the exporters read from a checkpoint: plain fp32 weights and the facts of the vision tower.

`load_checkpoint` accepts every directory `generate/mm.py` answers from (a merged model, base + LoRA + projector, an
aligned projector) through the same loader (`litgpt_mm.deploy.inference.load_multimodal`), then folds LoRA adapters into
plain weights (nf4 bases dequantised: the function the adapters were trained on). `vision_spec` reads the CLIP
tower's shape, activation and preprocessing from the loaded open_clip module itself, so any tower (ViT-B/32, a small
custom one, QuickGELU or not) is described by what it computes, not by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from litgpt.tokenizer import Tokenizer

from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT


@dataclass
class LoadedCheckpoint:
    """A checkpoint in plain fp32 tensors on the CPU.

    Attributes:
        checkpoint_dir: the directory that was loaded.
        kind: `merged` (lit_model.pth in the directory), `lora` (adapters on the base LM named in the config) or
            `aligned` (a projector on the base LM).
        config: the multimodal config (`multimodal_config.yaml`).
        lm_config: the LM's config (`litgpt_mm.config.Config`; `n_expert > 0` for the MoE LM).
        lm_state: the LM's weights in litgpt's key layout (`transformer.wte.weight`, `transformer.h.0.attn.qkv.weight`,
            ..., `lm_head.weight`, `lm_head.bias`; MoE blocks add `transformer.h.i.norm_moe.*` and
            `transformer.h.i.moe.{router.weight,w1,w2,b1,b2}`), LoRA folded in, fp32.
        projector_state: the projector's weights, keyed as `models.projector.build_projector(config.projector, ...)`
            names them (`weight`/`bias` for `linear`; `0.*`, `2.*` for `mlp2x_gelu`; `proj.*`, `norm.*`, `mlp.0.*`,
            `mlp.2.*` for `resblock`), fp32.
        feature_mean: (vision_width,) mean subtracted from the patch features before the projector when
            `config.feature_norm == "standardize"`, else None.
        feature_std: (vision_width,) standard deviation they are divided by, or None.
        separator: (n_embd,) the vector placed after each image's projected patches (the learned one, or the
            embedding of the separator token), fp32.
        tokenizer: litgpt's `Tokenizer` (what our prompts are encoded with).
        tokenizer_dir: the directory holding `tokenizer.json` / `tokenizer_config.json` (or `tokenizer.model`).
        encoder: the frozen CLIP tower (`CLIPPatchEncoder`, fp32, CPU, eval mode); `encoder.visual` is the open_clip
            `VisionTransformer`, `encoder.preprocess` its torchvision preprocessing.
        model: the multimodal model rebuilt from these plain weights (fp32, CPU, eval mode): a reference for parity.
    """

    checkpoint_dir: Path
    kind: Literal["merged", "lora", "aligned"]
    config: MultimodalConfig
    lm_config: Config
    lm_state: dict[str, torch.Tensor]
    projector_state: dict[str, torch.Tensor]
    feature_mean: torch.Tensor | None
    feature_std: torch.Tensor | None
    separator: torch.Tensor
    tokenizer: Tokenizer
    tokenizer_dir: Path
    encoder: CLIPPatchEncoder
    model: MultimodalGPT


def load_checkpoint(checkpoint_dir: Path) -> LoadedCheckpoint:
    """Load any checkpoint `generate/mm.py` answers from into plain fp32 CPU tensors (see `LoadedCheckpoint`).

    Raises `FileNotFoundError` (an `OSError`: one `error:` line in the CLIs) for a directory that is not a multimodal
    checkpoint, whose base LM is missing, or that has no tokenizer; `ValueError` for a config this code cannot build.
    """
    from litgpt_mm.deploy.inference import load_multimodal, tokenizer_dir
    from litgpt_mm.models.qlora import merged_state_dict

    checkpoint_dir = Path(checkpoint_dir)
    loaded, encoder, tokenizer = load_multimodal(checkpoint_dir, device="cpu")
    if (checkpoint_dir / "lit_model.pth").is_file():
        kind = "merged"
    elif (checkpoint_dir / "lora.pth").is_file():
        kind = "lora"
    else:
        kind = "aligned"
    config = loaded.config
    lm_config = loaded.lm.config
    lm_state = {k: v.detach().float().cpu() for k, v in merged_state_dict(loaded.lm).items()}
    adapter = {k: v.detach().float().cpu() for k, v in loaded.adapter_state_dict().items()}
    projector_state = {k.removeprefix("projector."): v for k, v in adapter.items() if k.startswith("projector.")}
    with torch.no_grad():
        separator = loaded.separator_embedding().detach().float().cpu().clone()
    standardize = config.feature_norm == "standardize"

    with torch.device("meta"):
        lm = GPT(lm_config)
    lm.load_state_dict(lm_state, assign=True)
    lm.cos, lm.sin = lm.rope_cache(device=torch.device("cpu"))
    separator_id = None if loaded.separator is not None else int(loaded.separator_id)
    model = MultimodalGPT(lm, config, separator_id=separator_id).eval()
    model.load_state_dict({f"lm.{k}": v for k, v in lm_state.items()} | adapter, strict=True)
    encoder = encoder.float().cpu().eval()
    return LoadedCheckpoint(
        checkpoint_dir=checkpoint_dir,
        kind=kind,
        config=config,
        lm_config=lm_config,
        lm_state=lm_state,
        projector_state=projector_state,
        feature_mean=adapter["feature_mean"] if standardize else None,
        feature_std=adapter["feature_std"] if standardize else None,
        separator=separator,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir(checkpoint_dir, config),
        encoder=encoder,
        model=model,
    )


@dataclass
class VisionSpec:
    """What the open_clip vision tower computes, read from the module (Hugging Face `CLIPVisionConfig` terms).

    Attributes:
        hidden_act: `quick_gelu` (OpenAI's x * sigmoid(1.702 x)) or `gelu` (exact erf GELU).
        hidden_size: transformer width.
        intermediate_size: MLP width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: attention heads.
        patch_size: square patch side in pixels.
        image_size: square input side in pixels.
        layer_norm_eps: epsilon of every LayerNorm of the tower.
        feature_layer: the block whose output is read, counted from the end (-1: the last block); HF's
            `hidden_states[feature_layer]`.
        feature_block: the same block counted from 0.
        normalize: whether `ln_post` is applied to the features (`clip_normalize`).
        resize: shortest-edge resize target of the preprocessing, in pixels.
        crop: centre-crop side, in pixels.
        resample: PIL resampling filter of the resize (3: bicubic).
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation standard deviation (RGB).
    """

    hidden_act: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    feature_layer: int
    feature_block: int
    normalize: bool
    resize: int
    crop: int
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def vision_spec(encoder: CLIPPatchEncoder) -> VisionSpec:
    """Describe `encoder`'s tower and preprocessing; `ValueError` naming what a plain CLIP ViT cannot express."""
    import open_clip
    from torchvision import transforms as T

    visual = encoder.visual
    name = encoder.model_name
    if type(visual).__name__ != "VisionTransformer":
        raise ValueError(f"CLIP tower {name}: {type(visual).__name__} is not a ViT; only open_clip ViTs export")
    if getattr(visual, "attn_pool", None) is not None or isinstance(visual.ln_pre, nn.Identity):
        raise ValueError(f"CLIP tower {name}: attentional pooling or no ln_pre has no CLIP equivalent")
    if visual.patch_size[0] != visual.patch_size[1] or visual.image_size[0] != visual.image_size[1]:
        raise ValueError(f"CLIP tower {name}: non-square patches or images {visual.image_size} cannot export")
    if visual.conv1.bias is not None:
        raise ValueError(f"CLIP tower {name}: a patch embedding with a bias has no CLIP equivalent")
    blocks = list(visual.transformer.resblocks)
    acts, eps = set(), {visual.ln_pre.eps, visual.ln_post.eps}
    for block in blocks:
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise ValueError(f"CLIP tower {name}: layer scale has no CLIP equivalent")
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            raise ValueError(f"CLIP tower {name}: attention {type(block.attn).__name__} cannot export")
        eps |= {block.ln_1.eps, block.ln_2.eps}
        act = block.mlp.gelu
        if isinstance(act, open_clip.transformer.QuickGELU):
            acts.add("quick_gelu")
        elif isinstance(act, nn.GELU) and act.approximate == "none":
            acts.add("gelu")
        else:
            raise ValueError(f"CLIP tower {name}: activation {act!r} has no CLIP equivalent")
    if len(acts) != 1 or len(eps) != 1:
        raise ValueError(f"CLIP tower {name}: mixed activations {acts} or LayerNorm eps {eps} cannot export")

    resize = crop = resample = None
    mean = std = None
    for t in encoder.preprocess.transforms:
        if isinstance(t, T.Resize):
            if not isinstance(t.size, int) and not (len(t.size) == 1):
                raise ValueError(f"CLIP tower {name}: preprocessing resizes to {t.size}, not a shortest edge")
            if t.max_size is not None:
                raise ValueError(f"CLIP tower {name}: preprocessing resize with max_size cannot export")
            resize = t.size if isinstance(t.size, int) else t.size[0]
            resample = _pil_filter(t.interpolation)
        elif isinstance(t, T.CenterCrop):
            h, w = t.size
            if h != w:
                raise ValueError(f"CLIP tower {name}: a non-square centre crop {t.size} cannot export")
            crop = h
        elif isinstance(t, T.Normalize):
            mean, std = tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
        elif isinstance(t, T.ToTensor) or getattr(t, "__name__", "") == "_convert_to_rgb":
            continue
        elif type(t).__name__ == "MaybeConvertMode" and getattr(t, "mode", None) == "RGB":
            continue
        else:
            raise ValueError(f"CLIP tower {name}: preprocessing step {t!r} has no CLIPImageProcessor equivalent")
    if None in (resize, crop, mean):
        raise ValueError(f"CLIP tower {name}: preprocessing without resize, centre crop and normalize cannot export")
    n = len(blocks)
    return VisionSpec(
        hidden_act=acts.pop(),
        hidden_size=visual.transformer.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=n,
        num_attention_heads=blocks[0].attn.num_heads,
        patch_size=visual.patch_size[0],
        image_size=visual.image_size[0],
        layer_norm_eps=float(eps.pop()),
        feature_layer=encoder.layer - n,
        feature_block=encoder.layer,
        normalize=bool(encoder.normalize),
        resize=int(resize),
        crop=int(crop),
        resample=resample,
        mean=mean,
        std=std,
    )


def _pil_filter(mode) -> int:
    """PIL's filter number of a torchvision interpolation mode (what both libraries resize PIL images with)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    table = {
        InterpolationMode.NEAREST: Image.Resampling.NEAREST,
        InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
        InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
        InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    }
    if mode not in table:
        raise ValueError(f"resize interpolation {mode} has no PIL equivalent")
    return int(table[mode])
