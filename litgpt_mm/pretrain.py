"""Pretrain Phi-2 with a mixture of experts after the MLP, from scratch, on prepared token shards.

    python scripts/prepare_gutenberg.py
    python recipes/pretrain_moe.py --data gutenberg
    python recipes/pretrain_moe.py --config recipes/configs/pretrain_moe_tiny.yaml   # CPU, minutes

The checkpoints (`out_dir/step-*/`, `out_dir/final/`) use litgpt's layout plus the tokenizer, so
`litgpt_mm.model.load_model` and litgpt's tools read them. `--resume auto` continues the newest checkpoint exactly.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import find_multiple
from litgpt.pretrain import initialize_weights
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer, num_parameters

from litgpt_mm.analysis.preflight import check_fits
from litgpt_mm.config import Config
from litgpt_mm.data.tokens import StreamArgs, TokenShards, shard_tokenizer
from litgpt_mm.model import GPT, Block
from litgpt_mm.models.expert_parallel import (
    check_expert_parallel,
    ddp_ignore_experts,
    expert_parallel_mesh,
    expert_parameters,
    finish_gradients,
    shard_experts,
    shard_optimizer_state,
)
from litgpt_mm.models.moe import MoE
from litgpt_mm.training.checkpoint import load_tokenizer, save_config
from litgpt_mm.training.flops import active_params, training_flops_per_token, warn_if_slow_bf16
from litgpt_mm.training.loop import (
    PRETRAIN_EVAL,
    PRETRAIN_TRAIN,
    SHARDED_DIR,
    Stage,
    check_launcher,
    fit,
    load_sharded_checkpoint,
    load_training_state,
    optimizer_spec,
    resolve_resume,
    sharded_checkpoints,
)

DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 4e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
}


def setup(
    model_name: str = "phi-2-moe",
    model_config: Config | Path | None = None,
    data: Literal["gutenberg", "redpajama"] = "gutenberg",
    data_dir: str | None = None,
    stream: StreamArgs = StreamArgs(),
    out_dir: Path | None = None,
    precision: str | None = None,
    devices: int | str = "auto",
    num_nodes: int = 1,
    train: TrainArgs = PRETRAIN_TRAIN,
    eval: EvalArgs = PRETRAIN_EVAL,
    optimizer: str | dict = DEFAULT_OPTIMIZER,
    activation_checkpointing: bool = False,
    compile: bool = False,
    strategy: Literal["auto", "fsdp"] = "auto",
    expert_parallel: int = 1,
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    num_workers: int = 2,
    preflight: bool = True,
) -> dict[str, float]:
    """Pretrain a Phi-2 (+ MoE after the MLP) model from scratch.

    Args:
        model_name: a litgpt-mm preset (`phi-2-moe`, `phi-2-moe-tiny`, `phi-2-tiny`, ...) or any litgpt name.
        model_config: a full config (or a `model_config.yaml` path) instead of `model_name`.
        data: which prepared corpus to read; its directory is `data/prepared/<data>` unless `data_dir` is given.
        data_dir: folder, or `s3://`/`gs://` prefix streamed by litdata, with `train/`, `val/` and `tokenizer/`
            written by `scripts/prepare_<data>.py`.
        stream: the chunk cache (`--stream.cache_dir`, `--stream.max_cache_size`), object-storage options and the
            shuffle (`global` for local folders, chunk windows when streaming); see `StreamArgs`.
        out_dir: where checkpoints and logs go (default `out/pretrain/<model>-<data>`).
        precision: Fabric precision; default `bf16-mixed` on CUDA, `32-true` on CPU.
        devices: devices per node; several run FSDP (CUDA) or DDP over gloo (CPU).
        num_nodes: number of nodes.
        train: batch sizes, token budget, schedule (litgpt's `TrainArgs`).
        eval: validation interval and size (litgpt's `EvalArgs`).
        optimizer: a `torch.optim` name, a class path (`bitsandbytes.optim.AdamW8bit` for 8-bit Adam) or
            `{"class_path": ..., "init_args": {...}}`; its `lr` is the peak of the warmup + cosine schedule.
        activation_checkpointing: recompute each block in the backward pass.
        compile: `torch.compile` the model.
        strategy: `auto` (FSDP on several GPUs, DDP over gloo on several CPU processes, else one device) or `fsdp`
            (FSDP even on one GPU; on CPU processes, FSDP2 over gloo). FSDP runs write sharded checkpoints (one file
            per rank, resumable on another number of ranks; `scripts/consolidate_checkpoint.py` makes
            `lit_model.pth`); the others write litgpt's single file.
        expert_parallel: split the experts of each MoE layer over this many ranks (consecutive ranks form a group;
            it must divide `n_expert` and the world size). Dense parameters stay data-parallel over all ranks (DDP,
            or FSDP with `--strategy fsdp`); checkpoints keep the single-device layout of the experts, so a resume
            may change it. 1: off.
        resume: `auto` continues the newest checkpoint in `out_dir`, or pass a `step-*` directory.
        seed: initialisation and data-order seed.
        num_workers: DataLoader workers.
        preflight: check, before allocating, that the run fits the devices' memory (the capacity plan's estimate);
            `false` skips the check.
    """
    check_launcher(num_nodes)
    optimizer = optimizer_spec(optimizer)
    if isinstance(model_config, (str, Path)):
        model_config = Config.from_file(model_config)
    config = model_config or Config.from_name(model_name)
    data_dir = data_dir or f"data/prepared/{data}"
    out_dir = Path(out_dir or f"out/pretrain/{config.name}-{data}")
    config, tokenizer_dir, tokenizer = config_for_shards(config, data_dir, data, stream, train.max_seq_length)
    T = train.max_seq_length or config.block_size
    if (resume_dir := resolve_resume(resume, out_dir)) is not None:
        check_resume_config(resume_dir, config, tokenizer_dir)

    cuda = torch.cuda.is_available()
    precision = precision or ("bf16-mixed" if cuda else "32-true")
    warn_if_slow_bf16("cuda" if cuda else "cpu", precision)
    n_devices = (torch.cuda.device_count() if cuda else 1) if devices == "auto" else int(devices)
    check_expert_parallel(expert_parallel, config.n_expert, n_devices * num_nodes)
    check_fits(
        config,
        micro_batch_size=train.micro_batch_size,
        seq_len=T,
        devices=n_devices,
        num_nodes=num_nodes,
        accelerator="cuda" if cuda else "cpu",
        precision=precision,
        strategy=strategy,
        expert_parallel=expert_parallel,
        activation_checkpointing=activation_checkpointing,
        optimizer=optimizer,
        enabled=preflight,
    )
    strategy = parallel_strategy(
        strategy, n_devices, num_nodes, cuda, precision, expert_parallel, activation_checkpointing
    )
    fabric = L.Fabric(
        accelerator="cuda" if cuda else "cpu",
        devices=n_devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
    )
    return fabric.launch(
        main,
        config,
        data_dir,
        out_dir,
        tokenizer,
        train,
        eval,
        optimizer,
        activation_checkpointing,
        compile,
        resume,
        seed,
        num_workers,
        expert_parallel,
        stream,
    )


def config_for_shards(
    config: Config, data_dir: str | Path, data: str, stream: StreamArgs, max_seq_length: int | None
) -> tuple[Config, Path, Tokenizer]:
    """`config` with the vocabulary of the shards' tokenizer (padded to a multiple of 64), the tokenizer's directory
    and the tokenizer; one line when `max_seq_length` exceeds the block size."""
    tokenizer_dir = shard_tokenizer(data_dir, stream)
    tokenizer = load_tokenizer(tokenizer_dir, f"scripts/prepare_{data}.py")
    vocab = tokenizer.vocab_size
    T = max_seq_length or config.block_size
    if T > config.block_size:
        raise ValueError(f"--train.max_seq_length {T} exceeds {config.name}'s block_size {config.block_size}")
    return config.replace(vocab_size=vocab, padded_vocab_size=find_multiple(vocab, 64)), tokenizer_dir, tokenizer


def parallel_strategy(
    strategy: str,
    n_devices: int,
    num_nodes: int,
    cuda: bool,
    precision: str,
    expert_parallel: int,
    activation_checkpointing: bool,
) -> Any:
    """Fabric's strategy for `--strategy`, the device count and expert parallelism: FSDP2 (`ModelParallelStrategy`)
    on CPU processes or with the experts split, DDP for expert parallelism alone, FSDP on several GPUs, DDP over
    gloo on several CPU processes; `strategy` unchanged on one device."""
    if n_devices * num_nodes > 1 or strategy == "fsdp":
        if strategy == "fsdp" and (not cuda or expert_parallel > 1):  # FSDP2: on CPU processes, or with experts split
            world = n_devices * num_nodes
            half = torch.bfloat16 if cuda and precision.startswith("bf16") else None
            parallelize = partial(fully_shard_blocks, expert_parallel=expert_parallel, param_dtype=half)
            strategy = ModelParallelStrategy(parallelize, data_parallel_size=world, tensor_parallel_size=1)
        elif expert_parallel > 1:
            strategy = DDPStrategy(process_group_backend="nccl" if cuda else "gloo")
        elif cuda:
            strategy = FSDPStrategy(
                auto_wrap_policy={Block},
                activation_checkpointing_policy={Block} if activation_checkpointing else None,
                state_dict_type="sharded",
                sharding_strategy="HYBRID_SHARD" if num_nodes > 1 else "FULL_SHARD",
            )
        else:
            strategy = DDPStrategy(process_group_backend="gloo")
    return strategy


def fully_shard_blocks(
    model: torch.nn.Module, device_mesh, expert_parallel: int = 1, param_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """`ModelParallelStrategy`'s `parallelize_fn`: FSDP2 over all ranks, one unit per block. With expert parallelism
    the experts are first split over the `ep` dimension of a `dp × ep` mesh and left out of FSDP. `param_dtype`
    (bf16 for `bf16-mixed` on GPUs) is what the shards are gathered and computed in; gradients reduce in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    inner = getattr(model, "_orig_mod", model)
    mesh = device_mesh["data_parallel"]
    ignored = None
    if expert_parallel > 1:
        shard_experts(inner, expert_parallel_mesh(mesh.device_type, mesh.size(), expert_parallel))
        ignored = set(expert_parameters(inner))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in inner.transformer.h:
        fully_shard(block, mesh=mesh, ignored_params=ignored, mp_policy=policy)
    fully_shard(inner, mesh=mesh, ignored_params=ignored, mp_policy=policy)
    if mesh.device_type == "cpu":  # gloo sums where FSDP2 asks for ReduceOp.AVG: reduce with SUM and divide instead
        for module in inner.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def check_resume_config(resume_dir: Path, config: Config, tokenizer_dir: Path | None = None) -> None:
    """One line if `resume_dir` was written for another model than `config`, or with another tokenizer than the
    shards' `tokenizer_dir` (before any work)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        saved_tok, data_tok = resume_dir / name, (tokenizer_dir or resume_dir) / name
        if saved_tok.is_file() and data_tok.is_file() and saved_tok.read_bytes() != data_tok.read_bytes():
            raise ValueError(
                f"--resume {resume_dir} was trained on shards of another tokenizer than {tokenizer_dir} ({name} "
                "differs): resume with the data it was trained on, or start a fresh --out_dir"
            )
    saved_file = resume_dir / "model_config.yaml"
    if not saved_file.is_file():
        return
    saved, current = asdict(Config.from_file(saved_file)), asdict(config)
    ignored = ("name", "hf_config", "moe_impl")  # no bearing on the weights
    diff = [
        f"{k}: {saved.get(k)!r} there, {current[k]!r} here"
        for k in current
        if k not in ignored and saved.get(k) != current[k]
    ]
    if diff:
        raise ValueError(
            f"--resume {resume_dir} holds another model configuration ({'; '.join(diff[:3])}): resume with the "
            "configuration it was trained with, or start a fresh --out_dir"
        )


def main(
    fabric: L.Fabric,
    config: Config,
    data_dir: str | Path,
    out_dir: Path,
    tokenizer: Tokenizer,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_spec: str | dict,
    activation_checkpointing: bool,
    compile: bool,
    resume: bool | str | Path,
    seed: int,
    num_workers: int,
    expert_parallel: int = 1,
    stream: StreamArgs | None = None,
) -> dict[str, float]:
    """Build the token data, the model and the optimizer, then train with the shared `fit`."""
    resume_dir = resolve_resume(resume, out_dir)
    fabric.seed_everything(seed)
    T = train.max_seq_length or config.block_size
    stream = stream or StreamArgs()
    data = TokenShards.from_args(data_dir, seed, num_workers, stream)
    tokenizer_dir = shard_tokenizer(data_dir, stream)
    data.connect(tokenizer, batch_size=train.micro_batch_size, max_seq_length=T)
    data.set_rank(fabric.global_rank, fabric.world_size)
    data.prepare_data()

    model = init_model(fabric, config, T, activation_checkpointing)
    flops_per_token = training_flops_per_token(model, T)
    fabric.print(
        f"{config.name}: {num_parameters(model) / 1e6:.1f}M parameters, {active_params(model) / 1e6:.1f}M active "
        f"(embeddings excluded), {len(model.moe_layers)} MoE layers, vocab {config.vocab_size}"
    )
    model, optimizer = setup_model_and_optimizer(fabric, model, optimizer_spec, compile, expert_parallel)
    learning_rate = optimizer.param_groups[0]["lr"]
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    state = {"model": model, "optimizer": optimizer, "train_dataloader": train_loader, "step": 0, "tokens": 0}
    if resume_dir is not None:
        load_checkpoint(fabric, state, resume_dir)

    stage = pretrain_stage(fabric, config, model, optimizer, tokenizer_dir, flops_per_token, expert_parallel)
    tokens_per_step = train.global_batch_size * T
    max_steps = train.max_steps or max(1, (train.max_tokens or tokens_per_step) // tokens_per_step)
    return fit(
        fabric,
        stage,
        state,
        out_dir=out_dir,
        train=train,
        eval=eval,
        max_steps=max_steps,
        learning_rate=learning_rate,
        val_loader=val_loader,
        resumed_from=resume_dir,
    )


def init_model(fabric: L.Fabric, config: Config, max_seq_length: int, activation_checkpointing: bool) -> GPT:
    """The model with litgpt's pretraining initialisation (as `litgpt.pretrain`, so a seed gives litgpt's weights)."""
    # no default init (initialize_weights sets every parameter); FSDP2 on CPU processes: DTensor's random init of a
    # meta-device model repeats one shard's values on every rank, so every rank initialises the whole model (same
    # seed) and `fully_shard` splits it
    cpu_fsdp = isinstance(fabric.strategy, ModelParallelStrategy) and fabric.device.type == "cpu"
    with fabric.init_module(empty_init=not cpu_fsdp):
        model = GPT(config)
    for m in model.modules():
        if isinstance(m, MoE):
            std = math.sqrt(2.0 / 5 / config.n_embd)
            out_std = 1 / math.sqrt(config.n_embd) / config.n_layer
            m.reset_parameters = partial(m.reset_parameters, std=std, out_std=out_std)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.max_seq_length = max_seq_length
    model.activation_checkpointing = activation_checkpointing and not isinstance(fabric.strategy, FSDPStrategy)
    return model


def setup_model_and_optimizer(
    fabric: L.Fabric, model: GPT, optimizer_spec: str | dict, compile: bool, expert_parallel: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model under Fabric's strategy (experts split over `expert_parallel` ranks, compiled on request) and its
    optimizer."""
    ddp_experts = expert_parallel > 1 and not isinstance(fabric.strategy, ModelParallelStrategy)  # else FSDP2's
    if ddp_experts:  # every rank initialised all experts alike: keep this rank's share
        shard_experts(model, expert_parallel_mesh(fabric.device.type, fabric.world_size, expert_parallel))
    if compile:
        model = torch.compile(model)
    if ddp_experts:
        ddp_ignore_experts(model)
    model = fabric.setup(model)
    optimizer = instantiate_torch_optimizer(optimizer_spec, model.parameters())
    if expert_parallel > 1 and isinstance(fabric.strategy, ModelParallelStrategy):
        for group in optimizer.param_groups:  # FSDP2's DTensors beside plain expert weights: no batched kernels
            group.update({"foreach": False} if "foreach" in group else {})
            group.update({"fused": False} if group.get("fused") else {})
    if expert_parallel > 1:
        shard_optimizer_state(optimizer, model)
    return model, fabric.setup_optimizers(optimizer)


