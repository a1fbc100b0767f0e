"""Scale-out of MoE pretraining: FSDP alone vs FSDP + expert parallelism, step time, memory, all-to-all share.

For each micro-batch size, two set-ups of the pretraining recipe's FSDP2 path (`fully_shard_blocks` of
`recipes/pretrain_moe.py`: one FSDP unit per block over all ranks): `fsdp` (the experts sharded by FSDP like every
other weight) and `fsdp_ep<N>` (the experts split over N ranks by `models.expert_parallel`, tokens sent to them
with `all_to_all_single`, left out of FSDP). Each builds a fresh model and times full training steps: forward, the
LM loss plus the MoE balance and z losses, backward, gradient clipping (`finish_gradients` with the experts split),
AdamW. bf16 (autocast and FSDP's `param_dtype`) on CUDA, fp32 on CPU (gloo).

The all-to-all time is measured by wrapping `torch.distributed.all_to_all_single` in this process (expert-parallel
layers are its only callers: the token counts, the dispatch and the combine, forward and backward). On CUDA two
events on the compute stream bracket each call, so it adds no synchronisation: what it counts is the time the step
waits for the exchange, waiting for slower ranks included; on CPU gloo's calls block, timed by the host clock.

    torchrun --standalone --nproc_per_node 8 benchmarks/scale_out.py                   # phi-2-moe, bf16, seq 2048
    torchrun --standalone --nproc_per_node 2 benchmarks/scale_out.py --n_layer 16      # the same at half depth
    torchrun --standalone --nproc_per_node 2 benchmarks/scale_out.py --model_name phi-2-moe-tiny --device cpu
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from litgpt.utils import chunked_cross_entropy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from litgpt_mm.analysis import bench as common
from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.models.expert_parallel import finish_gradients
from litgpt_mm.pretrain import fully_shard_blocks


class AllToAllTimer:
    """Seconds spent in `torch.distributed.all_to_all_single` while `active`, summed until `take()`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.active = device, False
        self.seconds, self.events = 0.0, []
        self.original = dist.all_to_all_single

    def __enter__(self) -> AllToAllTimer:
        dist.all_to_all_single = self.timed
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self.original

    def timed(self, *args, **kwargs):
        if not self.active:
            return self.original(*args, **kwargs)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work = self.original(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return work
        start_s = time.perf_counter()
        work = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - start_s
        return work

    def take(self) -> float:
        """The seconds counted since the last `take` (after a device synchronisation on CUDA)."""
        seconds = self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        self.seconds, self.events = 0.0, []
        return seconds


def init_distributed(device_name: str) -> torch.device:
    """The process group of `torchrun` (or a world of one without it) and this rank's device."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    if device_name == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def build(config: Config, mesh, expert_parallel: int, device: torch.device) -> GPT:
    """The model sharded as the recipe's FSDP2 path shards it; every rank draws the same weights (seed 0)."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    # as in the recipe: CUDA initialises the shards after sharding a meta-device model, CPU processes (where DTensor's
    # random init would repeat one shard's values) the whole model before sharding it
    with torch.device("meta" if cuda else "cpu"):
        model = GPT(config)
    fully_shard_blocks(model, mesh, expert_parallel, torch.bfloat16 if cuda else None)
    if cuda:
        model.to_empty(device=device)
        for module in model.modules():
            if callable(reset := getattr(module, "reset_parameters", None)):
                reset()
    return model


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with FSDP's DTensor shards and the plain (expert-parallel) weights in separate groups: the foreach
    kernels that CUDA picks by default refuse a mix of the two."""
    params = list(model.parameters())
    groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return torch.optim.AdamW([{"params": g} for g in groups if g], lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95))


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch: torch.Tensor, ep: bool, max_norm: float) -> None:
    """One optimizer step of the recipe: forward (autocast on CUDA), LM + MoE losses, backward, clipping, AdamW."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.device.type == "cuda"):
        logits = model(batch[:, :-1])
    loss = chunked_cross_entropy(logits, batch[:, 1:]) + model.moe_aux_objective()
    loss.backward()
    if ep:
        finish_gradients(model, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(
    config: Config,
    mesh,
    expert_parallel: int,
    micro_batch: int,
    seq_len: int,
    device: torch.device,
    timer: AllToAllTimer,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Median step time (slowest rank), all-to-all seconds per step (mean over ranks) and peak memory (most loaded
    rank) of one configuration."""
    cuda = device.type == "cuda"
    model = build(config, mesh, expert_parallel, device)
    model.max_seq_length = seq_len
    optimizer = adamw(model)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(dist.get_rank())
    batch = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), generator=generator).to(device)
    step = partial(train_step, model, optimizer, batch, expert_parallel > 1, args.max_norm)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    timer.active = True
    times, a2a = [], []
    for _ in range(args.steps):
        dist.barrier()
        common.sync(device)
        start = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - start)
        a2a.append(timer.take())
    timer.active = False
    stats = torch.tensor([*times, *a2a, held], dtype=torch.float64, device=device)
    slowest, mean = stats.clone(), stats.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    n = args.steps
    result = {
        "step_s": statistics.median(slowest[:n].tolist()),
        "a2a_s": statistics.median(mean[n : 2 * n].tolist()),
        "params_per_rank": slowest[-1].item(),
        "params": mean[-1].item() * dist.get_world_size(),
    }
    if cuda:
        peak = torch.tensor(
            [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)], device=device
        )
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result["peak_GiB"], result["reserved_GiB"] = (peak / 2**30).tolist()
    del model, optimizer, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (NCCL, bf16; the default when a GPU is visible) or cpu (gloo)")
    p.add_argument("--model_name", default="phi-2-moe")
    p.add_argument("--n_layer", type=int, default=None, help="depth instead of the preset's (so that it fits)")
    p.add_argument("--seq_len", type=int, default=None, help="default 2048 on CUDA, 64 on CPU")
    p.add_argument("--micro_batches", default="1,4", help="comma-separated micro-batch sizes per rank")
    p.add_argument("--expert_parallel", type=int, default=None, help="default: gcd(world size, n_expert)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--max_norm", type=float, default=1.0)
    p.add_argument("--results_dir", default=None, help="where scale_out_<device>.json/.md go (default results/)")
    return p.parse_args()


def model_config(args: argparse.Namespace, cuda: bool) -> tuple[Config, int]:
    """The preset (at `--n_layer` depth if given) and the sequence length, checked against its block size."""
    seq_len = args.seq_len or (2048 if cuda else 64)
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    config = Config.from_name(args.model_name, **overrides)
    if seq_len > config.block_size:
        raise ValueError(f"--seq_len {seq_len} exceeds {config.name}'s block_size {config.block_size}")
    return config, seq_len


def time_variants(
    config: Config,
    mesh,
    variants: dict[str, int],
    micro_batches: list[int],
    seq_len: int,
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[list[dict], float]:
    """One row per micro-batch and variant (`fsdp` first, the one the others are compared with), each timed by `run`
    in that order; and the model's parameter count."""
    cuda, rank = device.type == "cuda", dist.get_rank()
    rows = []
    with AllToAllTimer(device) as timer:
        for micro_batch in micro_batches:
            results = {}
            for name, size in variants.items():
                results[name] = r = run(config, mesh, size, micro_batch, seq_len, device, timer, args)
                row = {
                    "variant": name,
                    "micro_batch": micro_batch,
                    "ms_per_step": r["step_s"] * 1e3,
                    "tokens_per_s_per_gpu": micro_batch * seq_len / r["step_s"],
                    "x_vs_fsdp": results["fsdp"]["step_s"] / r["step_s"],
                    "a2a_ms": r["a2a_s"] * 1e3,
                    "a2a_share": r["a2a_s"] / r["step_s"],
                    "params_per_rank_M": r["params_per_rank"] / 1e6,
                }
                if cuda:
                    row.update(peak_GiB=r["peak_GiB"], reserved_GiB=r["reserved_GiB"])
                rows.append(row)
                if rank == 0:
                    print(f"{name} micro-batch {micro_batch}: {row['ms_per_step']:.1f} ms/step", flush=True)
    return rows, results["fsdp"]["params"]


def describe(
    config: Config,
    total: float,
    seq_len: int,
    micro_batches: list[int],
    ep: int,
    device: torch.device,
    args: argparse.Namespace,
) -> list[str]:
    """The notes under the table: the set-up, the two variants, the step, how each column is measured."""
    cuda, world = device.type == "cuda", dist.get_world_size()
    preset_layers = Config.from_name(args.model_name).n_layer
    size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU processes, gloo"
    clock = (
        "CUDA events on the compute stream (no added syncs; waits for other ranks included)"
        if cuda
        else "host clock around gloo's blocking calls"
    )
    notes = [
        f"world size {world} ({gpu}); {config.name} with {config.n_layer} layers (the preset has {preset_layers}), "
        f"{size} parameters, {config.n_expert} experts, top-{config.n_expert_per_token}; sequence {seq_len}, "
        f"micro-batches {micro_batches} per rank; {args.warmup} warm-up + {args.steps} timed steps each",
        f"fsdp: FSDP2 over all {world} ranks, one unit per block, experts sharded like the rest"
        + (f"; fsdp_ep{ep}: experts split over {ep} ranks (expert parallelism), the rest FSDP2" if ep > 1 else ""),
        f"step: forward, LM + balance + z losses, backward, clipping at max_norm {args.max_norm}, AdamW; "
        + ("bf16 autocast, FSDP param_dtype bf16, fp32 gradient reduction" if cuda else "fp32"),
        "ms_per_step: median over the timed steps of the slowest rank; a2a_ms: median per step of the time in "
        f"all_to_all_single (token counts, dispatch, combine, forward and backward), mean over ranks, {clock}; "
        "a2a_share = a2a_ms / ms_per_step; x_vs_fsdp: fsdp's ms_per_step / this one's at the same micro-batch",
    ]
    if cuda:
        notes.append("peak_GiB / reserved_GiB: torch.cuda.max_memory_allocated / _reserved, the highest rank")
    else:
        notes.append("peak memory: CUDA only")
    return notes


def main() -> None:
    args = parse_args()
    device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda, world = device.type == "cuda", dist.get_world_size()
    if cuda:
        torch.set_float32_matmul_precision("high")
    config, seq_len = model_config(args, cuda)
    ep = args.expert_parallel or math.gcd(world, config.n_expert)
    micro_batches = [int(b) for b in args.micro_batches.split(",")]
    mesh = init_device_mesh(device.type, (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    variants = {"fsdp": 1, **({f"fsdp_ep{ep}": ep} if ep > 1 else {})}
    rows, total = time_variants(config, mesh, variants, micro_batches, seq_len, device, args)
    if dist.get_rank() == 0:
        notes = describe(config, total, seq_len, micro_batches, ep, device, args)
        params = dict(
            world_size=world,
            model=config.name,
            n_layer=config.n_layer,
            seq_len=seq_len,
            micro_batches=micro_batches,
            expert_parallel=ep,
            warmup=args.warmup,
            steps=args.steps,
            dtype="bf16-mixed" if cuda else "fp32",
        )
        if args.results_dir:
            common.RESULTS = Path(args.results_dir)
        common.save("scale_out", device, rows, notes, params)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
