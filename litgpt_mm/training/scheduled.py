"""Autoregressive training with scheduled teacher forcing (Bengio et al., 2015), exact and at about twice the cost
of one-pass training.

Over the answer tokens the model predicts one position at a time; the next input is the ground-truth token with
probability `p` and the model's own greedy prediction otherwise. The image prefix, the prompt and later questions
are always ground truth. The original capstone re-forwarded the whole sequence for every answer token (O(n^2)).

Here the coin flips are drawn up front and a sample is trained in two passes:

1. `scheduled_inputs` (no gradient): decode through the KV cache only as far as each model-fed position needs,
   and write the model's greedy prediction there. Runs of ground-truth inputs are fed as one chunk, so this is one
   forward over the sequence split into one chunk per model-fed position; with `lookahead = k` a chunk also runs
   past the next `k` model-fed positions, guessing that the model predicts the ground truth there, and is cut back
   only where it does not (speculative decoding), so an accurate model needs fewer chunks. nf4 weights are
   dequantised once for the whole pass (`litgpt_mm.models.qlora.dequantized`), not once per chunk.
2. One ordinary teacher-forced forward and backward over these mixed inputs against the ground-truth labels.

Pass 2 gives exactly the loss and gradients of the token-by-token unrolled pass: a greedy choice is discrete (no
gradient flows through it), so once the inputs are fixed every position's logits depend only on its prefix of
mixed inputs, which is what a causal forward computes. With `p = 1` pass 1 does nothing and the loss is the
standard loss. Pass 1 runs in eval mode: the model-fed tokens are the model's own dropout-free greedy predictions
(an unrolled pass with dropout would draw each from the dropout mask of the forward that also scores it; with
dropout 0 the two are identical).

Schedules of `p` over training progress `t = step / total` in [0, 1]: `constant` (p_start), `linear`
(p_start -> p_end), `exponential` (p_end + (p_start - p_end) e^{-5t}), `cyclic` (triangle between p_start and p_end
with `cycles` periods, the original capstone's cyclic ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from litgpt_mm.model import embed_tokens, forward_embeds, lm_logits
from litgpt_mm.models.qlora import dequantized
from litgpt_mm.multimodal import IGNORE_INDEX, MultimodalGPT, target_cross_entropy

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


@dataclass
class ScheduledBatch:
    """Inputs of a batch after scheduled teacher forcing.

    Attributes:
        input_ids: per sample, the ids with the model's predictions at model-fed positions.
        candidates: answer inputs that could be model-fed (those read by a later scored position).
        model_fed: how many of them the coin flips gave to the model.
        changed: how many model-fed inputs differ from the ground truth.
        chunks: cached forwards of the decoding pass (0 when nothing is model-fed).
    """

    input_ids: list[torch.Tensor]
    candidates: int
    model_fed: int
    changed: int
    chunks: int


@torch.no_grad()
def scheduled_inputs(
    model: MultimodalGPT,
    features: Sequence[torch.Tensor | None],
    input_ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    p: float,
    generator: torch.Generator | None = None,
    lookahead: int = 0,
    dequantize: bool = True,
) -> ScheduledBatch:
    """Pass 1: the inputs the token-by-token pass with teacher-forcing probability `p` would read.

    Args:
        model: the multimodal model (in eval mode for this pass, then back to its mode).
        features: per sample, image features or None (as `MultimodalGPT.build_inputs`).
        input_ids: per sample, 1-D ground-truth ids.
        labels: per sample, ids with `IGNORE_INDEX` outside the answers.
        p: probability that an answer input is the ground truth.
        generator: source of the coin flips, drawn per sample in order (CPU).
        lookahead: model-fed positions a chunk speculates past (0: stop at the next one).
        dequantize: hold the nf4 weights dequantised in the compute dtype during the pass (faster; for Phi-2 in
            bf16 about 5 GB more memory while it lasts).
    """
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    lm = model.lm
    fed, candidates = draw_model_fed(features, labels, p, generator)
    ids = [x.clone() for x in input_ids]
    if not any(fed):
        return ScheduledBatch(ids, candidates, 0, 0, 0)

    embeds, lab, lengths = model.build_inputs(features, input_ids, labels)
    device = embeds.device
    ids = [x.to(device) for x in ids]
    offsets = [int(n) - x.numel() for n, x in zip(lengths, ids, strict=True)]  # image prefix before the text
    fed = [[t + off for t in row] for row, off in zip(fed, offsets, strict=True)]  # positions in `embeds`
    n_fed = sum(len(f) for f in fed)
    gold = [x.tolist() for x in input_ids]

    B, T = lab.shape
    was_training = model.training
    model.eval()
    lm.set_kv_cache(batch_size=B, max_seq_length=T, device=device)
    try:
        with dequantized(lm) if dequantize else nullcontext():  # one dequantisation for all chunks
            changed, chunks = decode_model_fed(lm, embeds, ids, gold, fed, offsets, lookahead)
    finally:
        lm.clear_kv_cache()
        model.train(was_training)
    return ScheduledBatch(ids, candidates, n_fed, changed, chunks)


def draw_model_fed(
    features: Sequence[torch.Tensor | None],
    labels: Sequence[torch.Tensor],
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], int]:
    """The coin flips, drawn per sample in order (none when `p >= 1`): per sample, the text positions whose input the
    model predicts; and the number of candidate positions."""
    fed: list[list[int]] = []
    candidates = 0
    for f, row_labels in zip(features, labels, strict=True):
        targets = (row_labels != IGNORE_INDEX).nonzero().flatten()
        if f is None or f.size(0) == 0:
            targets = targets[targets > 0]  # without an image prefix nothing predicts the first token
        cand = targets[:-1]  # every answer input but the last is read by a later scored position
        candidates += cand.numel()
        if p >= 1.0:
            fed.append([])
            continue
        fed.append(cand[(torch.rand(cand.numel(), generator=generator) >= p).to(cand.device)].tolist())
    return fed, candidates


def decode_model_fed(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    ids: list[torch.Tensor],
    gold: list[list[int]],
    fed: list[list[int]],
    offsets: list[int],
    lookahead: int,
) -> tuple[int, int]:
    """Write the model's greedy predictions at the model-fed positions `fed` (in `embeds`) into `ids` and `embeds`,
    in place, decoding through the KV cache chunk by chunk. Returns the changed inputs and the chunks run."""
    B = embeds.size(0)
    device = embeds.device
    nxt = [0] * B  # index of each sample's first unresolved model-fed position
    start = [0] * B  # where each sample's cache stops being final
    changed = chunks = 0
    vocab = lm.config.vocab_size  # never feed a padding id
    while True:
        waiting = [b for b in range(B) if nxt[b] < len(fed[b])]
        if not waiting:
            return changed, chunks
        # each row runs its own span [start, end); rows share one width, so a shorter span starts earlier
        # (recomputing final positions) and finished rows recompute their first positions
        end = [fed[b][min(nxt[b] + lookahead, len(fed[b]) - 1)] if b in waiting else 1 for b in range(B)]
        width = max(end[b] - start[b] for b in waiting)
        first = [max(end[b] - width, 0) for b in range(B)]
        pos = torch.tensor(first, device=device)[:, None] + torch.arange(width, device=device)
        chunk = embeds[torch.arange(B, device=device)[:, None], pos]
        hidden = forward_embeds(lm, chunk, pos, int(pos[:, -1].max()) + 1, head=False)
        chunks += 1
        wanted = [(b, q) for b in waiting for q in fed[b][nxt[b] :] if q <= end[b]]  # logits at q - 1 predict q
        rows = torch.tensor([b for b, _ in wanted], device=device)
        cols = torch.tensor([q - 1 - first[b] for b, q in wanted], device=device)
        best = lm_logits(lm, hidden[rows, cols])[:, :vocab].argmax(-1)
        guesses = dict(zip(wanted, best.tolist(), strict=True))
        for b in waiting:
            start[b] = end[b]
            while nxt[b] < len(fed[b]) and fed[b][nxt[b]] <= end[b]:
                q = fed[b][nxt[b]]
                nxt[b] += 1
                i = q - offsets[b]
                if guesses[b, q] != gold[b][i]:
                    ids[b][i] = guesses[b, q]
                    embeds[b, q] = embed_tokens(lm, ids[b][i : i + 1]).to(embeds.dtype)[0]
                    changed += 1
                    start[b] = q  # later positions read this input: recompute from here
                    break


def autoregressive_loss(
    model: MultimodalGPT,
    features: Sequence[torch.Tensor | None],
    input_ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    p: float,
    generator: torch.Generator | None = None,
    lookahead: int = 0,
    forward: torch.nn.Module | None = None,
    dequantize: bool = True,
) -> tuple[torch.Tensor, ScheduledBatch]:
    """Mean next-token loss over the answers of a batch with scheduled teacher forcing (both passes).

    `forward` is the module that runs pass 2 (e.g. Fabric's wrapper of `model`; default `model`).
    """
    batch = scheduled_inputs(model, features, input_ids, labels, p, generator, lookahead, dequantize)
    logits, targets = (forward or model)(features, batch.input_ids, labels, targets_only=True)
    return target_cross_entropy(logits, targets), batch
