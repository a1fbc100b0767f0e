"""Tables of reports/capacity-plan/README.md, computed with `analysis.capacity` (formulas only: no model is built,
nothing is trained; the whole script runs in a few seconds).

    OMP_NUM_THREADS=1 .venv/bin/python reports/capacity-plan/make_report.py            # print every table
    OMP_NUM_THREADS=1 .venv/bin/python reports/capacity-plan/make_report.py --update   # rewrite them in README.md

`--update` replaces the text between each `<!-- BEGIN name -->` and `<!-- END name -->` pair of the README and
leaves the prose around them alone.

Every number comes from `litgpt_mm.analysis.capacity.plan`, the function behind `scripts/capacity_plan.py`, with the
settings written in each table; the README gives one equivalent command line per kind of row. The only quantities
computed here rather than by `plan` are marked as such in the README: the FLOP upper bounds of the capstone's
10 GB-slice runs (`slice_bound`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

from litgpt_mm.analysis import capacity as C
from litgpt_mm.config import Config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

GUTENBERG = 3e9  # issue 19's estimate of all of Project Gutenberg after cleaning, Phi-2 tokenizer (not measured)
REDPAJAMA = 1e11  # the 100 B-token RedPajama run
SEQ = 2048  # Phi-2's block size
MB = 4  # micro-batch of the measured MFU (benchmarks/results/train_step_h100.json: batch 4 x 2048)
CLUSTERS = (8, 64, 512)
GPN = C.GPUS_PER_NODE
CHINCHILLA = 20  # tokens per parameter (Hoffmann et al. 2022, rule of thumb)
GB = 1e9


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def days_or_hours(days: float) -> str:
    return f"{days:,.2f} d" if days >= 1 else f"{days * 24:,.1f} h"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------------ model summary


def models_table(configs: dict[str, Config]) -> str:
    rows = []
    for name, cfg in configs.items():
        p = C.plan(cfg, REDPAJAMA, gpus=8, micro_batch=MB, seq_len=SEQ)
        total, active = CHINCHILLA * p.params.total, CHINCHILLA * p.params.active

        def share(tokens: float, moe: bool = bool(cfg.n_expert), active: float = active, total: float = total) -> str:
            if moe:
                return f"{tokens / active:.1%} (active) / {tokens / total:.1%} (total)"
            return f"{tokens / total:.1%}"

        need = f"{total / 1e9:.0f} B"
        if cfg.n_expert:
            need = f"{active / 1e9:.0f} B (active) / {need} (total)"
        rows.append(
            [
                f"`{name}`",
                f"{p.params.total / 1e9:.3f} B",
                f"{p.params.active / 1e9:.3f} B",
                f"{p.params.expert / 1e9:.3f} B" if cfg.n_expert else "-",
                f"{p.flops_per_token / 1e9:.2f}",
                f"{p.mfu:.3f}",
                need,
                share(GUTENBERG),
                share(REDPAJAMA),
            ]
        )
    header = [
        "model",
        "parameters",
        "active (no embedding)",
        "of which experts",
        "GFLOP / token (T = 2048)",
        "MFU used (H100)",
        f"{CHINCHILLA} tokens / parameter",
        "Gutenberg 3 B as a share of that",
        "RedPajama 100 B as a share of that",
    ]
    return table(header, rows)


# ------------------------------------------------------------------------------------------------ cluster table


def parallelisms(moe: bool, gpus: int) -> list[tuple[str, str, int, int]]:
    """(label, pretrain_moe.py flags, fsdp_size, expert_parallel) for `gpus` H100s, 8 per node."""
    nodes = gpus // GPN
    if gpus <= GPN:
        out = [(f"FSDP {gpus}", f"`--devices {gpus}`", gpus, 1)]
    else:
        out = [
            (f"FSDP {gpus} (all GPUs)", "none: the recipe shards within a node", gpus, 1),
            (f"HSDP: FSDP {GPN} x {nodes} replicas", f"`--num_nodes {nodes}` (HYBRID_SHARD)", GPN, 1),
        ]
    if moe:
        out += [
            (f"FSDP {gpus} + EP {GPN}", f"`--strategy fsdp --expert_parallel {GPN}`", gpus, GPN),
            (f"DDP + EP {GPN}", f"`--expert_parallel {GPN}`", 1, GPN),
        ]
    return out


def cluster_rows(name: str, cfg: Config) -> list[list[str]]:
    rows = []
    for gpus in CLUSTERS:
        for label, flags, fsdp, ep in parallelisms(bool(cfg.n_expert), gpus):
            p = C.plan(
                cfg, REDPAJAMA, gpus=gpus, gpu="h100", micro_batch=MB, seq_len=SEQ, fsdp_size=fsdp, expert_parallel=ep
            )
            c = p.communication
            per_token = p.step_s / p.tokens_per_step
            gut_days, rp_days = GUTENBERG * per_token / 86400, p.days
            rows.append(
                [
                    f"`{name}`",
                    str(gpus),
                    label,
                    flags,
                    f"{p.memory.peak / GB:.1f}",
                    "yes" if p.fits else "**no**",
                    f"{c.fsdp_bytes / GB:.1f} ({c.fsdp_s * 1e3:.0f})",
                    f"{c.all_to_all_bytes / GB:.1f} ({c.all_to_all_s * 1e3:.0f})" if ep > 1 else "-",
                    f"{p.step_s * 1e3:.0f}",
                    fmt(p.tokens_per_s),
                    f"{p.tokens_per_step / 1e6:.2f} M: "
                    f"{fmt(math.ceil(GUTENBERG / p.tokens_per_step))} / {fmt(p.steps)}",
                    f"{days_or_hours(gut_days)} / {fmt(gut_days * 24 * gpus)}",
                    f"{days_or_hours(rp_days)} / {fmt(p.gpu_hours)}",
                ]
            )
    return rows


def cluster_table(configs: dict[str, Config]) -> str:
    header = [
        "model",
        "H100s",
        "parallelism",
        "pretrain_moe.py flags",
        "peak memory / GPU (GB)",
        "fits 80 GB",
        "FSDP/DP traffic / step: GB (ms)",
        "expert all-to-all / step: GB (ms)",
        "step (ms)",
        "tokens/s",
        "tokens / step: steps for Gutenberg / RedPajama",
        "Gutenberg 3 B: wall clock / GPU-h",
        "RedPajama 100 B: wall clock / GPU-h",
    ]
    rows = []
    for name in ("phi-2-moe", "phi-2-twin"):
        rows += cluster_rows(name, configs[name])
    return table(header, rows)


def mfu_table(configs: dict[str, Config]) -> str:
    """RedPajama wall clock of the fastest fitting plan per (model, GPUs), at the measured MFU and at 0.40 / 0.30."""
    rows = []
    for name in ("phi-2-moe", "phi-2-twin"):
        cfg = configs[name]
        for gpus in CLUSTERS:
            best = None
            for label, _, fsdp, ep in parallelisms(bool(cfg.n_expert), gpus):
                p = C.plan(cfg, REDPAJAMA, gpus=gpus, micro_batch=MB, seq_len=SEQ, fsdp_size=fsdp, expert_parallel=ep)
                if p.fits and (best is None or p.step_s < best[1].step_s):
                    best = (label, p, fsdp, ep)
            label, p, fsdp, ep = best
            cells = [f"`{name}`", str(gpus), label, f"{days_or_hours(p.days)} (MFU {p.mfu:.3f})"]
            for mfu in (0.40, 0.30):
                q = C.plan(
                    cfg, REDPAJAMA, gpus=gpus, micro_batch=MB, seq_len=SEQ, fsdp_size=fsdp, expert_parallel=ep, mfu=mfu
                )
                cells.append(f"{days_or_hours(q.days)} / {fmt(q.gpu_hours)}")
            rows.append(cells)
    header = ["model", "H100s", "fastest fitting parallelism", "RedPajama 100 B at the measured MFU",
              "at MFU 0.40: wall clock / GPU-h", "at MFU 0.30: wall clock / GPU-h"]  # fmt: skip
    return table(header, rows)


# --------------------------------------------------------------------------------------------- one 80 GB GPU


def largest_micro_batch(cfg: Config, gpu: str = "h100", limit: int = 256, **kw) -> tuple[int, C.Plan]:
    """Largest micro-batch (1..limit) whose plan fits `gpu`; 0 and the micro-batch-1 plan when none does."""
    lo, hi = 0, limit
    first = C.plan(cfg, GUTENBERG, gpus=1, gpu=gpu, micro_batch=1, **kw)
    if not first.fits:
        return 0, first
    best = first
    lo = 1
    while lo < hi:  # memory grows with the micro-batch: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        p = C.plan(cfg, GUTENBERG, gpus=1, gpu=gpu, micro_batch=mid, **kw)
        if p.fits:
            lo, best = mid, p
        else:
            hi = mid - 1
    return lo, best


def single_gpu_table(configs: dict[str, Config]) -> str:
    rows = []
    for name in ("phi-2", "phi-2-twin", "phi-2-moe"):
        cfg = configs[name]
        for precision in ("bf16-mixed", "bf16-true"):
            for optimizer in ("adamw", "adamw8bit"):
                for ckpt in (False, True):
                    mb, p = largest_micro_batch(
                        cfg, precision=precision, optimizer=optimizer, activation_checkpointing=ckpt, seq_len=SEQ
                    )
                    m = p.memory
                    state = (m.weights + m.grads + m.optimizer) / GB
                    fits = str(mb) if mb else "**does not fit**"
                    per_token = p.step_s / p.tokens_per_step
                    rows.append(
                        [
                            f"`{name}`",
                            precision,
                            optimizer,
                            "on" if ckpt else "off",
                            fits,
                            f"{m.peak / GB:.1f}" + ("" if mb else " (at 1)"),
                            f"{state:.1f}",
                            fmt(p.tokens_per_s) if mb else "-",
                            days_or_hours(GUTENBERG * per_token / 86400) if mb else "-",
                            days_or_hours(REDPAJAMA * per_token / 86400) if mb else "-",
                        ]
                    )
    header = [
        "model",
        "precision",
        "optimizer",
        "checkpointing",
        "largest micro-batch (x 2048 tokens)",
        "peak memory (GB)",
        "weights + grads + optimizer (GB)",
        "tokens/s",
        "Gutenberg 3 B",
        "RedPajama 100 B",
    ]
    return table(header, rows)


def experts_table() -> str:
    """Largest phi-2-moe (more experts of the same width, top-2) that fits one H100 at micro-batch 1."""
    rows = []
    settings = [("bf16-mixed", "adamw8bit", True), ("bf16-true", "adamw8bit", True), ("bf16-true", "adamw", True)]
    for precision, optimizer, ckpt in settings:
        best = None
        for E in range(8, 257, 8):
            cfg = Config.from_name("phi-2-moe", n_expert=E)
            p = C.plan(
                cfg,
                GUTENBERG,
                gpus=1,
                micro_batch=1,
                seq_len=SEQ,
                precision=precision,
                optimizer=optimizer,
                activation_checkpointing=ckpt,
            )
            if not p.fits:
                break
            best = (E, p)
        if best is None:
            rows.append([precision, optimizer, "on" if ckpt else "off", "none", "-", "-", "-"])
            continue
        E, p = best
        rows.append(
            [
                precision,
                optimizer,
                "on" if ckpt else "off",
                str(E),
                f"{p.params.total / 1e9:.2f} B",
                f"{p.params.active / 1e9:.2f} B",
                f"{p.memory.peak / GB:.1f}",
            ]
        )
    header = [
        "precision",
        "optimizer",
        "checkpointing",
        "largest n_expert (multiple of 8)",
        "parameters",
        "active",
        "peak memory at micro-batch 1 (GB)",
    ]
    return table(header, rows)


# --------------------------------------------------------------------------------------------------- capstone


# A MIG 1g.10gb slice of an A100-80GB has 14 of the 108 SMs: 14/108 of the 312 TFLOP/s bf16 peak.
SLICE_PEAK = 312e12 * 14 / 108


def slice_bound(hours: float, cfg: Config, utilisation: float) -> float:
    """Most tokens a frozen (or 4-bit, LoRA-adapted) Phi-2 can process in `hours` on a 1g.10gb slice: forward (2 N)
    plus the backward to the inputs (2 N) per token, attention and CLIP ignored (short sequences)."""
    active = C.count_params(cfg).active
    return hours * 3600 * SLICE_PEAK * utilisation / (4 * active)


def from_scratch_rows(phi2: Config, need: float) -> list[list[str]]:
    """004: Phi-2 from scratch, 1 x A100-40GB, batch 1, gradient accumulation 4, 4000 iterations, autocast (fp16 by
    default), 8-bit Adam. The sequence length is not stated: Phi-2's 2048 is assumed. One row per reading of the
    iterations."""
    rows = []
    run = dict(gpus=1, gpu="a100-40gb", precision="16-mixed", optimizer="adamw8bit", micro_batch=1, seq_len=SEQ)
    for iters_are, tokens in (("optimizer steps", 4000 * 4 * 1 * SEQ), ("micro-batches", 4000 * 1 * SEQ)):
        p = C.plan(phi2, tokens, **run)
        q, r = C.plan(phi2, need, **run), C.plan(phi2, 1.4e12, **run)
        rows.append(
            [
                f"004: Phi-2 from scratch on a RedPajama cc+c4 subset; 4000 iterations read as {iters_are}",
                "1 x A100-40GB; fp16 autocast, 8-bit Adam, batch 1, accumulation 4; T = 2048 assumed",
                f"{tokens / 1e6:.1f} M",
                f"{tokens / need:.3%} of {need / 1e9:.1f} B; {tokens / 1.4e12:.4%} of Phi-2's 1.4 T",
                f"{p.memory.peak / GB:.1f} GB of 40: {'fits' if p.fits else 'does not fit'}",
                f"not stated / {p.days * 24:.1f} h",
                f"{q.days:,.0f} d ({need / 1e9:.1f} B); {r.days / 365:.1f} years (1.4 T)",
            ]
        )
    return rows


def microsoft_row(phi2: Config, need: float) -> list[str]:
    """Microsoft's Phi-2 (model card): 1.4 T training tokens, 96 x A100-80G, 14 days, DeepSpeed + FlashAttention."""
    p = C.plan(phi2, 1.4e12, gpus=96, gpu="a100", micro_batch=MB, seq_len=SEQ, fsdp_size=GPN)
    implied = p.mfu * p.days / 14
    return [
        "Microsoft's Phi-2 (reference, not a capstone)",
        "96 x A100-80GB; plan: bf16-mixed, HSDP 8, micro-batch 4",
        "1.4 T",
        f"{1.4e12 / need:.0f}x the 20-tokens/parameter mark",
        f"{p.memory.peak / GB:.1f} GB of 80",
        f"14 d / {p.days:.1f} d at MFU {p.mfu:.2f} (14 d implies MFU {implied:.2f})",
        "-",
    ]


