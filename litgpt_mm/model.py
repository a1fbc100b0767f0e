"""litgpt's GPT with a mixture-of-experts sub-layer after each block's MLP (see `models.moe` for the equation).

With `n_expert=0` the model is litgpt's GPT: same modules, same state-dict keys, same logits. `forward` also
accepts precomputed input embeddings (used by the multimodal model) and the MoE losses are collected after a
forward with `moe_losses()`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from litgpt import model as lit_model
from litgpt.model import batched_index_select, do_softcapping
from torch.utils.checkpoint import checkpoint

from litgpt_mm.config import Config
from litgpt_mm.models.moe import MoE, MoEStats


class Block(lit_model.Block):
    """litgpt block (parallel attention + MLP for Phi-2) followed by a pre-norm residual MoE sub-layer."""

    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__(config, block_idx)
        self.moe: MoE | None = None
        if block_idx in config.moe_layer_indices:
            self.norm_moe = config.norm_class(config.n_embd, eps=config.norm_eps)
            self.moe = MoE(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
    ) -> torch.Tensor:
        x = super().forward(x, cos, sin, mask, input_pos, input_pos_maxp1)
        if self.moe is not None:
            x = x + self.moe(self.norm_moe(x))
        return x


class GPT(lit_model.GPT):
    """litgpt `GPT` whose blocks carry a MoE after the MLP, with an embeddings input."""

    def __init__(self, config: Config) -> None:
        # Mirrors litgpt 0.5.13 `litgpt.model.GPT.__init__` (which hard-codes its own Block) with our Block; parity:
        # tests/test_model.py compares state-dict keys and logits with litgpt's GPT.
        nn.Module.__init__(self)
        assert config.padded_vocab_size is not None
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, block_idx) for block_idx in range(config.n_layer)),
                ln_f=config.norm_class(config.n_embd, eps=config.norm_eps),
            )
        )
        self.mask_cache: torch.Tensor | None = None
        self.max_seq_length = self.config.block_size
        self.activation_checkpointing = False

    @classmethod
    def from_name(cls, name: str, **kwargs) -> GPT:
        return cls(Config.from_name(name, **kwargs))

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoE):
            module.reset_parameters()

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `idx`, scaled as the config asks."""
        return embed_tokens(self, idx)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
        lm_head_chunk_size: int = 0,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """litgpt's forward, where `input_embeds` (B, T, n_embd) may replace the token ids `idx`."""
        if (idx is None) == (input_embeds is None):
            raise ValueError("Pass exactly one of `idx` and `input_embeds`.")
        x = self.embed(idx) if input_embeds is None else input_embeds
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        return forward_embeds(self, x, input_pos, input_pos_maxp1, lm_head_chunk_size, checkpointed)

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.moe for block in self.transformer.h if block.moe is not None]

    def moe_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean balance loss and mean z-loss over the MoE layers of the last training forward (zeros if none)."""
        aux = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        z = [m.z_loss for m in self.moe_layers if m.z_loss is not None]
        if not aux:
            zero = self.lm_head.weight.new_zeros((), dtype=torch.float32)
            return zero, zero
        return torch.stack(aux).mean(), torch.stack(z).mean()

    def moe_aux_objective(self) -> torch.Tensor:
        """`aux_coef * balance + z_coef * z` to add to the LM loss."""
        aux, z = self.moe_losses()
        return self.config.moe_aux_loss_coef * aux + self.config.moe_z_loss_coef * z

    def moe_stats(self) -> list[MoEStats]:
        """Routing statistics of the last forward, one entry per MoE layer (device tensors)."""
        return [m.stats for m in self.moe_layers if m.stats is not None]


def forward_embeds(
    model: lit_model.GPT,
    x: torch.Tensor,
    input_pos: torch.Tensor | None = None,
    input_pos_maxp1: int | None = None,
    lm_head_chunk_size: int = 0,
    checkpointed: bool = False,
    head: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    """litgpt `GPT.forward` from input embeddings `x` (B, T, n_embd) instead of token ids.

    Mirrors litgpt 0.5.13 `litgpt.model.GPT.forward` after its embedding lookup (parity tested against it).

    Works on any litgpt `GPT` instance (ours, litgpt's, litgpt's LoRA `GPT`): it uses only the attributes litgpt's
    forward uses (rope and mask caches, blocks, `ln_f`, `lm_head`). `head=False` returns the final hidden states
    (after `ln_f`), for callers that need logits at a few positions only (`lm_logits`).
    """
    T = x.size(1)
    if model.max_seq_length < T:
        raise ValueError(f"Cannot forward sequence of length {T}, max seq length is only {model.max_seq_length}.")
    if input_pos is not None:  # use the kv cache
        if input_pos.dim() > 2:
            raise ValueError(f"input_pos must have 1 or 2 dimensions, input_pos.shape = {input_pos.shape}")
        if input_pos.shape[-1] != T:
            raise ValueError(f"input_pos.shape[-1] = {input_pos.shape[-1]} != {T} = sequence length")
        if model.mask_cache is None:
            raise TypeError("You need to call `gpt.set_kv_cache()`")
        cos = batched_index_select(model.cos, 0, input_pos)
        sin = batched_index_select(model.sin, 0, input_pos)
        if input_pos.dim() == 1:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        mask = batched_index_select(model.mask_cache, 2, input_pos)
        if mask.dim() > 4:
            mask = mask.view(*(mask.shape[0:1] + mask.shape[2:]))
        if input_pos_maxp1 is not None:
            if input_pos_maxp1 > model.max_seq_length:
                raise ValueError(f"Positions in 'input_pos' must be in [0,{model.max_seq_length})")
            mask = mask[..., :input_pos_maxp1]
    else:
        cos, sin = model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0)
        mask, input_pos_maxp1 = None, None

    for block_idx, block in enumerate(model.transformer.h):
        c, s = cos, sin
        if model.config.rope_indices is not None:
            r = model.config.rope_indices[block_idx]
            c, s = cos[..., r], sin[..., r]
        if checkpointed:
            x = checkpoint(block, x, c, s, mask, input_pos, input_pos_maxp1, use_reentrant=False)
        else:
            x = block(x, c, s, mask, input_pos, input_pos_maxp1)
    x = model.transformer.ln_f(x)
    return lm_logits(model, x, lm_head_chunk_size) if head else x


def lm_logits(model: lit_model.GPT, x: torch.Tensor, lm_head_chunk_size: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """Logits of final hidden states `x` (after `ln_f`), soft-capped as the config asks.

    Mirrors the head of litgpt 0.5.13 `litgpt.model.GPT.forward` (parity tested through `forward_embeds`).
    """
    clamp_head = (
        partial(do_softcapping, thresh=model.config.final_logit_softcapping)
        if model.config.final_logit_softcapping is not None
        else nn.Identity()
    )
    if lm_head_chunk_size > 0:
        return [clamp_head(model.lm_head(x_i)) for x_i in x.split(lm_head_chunk_size, dim=1)]
    return clamp_head(model.lm_head(x))


def embed_tokens(model: lit_model.GPT, idx: torch.Tensor) -> torch.Tensor:
    """Token embeddings of `idx` for any litgpt `GPT`, scaled as its config asks.

    Mirrors the embedding step of litgpt 0.5.13 `litgpt.model.GPT.forward` (parity tested through `GPT.forward`).
    """
    x = model.transformer.wte(idx)
    if model.config.scale_embeddings:
        x = x * torch.tensor(model.config.n_embd**0.5, dtype=x.dtype)
    return x


def xla_sync(device: torch.device) -> None:
    """On an XLA device, compile and run the operations recorded so far (a no-op elsewhere)."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def save_checkpoint(model: GPT, checkpoint_dir: Path) -> None:
    """Write `lit_model.pth` and `model_config.yaml` (litgpt's layout), each atomically."""
    from litgpt_mm.training.checkpoint import atomic_torch_save, save_config

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_config(model.config, checkpoint_dir)
    atomic_torch_save(model.state_dict(), checkpoint_dir / "lit_model.pth")


def load_model(
    checkpoint_dir: Path, device: torch.device | str = "cpu", state: dict | None = None, **config_overrides
) -> GPT:
    """Build a `GPT` from a litgpt-layout checkpoint directory and load its weights (or the given `state`)."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "lit_model.pth"
    if state is None and not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: expected a litgpt checkpoint directory (lit_model.pth).")
    config = Config.from_checkpoint(checkpoint_dir, **config_overrides)
    with torch.device("meta"):
        model = GPT(config)
    load_on = "cpu" if torch.device(device).type == "xla" else device  # torch.load cannot map onto XLA
    if state is None:
        state = torch.load(path, map_location=load_on, mmap=True, weights_only=True)
    state = state.get("model", state)
    model.load_state_dict(state, assign=True)
    # the rope cache is not in the state dict: rebuild it off the meta device
    cos, sin = model.rope_cache(device=torch.device(load_on))
    model.cos, model.sin = cos, sin
    return model if load_on == device else model.to(device)
