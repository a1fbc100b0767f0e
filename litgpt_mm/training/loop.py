"""The training loop every stage shares: accumulation, schedule, logs, atomic checkpoints and exact resume.

A stage (pretraining, alignment, instruction tuning) supplies a `loss_fn(batch) -> (loss, metrics)` and a
`save_fn(dir)` that writes its artefacts; `fit` does the rest:

* gradient accumulation over micro-batches (`no_backward_sync` between them), clipping, warmup + cosine LR;
* a progress bar, `train_log.csv` / `val_log.csv` / `expert_load.csv` and TensorBoard events under `out_dir/logs`;
* checkpoints `out_dir/step-XXXXXX/` written to a temporary directory and renamed into place, holding the stage's
  artefacts plus `training_state.pth` (optimizer, data position, counters, RNG), and `out_dir/final/` at the end;
  under a strategy that shards the model (FSDP) every rank writes only its shards instead: model, optimizer and
  training state go to `step-XXXXXX/sharded/` (`torch.distributed.checkpoint`, through Fabric), which a run on
  another number of ranks resumes and `scripts/consolidate_checkpoint.py` turns into litgpt's `lit_model.pth`;
* `resume="auto"` picks the newest complete checkpoint and continues the same run: same data order, same RNG, same
  optimizer state, so the loss curve continues as if never interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from litgpt.args import EvalArgs, TrainArgs
from litgpt.pretrain import get_lr
from tqdm import tqdm

from litgpt_mm.cli import command_started
from litgpt_mm.training.flops import compute_dtype, peak_flops, refresh_peak_flops, warn_if_slow_bf16

CHECKPOINT_PREFIX = "step-"

# The schedule of a phi-2-scale pretraining run (3B tokens, 1M-token batches), shared by the pretraining recipes.
PRETRAIN_TRAIN = TrainArgs(
    save_interval=1000,
    log_interval=10,
    global_batch_size=512,
    micro_batch_size=4,
    max_tokens=int(3e9),
    lr_warmup_steps=2000,
    max_seq_length=2048,
    max_norm=1.0,
    min_lr=4e-5,
)
PRETRAIN_EVAL = EvalArgs(interval=1000, max_iters=100, initial_validation=True)
STATE_FILE = "training_state.pth"
SHARDED_DIR = "sharded"  # a sharded checkpoint: model, optimizer and training state, one file per rank


@dataclass
class Stage:
    """What a stage plugs into `fit`.

    Attributes:
        loss_fn: micro-batch -> (loss to backpropagate, metrics of scalar tensors; `loss` is the logged main loss).
        save_fn: writes the stage's artefacts (e.g. `lit_model.pth`, config, tokenizer) into a directory.
        tokens_fn: micro-batch -> number of tokens it holds (throughput and MFU).
        flops_per_token: training FLOPs per token on active parameters, for MFU (None: not logged).
        on_eval: optional callback `(step) -> dict` for extra evaluation outputs (e.g. generated captions).
        finish_gradients: optional `(max_norm) -> None` called once per step after the last backward, instead of
            Fabric's gradient clipping: reduces the gradients the strategy does not (expert-parallel experts) and
            clips by the global norm (`max_norm` 0 or None: no clipping).
        unit: what `tokens_fn` counts, for the plots' axes (`images` for CLIP pretraining).
        loss_label: the plotted loss's axis label.
    """

    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    save_fn: Callable[[Path], None]
    tokens_fn: Callable[[Any], int]
    flops_per_token: float | None = None
    on_eval: Callable[[int], dict[str, Any]] | None = None
    finish_gradients: Callable[[float | None], Any] | None = None
    unit: str = "tokens"
    loss_label: str = "cross-entropy (nats/token)"


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint directory `fit` wrote (single-file or sharded)."""
    return (Path(path) / STATE_FILE).is_file() or (Path(path) / SHARDED_DIR).is_dir()


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest complete `step-*` checkpoint in `out_dir` (incomplete ones never get their final name)."""
    found = sorted(p for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*") if is_checkpoint(p))
    return found[-1] if found else None


def sharded_checkpoints(fabric: L.Fabric) -> bool:
    """Whether `fit` writes sharded checkpoints: under a strategy that shards the model (Fabric's FSDP with a sharded
    state dict, or FSDP2 through `ModelParallelStrategy`). Other runs write the single-file layout."""
    from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = fabric.strategy
    if isinstance(strategy, FSDPStrategy):
        return strategy._state_dict_type == "sharded"
    return isinstance(strategy, ModelParallelStrategy)


LAUNCHER_ENV = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "LSB_JOBID")


def check_launcher(num_nodes: int) -> None:
    """One line when several nodes are asked for but no launcher started this process (before any work)."""
    if num_nodes > 1 and not any(k in os.environ for k in LAUNCHER_ENV):
        raise ValueError(
            f"--num_nodes {num_nodes} needs a launcher on every node: start the same command with torchrun "
            "(--nnodes/--node_rank/--rdzv_endpoint) or srun (scripts/slurm/); see docs/scale_out.md"
        )


def ddp_fabric(devices: int, num_nodes: int, precision: str | None) -> L.Fabric:
    """Fabric for a stage whose trainable part is small (alignment, QLoRA, CLIP pretraining): one device, or DDP
    (NCCL on GPUs, gloo on CPU) over several. Precision defaults to `bf16-mixed` on CUDA and `32-true` on CPU, with a
    warning where a bf16 precision would be emulated."""
    cuda = torch.cuda.is_available()
    precision = precision or ("bf16-mixed" if cuda else "32-true")
    warn_if_slow_bf16("cuda" if cuda else "cpu", precision)
    from lightning.fabric.strategies import DDPStrategy

    several = devices * num_nodes > 1
    strategy = DDPStrategy(process_group_backend="nccl" if cuda else "gloo") if several else "auto"
    return L.Fabric(
        accelerator="cuda" if cuda else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
    )


def optimizer_spec(optimizer: str | dict) -> str | dict:
    """The `--optimizer` argument as litgpt's `instantiate_torch_optimizer` takes it.

    jsonargparse parses `--optimizer.init_args.lr 3e-3` given after a `--config` into a stray top-level `lr: "3e-3"`
    beside `init_args` (which litgpt would silently ignore), and drops `class_path` without one: the stray keys are
    folded into `init_args` as numbers, and a spec without a class is one clear error.
    """
    if isinstance(optimizer, str):
        return optimizer
    spec = dict(optimizer)
    class_path = spec.pop("class_path", None)
    init_args = dict(spec.pop("init_args", None) or {})
    for key, value in spec.items():
        if isinstance(value, str):
            value = yaml.safe_load(value)
            with contextlib.suppress(TypeError, ValueError):
                value = float(value) if isinstance(value, str) else value  # YAML 1.1 reads "3e-3" as a string
        init_args[key] = value
    if class_path is None:
        raise ValueError(
            f"--optimizer {optimizer}: no class_path. Name the class first, e.g. --optimizer.class_path "
            "torch.optim.AdamW --optimizer.init_args.lr 3e-3, or give the whole spec in a --config file"
        )
    return {"class_path": class_path, "init_args": init_args}


def resolve_resume(resume: bool | str | Path, out_dir: Path) -> Path | None:
    """`False` -> None; `True`/`"auto"` -> newest checkpoint in `out_dir` (None if there is none); a path -> it.

    A fresh run (`False`) refuses an `out_dir` that holds checkpoints rather than overwrite them.
    """
    if resume is False or resume is None:
        if (found := latest_checkpoint(out_dir)) is not None:
            raise FileExistsError(
                f"{out_dir} holds checkpoints of an earlier run ({found.name}): pass --resume auto to continue it, "
                "or choose another --out_dir"
            )
        return None
    if resume is True or resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"--resume {path}: no {STATE_FILE} or {SHARDED_DIR}/ there; pass a step-* directory or 'auto'"
        )
    return path


class CSVLog:
    """Append-only CSV with a fixed header. A fresh run (`truncate_after=None`) starts a new file; a resumed run
    keeps the rows up to the resumed step and drops the rest (they are about to be recomputed)."""

    def __init__(self, path: Path, truncate_after: int | None = None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if truncate_after is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
                self.fields = list(rows[0].keys()) if rows else None
            if self.fields:
                kept = [r for r in rows if int(r["step"]) <= truncate_after]
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(kept)

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        elif new := [k for k in row if k not in self.fields]:  # a column appears later: widen the header
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.fields += new
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)


class Logs:
    """CSV files and TensorBoard events under `out_dir/logs` (rank 0 only)."""

    def __init__(self, fabric: L.Fabric, out_dir: Path, resumed_step: int | None) -> None:
        self.enabled = fabric.global_rank == 0
        self.dir = Path(out_dir) / "logs"
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = {
            name: CSVLog(self.dir / f"{name}.csv", resumed_step) for name in ("train_log", "val_log", "expert_load")
        }
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, name: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv[name].write(row)
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step",) and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{name.split('_')[0]}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def save_checkpoint(fabric: L.Fabric, stage: Stage, state: dict, ckpt_dir: Path) -> None:
    """Write the stage's artefacts and the training state into `ckpt_dir` atomically (temp dir, then rename).

    Under a sharding strategy (`sharded_checkpoints`) the model goes with the training state into `SHARDED_DIR`, one
    file per rank; the stage's `save_fn` then writes only its other artefacts.
    """
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    if fabric.global_rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    fabric.barrier()
    if fabric.global_rank == 0:
        tmp.mkdir(parents=True)
    fabric.barrier()
    stage.save_fn(tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if sharded_checkpoints(fabric):
        fabric.save(tmp / SHARDED_DIR, {**state, "rng": rng, "world_size": fabric.world_size})
    else:
        training_state = {k: v for k, v in state.items() if k != "model"}
        fabric.save(tmp / STATE_FILE, {**training_state, "rng": rng, "world_size": fabric.world_size})
    fabric.barrier()
    if fabric.global_rank == 0:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        tmp.replace(ckpt_dir)
    fabric.barrier()


def load_training_state(fabric: L.Fabric, state: dict, ckpt_dir: Path) -> None:
    """Restore optimizer, data position, counters and RNG from a checkpoint (the model is loaded by the stage)."""
    state.setdefault("tokens", 0)
    state.setdefault("elapsed", 0.0)
    training_state = {k: v for k, v in state.items() if k != "model"}
    remainder = fabric.load(ckpt_dir / STATE_FILE, training_state)
    state.update({k: v for k, v in training_state.items()})
    _restore_rng_and_position(fabric, state, remainder or {})


def _restore_rng_and_position(fabric: L.Fabric, state: dict, remainder: dict) -> None:
    rng = remainder.get("rng")
    if rng:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    # on another number of ranks: the same samples were consumed (each rank reads a stride of one permutation), so
    # every rank continues at the same global position
    saved_world = remainder.get("world_size", fabric.world_size)
    loader = state.get("train_dataloader")
    if saved_world != fabric.world_size and hasattr(loader, "batches_served"):
        consumed = loader.batches_served * saved_world
        if consumed % fabric.world_size:
            raise ValueError(
                f"the checkpoint was written by {saved_world} ranks after {consumed} micro-batches, which "
                f"{fabric.world_size} ranks cannot split evenly: resume on a divisor of {consumed} ranks"
            )
        loader.batches_served = consumed // fabric.world_size


def load_sharded_checkpoint(fabric: L.Fabric, state: dict, ckpt_dir: Path) -> None:
    """Restore model, optimizer, data position, counters and RNG from `ckpt_dir/SHARDED_DIR`, on any number of
    ranks: a sharding strategy reshards it (`torch.distributed.checkpoint`), any other run loads it whole."""
    path = Path(ckpt_dir) / SHARDED_DIR
    loader = state["train_dataloader"]
    state.setdefault("tokens", 0)
    state.setdefault("elapsed", 0.0)
    if sharded_checkpoints(fabric):
        # Fabric's sharded load restores modules and optimizers in place and *replaces* the other entries
        request = {k: v for k, v in state.items() if k != "train_dataloader"}
        remainder = fabric.load(path, request)
        state.update({k: v for k, v in request.items() if k not in ("model", "optimizer")})
    else:
        remainder = consolidate_sharded(path)
        model, optimizer = state["model"], state["optimizer"]
        inner = getattr(model, "module", model)
        inner = getattr(inner, "_orig_mod", inner)
        inner.load_state_dict(remainder.pop("model"))
        optimizer = getattr(optimizer, "optimizer", optimizer)
        optimizer.load_state_dict(index_optimizer_state(remainder.pop("optimizer"), inner, optimizer))
        for key in [k for k in state if k not in ("model", "optimizer", "train_dataloader")]:
            if key in remainder:
                state[key] = remainder.pop(key)
    loader.load_state_dict(remainder.pop("train_dataloader"))
    _restore_rng_and_position(fabric, state, remainder)


def consolidate_sharded(path: Path) -> dict[str, Any]:
    """The whole content of a sharded checkpoint directory in one process (no process group): `model` (litgpt's
    state-dict keys), `optimizer` (keyed by parameter name), and the training state. Needs the whole model in CPU
    memory."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(path))


