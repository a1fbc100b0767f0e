"""The comparison's "LIT-GPT implementation": a dense Phi-2 pretrained by litgpt's own `litgpt.pretrain`, reading
our token shards through `litgpt_mm.data.tokens.TokenShards` (a litgpt `DataModule`).

    python scripts/prepare_redpajama.py --download_sample true
    python recipes/pretrain_dense_litgpt.py --data redpajama                      # phi-2 shape, GPUs
    python recipes/pretrain_dense_litgpt.py --config recipes/configs/pretrain_dense_litgpt_tiny.yaml   # CPU, minutes

Everything past the data and the config (loop, optimizer, logging, checkpoints in `out_dir/step-*/`, `--resume`)
is litgpt's. The vocabulary is sized to the prepared tokenizer, as in `recipes/pretrain_moe.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch
from litgpt.args import EvalArgs, TrainArgs

from litgpt_mm.config import Config
from litgpt_mm.data.tokens import StreamArgs
from litgpt_mm.pretrain import config_for_shards
from litgpt_mm.training.loop import PRETRAIN_EVAL, PRETRAIN_TRAIN, check_launcher, optimizer_spec


def setup(
    model_name: str = "phi-2",
    data: Literal["gutenberg", "redpajama"] = "redpajama",
    data_dir: str | None = None,
    stream: StreamArgs = StreamArgs(),
    out_dir: Path | None = None,
    precision: str | None = None,
    devices: int | str = "auto",
    num_nodes: int = 1,
    train: TrainArgs = PRETRAIN_TRAIN,
    eval: EvalArgs = PRETRAIN_EVAL,
    optimizer: str | dict = "AdamW",
    compile: bool = True,
    resume: bool | Literal["auto"] | Path = False,
    seed: int = 42,
    num_workers: int = 2,
    logger_name: Literal["csv", "tensorboard"] = "csv",
) -> None:
    """Run `litgpt.pretrain.setup` on prepared token shards.

    Args:
        model_name: a dense litgpt name (`phi-2`) or litgpt-mm preset (`phi-2-tiny`, `phi-2-tiny-twin`).
        data: which prepared corpus; its directory is `data/prepared/<data>` unless `data_dir` is given.
        data_dir: folder or `s3://`/`gs://` prefix with `train/`, `val/` and `tokenizer/` from
            `scripts/prepare_<data>.py`.
        stream: chunk cache, object-storage options and shuffle for the shards (`StreamArgs`).
        out_dir: litgpt's output directory (default `out/pretrain/litgpt-<model>-<data>`).
        precision: Fabric precision (litgpt's default when unset).
        devices: devices per node (litgpt uses FSDP for more than one).
        num_nodes: number of nodes.
        train: litgpt `TrainArgs` (use `max_tokens`: litgpt's pretrain loop counts tokens).
        eval: litgpt `EvalArgs`.
        optimizer: litgpt optimizer spec.
        compile: litgpt's pretrain always calls `torch.compile`; `false` turns TorchDynamo off for this process
            (CPU runs without the compile wait).
        resume: litgpt's `--resume`.
        seed: litgpt's seed (initialisation) and our data-order seed.
        num_workers: DataLoader workers.
        logger_name: litgpt logger (`csv` is what `recipes/compare.py` reads).
    """
    from dataclasses import asdict, fields

    import litgpt.config
    import yaml

    check_launcher(num_nodes)
    optimizer = optimizer_spec(optimizer)
    config = Config.from_name(model_name)
    if config.n_expert:
        raise ValueError(f"{model_name} is a MoE preset: this recipe trains litgpt's dense model; use pretrain_moe.py")
    data_dir = str(data_dir or f"data/prepared/{data}")
    config, tokenizer_dir, _ = config_for_shards(config, data_dir, data, stream, train.max_seq_length)
    litgpt_fields = {f.name for f in fields(litgpt.config.Config)}
    out_dir = Path(out_dir or f"out/pretrain/litgpt-{config.name}-{data}")
    args = {
        "model_name": config.name,
        "model_config": {k: v for k, v in asdict(config).items() if k in litgpt_fields},
        "out_dir": str(out_dir),
        "precision": precision,
        "resume": str(resume) if isinstance(resume, Path) else resume,
        "data": {
            "class_path": "litgpt_mm.data.tokens.TokenShards",
            "init_args": {"data_path": data_dir, "seed": seed, "num_workers": num_workers, **asdict(stream)},
        },
        "train": asdict(train),
        "eval": asdict(eval),
        "optimizer": optimizer,
        "devices": devices,
        "num_nodes": num_nodes,
        "tokenizer_dir": str(tokenizer_dir),
        "logger_name": logger_name,
        "seed": seed,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "litgpt_pretrain.yaml"
    config_file.write_text(yaml.safe_dump(args, sort_keys=False))
    print(f"Running `litgpt pretrain --config {config_file}`")
    if not compile:
        torch._dynamo.config.disable = True
    run_litgpt_cli("pretrain", "--config", str(config_file))


def run_litgpt_cli(*args: str) -> None:
    """`litgpt <args>` in this process, through litgpt's own CLI: its checkpoints re-parse the command line to save
    `hyperparameters.yaml`."""
    from litgpt.__main__ import main as litgpt_main

    argv = sys.argv
    sys.argv = [argv[0], *args]
    try:
        litgpt_main()
    finally:
        sys.argv = argv
