"""QLoRA on a built litgpt `GPT` (ours with MoE included): litgpt's LoRA layers on chosen projections, and the
frozen linear weights quantised to bitsandbytes nf4 module by module.

Lightning Fabric refuses `BitsandbytesPrecision` on CPU, so the quantisation is done here directly with
`bnb.nn.Linear4bit` (which runs on CPU and CUDA); the MoE's stacked expert weights are not `nn.Linear` and stay in
the compute dtype. `merged_state_dict` folds the adapters into plain weights (dequantised base + B A * scaling), the
exact function the adapted model computes, in litgpt's key layout.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt import lora as lit_lora

# On CPU, bitsandbytes' paged optimizers fall back to plain buffers (what we want there), and its nf4 matmul looks
# for the optional `kernels` package first; both say so on every run.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class LoRASettings:
    """litgpt's LoRA fields: rank, alpha, dropout and which projections get adapters."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False


def _wrap(old: nn.Linear, new: nn.Module) -> nn.Module:
    new.linear = old
    return new


def add_lora(model: nn.Module, s: LoRASettings) -> nn.Module:
    """Replace the chosen linear layers of every block (and optionally the head) by litgpt LoRA layers."""
    cfg = model.config
    lin = dict(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout)
    for block in model.transformer.h:
        attn = block.attn
        if s.query or s.key or s.value:
            qkv = attn.qkv
            new = lit_lora.LoRAQKVLinear(
                qkv.in_features,
                qkv.out_features,
                head_size=cfg.head_size,
                n_head=cfg.n_head,
                n_query_groups=cfg.n_query_groups,
                enable_lora=(s.query, s.key, s.value),
                **lin,
            )
            attn.qkv = _wrap(qkv, new)
        if s.projection:
            attn.proj = _wrap(attn.proj, lit_lora.LoRALinear(attn.proj.in_features, attn.proj.out_features, **lin))
        if s.mlp:
            for name, child in list(block.mlp.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(
                        block.mlp, name, _wrap(child, lit_lora.LoRALinear(child.in_features, child.out_features, **lin))
                    )
    if s.head:
        h = model.lm_head
        model.lm_head = _wrap(h, lit_lora.LoRALinear(h.in_features, h.out_features, **lin))
    device = model.transformer.wte.weight.device
    for m in model.modules():
        if isinstance(m, lit_lora.LoRALayer):
            m.to(device).train(model.training)
    lit_lora.mark_only_lora_as_trainable(model)
    return model


def quantize_nf4(
    model: nn.Module, compute_dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ("lm_head", "router")
) -> int:
    """Swap every frozen `nn.Linear` (LoRA bases included) for a bnb nf4 `Linear4bit`. Returns how many.

    Modules named in `skip` stay as they are: the head (as in QLoRA) and the MoE routers (fp32 by design).
    """
    import bitsandbytes as bnb

    device = model.transformer.wte.weight.device
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not any(part in skip for part in name.split("."))
    ]
    for name, mod in targets:
        q = bnb.nn.Linear4bit(
            mod.in_features,
            mod.out_features,
            bias=mod.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(mod.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data.clone(), requires_grad=False)
        # bnb repacks CPU weights for AVX512-BF16 inference on the first eval-mode forward and then cannot train
        # through them; the adapters train after every evaluation, so keep the trainable layout
        q.support_avx512bf16_for_cpu = False
        q = q.to(device)  # quantises
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return len(targets)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a LoRA checkpoint holds)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def _plain_weight(linear: nn.Module) -> torch.Tensor:
    w = linear.weight
    if w.__class__.__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float()


class _DequantizedLinear(nn.Module):
    """What a bnb `Linear4bit` computes, from a weight dequantised once (input cast to the compute dtype and back)."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        dtype = q.compute_dtype or torch.float32
        self.weight = _plain_weight(q).to(dtype)
        self.bias = None if q.bias is None else q.bias.data.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


@contextmanager
def dequantized(model: nn.Module) -> Iterator[int]:
    """Within the block every nf4 `Linear4bit` of `model` runs from a weight dequantised once, instead of once per
    call; yields how many were swapped. For gradient-free passes that call the model many times, such as the decoding
    pass of scheduled teacher forcing; it holds the LM's linear weights in the compute dtype meanwhile."""
    swapped = []
    try:
        for name, mod in list(model.named_modules()):
            if mod.__class__.__name__ == "Linear4bit":
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, _DequantizedLinear(mod))
                swapped.append((parent, child, mod))
        yield len(swapped)
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain fp32 weights in litgpt's layout with every adapter folded in (W = deq(W0) + B A * scaling)."""
    out: dict[str, torch.Tensor] = {}
    skip_prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, lit_lora.LoRALayer):
            weight = _plain_weight(mod.linear)
            if mod.r > 0 and not mod.merged:
                weight = weight + mod.get_lora_AB().float().to(weight.device)
            out[f"{name}.weight"] = weight
            if mod.linear.bias is not None:
                out[f"{name}.bias"] = mod.linear.bias.data.float()
            skip_prefixes.append(name + ".")
        elif mod.__class__.__name__ == "Linear4bit" and not any(name.startswith(p) for p in skip_prefixes):
            out[f"{name}.weight"] = _plain_weight(mod)
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.data.float()
            skip_prefixes.append(name + ".")
    for key, value in model.state_dict().items():
        if key not in out and "lora_" not in key and not any(key.startswith(p) for p in skip_prefixes):
            out[key] = value.float() if value.is_floating_point() else value
    return out
