"""Sharded checkpoints on CPU: `recipes/pretrain_moe.py --strategy fsdp` (FSDP2 over gloo) writes one shard per rank,
resumes on 2 ranks and on 1, and `scripts/consolidate_checkpoint.py` gives litgpt's single-file layout."""

import json
from functools import partial

import pytest
import torch
from conftest import (
    assert_rows_close,
    pretrain_args,
    pretrain_setup,
    read_log,
    run_python,
    run_recipe_here,
)

import litgpt_mm.training.consolidate
from litgpt_mm.config import Config
from litgpt_mm.model import load_model
from litgpt_mm.training.checkpoint import save_config


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_two_and_on_one_rank_and_consolidates(prepared_gutenberg, tmp_path, capfd):
    """Save on 2 FSDP ranks (one `.distcp` per rank, no `lit_model.pth`); resume step 2 on 2 FSDP ranks, on one
    plain process, and on 2 FSDP ranks with the experts split over them (`--expert_parallel 2`): all continue the
    uninterrupted curve; the consolidated final weights load with `load_model` and equal the single-process
    continuation's `lit_model.pth`."""
    # no balance loss: one process accumulates other micro-batches than two ranks (the sampler strides ranks), and
    # the balance loss, unlike the token means, depends on how a step's sequences are split into micro-batches
    save_config(Config.from_name("phi-2-moe-tiny", n_layer=2, moe_aux_loss_coef=0.0), tmp_path)
    common = {
        "model_config": tmp_path / "model_config.yaml",
        "train.max_steps": 4,
        "train.save_interval": 2,
        "train.lr_warmup_steps": 2,
        "train.log_interval": 1,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.max_seq_length": 32,
        "eval.interval": 4,
        "eval.max_iters": 2,
    }
    step2 = tmp_path / "two" / "step-000002"
    runs = {
        "two": dict(devices=2, strategy="fsdp"),
        "two_resumed": dict(devices=2, strategy="fsdp", resume=step2),
        "one_resumed": dict(devices=1, resume=step2),
        "ep_resumed": dict(devices=2, strategy="fsdp", expert_parallel=2, resume=step2),  # FSDP × experts split
    }
    # DTensor shards beside plain expert weights: the recipe turns off the batched kernels CUDA's AdamW would pick
    batched = {"lr": 3.0e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "foreach": True}
    (tmp_path / "foreach.yaml").write_text(
        json.dumps({"optimizer": {"class_path": "torch.optim.AdamW", "init_args": batched}})
    )
    runs["ep_resumed"]["config"] = tmp_path / "foreach.yaml"
    for name, extra in runs.items():
        run = partial(run_recipe_here, capfd) if extra["devices"] == 1 else run_python
        proc = run(pretrain_args(prepared_gutenberg, tmp_path / name, **common, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if "resume" in extra:
            assert "Resumed from" in proc.stdout and "at step 2" in proc.stdout
    shards = sorted(p.name for p in (step2 / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not (step2 / "lit_model.pth").exists() and not (step2 / "training_state.pth").exists()

    logs = {n: read_log(tmp_path / n / "logs" / "train_log.csv") for n in runs}
    columns = ("tokens", "loss", "z_loss")
    assert_rows_close(logs["two_resumed"], logs["two"][2:], (*columns, "aux_loss"), 1e-5)
    assert_rows_close(logs["ep_resumed"], logs["two"][2:], (*columns, "aux_loss"), 1e-5)
    assert_rows_close(logs["one_resumed"], logs["two"][2:], columns, 1e-4)
    assert (tmp_path / "one_resumed" / "final" / "lit_model.pth").is_file()  # a small run: the single-file layout

    consolidate = litgpt_mm.training.consolidate.consolidate
    sharded_runs = ("two", "two_resumed", "ep_resumed")
    for name in sharded_runs:
        consolidate(tmp_path / name / "final", tmp_path / f"{name}_litgpt")
    want = torch.load(tmp_path / "one_resumed" / "final" / "lit_model.pth")["model"]
    for name in sharded_runs:
        got = torch.load(tmp_path / f"{name}_litgpt" / "lit_model.pth")["model"]
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    model = load_model(tmp_path / "two_litgpt")  # config and weights in litgpt's layout
    assert model.config.n_layer == 2 and (tmp_path / "two_litgpt" / "tokenizer.json").is_file()


def test_resume_with_another_model_configuration_is_one_clear_error(prepared_gutenberg, tmp_path):
    """Checked in `setup`, before any work: which fields differ and what to do."""
    ckpt = tmp_path / "run" / "step-000002"
    (ckpt / "sharded").mkdir(parents=True)
    save_config(Config.from_name("phi-2-moe-tiny", n_layer=2, vocab_size=1024, padded_vocab_size=1024), ckpt)
    with pytest.raises(ValueError, match=r"another model configuration \(n_layer: 2 there, 4 here\).*fresh --out_dir"):
        pretrain_setup(
            data_dir=prepared_gutenberg,
            out_dir=tmp_path / "run",
            model_name="phi-2-moe-tiny",
            resume="auto",
            num_workers=0,
            train=dict(micro_batch_size=4, global_batch_size=8, max_steps=4, lr_warmup_steps=0),
            eval=dict(),
        )


def test_consolidate_refuses_a_directory_without_shards(tmp_path):
    consolidate = litgpt_mm.training.consolidate.consolidate
    with pytest.raises(FileNotFoundError, match="sharded"):
        consolidate(tmp_path)