def slice_rows(phi2: Config) -> list[list[str]]:
    """003's runs on a 10 GB slice of an A100, whose token counts are not stated: `slice_bound` at 100 % and 40 %."""
    rows = []
    for what, hours, steps, n_steps in (
        (
            "003: alignment (projector only; Phi-2, CLIP ViT-B/32 frozen), COCO",
            6.5,
            "2 epochs x 20,000 iterations",
            40_000,
        ),
        ("003: QLoRA instruction tuning, LLaVA-Instruct-150K", 18.0, "3 epochs x 100,000 steps", 300_000),
    ):
        hi, mid = slice_bound(hours, phi2, 1.0), slice_bound(hours, phi2, 0.40)
        rows.append(
            [
                what,
                f"A100 10 GB slice; {steps}; batch not stated",
                f"not stated; at most {hi / 1e6:.0f} M (100 % of a 1g.10gb slice's peak), {mid / 1e6:.0f} M at 40 %",
                "no token target (LLaVA-1.5 figures in the text)",
                "-",
                f"{hours:g} h ({hours * 3600 / n_steps:.2f} s / step) / -",
                "-",
            ]
        )
    return rows


def capstone_table(configs: dict[str, Config]) -> str:
    phi2 = configs["phi-2"]
    need = CHINCHILLA * C.count_params(phi2).total
    unstated = [
        "000/001: Phi-2 with MoE after the MLP from scratch on Gutenberg; litgpt Phi-2 on RedPajama",
        "not stated",
        "not stated",
        "-",
        "-",
        "not stated / -",
        "-",
    ]
    alignment_004 = [
        "004: alignment (linear projector; TinyCLIP, Phi-2 frozen), COCO 2017",
        "1 x A100-40GB; batch 2, 11K steps",
        "not stated (22,000 image-caption pairs)",
        f"{22_000 / 558_000:.1%} of LLaVA-1.5's 558K alignment pairs",
        "-",
        "not stated / -",
        "-",
    ]
    rows = [*from_scratch_rows(phi2, need), microsoft_row(phi2, need), unstated, *slice_rows(phi2), alignment_004]
    header = [
        "run (capstone document)",
        "hardware and settings",
        "tokens processed",
        "against what the model needs",
        "plan: peak memory / GPU",
        "time: stated / plan",
        "plan: same GPU to 20 tokens/param, and to 1.4 T",
    ]
    return table(header, rows)


