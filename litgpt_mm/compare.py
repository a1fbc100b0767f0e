"""The comparison study: MoE on Gutenberg, litgpt's dense pretrain on RedPajama, and MoE vs an equal-active-FLOP
dense twin on the same Gutenberg tokens, two seeds each; writes a Markdown report with plots.

    python recipes/compare.py                                        # tiny presets, CPU, minutes
    python recipes/compare.py --litgpt_data gutenberg                # no RedPajama prepared: litgpt on the books
    python recipes/compare.py --preset cpu-5m --litgpt_data gutenberg  # 5.2M tokens a run -> reports/pretrain-cpu-5m
    python recipes/compare.py --preset gpu                           # phi-2-moe vs phi-2-twin vs litgpt, 2B tokens

Every final checkpoint is also scored by one evaluator (held-out loss and bits per byte on the same text), and the
first MoE run's experts are analysed on every bundled book (`litgpt_mm.analysis.experts`).

Each run is its own process (so its peak memory is its own) writing to `runs_dir/<run>/`; a finished run is
reused and an interrupted one resumes. `--report_only true` rebuilds the report from existing runs.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from litgpt_mm import REPO_ROOT as ROOT
from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.training.checkpoint import atomic_write
from litgpt_mm.training.flops import active_params
from litgpt_mm.training.plots import plot_expert_load, read_csv

PRESETS = {
    "tiny": {"models": ("phi-2-moe-tiny", "phi-2-tiny-twin"),
             "configs": ("pretrain_moe_tiny.yaml", "pretrain_dense_litgpt_tiny.yaml")},
    "cpu-5m": {"models": ("phi-2-moe-tiny", "phi-2-tiny-twin"),
               "configs": ("pretrain_moe_cpu5m.yaml", "pretrain_dense_litgpt_cpu5m.yaml")},
    "gpu": {"models": ("phi-2-moe", "phi-2-twin"),
            "configs": ("pretrain_moe_gpu.yaml", "pretrain_dense_litgpt_gpu.yaml")},
}  # fmt: skip
GROUPS = {
    "moe-gutenberg": "(1) ours: Phi-2 + MoE after the MLP, Gutenberg",
    "litgpt-dense": "(2) litgpt pretrain, dense Phi-2",
    "dense-twin-gutenberg": "(3) ours: dense twin with equal active FLOPs, Gutenberg",
}
COLORS = {"moe-gutenberg": "tab:blue", "litgpt-dense": "tab:green", "dense-twin-gutenberg": "tab:orange"}


@dataclass
class Run:
    """One training run's logs, normalised across our CSV logs and litgpt's CSV logger."""

    name: str
    group: str
    seed: int
    out: Path
    train: list[dict[str, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    peak_memory_gb: float = float("nan")
    params: int = 0
    active: int = 0
    held_out: dict = field(default_factory=dict)

    @property
    def final_val(self) -> float:
        return self.val[-1]["val_loss"] if self.val else float("nan")

    @property
    def tokens_per_s(self) -> float:
        rates = [r["tokens_per_s"] for r in self.train[1:] if "tokens_per_s" in r]  # the first window holds warm-up
        return statistics.median(rates) if rates else float("nan")

    @property
    def wall_clock_s(self) -> float:
        return self.train[-1]["elapsed_s"] if self.train else float("nan")


def main(
    out_dir: Path = Path("reports/compare"),
    runs_dir: Path = Path("out/compare"),
    gutenberg_dir: Path = Path("data/prepared/gutenberg"),
    litgpt_data: Literal["redpajama", "gutenberg"] = "redpajama",
    litgpt_data_dir: Path | None = None,
    moe_model: str = "phi-2-moe-tiny",
    dense_model: str = "phi-2-tiny-twin",
    moe_config: Path = Path("recipes/configs/pretrain_moe_tiny.yaml"),
    litgpt_config: Path = Path("recipes/configs/pretrain_dense_litgpt_tiny.yaml"),
    seeds: list[int] = [1, 2],  # noqa: B006
    report_only: bool = False,
    preset: Literal["tiny", "cpu-5m", "gpu"] | None = None,
    eval_blocks: int = 256,
    books_dir: Path | None = Path("data/gutenberg"),
    width: int | None = None,
    groups: list[str] = list(GROUPS),  # noqa: B006
) -> Path:
    """Run (or reuse) the six runs and write `out_dir/README.md` with plots.

    Args:
        out_dir: where the report and its plots go.
        runs_dir: where each run's checkpoints and logs go.
        gutenberg_dir: prepared Gutenberg shards (`scripts/prepare_gutenberg.py`).
        litgpt_data: corpus of the litgpt dense run; `redpajama` as in the original study.
        litgpt_data_dir: its prepared shards (default `data/prepared/<litgpt_data>`).
        moe_model: our MoE preset for runs (1).
        dense_model: the dense preset with the MoE's active FLOPs, for runs (2) and (3).
        moe_config: YAML of `recipes/pretrain_moe.py` settings shared by runs (1) and (3).
        litgpt_config: YAML of `recipes/pretrain_dense_litgpt.py` settings for run (2).
        seeds: one run per seed in each group.
        report_only: do not train; report on what `runs_dir` holds.
        preset: a whole study's settings, overriding the model and config arguments: `tiny` (307k tokens per run,
            minutes), `cpu-5m` (5.2M tokens per run, about 15 minutes a run on 2 cores) or `gpu` (full Phi-2 + MoE vs
            its dense twin and litgpt's Phi-2, `recipes/configs/pretrain_*_gpu.yaml`).
        eval_blocks: held-out windows (spread over the Gutenberg validation book) for the common evaluator's loss
            and bits per byte.
        books_dir: the raw books, routed through the first MoE run to show what its experts learned (None: skip).
        width: with a CPU preset, the tiny family at another width (64, 256 or 384; 128 is the preset's own): the
            models `phi-2-moe-tiny-<width>` and `phi-2-tiny-twin-<width>`, reported under `...-w<width>`. The
            preset's own report then gains a width-sweep section from every `...-w<width>` run directory.
        groups: which of the three groups to run (a width sweep needs only `moe-gutenberg` and
            `dense-twin-gutenberg`).
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"--groups: unknown {sorted(unknown)}; choose from {list(GROUPS)}")
    study = StudySetup(out_dir, runs_dir, moe_model, dense_model, moe_config, litgpt_config)
    if preset is not None:
        study = study.with_preset(preset)
    if width is not None:
        study = study.at_width(width, preset)
    litgpt_data_dir = Path(litgpt_data_dir or f"data/prepared/{litgpt_data}")
    for directory, script in ((gutenberg_dir, "prepare_gutenberg"), (litgpt_data_dir, f"prepare_{litgpt_data}")):
        if not report_only and not (directory / "train" / "index.json").is_file():
            raise SystemExit(f"{directory} has no prepared shards: run `python scripts/{script}.py` first")
    commands = study.commands(gutenberg_dir, litgpt_data, litgpt_data_dir)
    runs = [
        _run(f"{name}-seed{seed}", group, seed, study.runs_dir, report_only, [*args, "--seed", str(seed)])
        for seed in seeds
        for name, group, args in commands
        if group in groups
    ]
    runs = [r for r in runs if r.train]
    if not runs:
        raise SystemExit(f"No finished runs under {study.runs_dir}")
    for run in runs:
        run.held_out = held_out(run, gutenberg_dir, eval_blocks)
    sweep = {}
    if width is None and preset in ("tiny", "cpu-5m"):
        sweep = _width_sweep(runs, study.runs_dir, seeds, gutenberg_dir, eval_blocks)
    return write_report(runs, Path(study.out_dir), litgpt_data, books_dir, sweep if len(sweep) > 1 else None)


@dataclass(frozen=True)
class StudySetup:
    """Where a study's runs and report go and what its runs train, after `--preset` and `--width` (see `main`)."""

    out_dir: Path
    runs_dir: Path
    moe_model: str
    dense_model: str
    moe_config: Path
    litgpt_config: Path

    def with_preset(self, preset: str) -> StudySetup:
        """The models, configs and directories of a `PRESETS` study."""
        name = {"tiny": "cpu-tiny", "cpu-5m": "cpu-5m", "gpu": "gpu"}[preset]
        moe_config, litgpt_config = (Path(f"recipes/configs/{c}") for c in PRESETS[preset]["configs"])
        return StudySetup(
            Path(f"reports/pretrain-{name}"),
            Path(f"out/compare-{name}"),
            *PRESETS[preset]["models"],
            moe_config,
            litgpt_config,
        )

    def at_width(self, width: int, preset: str | None) -> StudySetup:
        """The tiny family at another width, reported under `...-w<width>`; an unknown width fails here."""
        if preset not in ("tiny", "cpu-5m"):
            raise ValueError("--width picks a width of the tiny family: use it with --preset tiny or cpu-5m")
        moe_model, dense_model = f"phi-2-moe-tiny-{width}", f"phi-2-tiny-twin-{width}"
        Config.from_name(moe_model)  # an unknown width fails here, naming the ones there are
        return replace(
            self,
            out_dir=Path(f"{self.out_dir}-w{width}"),
            runs_dir=Path(f"{self.runs_dir}-w{width}"),
            moe_model=moe_model,
            dense_model=dense_model,
        )

    def commands(self, gutenberg_dir: Path, litgpt_data: str, litgpt_data_dir: Path) -> list[tuple[str, str, list]]:
        """`(run name, group, training script and its arguments)` of each group, without the seed."""
        ours = ["recipes/pretrain_moe.py", "--config", self.moe_config, "--data_dir", gutenberg_dir, "--resume", "auto"]
        return [
            ("moe-gutenberg", "moe-gutenberg", [*ours, "--model_name", self.moe_model]),
            ("dense-twin-gutenberg", "dense-twin-gutenberg", [*ours, "--model_name", self.dense_model]),
            (f"litgpt-dense-{litgpt_data}", "litgpt-dense",
             ["recipes/pretrain_dense_litgpt.py", "--config", self.litgpt_config, "--model_name", self.dense_model,
              "--data", litgpt_data, "--data_dir", litgpt_data_dir]),
        ]  # fmt: skip


def _width_sweep(
    runs: list[Run], runs_dir: Path, seeds: list[int], gutenberg_dir: Path, eval_blocks: int
) -> dict[int, list[Run]]:
    """This study's runs as width 128, plus the finished runs of every `<runs_dir>-w<width>` directory beside it."""
    sweep = {128: runs}
    for directory in sorted(Path(runs_dir).parent.glob(f"{Path(runs_dir).name}-w*")):
        found = _finished_runs(directory, seeds, gutenberg_dir, eval_blocks)
        if found:
            sweep[int(directory.name.rsplit("-w", 1)[1])] = found
    return sweep


def _finished_runs(runs_dir: Path, seeds: list[int], gutenberg_dir: Path, eval_blocks: int) -> list[Run]:
    """The finished MoE and dense-twin runs of a width-sweep directory, with their held-out scores."""
    runs = []
    for seed in seeds:
        for group in ("moe-gutenberg", "dense-twin-gutenberg"):
            out = runs_dir / f"{group}-seed{seed}"
            if (out / "final" / "lit_model.pth").is_file():
                run = load_run(out.name, group, seed, out)
                run.held_out = held_out(run, gutenberg_dir, eval_blocks)
                runs.append(run)
    return runs


def _run(name: str, group: str, seed: int, runs_dir: Path, report_only: bool, args: list) -> Run:
    out = Path(runs_dir) / name
    if not report_only and not (out / "final" / "lit_model.pth").is_file():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, *map(str, args), "--out_dir", str(out)]
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        with open(out / "stdout.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"[{name}] failed with exit code {proc.returncode}; see {out / 'stdout.log'}")
        (out / "peak_rss_gb.txt").write_text(f"{usage.ru_maxrss / 1e6:.4f}\n")
    return load_run(name, group, seed, out)


def load_run(name: str, group: str, seed: int, out: Path) -> Run:
    """Read a run directory written by `recipes/pretrain_moe.py` or by litgpt's pretrain (CSV logger)."""
    run = Run(name, group, seed, out)
    if (out / "logs" / "train_log.csv").is_file():
        run.train = read_csv(out / "logs" / "train_log.csv")
        run.val = read_csv(out / "logs" / "val_log.csv")
    else:
        run.train, run.val = _litgpt_logs(out)
    memory = [r["peak_memory_gb"] for r in run.train if "peak_memory_gb" in r]
    stdout = (out / "stdout.log").read_text(errors="replace") if (out / "stdout.log").is_file() else ""
    gpu = re.search(r"Memory Used\s*:\s*([\d.]+) GB", stdout)
    if memory and torch.cuda.is_available():
        run.peak_memory_gb = max(memory)
    elif gpu:
        run.peak_memory_gb = float(gpu.group(1))
    elif (out / "peak_rss_gb.txt").is_file():
        run.peak_memory_gb = float((out / "peak_rss_gb.txt").read_text())
    if (out / "final" / "model_config.yaml").is_file():
        with torch.device("meta"):
            model = GPT(Config.from_file(out / "final" / "model_config.yaml"))
        run.params = sum(p.numel() for n, p in model.named_parameters() if "wte" not in n)
        run.active = active_params(model)
    return run


def held_out(run: Run, gutenberg_dir: Path, max_blocks: int, seq_len: int = 128) -> dict:
    """Loss and bits per byte of a run's final checkpoint on the Gutenberg validation book, by one evaluator for all
    runs (litgpt's `GPT` forward; the same text in every run's own tokenizer, so bits per byte compare across
    tokenizers). Cached in the run directory, keyed by the checkpoint's hash and the settings."""
    import json

    from litgpt_mm.eval import lm as lm_lib
    from litgpt_mm.eval.runner import checkpoint_hash
    from litgpt_mm.model import load_model
    from litgpt_mm.training.checkpoint import load_tokenizer

    final = run.out / "final"
    if not (final / "lit_model.pth").is_file():
        return {}
    key = {"hash": checkpoint_hash(final), "blocks": max_blocks, "seq_len": seq_len, "data": str(gutenberg_dir)}
    cache = run.out / "held_out.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["result"]
    model, tokenizer = load_model(final, device="cpu").eval(), load_tokenizer(final)
    model.max_seq_length = seq_len
    windows = lm_lib.shard_windows(Path(gutenberg_dir) / "val", seq_len, max_blocks)
    ours = load_tokenizer(Path(gutenberg_dir) / "tokenizer")
    if tokenizer.vocab_size != ours.vocab_size or not all(
        torch.equal(tokenizer.encode(t, bos=False, eos=False), ours.encode(t, bos=False, eos=False))
        for t in ("The sea, said he.", "Où est-il?")
    ):  # another tokenizer: the same text, re-tokenized
        text = "".join(ours.decode(w) for w in windows)
        windows = lm_lib.text_windows(tokenizer.encode(text, bos=False, eos=False), seq_len)[:max_blocks]
    with torch.no_grad():
        results = {r.metric: r.value for r in lm_lib.bits_per_byte(model, tokenizer, windows)}
    atomic_write(cache, lambda f: f.write(json.dumps({"key": key, "result": results}, indent=2).encode()))
    return results


def _litgpt_logs(out: Path) -> tuple[list[dict], list[dict]]:
    """litgpt's `metrics.csv` (every `version_*` of a resumed run, later rows winning) as our log rows."""
    rows: dict[tuple[str, int], dict] = {}
    for path in sorted((out / "logs" / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        for r in read_csv(path):
            rows[("val" if "val_loss" in r else "train", int(r["step"]))] = r
    train = [r for (kind, _), r in sorted(rows.items(), key=lambda kv: kv[0][1]) if kind == "train"]
    if not train:
        return [], []
    per_iter = train[-1]["total_tokens"] / train[-1]["iter"]
    out_train, prev = [], None
    for r in train:
        row = {"step": r["step"], "tokens": r["total_tokens"], "loss": r["loss"], "elapsed_s": r["time"]}
        if prev is not None and r["time"] > prev["time"]:
            row["tokens_per_s"] = (r["total_tokens"] - prev["total_tokens"]) / (r["time"] - prev["time"])
        out_train.append(row)
        prev = r
    val = []
    for (kind, step), r in sorted(rows.items(), key=lambda kv: kv[0][1]):
        if kind == "val":
            tokens = (step + 1) * per_iter
            nearest = min(train, key=lambda t: abs(t["total_tokens"] - tokens))
            val.append({"step": step, "tokens": tokens, "val_loss": r["val_loss"], "elapsed_s": nearest["time"]})
    return out_train, val


def _experts_section(moe: Run, books_dir: Path, out_dir: Path) -> list[str]:
    """What the experts of the first MoE run learned: routing by book and language, top tokens, balance targets."""
    from litgpt_mm.analysis.experts import analyse

    found = analyse(moe.out / "final", books_dir, out_dir / "experts")
    summary = found["summary"].replace("](", "](experts/")  # its figures live in experts/
    note = f"## What the experts learn\n\nRun `{moe.name}`'s final checkpoint, on every bundled book.\n"
    return [summary.replace("## What the experts learn\n", note, 1), ""]


def write_report(
    runs: list[Run],
    out_dir: Path,
    litgpt_data: str,
    books_dir: Path | None = None,
    sweep: dict[int, list[Run]] | None = None,
) -> Path:
    """Plots and `README.md` of the study; `sweep` (width -> its MoE and twin runs) adds the width-sweep section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    moe = _plot_runs(runs, out_dir)
    by_group = {g: [r for r in runs if r.group == g] for g in GROUPS if any(r.group == g for r in runs)}
    lines = _summary_section(by_group, litgpt_data)
    if "moe-gutenberg" in by_group and "dense-twin-gutenberg" in by_group:
        lines += _fair_test_section(by_group["moe-gutenberg"], by_group["dense-twin-gutenberg"])
    if litgpt_data == "gutenberg" and "litgpt-dense" in by_group and "dense-twin-gutenberg" in by_group:
        lines += _loop_check(by_group["dense-twin-gutenberg"], by_group["litgpt-dense"])
    if sweep:
        lines += _sweep_section(sweep, out_dir / "width_sweep.png")
    lines += [
        "## Plots",
        "",
        "![validation loss vs tokens](loss_vs_tokens.png)",
        "",
        "![validation loss vs wall-clock](loss_vs_time.png)",
        "",
        "![throughput and memory](throughput_memory.png)",
        "",
    ]
    if (out_dir / "expert_load.png").is_file():
        lines += ["![expert load](expert_load.png)", ""]
    if moe is not None and (moe.out / "final" / "lit_model.pth").is_file() and books_dir is not None:
        lines += _experts_section(moe, books_dir, out_dir)
    lines += ["## Runs", "", "| run | final val loss | held-out loss | bits/byte | tokens/s | directory |"]
    lines += ["|---|---|---|---|---|---|"]
    lines += [
        f"| {r.name} | {r.final_val:.3f} | {r.held_out.get('loss', float('nan')):.4f} "
        f"| {r.held_out.get('bits_per_byte', float('nan')):.4f} | {r.tokens_per_s:,.0f} | `{r.out}` |"
        for r in runs
    ]
    report = out_dir / "README.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"Report: {report}")
    return report


def _plot_runs(runs: list[Run], out_dir: Path) -> Run | None:
    """The loss, throughput and memory plots, and the first MoE run's expert load; returns that run (or None)."""
    _loss_plot(runs, "tokens", "tokens", out_dir / "loss_vs_tokens.png")
    _loss_plot(runs, "elapsed_s", "wall-clock seconds", out_dir / "loss_vs_time.png")
    _throughput_plot(runs, out_dir / "throughput_memory.png")
    moe = next((r for r in runs if r.group == "moe-gutenberg"), None)
    if moe is not None and (moe.out / "logs" / "expert_load.csv").is_file():
        plot_expert_load(read_csv(moe.out / "logs" / "expert_load.csv"), out_dir / "expert_load.png", moe.name)
    return moe


def _summary_section(by_group: dict[str, list[Run]], litgpt_data: str) -> list[str]:
    """The report's title, what the runs read, and one row per group, with the notes on how each column is got."""
    lines = [
        "# Pretraining comparison",
        "",
        f"Generated by `python recipes/compare.py` on {time.strftime('%Y-%m-%d')} "
        f"({'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}).",
        (
            f"Runs (2) read **{litgpt_data}**"
            + ("" if litgpt_data == "redpajama" else " (RedPajama was not prepared for this run)")
            + "; "
            if "litgpt-dense" in by_group
            else ""
        )
        + "runs (1) and (3) read the same Gutenberg token shards in the same order.",
        "",
        "| group | runs | params (no emb.) | active | tokens | final val loss | held-out loss | bits/byte "
        "| tokens/s (best) | wall-clock (best) | peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, members in by_group.items():
        vals = [r.final_val for r in members]
        spread = (max(vals) - min(vals)) / 2
        lines.append(
            f"| {GROUPS[group]} | {len(members)} | {members[0].params / 1e6:.2f}M | {members[0].active / 1e6:.2f}M "
            f"| {members[0].train[-1]['tokens']:,.0f} | {statistics.mean(vals):.3f} ± {spread:.3f} "
            f"| {_mean_spread([r.held_out.get('loss') for r in members])} "
            f"| {_mean_spread([r.held_out.get('bits_per_byte') for r in members], 4)} "
            f"| {max(r.tokens_per_s for r in members):,.0f} "
            f"| {min(r.wall_clock_s for r in members):.0f} s "
            f"| {statistics.mean(r.peak_memory_gb for r in members):.2f} GB |"
        )
    return lines + [
        "",
        "± is half the spread over seeds. Final val loss: each loop's own last validation (its first batches of the "
        "held-out book). Held-out loss and bits per byte: one evaluator for every final checkpoint, "
        "`recipes/evaluate.py lm`'s, on windows of 128 tokens spread over the whole held-out book, the same text in "
        "each run's own tokenizer (bits per byte compare across tokenizers). Tokens/s and wall-clock: the fastest "
        "seed of the group (a run that shared the machine with other work is slower, never faster). Peak memory: "
        f"CUDA allocator peak on GPU, peak RSS on CPU. Hardware: {_hardware()}.",
        "",
    ]


def _fair_test_section(moe: list[Run], twin: list[Run]) -> list[str]:
    """MoE vs its dense twin on the same tokens: final validation losses and the throughput ratio."""
    m = statistics.mean(r.final_val for r in moe)
    d = statistics.mean(r.final_val for r in twin)
    speed = max(r.tokens_per_s for r in moe) / max(r.tokens_per_s for r in twin)
    return [
        "## The fair test: MoE vs dense at equal active FLOPs",
        "",
        f"On the same tokens, the MoE ends at validation loss {m:.3f} and its dense twin at {d:.3f} "
        f"({'MoE better' if m < d else 'dense better'} by {abs(m - d):.3f} nats/token); "
        f"the MoE trains at {speed:.2f}× the twin's tokens/s.",
        "",
    ]


def _loop_check(ours: list[Run], litgpt: list[Run]) -> list[str]:
    """Our loop against litgpt's on the same model, tokens and seeds: the difference of the held-out losses."""
    pairs = {r.seed: r for r in litgpt}
    diffs = [
        r.held_out["loss"] - pairs[r.seed].held_out["loss"]
        for r in ours
        if r.seed in pairs and r.held_out and pairs[r.seed].held_out
    ]
    if not diffs:
        return []
    return [
        "## Our loop vs litgpt's (the same dense model, tokens and seeds)",
        "",
        f"Held-out loss of our dense twin minus litgpt's, per seed: {', '.join(f'{d:+.4f}' for d in diffs)} nats. "
        "Both start from the same weights (litgpt's initialisation, same seed) and read the same batches; without "
        "gradient accumulation the two curves agree to 2e-5 (a test pins it). With accumulation one deliberate "
        "difference remains: litgpt steps its learning-rate schedule per micro-batch, so its rate runs half an "
        "optimizer step ahead of ours; we step per optimizer step, so that the schedule does not depend on how the "
        "global batch is split.",
        "",
    ]


def _sweep_section(sweep: dict[int, list[Run]], plot: Path) -> list[str]:
    """MoE minus dense twin per model width, on the same tokens: does the MoE's advantage grow with scale?"""
    lines = [
        "## Width sweep: MoE vs dense twin as the model grows",
        "",
        "The same tokens and settings at each width (128 is the study above); held-out loss and bits/byte as in the "
        "table above, mean over the seeds run at that width. Δ = MoE − twin: negative means the MoE is better. "
        "MoE/twin tokens/s compares the fastest runs of one width; widths may have run with other thread counts or "
        "load (each width's own report, `...-w<width>/README.md`, has its hardware line).",
        "",
        "| width | seeds | active params | MoE held-out | twin held-out | Δ loss | Δ bits/byte | MoE/twin tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for width in sorted(sweep):
        moe = [r for r in sweep[width] if r.group == "moe-gutenberg" and r.held_out]
        twin = [r for r in sweep[width] if r.group == "dense-twin-gutenberg" and r.held_out]
        if not moe or not twin:
            continue
        loss = [statistics.mean(r.held_out[k] for r in rs) for rs in (moe, twin) for k in ("loss", "bits_per_byte")]
        speed = max(r.tokens_per_s for r in moe) / max(r.tokens_per_s for r in twin)
        points.append((moe[0].active, loss[0] - loss[2]))
        lines.append(
            f"| {width} | {len(moe)} | {moe[0].active / 1e6:.2f}M | {loss[0]:.4f} | {loss[2]:.4f} "
            f"| {loss[0] - loss[2]:+.4f} | {loss[1] - loss[3]:+.4f} | {speed:.2f}× |"
        )
    if len(points) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="active parameters (no embeddings)", ylabel="held-out loss: MoE − twin (nats)")
        ax.set_title("MoE vs dense twin across widths (below 0: MoE better)")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        first, last = points[0][1], points[-1][1]
        better = "MoE" if last < 0 else "dense twin"
        moves = "grows" if last < first else "shrinks"
        lines += [
            "",
            f"![width sweep]({plot.name})",
            "",
            f"Δ moves from {first:+.4f} at the smallest width to "
            f"{last:+.4f} at the largest: the MoE's standing against its twin {moves} with width, and at the "
            f"largest width the {better} is ahead.",
            "",
        ]
    return lines + [""]


def _mean_spread(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    threads = torch.get_num_threads()
    return f"CPU {model.group(1).strip() if model else 'unknown'}, {threads} thread{'s' if threads > 1 else ''}"


def _loss_plot(runs: list[Run], x: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        style = "-" if r.seed == runs[0].seed else "--"
        train = [t for t in r.train if x in t]
        ax.plot([t[x] for t in train], [t["loss"] for t in train], style, color=COLORS[r.group], alpha=0.25, lw=1)
        val = [v for v in r.val if x in v]
        ax.plot(
            [v[x] for v in val],
            [v["val_loss"] for v in val],
            style,
            marker="o",
            ms=3,
            color=COLORS[r.group],
            label=f"{r.group} seed {r.seed}",
        )
    ax.set(xlabel=label, ylabel="cross-entropy (nats/token)", title=f"validation loss (faint: train) vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _throughput_plot(runs: list[Run], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r.name.replace("-gutenberg", "").replace("-redpajama", "") for r in runs]
    colors = [COLORS[r.group] for r in runs]
    a.barh(names, [r.tokens_per_s for r in runs], color=colors)
    a.set(xlabel="training tokens/s (median over log windows)", title="throughput")
    b.barh(names, [r.peak_memory_gb for r in runs], color=colors)
    b.set(xlabel="GB", title="peak memory")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