def index_optimizer_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A name-keyed optimizer state dict (`torch.distributed.checkpoint`'s) in `optimizer.load_state_dict`'s
    layout: parameters numbered in the order of `optimizer.param_groups`."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, groups = {}, []
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        ids = []
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            ids.append(index[names[id(p)]])
        groups.append({**saved, "params": ids})
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def _batches(loader) -> Iterator:
    while True:
        yield from loader


@torch.no_grad()
def validate(fabric: L.Fabric, stage: Stage, model: torch.nn.Module, val_loader, max_iters: int) -> float:
    """Mean main loss over up to `max_iters` validation batches (all ranks reduced)."""
    model.eval()
    losses = []
    for i, batch in enumerate(val_loader):
        if i >= max_iters:
            break
        _, metrics = stage.loss_fn(batch)
        losses.append(metrics["loss"].detach().float())
    model.train()
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    return fabric.all_reduce(mean.to(fabric.device), reduce_op="mean").item()


class Throughput:
    """Tokens per second over the steps since the last train log line, and MFU against the device's peak FLOP/s."""

    def __init__(self, fabric: L.Fabric, flops_per_token: float | None) -> None:
        self.fabric, self.flops_per_token = fabric, flops_per_token
        self.dtype = compute_dtype(getattr(fabric.strategy.precision, "precision", None))
        self.peak = peak_flops(fabric.device, self.dtype) if flops_per_token else None
        self.restart()

    def restart(self) -> None:
        """Open a new window of steps."""
        self.start, self.tokens = time.perf_counter(), 0

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def mfu(self, tokens_per_s: float) -> float:
        achieved = tokens_per_s * self.flops_per_token / self.fabric.world_size
        if achieved > self.peak:  # a CPU peak measured while the machine was busy: measure it again
            self.peak = refresh_peak_flops(self.fabric.device, self.dtype, at_least=achieved)
        return achieved / self.peak


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to `lr` times its `lr_scale`."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # in place: a device tensor keeps XLA's step graph fixed
        else:
            group["lr"] = value


def train_step(
    fabric: L.Fabric,
    stage: Stage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    accum: int,
    max_norm: float | None,
) -> tuple[dict[str, torch.Tensor], int]:
    """One optimizer step over `accum` micro-batches: backward passes, gradient finish or clipping, update.

    Returns the metrics averaged over the micro-batches (this rank's) and the tokens of the step (all ranks).
    """
    means: dict[str, torch.Tensor] = {}
    step_tokens = 0
    for micro in range(accum):
        batch = next(batches)
        with fabric.no_backward_sync(model, enabled=micro < accum - 1):
            loss, metrics = stage.loss_fn(batch)
            fabric.backward(loss / accum)
        for k, v in metrics.items():
            means[k] = means.get(k, 0.0) + v.detach().float() / accum
        step_tokens += stage.tokens_fn(batch)
    if stage.finish_gradients is not None:
        stage.finish_gradients(max_norm)
    elif max_norm:
        fabric.clip_gradients(model, optimizer, max_norm=max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if fabric.world_size > 1:  # ranks see sequences of different lengths: count them all
        total = torch.tensor(float(step_tokens), dtype=torch.float64, device=fabric.device)
        step_tokens = int(fabric.all_reduce(total, reduce_op="sum").item())
    return means, step_tokens


def log_train_step(
    fabric: L.Fabric,
    logs: Logs,
    model: torch.nn.Module,
    throughput: Throughput,
    state: dict,
    means: dict[str, torch.Tensor],
    lr: float,
) -> tuple[float, float]:
    """Write the step's metrics (averaged over the ranks), throughput, memory and MFU to `train_log`, and the experts'
    load. Returns the main loss and the tokens per second."""
    reduced = {k: fabric.all_reduce(v, reduce_op="mean").item() for k, v in means.items()}
    tps = throughput.tokens_per_s()
    row = {"step": state["step"], "tokens": state["tokens"], "lr": lr, **reduced, "tokens_per_s": tps}
    row.update(elapsed_s=state["elapsed"], peak_memory_gb=peak_memory_gb(fabric.device))
    if throughput.peak:
        row["mfu"] = throughput.mfu(tps)
    logs.log("train_log", row)
    _log_experts(logs, model, state["step"])
    return reduced["loss"], tps


def validate_and_log(
    fabric: L.Fabric, stage: Stage, logs: Logs, model: torch.nn.Module, val_loader, max_iters: int, row: dict
) -> float:
    """Validate, run the stage's `on_eval`, and write `row` (step, tokens, elapsed_s) with the results to `val_log`.
    Returns the validation loss."""
    val_loss = validate(fabric, stage, model, val_loader, max_iters)
    row = {**row, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    if stage.on_eval is not None:
        row.update(stage.on_eval(row["step"]))
    logs.log("val_log", row)
    return val_loss


def fit(
    fabric: L.Fabric,
    stage: Stage,
    state: dict,
    *,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    max_steps: int,
    learning_rate: float,
    val_loader=None,
    resumed_from: Path | None = None,
) -> dict[str, float]:
    """Run optimizer steps until `max_steps`. `state` holds `model`, `optimizer`, `train_dataloader`, `step`.

    Returns the final train and validation loss, and the set-up seconds before the first step (`command_started`).
    """
    model, optimizer, loader = state["model"], state["optimizer"], state["train_dataloader"]
    accum = train.gradient_accumulation_iters(fabric.world_size, 1)
    warmup = train.lr_warmup_steps or int((train.lr_warmup_fraction or 0.0) * max_steps)
    logs = Logs(fabric, out_dir, state["step"] if resumed_from else None)
    throughput = Throughput(fabric, stage.flops_per_token)
    start_step = state["step"]
    if fabric.device.type == "xla":  # a Python float LR is a graph constant on XLA: one recompile per new value
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=fabric.device)
            group["foreach"] = False
    val_loss = float("nan")
    if val_loader is not None and eval.initial_validation and start_step == 0:
        row = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
        val_loss = validate_and_log(fabric, stage, logs, model, val_loader, eval.max_iters, row)

    startup_s = time.time() - command_started()
    fabric.print(f"Set-up: {startup_s:.1f} s before the first step")
    batches = _batches(loader)
    progress = tqdm(
        total=max_steps, initial=start_step, desc="train", disable=fabric.global_rank != 0, dynamic_ncols=True
    )
    throughput.restart()
    session_start, elapsed_before = throughput.start, state.get("elapsed", 0.0)  # wall clock carries over a resume
    loss_value = float("nan")
    while state["step"] < max_steps:
        lr = get_lr(learning_rate, state["step"], warmup, max_steps, train.min_lr)
        set_learning_rate(optimizer, lr)
        means, step_tokens = train_step(fabric, stage, model, optimizer, batches, accum, train.max_norm)
        state["step"] += 1
        state["tokens"] = state.get("tokens", 0) + step_tokens
        throughput.tokens += step_tokens
        state["elapsed"] = elapsed_before + time.perf_counter() - session_start
        step = state["step"]

        if step % train.log_interval == 0 or step == max_steps:
            loss_value, tps = log_train_step(fabric, logs, model, throughput, state, means, lr)
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            throughput.restart()
        progress.update(1)

        last = step == max_steps
        if val_loader is not None and (step % eval.interval == 0 or last):
            row = {"step": step, "tokens": state["tokens"], "elapsed_s": state["elapsed"]}
            val_loss = validate_and_log(fabric, stage, logs, model, val_loader, eval.max_iters, row)
            fabric.print(f"step {step}: val loss {val_loss:.4f}")
        if (train.save_interval and step % train.save_interval == 0) or last:
            save_checkpoint(fabric, stage, state, Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:06d}")
    progress.close()
    logs.close()
    if fabric.global_rank == 0:
        final = write_final(stage, Path(out_dir), state["step"])
        fabric.print(f"Final train loss {loss_value:.4f}, val loss {val_loss:.4f}")
        fabric.print(f"Checkpoint: {final}  logs and plots: {Path(out_dir) / 'logs'}")
    fabric.barrier()
    return {"train_loss": loss_value, "val_loss": val_loss, "startup_s": startup_s}


def write_final(stage: Stage, out_dir: Path, step: int) -> Path:
    """Copy the last checkpoint's artefacts (not its training state) to `out_dir/final` and plot the run's logs."""
    final = out_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out_dir / f"{CHECKPOINT_PREFIX}{step:06d}", final, ignore=_only_artefacts)
    from litgpt_mm.training.plots import plot_run

    plot_run(out_dir, stage.unit, stage.loss_label)
    return final


def _only_artefacts(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == STATE_FILE]


def _log_experts(logs: Logs, model: torch.nn.Module, step: int) -> None:
    inner = getattr(model, "module", model)
    stats = inner.moe_stats() if hasattr(inner, "moe_stats") else []
    if not stats or not logs.enabled:
        return
    for layer, s in enumerate(stats):
        share = (s.tokens_per_expert / s.tokens_per_expert.sum().clamp_min(1)).tolist()
        row = {"step": step, "layer": layer, "cv": s.cv.item(), "entropy": s.entropy.item()}
        row.update({f"e{i}": v for i, v in enumerate(share)})
        logs.csv["expert_load"].write(row)
    logs.tb.add_scalar("moe/cv_mean", sum(s.cv.item() for s in stats) / len(stats), step)
    logs.tb.add_scalar("moe/entropy_mean", sum(s.entropy.item() for s in stats) / len(stats), step)