def leanest_table(configs: dict[str, Config]) -> str:
    """The least memory full training of phi-2 and phi-2-moe needs (micro-batch 1), against 40 GB and 10 GB."""
    rows = []
    for name in ("phi-2", "phi-2-moe"):
        for precision, optimizer, ckpt in (
            ("16-mixed", "adamw8bit", False),
            ("bf16-mixed", "adamw8bit", True),
            ("bf16-true", "adamw8bit", True),
        ):
            p = C.plan(
                configs[name],
                GUTENBERG,
                gpus=1,
                gpu="a100-40gb",
                micro_batch=1,
                seq_len=SEQ,
                precision=precision,
                optimizer=optimizer,
                activation_checkpointing=ckpt,
            )
            rows.append(
                [
                    f"`{name}`",
                    precision,
                    optimizer,
                    "on" if ckpt else "off",
                    f"{p.memory.peak / GB:.1f}",
                    "yes" if p.memory.peak <= 40 * GB else "no",
                    "yes" if p.memory.peak <= 10 * GB else "no",
                ]
            )
    header = [
        "model",
        "precision",
        "optimizer",
        "checkpointing",
        "peak, micro-batch 1 x 2048 (GB)",
        "fits 40 GB",
        "fits 10 GB",
    ]
    return table(header, rows)