def load_checkpoint(fabric: L.Fabric, state: dict, resume_dir: Path) -> None:
    """Restore model and training state from a sharded or a single-file checkpoint."""
    if (resume_dir / SHARDED_DIR).is_dir():
        load_sharded_checkpoint(fabric, state, resume_dir)
    else:
        fabric.load(resume_dir / "lit_model.pth", {"model": state["model"]})
        load_training_state(fabric, state, resume_dir)
    fabric.print(f"Resumed from {resume_dir} at step {state['step']}")


def pretrain_stage(
    fabric: L.Fabric,
    config: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path,
    flops_per_token: float,
    expert_parallel: int,
) -> Stage:
    """Next-token loss plus the MoE auxiliary losses; checkpoints in litgpt's layout with the tokenizer; with expert
    parallelism, the experts' gradients reduced and clipped by `finish_gradients`."""
    inner = model.module if hasattr(model, "module") else model
    inner = getattr(inner, "_orig_mod", inner)

    def loss_fn(batch: torch.Tensor):
        batch = batch.to(fabric.device)
        logits = model(batch[:, :-1])
        lm = chunked_cross_entropy(logits, batch[:, 1:])
        aux, z = inner.moe_losses()
        total = lm + config.moe_aux_loss_coef * aux + config.moe_z_loss_coef * z
        return total, {"loss": lm, "aux_loss": aux, "z_loss": z}

    def save_fn(ckpt_dir: Path) -> None:
        if not sharded_checkpoints(fabric):  # else the weights go into `fit`'s sharded checkpoint
            fabric.save(ckpt_dir / "lit_model.pth", {"model": model})
        if fabric.global_rank == 0:
            save_config(config, ckpt_dir)
            for f in tokenizer_dir.iterdir():
                shutil.copy2(f, ckpt_dir / f.name)

    def finish_fn(max_norm: float | None) -> None:
        fabric.strategy.precision.unscale_gradients(getattr(optimizer, "optimizer", optimizer))
        finish_gradients(inner, max_norm)

    return Stage(
        loss_fn,
        save_fn,
        tokens_fn=lambda b: b[:, :-1].numel(),
        flops_per_token=flops_per_token,
        finish_gradients=finish_fn if expert_parallel > 1 else None,
    )
