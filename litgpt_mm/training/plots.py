"""Plots of a run's logs (`out_dir/logs/*.csv`): loss curves, throughput, and expert load."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a log CSV, numeric columns only (empty list if the file does not exist)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None} for row in csv.DictReader(f)
        ]


def _number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_run(out_dir: Path, unit: str = "tokens", loss_label: str = "cross-entropy (nats/token)") -> list[Path]:
    """Write `loss.png`, `throughput.png`, `accuracy.png` (when the run evaluated questions) and (for MoE runs)
    `expert_load.png` next to the logs; `unit` is what the `tokens` column counts (images for CLIP)."""
    logs = Path(out_dir) / "logs"
    train, val = read_csv(logs / "train_log.csv"), read_csv(logs / "val_log.csv")
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(xlabel=unit, ylabel=loss_label, title=f"{Path(out_dir).name}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, logs / "loss.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
        ax.set(xlabel="optimizer step", ylabel=f"{unit}/s", title="throughput")
        ax.grid(alpha=0.3)
        written.append(_save(fig, logs / "throughput.png"))
    if val and any(k.endswith("_image") for k in val[-1]):
        written.append(plot_accuracy(val, logs / "accuracy.png", Path(out_dir).name))
    experts = read_csv(logs / "expert_load.csv")
    if experts:
        written.append(plot_expert_load(experts, logs / "expert_load.png"))
    return written


def plot_accuracy(val: list[dict[str, float]], path: Path, title: str) -> Path:
    """One panel per question type (or caption metric): the held-out score against the optimizer step with the
    image, blind and with another image, from the `<type>_<condition>` columns of `val_log.csv`."""
    kinds = sorted({k.rsplit("_", 1)[0] for k in val[-1] if k.endswith("_image")}, key=lambda k: (k != "vqa", k))
    styles = {"image": ("C0", "-", "o"), "blind": ("C3", "--", None), "shuffled": ("C7", ":", None)}
    cols = min(3, len(kinds))
    rows = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), sharex=True, squeeze=False)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        for condition, (colour, style, marker) in styles.items():
            points = [(r["step"], r[f"{kind}_{condition}"]) for r in val if f"{kind}_{condition}" in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=colour, marker=marker, label=condition)
        values = [r[k] for r in val for k in r if k.startswith(f"{kind}_") and r[k] is not None]
        ax.set(title="all questions" if kind == "vqa" else kind)
        if values and max(values) <= 1.0:  # accuracies; CIDEr runs past 1
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(kinds) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("score" if {"CIDEr", "ROUGE_L"} & set(kinds) else "accuracy")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{title}: held-out scores with the image, blind and with another image")
    return _save(fig, path)


def plot_expert_load(rows: list[dict[str, float]], path: Path, title: str = "expert load") -> Path:
    """Heat map of each layer's token share per expert at the last logged step (1/E everywhere = balanced)."""
    last = max(r["step"] for r in rows)
    rows = sorted((r for r in rows if r["step"] == last), key=lambda r: r["layer"])
    n_expert = sum(1 for k in rows[0] if k.startswith("e") and k[1:].isdigit())
    grid = [[r[f"e{i}"] for i in range(n_expert)] for r in rows]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_expert, 1 + 0.45 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"{title} (step {int(last)})")
    ax.set_xticks(range(n_expert))
    ax.set_yticks(range(len(rows)))
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
