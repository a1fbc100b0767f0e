"""Pretraining-stage benchmarks, each measured side by side in one run.

(Corpus preparation throughput is `benchmarks/prepare.py`.)

1. Training tokens/s of the tiny MoE (`phi-2-moe-tiny`) against its dense twin with equal active FLOPs
   (`phi-2-tiny-twin`): full optimizer steps (forward, loss incl. MoE losses, backward, AdamW), fp32 on CPU.
   Target >= 0.85x.
2. The recipe itself (`recipes/pretrain_moe.py`, the tiny config's 150 steps, in a fresh process): set-up (process
   start to the first step: imports, data, model, peak FLOP/s) against the whole run. Target: set-up <= 10 %.

    python benchmarks/pretrain.py                   # CPU
    python benchmarks/pretrain.py --device cuda     # same, on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from litgpt_mm.analysis.bench import save, timeit_interleaved
from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.training.flops import active_params

ROOT = Path(__file__).resolve().parents[1]


def recipe_run(device: torch.device) -> dict:
    """Wall clock of the tiny pretraining recipe in a new process, and its own set-up time (printed by `fit`)."""
    import re
    import subprocess

    # `import lightning` alone as the recipes import it: without torch_xla through accelerate (litgpt_mm's default)
    env = {**os.environ, "USE_TORCH_XLA": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gutenberg"
        prep = [sys.executable, "scripts/prepare_gutenberg.py", "--vocab_size", "4096", "--out_dir", str(data)]
        subprocess.run(prep, cwd=ROOT, check=True, capture_output=True)
        cmd = [sys.executable, "recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml",
               "--data_dir", str(data), "--out_dir", str(Path(tmp) / "run")]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        total = time.perf_counter() - start
    setup = float(re.search(r"Set-up: ([\d.]+) s", proc.stdout).group(1))
    # what any Lightning program pays before its first line: torch, then torchmetrics and what it imports
    timed = "import time; t = time.perf_counter(); import lightning; print(time.perf_counter() - t)"
    lightning_s = float(subprocess.run([sys.executable, "-c", timed], check=True, env=env, capture_output=True).stdout)
    return {"total_s": total, "setup_s": setup, "share": setup / total, "lightning_s": lightning_s}


def train_step_fn(name: str, device: torch.device, batch: int, seq: int):
    torch.manual_seed(0)
    config = Config.from_name(name, block_size=seq)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        aux, z = model.moe_losses()
        (loss + config.moe_aux_loss_coef * aux + config.moe_z_loss_coef * z).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)

    run = recipe_run(device) if device.type == "cpu" else None
    fns, models = {}, {}
    for name in ("phi-2-moe-tiny", "phi-2-tiny-twin"):
        fns[name], models[name] = train_step_fn(name, device, args.batch, args.seq_len)
    times = timeit_interleaved(fns, device, warmup=3, iters=args.iters)
    tokens = args.batch * args.seq_len
    moe_tps, dense_tps = tokens / times["phi-2-moe-tiny"], tokens / times["phi-2-tiny-twin"]
    rows = [
        {"what": "train: phi-2-moe-tiny", "value": moe_tps, "unit": "tokens/s"},
        {"what": "train: phi-2-tiny-twin (dense, equal active FLOPs)", "value": dense_tps, "unit": "tokens/s"},
        {"what": "MoE / dense twin tokens/s (target >= 0.85)", "value": moe_tps / dense_tps, "unit": "x"},
    ]
    if run:
        rows += [
            {"what": "recipe: set-up before the first step", "value": run["setup_s"], "unit": "s"},
            {"what": "recipe: whole 150-step tiny run (fresh process)", "value": run["total_s"], "unit": "s"},
            {"what": "recipe: set-up share of the run (target <= 0.10)", "value": run["share"], "unit": "x"},
            {"what": "of the set-up: `import lightning` alone", "value": run["lightning_s"], "unit": "s"},
        ]
    active = {n: active_params(m) for n, m in models.items()}
    notes = [
        f"active params (no embeddings): moe {active['phi-2-moe-tiny']:,}, twin {active['phi-2-tiny-twin']:,}",
        f"train: batch {args.batch} x seq {args.seq_len}, median of {args.iters} interleaved steps, "
        + ("bf16 autocast" if device.type == "cuda" else "fp32"),
    ]
    save("pretrain", device, rows, notes, vars(args))


if __name__ == "__main__":
    main()
