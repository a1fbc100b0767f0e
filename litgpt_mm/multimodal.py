"""A language model that reads images: `[projected CLIP patches, separator]` per image, then the text embeddings.

    embeds = [P(f_1), s, P(f_2), s, ..., E(t_1), ..., E(t_n)]

with `f_i` the patch features (num_patches x width) of the i-th image of the prompt, `P` the projector, `s` the
image separator and `E` the LM's token embedding. Images always come first, as LLaVA places its `<image>` prefix.

The separator is either a learned vector (`separator="learned"`, the default: it trains with the projector, and no
vocabulary id is hard-coded) or the embedding of a named tokenizer token (e.g. `separator="\\n"`), looked up by the
tokenizer at build time so it stays correct for any vocabulary.

`MultimodalGPT` wraps any litgpt `GPT` (ours with MoE, litgpt's, or litgpt's LoRA `GPT`, whose `__init__` does not
call `GPT.__init__`) by composition and runs its blocks through `litgpt_mm.model.forward_embeds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from litgpt import model as lit_model

from litgpt_mm.model import embed_tokens, forward_embeds, lm_logits, xla_sync
from litgpt_mm.models.projector import build_projector
from litgpt_mm.training.checkpoint import atomic_torch_save, atomic_write

IGNORE_INDEX = -100
CONFIG_FILE = "multimodal_config.yaml"
WEIGHTS_FILE = "projector.pth"


@dataclass
class MultimodalConfig:
    """What, besides the LM checkpoint, defines the multimodal model (saved as `multimodal_config.yaml`).

    Attributes:
        clip_model: open_clip model name.
        clip_pretrained: open_clip pretrained tag (None: random initialisation).
        clip_layer: which vision block's output is read.
        clip_normalize: whether `ln_post` is applied to the patch features.
        clip_quick_gelu: whether the tower ran QuickGELU (as OpenAI's weights were trained). Checkpoints written
            before this field existed ran open_clip's default `nn.GELU` and load as such.
        vision_width: width of the patch features.
        num_patches: patches per image.
        projector: `linear`, `resblock` or `mlp2x_gelu`.
        separator: `learned` or a tokenizer token whose embedding follows each image.
        lm_checkpoint_dir: the litgpt checkpoint directory of the language model.
        feature_norm: `none`, or `standardize`: subtract the training features' per-channel mean and divide by their
            standard deviation before the projector (statistics saved with it). Features of a random or weak vision
            tower share most of their direction across images (cosine ~0.97 for a random ViT-B/32); standardising
            lets the projector see what differs from image to image from its first step.
    """

    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_layer: int = -1
    clip_normalize: bool = False
    clip_quick_gelu: bool = False
    vision_width: int = 768
    num_patches: int = 49
    projector: str = "resblock"
    separator: str = "learned"
    lm_checkpoint_dir: str = ""
    feature_norm: str = "none"

    def save(self, directory: Path) -> None:
        text = yaml.safe_dump(asdict(self), sort_keys=False)
        atomic_write(Path(directory) / CONFIG_FILE, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, directory: Path) -> MultimodalConfig:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {directory} does not exist: pass a directory written by recipes/align.py "
                "(final/) or recipes/qlora_instruct.py (final/ or merged/)"
            )
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a multimodal checkpoint (no {CONFIG_FILE}): pass a directory written by "
                "recipes/align.py (final/) or recipes/qlora_instruct.py (final/ or merged/)"
            )
        return cls(**yaml.safe_load(path.read_text()))


class MultimodalGPT(nn.Module):
    """An LM plus a projector (and learned separator) that place image prefixes before the text.

    Args:
        lm: any litgpt `GPT`.
        config: the multimodal config.
        separator_id: token id of `config.separator` when it is not `learned` (see `separator_token_id`).
    """

    def __init__(self, lm: lit_model.GPT, config: MultimodalConfig, separator_id: int | None = None) -> None:
        super().__init__()
        self.lm, self.config = lm, config
        n_embd = lm.config.n_embd
        self.projector = build_projector(config.projector, config.vision_width, n_embd)
        if config.separator == "learned":
            self.separator = nn.Parameter(torch.randn(n_embd) * 0.02)
        else:
            if separator_id is None:
                raise ValueError(f"separator {config.separator!r} is a token: pass its `separator_id`")
            self.separator = None
            self.register_buffer("separator_id", torch.tensor(separator_id), persistent=False)
        if config.feature_norm == "standardize":
            self.register_buffer("feature_mean", torch.zeros(config.vision_width))
            self.register_buffer("feature_std", torch.ones(config.vision_width))
        elif config.feature_norm != "none":
            raise ValueError(f"feature_norm {config.feature_norm!r}: choose 'none' or 'standardize'")

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of (..., vision_width) training features, for `standardize`."""
        flat = features.reshape(-1, features.size(-1)).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-6))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained multimodal weights (projector and learned separator), without the LM."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save_adapter(self, directory: Path) -> None:
        """Write `projector.pth` and `multimodal_config.yaml`, each atomically."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.adapter_state_dict(), Path(directory) / WEIGHTS_FILE)
        self.config.save(directory)

    def load_adapter(self, directory: Path) -> None:
        state = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        missing, unexpected = self.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith("lm.")] + list(unexpected)
        if wrong:
            raise KeyError(f"{directory / WEIGHTS_FILE} does not match this model: {wrong[:5]}")

    def separator_embedding(self) -> torch.Tensor:
        if self.separator is not None:
            return self.separator
        return embed_tokens(self.lm, self.separator_id.view(1))[0]

    def image_prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(n_images, num_patches, width) features -> (n_images, num_patches + 1, n_embd) prefixes."""
        dtype = self.lm.transformer.wte.weight.dtype
        if self.config.feature_norm == "standardize":
            features = (features.float() - self.feature_mean) / self.feature_std
        projected = self.projector(features.to(next(self.projector.parameters()).dtype))
        sep = self.separator_embedding().to(projected.dtype).expand(projected.size(0), 1, -1)
        return torch.cat([projected, sep], dim=1).to(dtype)

    def build_inputs(
        self,
        features: Sequence[torch.Tensor | None],
        input_ids: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings of a batch of prompts, right-padded to the longest.

        Args:
            features: per sample, (n_images, num_patches, width) features (n_images may be 0) or None.
            input_ids: per sample, 1-D token ids.
            labels: per sample, ids aligned with `input_ids` with `IGNORE_INDEX` where no loss is wanted
                (default: every text token counts).

        Returns:
            embeds (B, T, n_embd); labels (B, T) aligned with the input positions, `IGNORE_INDEX` on image
            positions and padding (use `shifted_cross_entropy`); lengths (B,).
        """
        device = self.lm.transformer.wte.weight.device
        n_images = [0 if f is None else f.size(0) for f in features]
        prefixes: list[torch.Tensor | None] = [None] * len(features)
        if sum(n_images):
            stacked = torch.cat([f.to(device) for f in features if f is not None and f.size(0)])
            flat = iter(self.image_prefix(stacked).split([n for n in n_images if n]))
            prefixes = [next(flat).flatten(0, 1) if n else None for n in n_images]
        rows, label_rows = [], []
        for i, ids in enumerate(input_ids):
            ids = ids.to(device)
            text = embed_tokens(self.lm, ids)
            lab = (ids if labels is None else labels[i].to(device)).long()
            if prefixes[i] is not None:
                text = torch.cat([prefixes[i].to(text.dtype), text])
                lab = torch.cat([lab.new_full((prefixes[i].size(0),), IGNORE_INDEX), lab])
            rows.append(text)
            label_rows.append(lab)
        lengths = torch.tensor([r.size(0) for r in rows], device=device)
        T = int(lengths.max())
        embeds = torch.stack([F.pad(r, (0, 0, 0, T - r.size(0))) for r in rows])
        out_labels = torch.stack([F.pad(lab, (0, T - lab.size(0)), value=IGNORE_INDEX) for lab in label_rows])
        return embeds, out_labels, lengths

    def forward(
        self,
        features: Sequence[torch.Tensor | None],
        input_ids: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor] | None = None,
        targets_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) and aligned labels (B, T) of a padded batch (no KV cache), for
        `shifted_cross_entropy`.

        With `targets_only`, only the positions that predict a labelled token go through the LM head: logits
        (N, vocab) and their target ids (N,), for `target_cross_entropy` (the same loss without the head's matmul
        and softmax on image, prompt and padding positions, and without their logits in memory).
        """
        embeds, out_labels, _ = self.build_inputs(features, input_ids, labels)
        checkpointed = getattr(self.lm, "activation_checkpointing", False) and self.training
        if not targets_only:
            return forward_embeds(self.lm, embeds, checkpointed=checkpointed), out_labels
        hidden = forward_embeds(self.lm, embeds, checkpointed=checkpointed, head=False)
        targets = out_labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return lm_logits(self.lm, hidden[:, :-1][keep]), targets[keep]


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target is not `IGNORE_INDEX`."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `MultimodalGPT(..., targets_only=True)`'s logits (N, vocab) against its targets (N,)."""
    return F.cross_entropy(logits.float(), targets)


def separator_token_id(tokenizer, token: str) -> int | None:
    """Id of a single-token separator in `tokenizer` (a clear error if the text is not exactly one token); `None` for
    the `learned` separator."""
    if token == "learned":
        return None
    ids = tokenizer.encode(token, bos=False, eos=False).tolist()
    if len(ids) != 1:
        raise ValueError(f"separator {token!r} is {len(ids)} tokens in this tokenizer; use 'learned' or one token")
    return ids[0]


@torch.no_grad()
def generate(
    model: MultimodalGPT,
    features: torch.Tensor | None,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Stream new token ids for one prompt with image features (n_images, num_patches, width) or None.

    With the KV cache the image prefix and prompt are fed once and each new token costs one position; with
    `use_cache=False` every step re-forwards the whole sequence (the reference the cache is tested against).
    """
    from litgpt.generate.base import sample

    lm = model.lm
    embeds, _, _ = model.build_inputs([features], [prompt_ids])
    T0 = embeds.size(1)
    total = T0 + max_new_tokens
    if total > lm.max_seq_length:
        raise ValueError(
            f"prompt ({T0} positions incl. images) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {lm.max_seq_length}: shorten the prompt or lower max_new_tokens"
        )
    device = embeds.device
    if use_cache:
        lm.set_kv_cache(batch_size=1, max_seq_length=total, device=device)
    try:
        pos = torch.arange(T0, device=device)
        logits = forward_embeds(lm, embeds, input_pos=pos if use_cache else None, input_pos_maxp1=T0)
        seq = embeds
        for i in range(max_new_tokens):
            token = sample(logits[:, -1:].float(), temperature=temperature, top_k=top_k, top_p=top_p)
            yield int(token)
            if (eos_id is not None and int(token) == eos_id) or i == max_new_tokens - 1:
                return
            emb = embed_tokens(lm, token.view(1, 1)).to(embeds.dtype)
            if use_cache:
                p = torch.tensor([T0 + i], device=device)
                logits = forward_embeds(lm, emb, input_pos=p, input_pos_maxp1=T0 + i + 1)
            else:
                seq = torch.cat([seq, emb], dim=1)
                logits = forward_embeds(lm, seq)
    finally:
        if use_cache:
            lm.clear_kv_cache()


@dataclass(frozen=True)
class Sampling:
    """How one row picks its next token: greedy when `temperature` is 0, else temperature, top-k and top-p sampling
    drawn from `generator` (a seeded `torch.Generator` makes a row reproducible whatever else shares its batch)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (shape (1,)) from one row's last-position logits (vocab,)."""
        from litgpt.generate.base import sample, sample_top_p

        if self.generator is None or self.temperature <= 0.0 or self.top_p <= 0.0:
            return sample(logits.view(1, 1, -1).float(), self.temperature, self.top_k, self.top_p).view(1)
        logits = logits.float()
        if self.top_k is not None:
            v, i = torch.topk(logits, min(self.top_k, logits.size(-1)))
            logits = torch.full_like(logits, float("-inf")).scatter_(-1, i, v)
        logits = logits / self.temperature
        if self.top_p < 1.0:
            logits = sample_top_p(logits, self.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).to(logits.device)


@torch.no_grad()
def generate_batch(
    model: MultimodalGPT,
    features: Sequence[torch.Tensor | None],
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_to: int | None = None,
    static: bool = False,
) -> list[list[int]]:
    """Decode a batch of prompts together with the KV cache; returns each row's new tokens (up to its EOS).

    Rows are left-padded to a common length (at least `pad_to`) and the pads are masked out of attention (a pad
    position attends only to itself), so with greedy decoding each row gets the same tokens as when decoded alone:
    rotary attention depends on relative positions only. `static=True` keeps every step's shapes fixed (attention
    over the whole cache, masked), so XLA compiles one prefill and one decode graph.
    """
    out: list[list[int]] = [[] for _ in prompts]
    n, sampling = len(prompts), Sampling(temperature, top_k, top_p)
    for step in stream_batch(model, features, prompts, [max_new_tokens] * n, [sampling] * n, eos_id, pad_to, static):
        for row, token in zip(out, step, strict=True):
            if token is not None:
                row.append(token)
    return out


@torch.no_grad()
def stream_batch(
    model: MultimodalGPT,
    features: Sequence[torch.Tensor | None],
    prompts: Sequence[torch.Tensor],
    max_new_tokens: Sequence[int],
    sampling: Sequence[Sampling],
    eos_id: int | None = None,
    pad_to: int | None = None,
    static: bool = False,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[list[int | None]]:
    """Decode a batch of prompts together, yielding each step's new token per row (None for a finished row).

    A row finishes at its EOS (which is yielded), after its own `max_new_tokens`, or when `cancelled(row)` says so
    (a client that went away); decoding ends when every row has finished. See `generate_batch` for the padding.
    """
    lm = model.lm
    rows = [model.build_inputs([f], [p])[0][0] for f, p in zip(features, prompts, strict=True)]
    lengths = [r.size(0) for r in rows]
    T0, B, steps = max(max(lengths), pad_to or 0), len(rows), max(max_new_tokens)
    total = T0 + steps
    if total > lm.max_seq_length:
        raise ValueError(
            f"the longest prompt ({T0} positions incl. images) + max_new_tokens ({steps}) exceeds the "
            f"model's context of {lm.max_seq_length}"
        )
    device = rows[0].device
    embeds = torch.stack([F.pad(r, (0, 0, T0 - r.size(0), 0)) for r in rows])
    mask = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device)).repeat(B, 1, 1, 1)
    for b, n in enumerate(lengths):
        mask[b, :, :, : T0 - n] = False
    mask |= torch.eye(total, dtype=torch.bool, device=device)
    lm.set_kv_cache(batch_size=B, max_seq_length=total, device=device)
    lm.mask_cache = mask
    done = [n <= 0 for n in max_new_tokens]
    try:
        logits = forward_embeds(lm, embeds, torch.arange(T0, device=device), None if static else T0)
        for i in range(steps):
            tokens = torch.cat([sampling[b](logits[b, -1]) for b in range(B)])
            xla_sync(device)  # the step and its KV-cache writes: every step then runs the same graph
            step: list[int | None] = []
            for b in range(B):
                done[b] = done[b] or (cancelled is not None and cancelled(b))
                step.append(None if done[b] else int(tokens[b]))
                done[b] = done[b] or step[b] == eos_id or i + 1 >= max_new_tokens[b]
            yield step
            if all(done):
                break
            emb = embed_tokens(lm, tokens.view(B, 1)).to(embeds.dtype)
            logits = forward_embeds(lm, emb, torch.tensor([T0 + i], device=device), None if static else T0 + i + 1)
    finally:
        lm.clear_kv_cache()
