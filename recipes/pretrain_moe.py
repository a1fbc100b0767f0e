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
import sys
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import find_multiple
from litgpt.pretrain import initialize_weights
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer, num_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_mm.checkpoint import load_tokenizer, save_config  # noqa: E402
from litgpt_mm.cli import run_cli  # noqa: E402
from litgpt_mm.config import Config  # noqa: E402
from litgpt_mm.data.tokens import TokenShards  # noqa: E402
from litgpt_mm.flops import active_params, training_flops_per_token, warn_if_slow_bf16  # noqa: E402
from litgpt_mm.model import GPT, Block  # noqa: E402
from litgpt_mm.moe import MoE  # noqa: E402
from litgpt_mm.training import (  # noqa: E402
    PRETRAIN_EVAL,
    PRETRAIN_TRAIN,
    Stage,
    fit,
    load_training_state,
    resolve_resume,
)

DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"lr": 4e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
}


def setup(
    model_name: str = "phi-2-moe",
    model_config: Config | Path | None = None,
    data: Literal["gutenberg", "redpajama"] = "gutenberg",
    data_dir: Path | None = None,
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
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    num_workers: int = 2,
) -> dict[str, float]:
    """Pretrain a Phi-2 (+ MoE after the MLP) model from scratch.

    Args:
        model_name: a litgpt-mm preset (`phi-2-moe`, `phi-2-moe-tiny`, `phi-2-tiny`, ...) or any litgpt name.
        model_config: a full config (or a `model_config.yaml` path) instead of `model_name`.
        data: which prepared corpus to read; its directory is `data/prepared/<data>` unless `data_dir` is given.
        data_dir: directory with `train/`, `val/` and `tokenizer/` written by `scripts/prepare_<data>.py`.
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
            (FSDP even on one GPU).
        resume: `auto` continues the newest checkpoint in `out_dir`, or pass a `step-*` directory.
        seed: initialisation and data-order seed.
        num_workers: DataLoader workers.
    """
    if isinstance(model_config, (str, Path)):
        model_config = Config.from_file(model_config)
    config = model_config or Config.from_name(model_name)
    data_dir = Path(data_dir or f"data/prepared/{data}")
    out_dir = Path(out_dir or f"out/pretrain/{config.name}-{data}")
    tokenizer = load_tokenizer(data_dir / "tokenizer", f"scripts/prepare_{data}.py")
    vocab = tokenizer.vocab_size
    T = train.max_seq_length or config.block_size
    if T > config.block_size:
        raise ValueError(f"--train.max_seq_length {T} exceeds {config.name}'s block_size {config.block_size}")
    config = config.replace(vocab_size=vocab, padded_vocab_size=find_multiple(vocab, 64))

    cuda = torch.cuda.is_available()
    precision = precision or ("bf16-mixed" if cuda else "32-true")
    warn_if_slow_bf16("cuda" if cuda else "cpu", precision)
    n_devices = (torch.cuda.device_count() if cuda else 1) if devices == "auto" else int(devices)
    if strategy == "fsdp" and not cuda:
        raise ValueError("--strategy fsdp needs CUDA devices; on CPU several processes use DDP over gloo")
    if n_devices * num_nodes > 1 or strategy == "fsdp":
        if cuda:
            strategy = FSDPStrategy(
                auto_wrap_policy={Block},
                activation_checkpointing_policy={Block} if activation_checkpointing else None,
                state_dict_type="full",
                sharding_strategy="HYBRID_SHARD" if num_nodes > 1 else "FULL_SHARD",
            )
        else:
            strategy = DDPStrategy(process_group_backend="gloo")
    fabric = L.Fabric(
        accelerator="cuda" if cuda else "cpu",
        devices=n_devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
    )
    return fabric.launch(
        main, config, data_dir, out_dir, tokenizer, train, eval, optimizer, activation_checkpointing, compile,
        resume, seed, num_workers,
    )  # fmt: skip


def main(
    fabric: L.Fabric,
    config: Config,
    data_dir: Path,
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
) -> dict[str, float]:
    resume_dir = resolve_resume(resume, out_dir)
    fabric.seed_everything(seed)
    T = train.max_seq_length or config.block_size
    data = TokenShards(data_dir, seed=seed, num_workers=num_workers)
    data.connect(tokenizer, batch_size=train.micro_batch_size, max_seq_length=T)
    data.set_rank(fabric.global_rank, fabric.world_size)
    data.prepare_data()

    # as litgpt's pretrain: no default init (initialize_weights sets every parameter), so a seed gives litgpt's weights
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    for m in model.modules():
        if isinstance(m, MoE):
            std = math.sqrt(2.0 / 5 / config.n_embd)
            out_std = 1 / math.sqrt(config.n_embd) / config.n_layer
            m.reset_parameters = partial(m.reset_parameters, std=std, out_std=out_std)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.max_seq_length = T
    model.activation_checkpointing = activation_checkpointing and not isinstance(fabric.strategy, FSDPStrategy)
    flops_per_token = training_flops_per_token(model, T)
    fabric.print(
        f"{config.name}: {num_parameters(model) / 1e6:.1f}M parameters, {active_params(model) / 1e6:.1f}M active "
        f"(embeddings excluded), {len(model.moe_layers)} MoE layers, vocab {config.vocab_size}"
    )
    if compile:
        model = torch.compile(model)
    model = fabric.setup(model)
    optimizer = instantiate_torch_optimizer(optimizer_spec, model.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    learning_rate = optimizer.param_groups[0]["lr"]
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    state = {"model": model, "optimizer": optimizer, "train_dataloader": train_loader, "step": 0, "tokens": 0}
    if resume_dir is not None:
        fabric.load(resume_dir / "lit_model.pth", {"model": model})
        load_training_state(fabric, state, resume_dir)
        fabric.print(f"Resumed from {resume_dir} at step {state['step']}")

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
        fabric.save(ckpt_dir / "lit_model.pth", {"model": model})
        if fabric.global_rank == 0:
            save_config(config, ckpt_dir)
            for f in (data_dir / "tokenizer").iterdir():
                shutil.copy2(f, ckpt_dir / f.name)

    tokens_per_step = train.global_batch_size * T
    max_steps = train.max_steps or max(1, (train.max_tokens or tokens_per_step) // tokens_per_step)
    stage = Stage(loss_fn, save_fn, tokens_fn=lambda b: b[:, :-1].numel(), flops_per_token=flops_per_token)
    result = fit(
        fabric, stage, state, out_dir=out_dir, train=train, eval=eval, max_steps=max_steps,
        learning_rate=learning_rate, val_loader=val_loader, resumed_from=resume_dir,
    )  # fmt: skip
    return result


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
