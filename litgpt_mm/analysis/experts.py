"""What the experts learn: how a trained MoE model routes named texts (books, languages), and how its router evolved.

    python -m litgpt_mm.analysis.experts --checkpoint_dir out/pretrain/run/final --out_dir reports/experts

`route_texts` runs the model over each text in windows and records, per MoE layer, the top-k experts of every token
(captured by forward hooks on the MoE modules, checked against the counts the model's own router recorded).
From that table: the share of each source's routing slots per expert and its lift over the expert's overall share
(`expert_by_source`, `language_split`), the tokens most over-represented in each expert (`top_tokens`), and the
balance loss / load CV / router entropy on the texts (`routing_balance`). `plot_expert_heatmaps` and
`plot_router_over_training` draw them; `summary_markdown` writes the report section; `analyse` ties it together.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CV_TARGET = 0.15
BALANCE_TARGET = 1.05


@dataclass
class RoutingTable:
    """Routing of every analysed token: `experts[l, i]` are the top-k experts (in router order) of token i in MoE
    layer l; `source[i]` indexes `sources`. `prob_sum` (L, S, E) and `entropy_sum` (L, S) sum the router's
    probabilities and entropies (nats) over each source's tokens."""

    sources: list[str]
    source: np.ndarray  # (N,) int
    token_ids: np.ndarray  # (N,) int
    experts: np.ndarray  # (L, N, k) int
    prob_sum: np.ndarray  # (L, S, E)
    entropy_sum: np.ndarray  # (L, S)
    blocks: list[int]  # transformer block index of each MoE layer

    @property
    def n_expert(self) -> int:
        return self.prob_sum.shape[-1]

    @property
    def k(self) -> int:
        return self.experts.shape[-1]

    def counts(self, layer: int) -> np.ndarray:
        """Routing slots per expert and source in `layer`, shape (E, S)."""
        S = len(self.sources)
        flat = self.experts[layer].reshape(-1) * S + np.repeat(self.source, self.k)
        return np.bincount(flat, minlength=self.n_expert * S).reshape(self.n_expert, S)


@dataclass
class SourceShares:
    """Per layer, the share of each source's routing slots going to each expert (columns sum to 1), the expert's
    share of all slots, and the lift `share / overall` (1 = no preference)."""

    sources: list[str]
    share: np.ndarray  # (L, E, S)
    overall: np.ndarray  # (L, E)
    lift: np.ndarray  # (L, E, S)


@dataclass
class TopToken:
    """A token over-represented in an expert: `ratio = P(token | expert) / P(token)`; `count` slots in the expert."""

    token_id: int
    text: str
    count: int
    ratio: float


# ---------------------------------------------------------------------------------------------------------- routing


