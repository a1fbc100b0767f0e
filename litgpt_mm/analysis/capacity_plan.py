"""Capacity plan of a pretraining run: parameters, FLOPs per token, memory per GPU, communication, time and cost.

    python scripts/capacity_plan.py --model_name phi-2-moe --gpus 8 --gpu h100 --tokens 3e9
    python scripts/capacity_plan.py --model_name phi-2-twin --gpus 16 --gpu h200 --tokens 3e10 --micro_batch 8
    python scripts/capacity_plan.py --model_name Llama-3.2-1B --gpus 8 --gpu a100 --tokens 1e10 \\
        --optimizer adamw8bit --activation_checkpointing true --out plan.json

`--model_name` takes our presets, any litgpt config name, a `model_config.yaml` or a checkpoint directory. The MFU
defaults to the one our GPU train-step benchmark measured (`benchmarks/results/train_step_*.json`); the plan says
which. See `litgpt_mm/capacity.py` for the formulas and their assumptions.
"""

from __future__ import annotations

import json
from pathlib import Path

from litgpt_mm.analysis import capacity
from litgpt_mm.config import Config


def load_config(model_name: str) -> Config:
    """A preset or litgpt name, a `model_config.yaml` file, or a checkpoint directory."""
    path = Path(model_name)
    if path.is_file():
        return Config.from_file(path)
    if path.is_dir():
        return Config.from_checkpoint(path)
    return Config.from_name(model_name)


def main(
    model_name: str = "phi-2-moe",
    tokens: float = 3e9,
    gpus: int = 8,
    gpu: str = "h100",
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    micro_batch: int = 4,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    fsdp_size: int | None = None,
    expert_parallel: int = 1,
    mfu: float | None = None,
    peak_tflops: float | None = None,
    gpu_memory_gb: float | None = None,
    link_gbps: float | None = None,
    internode_gbps: float = capacity.INTERNODE_GBPS,
    gpus_per_node: int = capacity.GPUS_PER_NODE,
    overhead_gb: float = 2.0,
    out: Path | None = None,
) -> capacity.Plan:
    """Print the capacity plan of a pretraining run as a Markdown table.

    Args:
        model_name: our preset (e.g. `phi-2-moe`), a litgpt name (e.g. `phi-2`), a `model_config.yaml` or a
            checkpoint directory.
        tokens: training tokens.
        gpus: GPUs in all.
        gpu: one of `h100`, `h100-pcie`, `h200`, `a100`, `a100-40gb`, `a10g`, `l4`, `v100`, `t4`, `rtx4090`,
            `rtx3090` (peak FLOP/s from Lightning's table, memory and NVLink rate from the datasheet).
        precision: `bf16-mixed`, `bf16-true`, `32-true`, `16-mixed` or `16-true`.
        optimizer: `adamw` or `adamw8bit` (bitsandbytes).
        micro_batch: sequences per GPU per step.
        seq_len: tokens per sequence (default: the model's block size).
        activation_checkpointing: checkpoint every block.
        fsdp_size: ranks sharding the dense state (default: all GPUs; 1 = DDP).
        expert_parallel: ranks splitting each MoE layer's experts (each holds its share whole, outside FSDP).
        mfu: model FLOPs utilisation (default: the one we measured on a GPU).
        peak_tflops: override the GPU's dense peak in the run's compute dtype.
        gpu_memory_gb: override the GPU's memory.
        link_gbps: override the intra-node link (Gbit/s per GPU and direction; NVLink 4 = 3600).
        internode_gbps: inter-node rate per GPU (Gbit/s; default one 400 Gb/s NIC per GPU).
        gpus_per_node: GPUs per node (collectives over more GPUs run at the inter-node rate).
        overhead_gb: memory per GPU outside tensors (CUDA context, workspaces, fragmentation).
        out: also write the plan as JSON here.
    """
    flags = dict(locals())  # first statement: the flags, all but two of them `capacity.plan`'s keyword arguments
    config = load_config(flags.pop("model_name"))
    out = flags.pop("out")
    plan = capacity.plan(config, **flags)
    print(capacity.format_plan(plan))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    return plan
