"""Autoregressive training with scheduled teacher forcing, in O(n) steps per sample through a KV cache.

Over the answer tokens the model predicts one position at a time; the next input is the ground-truth token with
probability `p` and the model's own greedy prediction otherwise (Bengio et al., 2015). The image prefix, the
prompt and later questions are always ground truth. Each step feeds one position and attends to cached keys and
values, so a sample costs n single-position forwards instead of the original capstone's n full re-forwards (O(n^2)).
The cache keeps autograd history (keys and values are concatenated out of place), so the loss backpropagates
through the whole unrolled pass. With `p = 1` every input is the ground truth and the loss equals the one-pass
(standard) loss.

Schedules of `p` over training progress `t = step / total` in [0, 1]: `constant` (p_start), `linear`
(p_start -> p_end), `exponential` (p_end + (p_start - p_end) e^{-5t}), `cyclic` (triangle between p_start and p_end
with `cycles` periods, the original capstone's cyclic ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.model import KVCache, build_mask_cache

from litgpt_mm.model import embed_tokens, forward_embeds
from litgpt_mm.multimodal import IGNORE_INDEX, MultimodalGPT

SCHEDULES = ("constant", "linear", "exponential", "cyclic")


def teacher_forcing_p(
    schedule: str, step: int, total: int, p_start: float = 1.0, p_end: float = 0.5, cycles: int = 4
) -> float:
    """Probability of feeding the ground truth at training step `step` of `total`."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "constant":
        return p_start
    if schedule == "linear":
        return p_start + (p_end - p_start) * t
    if schedule == "exponential":
        return p_end + (p_start - p_end) * math.exp(-5 * t)
    if schedule == "cyclic":
        phase = (t * cycles) % 1.0
        return p_end + (p_start - p_end) * abs(1 - 2 * phase)
    raise ValueError(f"Unknown schedule {schedule!r}; choose from {SCHEDULES}")


class GradKVCache(KVCache):
    """KV cache that keeps autograd history: positions must come in order, keys/values are concatenated."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = 0 if self.k is None else self.k.size(2)
        if int(input_pos.reshape(-1)[0]) != start:
            raise ValueError(f"GradKVCache expects position {start} next, got {int(input_pos.reshape(-1)[0])}")
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset_parameters(self) -> None:
        self.k = self.v = None


def autoregressive_loss(
    model: MultimodalGPT,
    features: torch.Tensor | None,
    ids: torch.Tensor,
    labels: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of one sample, and how many there are.

    The coin flips (ground truth with probability `p`) are drawn up front; every run of ground-truth inputs is fed
    as one chunk through the cache and only an input the model must predict starts a new chunk, so a sample costs
    one forward per model-fed token plus one (a single forward, the standard pass, when `p = 1`).
    """
    lm = model.lm
    embeds, lab, _ = model.build_inputs([features], [ids], [labels])
    lab = lab[0]
    T = embeds.size(1)
    predict_at = (lab[1:] != IGNORE_INDEX).nonzero().flatten()  # positions whose output is scored
    if predict_at.numel() == 0:
        return embeds.sum() * 0.0, 0
    answer_inputs = predict_at[1:] + 1  # inputs that are answer tokens after the first prediction
    if p < 1.0 and answer_inputs.numel():
        draws = torch.rand(answer_inputs.numel(), generator=generator)
        model_fed = answer_inputs[(draws >= p).to(answer_inputs.device)].tolist()
    else:
        model_fed = []
    device = embeds.device
    lm.mask_cache = build_mask_cache(lm.max_seq_length, device)
    for block in lm.transformer.h:
        block.attn.kv_cache = GradKVCache()
    try:
        outputs, start = [], 0
        for pos in [*model_fed, T]:
            chunk = embeds[:, start:pos]
            if outputs:  # this chunk opens with the model's own prediction for position `start`
                guess = outputs[-1][:, -1].argmax(-1).view(1, 1).detach()
                chunk = torch.cat([embed_tokens(lm, guess).to(embeds.dtype), embeds[:, start + 1 : pos]], dim=1)
            outputs.append(forward_embeds(lm, chunk, torch.arange(start, pos, device=device), pos))
            start = pos
    finally:
        lm.clear_kv_cache()
    logits = torch.cat(outputs, dim=1)[0]  # (T, vocab): position j predicts j + 1
    loss = F.cross_entropy(logits[predict_at].float(), lab[predict_at + 1], reduction="sum")
    return loss, int(predict_at.numel())