def ddp_ep_line(configs: dict[str, Config]) -> str:
    """Largest micro-batch of DDP + EP 8 (`--expert_parallel 8` without `--strategy fsdp`) on 8 H100s."""
    cfg, out = configs["phi-2-moe"], []
    for ckpt in (False, True):
        mb = 0
        while C.plan(
            cfg,
            REDPAJAMA,
            gpus=8,
            micro_batch=mb + 1,
            seq_len=SEQ,
            fsdp_size=1,
            expert_parallel=GPN,
            activation_checkpointing=ckpt,
        ).fits:
            mb += 1
        out.append(f"checkpointing {'on' if ckpt else 'off'}: largest micro-batch {mb}")
    p = C.plan(cfg, REDPAJAMA, gpus=8, micro_batch=1, seq_len=SEQ, fsdp_size=1, expert_parallel=GPN)
    state = (p.memory.weights + p.memory.grads + p.memory.optimizer) / GB
    head = f"DDP + EP 8 on 8 H100s (bf16-mixed, AdamW): {state:.1f} GB of weights, gradients and AdamW state per GPU"
    return head + "; " + "; ".join(out) + "."


# ------------------------------------------------------------------------------------------------------ main


def build() -> dict[str, str]:
    configs = {n: Config.from_name(n) for n in ("phi-2", "phi-2-twin", "phi-2-moe")}
    moe_source = C.measured_mfu(configs["phi-2-moe"], "h100")[1]
    dense_source = C.measured_mfu(configs["phi-2-twin"], "h100")[1]
    peak = C.gpu_peak_flops("h100", "bf16-mixed")
    sources = "\n".join(
        [
            f"- `phi-2-moe`: {moe_source}",
            f"- `phi-2-twin` and `phi-2`: {dense_source}",
            f"- peak: {peak[0] / 1e12:.1f} TFLOP/s per H100 from {peak[1]}",
        ]
    )
    return {
        "mfu-sources": sources,
        "models": models_table(configs),
        "cluster": cluster_table(configs),
        "mfu": mfu_table(configs),
        "single-gpu": single_gpu_table(configs),
        "experts": experts_table(),
        "capstone": capstone_table(configs),
        "leanest": leanest_table(configs),
        "ddp-ep": ddp_ep_line(configs),
    }


def update(readme: Path, blocks: dict[str, str]) -> None:
    text = readme.read_text(encoding="utf-8")
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{readme}: no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the tables in README.md instead of printing")
    args = parser.parse_args()
    start = time.perf_counter()
    blocks = build()
    if args.update:
        update(HERE / "README.md", blocks)
        print(f"updated {HERE / 'README.md'} in {time.perf_counter() - start:.1f} s")
    else:
        for name, body in blocks.items():
            print(f"<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\n")
        print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
