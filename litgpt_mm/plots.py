"""Plots of a run's logs (`out_dir/logs/*.csv`): loss curves, throughput, and expert load."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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


def plot_run(out_dir: Path) -> list[Path]:
    """Write `loss.png`, `throughput.png`, `accuracy.png` (when the run evaluated questions) and (for MoE runs)
    `expert_load.png` next to the logs."""
    logs = Path(out_dir) / "logs"
    train, val = read_csv(logs / "train_log.csv"), read_csv(logs / "val_log.csv")
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title=f"{Path(out_dir).name}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, logs / "loss.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
        ax.set(xlabel="optimizer step", ylabel="tokens/s", title="throughput")
        ax.grid(alpha=0.3)
        written.append(_save(fig, logs / "throughput.png"))
    if val and any(k.endswith("_image") for k in val[-1]):
        written.append(plot_accuracy(val, logs / "accuracy.png", Path(out_dir).name))
    experts = read_csv(logs / "expert_load.csv")
    if experts:
        written.append(plot_expert_load(experts, logs / "expert_load.png"))
    return written


def plot_accuracy(val: list[dict[str, float]], path: Path, title: str) -> Path:
    """Accuracy per question type against the optimizer step: with the image (solid), blind (dashed) and with another
    image (dotted), from the `<type>_<condition>` columns of `val_log.csv`."""
    kinds = sorted({k.rsplit("_", 1)[0] for k in val[-1] if k.endswith("_image")})
    styles = {"image": "-", "blind": "--", "shuffled": ":"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, kind in enumerate(kinds):
        colour = f"C{i}"
        for condition, style in styles.items():
            rows = [r for r in val if f"{kind}_{condition}" in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[f"{kind}_{condition}"] for r in rows], style, color=colour,
                        marker="o" if condition == "image" else None, label=f"{kind} ({condition})")  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"{title}: held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
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