class _RoutingCapture:
    """Forward hooks on the MoE modules that record each forward's top-k experts and router probabilities."""

    def __init__(self, moes: Sequence[torch.nn.Module]) -> None:
        self.moes = list(moes)
        self.experts: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.moes]

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, args[0].size(-1))
        # the router's own computation (`MoE.route`): fp32 logits, softmax, top-k
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = F.linear(x.float(), module.router.weight.float()).softmax(dim=-1)
        top = probs.topk(module.config.n_expert_per_token, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=probs.size(-1)).float()
        if module.stats is not None and not torch.equal(counts, module.stats.tokens_per_expert.float()):
            raise RuntimeError("the captured routing differs from the counts the MoE layer recorded")
        self.experts.append(top.cpu())
        self.probs.append(probs.cpu())

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (L, N, k), probs (L, N, E)) of the last forward, one entry per MoE layer, then reset."""
        if len(self.experts) != len(self.moes):
            raise RuntimeError(f"expected one routing per MoE layer ({len(self.moes)}), got {len(self.experts)}")
        out = torch.stack(self.experts), torch.stack(self.probs)
        self.experts, self.probs = [], []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def text_windows(tokenizer, text: str, seq_len: int, max_tokens: int, chars_per_token: int = 8) -> list[torch.Tensor]:
    """Token windows of at most `seq_len` tokens, `max_tokens` in all, spread evenly over `text` (only the needed
    stretches are tokenized); a text too short to spread is tokenized whole and cut into consecutive windows."""
    window = min(seq_len, max_tokens)
    lengths = [window] * (max_tokens // window) + ([max_tokens % window] if max_tokens % window else [])
    span = window * chars_per_token
    if len(text) <= span * len(lengths):
        ids = tokenizer.encode(text, bos=False, eos=False).long()[:max_tokens]
        return [w for w in ids.split(window) if w.numel()]
    windows = []
    for i, n in enumerate(lengths):
        start = round(i * (len(text) - span) / max(1, len(lengths) - 1))
        space = re.search(r"\s", text[start : start + 200])  # begin on a word boundary
        start += space.end() if space and start else 0
        ids = tokenizer.encode(text[start : start + span], bos=False, eos=False).long()[:n]
        if ids.numel():
            windows.append(ids)
    return windows


@torch.no_grad()
def route_texts(
    model, tokenizer, texts: dict[str, str], seq_len: int = 128, max_tokens_per_text: int = 4096, batch_size: int = 8
) -> RoutingTable:
    """Run `model` (in eval mode, no grad) over each named text in windows of `seq_len` tokens (at most
    `max_tokens_per_text` per text, see `text_windows`) and record the top-k experts of every token in every MoE
    layer, with the token ids.

    Args:
        model: a `litgpt_mm.model.GPT` with MoE layers.
        tokenizer: litgpt `Tokenizer` of the checkpoint.
        texts: source name -> text (e.g. one cleaned book per entry).
        seq_len: tokens per window (at most the model's `max_seq_length`).
        max_tokens_per_text: bound on the tokens analysed per text.
        batch_size: windows per forward pass.
    """
    from litgpt_mm.model import forward_embeds

    moes = list(model.moe_layers)
    if not moes:
        raise ValueError("the model has no MoE layers: nothing to analyse")
    if seq_len > model.max_seq_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_length {model.max_seq_length}")
    blocks = [i for i, block in enumerate(model.transformer.h) if block.moe is not None]
    E = moes[0].config.n_expert
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    capture = _RoutingCapture(moes)
    sources, token_ids, experts = [], [], []
    prob_sum, entropy_sum = np.zeros((len(moes), len(texts), E)), np.zeros((len(moes), len(texts)))
    try:
        for s, text in enumerate(texts.values()):
            windows = text_windows(tokenizer, text, seq_len, max_tokens_per_text)
            for batch in _batches(windows, batch_size):
                idx = torch.stack(batch).to(device)
                forward_embeds(model, model.embed(idx), head=False)  # the routing is all we need: skip the LM head
                top, probs = capture.take()
                experts.append(top.numpy())
                token_ids.append(torch.cat(batch).numpy())
                sources.append(np.full(top.size(1), s))
                prob_sum[:, s] += probs.sum(1).double().numpy()
                entropy_sum[:, s] += (-(probs * probs.clamp_min(1e-20).log()).sum(-1)).sum(1).double().numpy()
    finally:
        capture.remove()
        model.train(was_training)
    if not token_ids:
        raise ValueError("no tokens to analyse: the texts are empty")
    return RoutingTable(
        list(texts),
        np.concatenate(sources),
        np.concatenate(token_ids),
        np.concatenate(experts, axis=1),
        prob_sum,
        entropy_sum,
        blocks,
    )


def _batches(windows: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    """Consecutive windows of equal length, `batch_size` at most per batch."""
    out: list[list[torch.Tensor]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].numel() == w.numel():
            out[-1].append(w)
        else:
            out.append([w])
    return out


# --------------------------------------------------------------------------------------------------------- analysis


def expert_by_source(table: RoutingTable) -> SourceShares:
    """Share of each source's routing slots per expert (E × S per layer, columns sum to 1) and its lift over the
    expert's overall share of all slots."""
    counts = np.stack([table.counts(layer) for layer in range(len(table.blocks))]).astype(float)  # (L, E, S)
    share = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    overall = counts.sum(2) / np.clip(counts.sum((1, 2))[:, None], 1, None)
    lift = share / np.clip(overall[:, :, None], 1e-12, None)
    return SourceShares(list(table.sources), share, overall, lift)


def group_sources(table: RoutingTable, groups: dict[str, str], default: str = "unknown") -> RoutingTable:
    """The same routing with sources merged by label (`groups[source]`, `default` when missing), labels in order of
    first appearance."""
    labels = [groups.get(name, default) for name in table.sources]
    names = list(dict.fromkeys(labels))
    index = np.array([names.index(label) for label in labels])
    prob_sum = np.zeros((len(table.blocks), len(names), table.n_expert))
    entropy_sum = np.zeros((len(table.blocks), len(names)))
    np.add.at(prob_sum, (slice(None), index), table.prob_sum)
    np.add.at(entropy_sum, (slice(None), index), table.entropy_sum)
    return RoutingTable(
        names, index[table.source], table.token_ids, table.experts, prob_sum, entropy_sum, list(table.blocks)
    )


def language_split(table: RoutingTable, languages: dict[str, str]) -> SourceShares:
    """`expert_by_source` with the sources merged by language (`languages`: source name -> language label)."""
    return expert_by_source(group_sources(table, languages))


def top_tokens(table: RoutingTable, tokenizer, k: int = 10, min_count: int = 5) -> list[list[list[TopToken]]]:
    """Per layer, per expert: the `k` tokens most over-represented in the expert, by `P(token | expert) / P(token)`
    (over the expert's routing slots and over all tokens), among tokens with at least `min_count` slots in the
    expert; ties broken by count. `tokenizer.decode` gives their text (None: the id)."""
    ids, inverse = np.unique(table.token_ids, return_inverse=True)
    p_token = np.bincount(inverse, minlength=len(ids)) / len(inverse)
    result = []
    for layer in range(len(table.blocks)):
        flat = table.experts[layer].reshape(-1) * len(ids) + np.repeat(inverse, table.k)
        counts = np.bincount(flat, minlength=table.n_expert * len(ids)).reshape(table.n_expert, len(ids))
        per_expert = []
        for e in range(table.n_expert):
            ratio = counts[e] / max(counts[e].sum(), 1) / p_token
            keep = np.flatnonzero(counts[e] >= min_count)
            order = keep[np.lexsort((-counts[e][keep], -ratio[keep]))][:k]
            per_expert.append(
                [TopToken(int(ids[t]), _decode(tokenizer, ids[t]), int(counts[e, t]), float(ratio[t])) for t in order]
            )
        result.append(per_expert)
    return result


def _decode(tokenizer, token_id: int) -> str:
    return str(token_id) if tokenizer is None else tokenizer.decode(torch.tensor([int(token_id)]))


def routing_balance(table: RoutingTable) -> list[dict[str, float]]:
    """Per MoE layer on the analysed tokens: the Switch balance loss (`E Σ f_e P_e`, 1 = balanced), the load CV,
    the mean router entropy (nats), `noise_cv`, the CV a perfectly balanced random router would show on this
    many tokens (`sqrt((E - k) / (N k))`), `cv_per_text`, the load CV within each source, averaged, and `prob_cv`,
    the CV of the experts' mean router probabilities P_e."""
    n, E, k = len(table.token_ids), table.n_expert, table.k
    rows = []
    for layer, block in enumerate(table.blocks):
        by_source = table.counts(layer).astype(float)
        per_text = by_source.std(0) / np.clip(by_source.mean(0), 1e-9, None)
        counts = by_source.sum(1)
        f, p = counts / (n * k), table.prob_sum[layer].sum(0) / n
        rows.append({
            "layer": layer, "block": block, "tokens": n, "balance_loss": float(E * np.sum(f * p)),
            "cv": float(counts.std() / max(counts.mean(), 1e-9)), "entropy": float(table.entropy_sum[layer].sum() / n),
            "max_entropy": math.log(E), "noise_cv": math.sqrt((E - k) / (n * k)),
            "cv_per_text": float(per_text[by_source.sum(0) > 0].mean()), "prob_cv": float(p.std() / p.mean()),
        })  # fmt: skip
    return rows


def training_balance(expert_rows: list[dict], train_rows: list[dict] | None = None, last: int = 10) -> list[dict]:
    """Per MoE layer, the logged CV and router entropy at the last step and averaged over the `last` logged steps
    (`expert_load.csv`), with the mean balance loss over layers (`aux_loss` of `train_log.csv`) alike."""
    steps = sorted({r["step"] for r in expert_rows})[-last:]
    aux = [r["aux_loss"] for r in (train_rows or []) if "aux_loss" in r][-last:]
    out = []
    for layer in sorted({int(r["layer"]) for r in expert_rows}):
        rows = sorted((r for r in expert_rows if r["layer"] == layer and r["step"] in steps), key=lambda r: r["step"])
        out.append(
            {
                "layer": layer,
                "step": int(rows[-1]["step"]),
                "steps_averaged": len(rows),
                "cv": rows[-1]["cv"],
                "cv_mean": float(np.mean([r["cv"] for r in rows])),
                "entropy": rows[-1]["entropy"],
                "balance_loss": aux[-1] if aux else None,
                "balance_loss_mean": float(np.mean(aux)) if aux else None,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------------ plots


def plot_expert_heatmaps(
    shares: SourceShares,
    path: Path,
    languages: dict[str, str] | None = None,
    layer_labels: list[str] | None = None,
    max_panels: int = 8,
) -> Path:
    """One panel per MoE layer, experts × sources: the number in a cell is the % of the source's routing slots sent to
    the expert (columns sum to 100), the colour its lift over the expert's overall share (shown beside its name).
    Sources are grouped by language (majority first), groups split by a black line and labelled on top; sources
    outside the majority language have coloured names. With more than `max_panels` layers, evenly spaced layers
    (first and last included) are drawn."""
    layers = np.unique(np.linspace(0, shares.share.shape[0] - 1, min(max_panels, shares.share.shape[0])).round())
    layers = layers.astype(int).tolist()
    labels = [layer_labels[i] if layer_labels else f"layer {i}" for i in layers]
    shares = SourceShares(shares.sources, shares.share[layers], shares.overall[layers], shares.lift[layers])
    L, E, S = shares.share.shape
    order, groups = _language_order(shares.sources, languages)
    majority = groups[0][0] if len(groups) > 1 else None
    other = [majority is not None and languages.get(shares.sources[i], "unknown") != majority for i in order]
    names = [
        shares.sources[i] + (f" [{languages.get(shares.sources[i], 'unknown')}]" if o else "")
        for i, o in zip(order, other, strict=True)
    ]
    cols = 1 if L <= 2 else 2
    rows = math.ceil(L / cols)
    size = (cols * (2.2 + 0.6 * S) + 1.2, rows * (1.0 + 0.42 * E) + 1.9)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    log_lift = np.log2(np.clip(shares.lift[:, :, order], 1 / 64, 64))
    vmax = max(float(np.abs(log_lift).max()), math.log2(1.5))
    for layer, ax in enumerate(axes.flat[:L]):
        im = ax.imshow(log_lift[layer], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for e in range(E):
            for j, s in enumerate(order):
                dark = abs(log_lift[layer, e, j]) > 0.6 * vmax
                ax.text(
                    j,
                    e,
                    f"{100 * shares.share[layer, e, s]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        ax.set_yticks(range(E), [f"e{e} ({100 * shares.overall[layer, e]:.0f}%)" for e in range(E)], fontsize=8)
        ax.set_xticks(range(S), names, rotation=40, ha="right", fontsize=8)
        for tick, o in zip(ax.get_xticklabels(), other, strict=True):
            tick.set_color("tab:purple" if o else "black")
        _mark_groups(ax, groups)
        ax.set_title(labels[layer], fontsize=10)
    for ax in axes.flat[L:]:
        ax.axis("off")
    nice = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16] if vmax > 1 else [1 / 2, 2 / 3, 4 / 5, 1, 5 / 4, 3 / 2, 2]
    ticks = [math.log2(v) for v in nice if abs(math.log2(v)) <= vmax + 1e-9]
    bar = fig.colorbar(im, ax=axes, ticks=ticks, shrink=0.8)
    bar.ax.set_yticklabels([f"×{2.0**t:.3g}" for t in ticks])
    bar.set_label("lift: share ÷ expert's overall share")
    fig.suptitle("Routing by source: % of each source's routing slots per expert (columns sum to 100)", fontsize=11)
    return _save(fig, path)


def _language_order(sources: list[str], languages: dict[str, str] | None) -> tuple[list[int], list[tuple[str, int]]]:
    """Source indices grouped by language (the most common first) and the (language, size) of each group."""
    if not languages:
        return list(range(len(sources))), []
    labels = [languages.get(s, "unknown") for s in sources]
    by_size = sorted(dict.fromkeys(labels), key=lambda g: -labels.count(g))
    order = [i for g in by_size for i, label in enumerate(labels) if label == g]
    return order, [(g, labels.count(g)) for g in by_size]


def _mark_groups(ax, groups: list[tuple[str, int]]) -> None:
    """Black lines between language groups and their labels above the panel."""
    if len(groups) < 2:
        return
    start, centres = 0, []
    for _, size in groups:
        if start:
            ax.axvline(start - 0.5, color="black", linewidth=2.5)
        centres.append(start + (size - 1) / 2)
        start += size
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, [g for g, _ in groups], fontsize=8, fontweight="bold")
    top.tick_params(length=0)


def plot_router_over_training(
    expert_load_rows: list[dict[str, float]], path: Path, train_rows: list[dict[str, float]] | None = None
) -> Path:
    """Router entropy, load CV and balance loss against the optimizer step, one line per MoE layer (a trailing mean;
    the raw values faint), from `expert_load.csv` rows. The balance loss is per layer when those rows carry a
    `balance_loss` column, else the mean over layers logged as `aux_loss` in `train_log.csv` (`train_rows`).
    Targets (CV 0.15, balance loss 1.05) are dashed, the uniform router's entropy ln E dotted."""
    layers = sorted({int(r["layer"]) for r in expert_load_rows})
    n_expert = sum(1 for key in expert_load_rows[0] if re.fullmatch(r"e\d+", key))
    aux = [(r["step"], r["aux_loss"]) for r in train_rows or [] if "aux_loss" in r]
    per_layer_balance = all("balance_loss" in r for r in expert_load_rows)
    panels = ["entropy", "cv"] + (["balance_loss"] if per_layer_balance or aux else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], panels, strict=True):
        for layer in layers if key != "balance_loss" or per_layer_balance else []:
            points = sorted((r["step"], r[key]) for r in expert_load_rows if int(r["layer"]) == layer)
            _smoothed_line(ax, points, f"C{layer % 10}", f"layer {layer}")
        if key == "balance_loss" and not per_layer_balance:
            _smoothed_line(ax, aux, "C0", "mean over layers")
        if key == "entropy":
            ax.axhline(math.log(n_expert), color="gray", linestyle=":", label=f"uniform router (ln {n_expert})")
        elif key == "cv":
            ax.axhline(CV_TARGET, color="black", linestyle="--", label=f"target {CV_TARGET}")
        else:
            ax.axhline(BALANCE_TARGET, color="black", linestyle="--", label=f"target {BALANCE_TARGET}")
            ax.axhline(1.0, color="gray", linestyle=":", label="perfect balance")
        ylabel = {"entropy": "router entropy (nats)", "cv": "load CV", "balance_loss": "balance loss E·Σ f·P"}[key]
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Router over training (lines: trailing mean; faint: logged values)", fontsize=11)
    return _save(fig, path)


def _smoothed_line(ax, points: list[tuple[float, float]], color: str, label: str) -> None:
    if not points:
        return
    steps, values = (np.asarray(v, dtype=float) for v in zip(*points, strict=True))
    window = max(1, len(values) // 15)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - window)
    if window > 1:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, (csum[hi] - csum[lo]) / (hi - lo), color=color, label=label)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------- report


def summary_markdown(
    table: RoutingTable,
    shares: SourceShares,
    tokens: list[list[list[TopToken]]],
    balance: list[dict],
    training: list[dict] | None = None,
    by_language: SourceShares | None = None,
    figures: Sequence[str] = (),
    aux_loss_coef: float | None = None,
    tokens_shown: int = 8,
) -> str:
    """A Markdown section: the most specialised expert per layer and source (and language), the top tokens per
    expert, and the balance loss and CV per layer against the targets, saying plainly whether they are met."""
    n_texts = len(table.sources)
    lines = [
        "## What the experts learn",
        "",
        f"{len(table.token_ids):,} tokens from {n_texts} texts (at most {_max_per_source(table):,} each, windows "
        f"spread over each text) routed by {len(table.blocks)} MoE layers of {table.n_expert} experts (top-{table.k}). "
        "*Share*: the fraction of a text's routing slots sent to an expert; *lift*: that share divided by the "
        "expert's share of all slots (1 = no preference, 2 = twice as often as usual).",
        "",
    ]
    lines += [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in figures] + ([""] if figures else [])
    labels = [_layer_label(table, layer) for layer in range(len(table.blocks))]
    lines += ["### Most specialised expert per text (highest lift)", ""]
    lines += _best_expert_table(shares, labels)
    if by_language is not None:
        lines += ["### By language", ""] + _best_expert_table(by_language, labels)
    lines += [
        "### Top tokens per expert",
        "",
        "Tokens most over-represented in an expert, by P(token | expert) / P(token), ties broken by frequency. "
        "The ratio cannot exceed 1 / (k · share): a token at the ceiling is routed to this expert every time. "
        "`·` is a space, `↵` a newline.",
        "",
    ]
    for layer, per_expert in enumerate(tokens):
        lines += [
            f"**{labels[layer]}**",
            "",
            "| expert | share of slots | ceiling | top tokens (ratio) |",
            "|---|---:|---:|---|",
        ]
        for e, top in enumerate(per_expert):
            shown = ", ".join(f"`{_show(t.text)}` {t.ratio:.1f}" for t in top[:tokens_shown])
            share = shares.overall[layer, e]
            ceiling = f"{1 / (table.k * share):.1f}" if share else "–"
            lines.append(f"| e{e} | {100 * share:.1f}% | {ceiling} | {shown or '(none frequent enough)'} |")
        lines.append("")
    return "\n".join(lines + _balance_section(balance, training, labels, aux_loss_coef))


def _max_per_source(table: RoutingTable) -> int:
    return int(np.bincount(table.source, minlength=len(table.sources)).max())


def _layer_label(table: RoutingTable, layer: int) -> str:
    block = table.blocks[layer]
    return f"layer {layer}" if block == layer else f"layer {layer} (block {block})"


def _best_expert_table(shares: SourceShares, labels: list[str]) -> list[str]:
    lines = [
        "| layer | " + " | ".join(_cell(s) for s in shares.sources) + " |",
        "|---" * (len(shares.sources) + 1) + "|",
    ]
    for layer, label in enumerate(labels):
        best = shares.lift[layer].argmax(0)
        cells = [f"e{e} ×{shares.lift[layer, e, s]:.2f}" for s, e in enumerate(best)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _balance_section(
    balance: list[dict], training: list[dict] | None, labels: list[str], aux_loss_coef: float | None
) -> list[str]:
    lines = [
        "### Load balance against the targets",
        "",
        f"Targets: balance loss ≤ {BALANCE_TARGET} (1 = perfectly balanced) and load CV ≤ {CV_TARGET}. *Texts*: on "
        "all the analysed tokens; *noise CV*: what a perfectly balanced random router would show on that many tokens; "
        "*training*: the logged value at the last step (mean of the last logged steps in brackets; the training log "
        "has the balance loss only as a mean over layers).",
        "",
        "| layer | balance loss (texts) | CV (texts) | noise CV | entropy / ln E | CV (training) | balance loss "
        "(training) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_layer = {t["layer"]: t for t in training or []}
    for b, label in zip(balance, labels, strict=True):
        t = by_layer.get(b["layer"])
        cv_t = f"{t['cv']:.3f} ({t['cv_mean']:.3f})" if t else "–"
        bal_t = (
            f"{t['balance_loss']:.3f} ({t['balance_loss_mean']:.3f})" if t and t["balance_loss"] is not None else "–"
        )
        lines.append(
            f"| {label} | {b['balance_loss']:.3f} | {b['cv']:.3f} | {b['noise_cv']:.3f} | "
            f"{b['entropy'] / b['max_entropy']:.2f} | {cv_t} | {bal_t} |"
        )
    lines.append("")
    met = targets_met(balance, training)
    lines.append(_verdict("On the analysed texts", balance, "balance_loss", "cv", labels, met["texts"]))
    if training:
        t_labels = [f"layer {t['layer']}" for t in training]
        lines += [
            "",
            _verdict("In training", training, "balance_loss_mean", "cv_mean", t_labels, met["training"], True),
        ]
    if not (met["texts"] and met["training"] in (True, None)):
        lines += ["", "Why not:", "", *_why_not(balance, training, aux_loss_coef)]
    return lines + [""]


def targets_met(balance: list[dict], training: list[dict] | None = None) -> dict[str, bool | None]:
    """Whether every layer meets both targets on the analysed texts and in training (mean of the last logged steps;
    None without a training log)."""

    def ok(rows: list[dict], bal: str, cv: str) -> bool:
        return all((r[bal] is None or r[bal] <= BALANCE_TARGET) and r[cv] <= CV_TARGET for r in rows)

    return {
        "texts": ok(balance, "balance_loss", "cv"),
        "training": ok(training, "balance_loss_mean", "cv_mean") if training else None,
    }


def _verdict(
    where: str, rows: list[dict], bal: str, cv: str, labels: list[str], met: bool, mean_balance: bool = False
) -> str:
    if met:
        return f"**{where}: targets met** in every layer (balance loss ≤ {BALANCE_TARGET}, CV ≤ {CV_TARGET})."
    bad_cv = [f"{lab} ({_over(r[cv], CV_TARGET)})" for r, lab in zip(rows, labels, strict=True) if r[cv] > CV_TARGET]
    values = {lab: r[bal] for r, lab in zip(rows, labels, strict=True) if r[bal] is not None}
    bad_bal = {lab: v for lab, v in values.items() if v > BALANCE_TARGET}
    parts = [f"CV > {CV_TARGET} in " + ", ".join(bad_cv)] if bad_cv else []
    if mean_balance and bad_bal:  # one value for all layers: the training log's mean
        value = _over(next(iter(bad_bal.values())), BALANCE_TARGET)
        parts.append(f"balance loss {value} > {BALANCE_TARGET} (mean over layers)")
    elif bad_bal:
        parts.append(
            f"balance loss > {BALANCE_TARGET} in "
            + ", ".join(f"{k} ({_over(v, BALANCE_TARGET)})" for k, v in bad_bal.items())
        )
    return f"**{where}: targets not met**: " + "; ".join(parts) + "."


def _over(value: float, target: float) -> str:
    """`value` with enough decimals (3 to 6) to show that it exceeds `target`."""
    digits = 3
    while digits < 6 and round(value, digits) <= target:
        digits += 1
    return f"{value:.{digits}f}"


def _why_not(balance: list[dict], training: list[dict] | None, aux_loss_coef: float | None) -> list[str]:
    """Reasons read off the numbers for targets that are not met."""
    reasons = []
    flat = [b for b in balance if b["cv"] > CV_TARGET and b["balance_loss"] <= BALANCE_TARGET]
    for b in flat:
        reasons.append(
            f"- Layer {b['layer']}: load CV {_over(b['cv'], CV_TARGET)} above target while the balance loss "
            f"({b['balance_loss']:.3f}) meets its own. The loss is 1 + E·Σ (f_e − 1/E)(P_e − 1/E), so |loss − 1| ≤ "
            f"CV(f)·CV(P), the load's CV times that of the mean router probabilities: {b['cv']:.3f} × "
            f"{b['prob_cv']:.3f} = {b['cv'] * b['prob_cv']:.4f} here. At this load the loss could pass "
            f"{BALANCE_TARGET} only if CV(P) ≥ {(BALANCE_TARGET - 1) / b['cv']:.2f}: the balance-loss target is much "
            "looser than the CV target, and the aux loss pushes little towards balance once it is met."
        )
    noisy = [b for b in balance if b["noise_cv"] > CV_TARGET]
    if noisy:
        reasons.append(
            f"- Too few tokens: even a perfectly balanced router shows a CV of {noisy[0]['noise_cv']:.2f} "
            f"on {noisy[0]['tokens']:,} tokens; analyse more (`--max_tokens_per_text`)."
        )
    if training and any(t["cv_mean"] > CV_TARGET for t in training):
        within, pooled = np.mean([b["cv_per_text"] for b in balance]), np.mean([b["cv"] for b in balance])
        reasons.append(
            "- The training CV is measured on one micro-batch per logged step: sampling noise on few tokens, and "
            f"routing that depends on the text (within one text the load CV averages {within:.2f} over layers, "
            f"against {pooled:.2f} pooled over all texts): a batch of a few windows is less balanced than the corpus."
        )
    over = [b for b in balance if b["balance_loss"] > BALANCE_TARGET]
    over += [t for t in training or [] if (t["balance_loss_mean"] or 0) > BALANCE_TARGET]
    if over:
        coef = f" (now {aux_loss_coef:g})" if aux_loss_coef is not None else ""
        reasons.append(
            f"- The balance loss is above target: the router gives its overloaded experts the highest "
            f"probabilities. A larger `moe_aux_loss_coef`{coef} or longer training would push them "
            "apart."
        )
    return reasons or ["- No single cause stands out in these numbers; see the per-layer table."]


def _show(text: str) -> str:
    """A token's text for a Markdown code span in a table."""
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→").replace("`", "ˋ").replace("|", "\\|") or "∅"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------------------------ entry point


def short_title(file_name: str, language: str | None = None, width: int = 24) -> str:
    """A readable short title from a book file name: `pg1342_pride_and_prejudice.txt` -> `Pride and Prejudice`
    (a trailing `_<language>` tag dropped, long titles cut with `…`)."""
    slug = re.sub(r"^pg\d+_", "", Path(file_name).stem)
    if language and slug.endswith(f"_{language}"):
        slug = slug[: -len(language) - 1]
    small = {"a", "an", "and", "at", "in", "of", "on", "the", "to"}
    title = " ".join(w if i and w in small else w[:1].upper() + w[1:] for i, w in enumerate(slug.split("_")))
    return title if len(title) <= width else title[: width - 1].rstrip() + "…"


def read_books(books_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Raw Project Gutenberg `.txt` files under `books_dir`, cleaned by `litgpt_mm.data.gutenberg.load_book`:
    (short title -> body, short title -> language code). Unreadable books are reported and skipped."""
    from litgpt_mm.data import gutenberg as pg

    files = sorted(Path(books_dir).glob("*.txt"))
    if not files:
        raise ValueError(
            f"{books_dir} holds no .txt files: pass --books_dir, a directory of raw Project Gutenberg books"
        )
    texts, languages = {}, {}
    for path in files:
        try:
            book = pg.load_book(path)
        except (OSError, UnicodeDecodeError, pg.BoilerplateError) as err:
            print(f"skipped {path.name}: {err}")
            continue
        title = short_title(path.name, book.language)
        title = title if title not in texts else f"{title} ({book.ebook_id})"
        texts[title], languages[title] = book.text, book.language
    if not texts:
        raise ValueError(f"no readable book under {books_dir}")
    return texts, languages


def analyse(
    checkpoint_dir: Path,
    books_dir: Path = Path("data/gutenberg"),
    out_dir: Path = Path("out/expert_analysis"),
    seq_len: int = 128,
    max_tokens_per_text: int = 4096,
    logs_dir: Path | None = None,
    top_k: int = 10,
    min_count: int = 5,
    batch_size: int = 8,
    device: str | None = None,
) -> dict:
    """Route the books through a MoE checkpoint and write `experts_by_book.png`, `router_over_training.png` (when
    training logs are found), `experts.md` and `experts.json` to `out_dir`.

    Args:
        checkpoint_dir: a litgpt-layout checkpoint of our MoE model with its tokenizer (e.g. `<run>/final`).
        books_dir: raw Project Gutenberg `.txt` files (cleaned as for pretraining), one source per book.
        out_dir: where the plots and the summary go.
        seq_len: tokens per window.
        max_tokens_per_text: tokens analysed per book (windows spread over the book).
        logs_dir: the run's `logs/` (`expert_load.csv`, `train_log.csv`); default `<checkpoint_dir>/../logs`.
        top_k: top tokens listed per expert.
        min_count: routing slots a token needs in an expert to be listed.
        batch_size: windows per forward pass.
        device: `cuda` or `cpu` (default: CUDA when available).

    Returns:
        `summary` (the Markdown), `figures`, per-layer `balance` on the books and `training` from the logs,
        `targets_met`, and the `sources`, `languages`, `share`, `lift`, `overall` and `top_tokens` numbers.
    """
    from litgpt_mm.model import load_model
    from litgpt_mm.training.checkpoint import load_tokenizer
    from litgpt_mm.training.plots import read_csv

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint_dir, device=device).eval()
    tokenizer = load_tokenizer(checkpoint_dir)
    if seq_len > model.config.block_size:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's block size {model.config.block_size}")
    model.max_seq_length = seq_len
    texts, languages = read_books(books_dir)
    table = route_texts(model, tokenizer, texts, seq_len, max_tokens_per_text, batch_size)
    shares = expert_by_source(table)
    by_language = language_split(table, languages) if len(set(languages.values())) > 1 else None
    tokens, balance = top_tokens(table, tokenizer, top_k, min_count), routing_balance(table)
    logs_dir = Path(logs_dir) if logs_dir is not None else Path(checkpoint_dir).parent / "logs"
    expert_rows, train_rows = read_csv(logs_dir / "expert_load.csv"), read_csv(logs_dir / "train_log.csv")
    training = training_balance(expert_rows, train_rows) if expert_rows else None

    out_dir = Path(out_dir)
    labels = [_layer_label(table, layer) for layer in range(len(table.blocks))]
    figures = [plot_expert_heatmaps(shares, out_dir / "experts_by_book.png", languages, labels)]
    if expert_rows:
        figures.append(plot_router_over_training(expert_rows, out_dir / "router_over_training.png", train_rows))
    summary = summary_markdown(
        table, shares, tokens, balance, training, by_language, [f.name for f in figures], model.config.moe_aux_loss_coef
    )
    result = {
        "summary": summary,
        "figures": [str(f) for f in figures],
        "balance": balance,
        "training": training,
        "targets_met": targets_met(balance, training),
        "sources": shares.sources,
        "languages": languages,
        "share": shares.share.tolist(),
        "lift": shares.lift.tolist(),
        "overall": shares.overall.tolist(),
        "top_tokens": [[[vars(t) for t in top] for top in layer] for layer in tokens],
    }
    (out_dir / "experts.md").write_text(summary)
    (out_dir / "experts.json").write_text(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1))
    print(
        f"Analysed {len(table.token_ids):,} tokens of {len(texts)} books; wrote {out_dir / 'experts.md'} and "
        f"{', '.join(f.name for f in figures)}"
    )
    return result


def main(args: list[str] | None = None) -> dict:
    """The command line: `analyse`'s arguments as `--name value` options (`args`: instead of `sys.argv`)."""
    from litgpt_mm.cli import run_cli

    return run_cli(analyse, as_positional=False, args=args)


if __name__ == "__main__":
    main()
