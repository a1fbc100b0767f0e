"""Gutenberg preparation and `recipes/pretrain_moe.py`: learning, exact resume after a kill, accumulation, 8-bit
Adam, and a 2-process gloo run."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    DATA,
    SHORT_RUN,
    NoBf16OnCpu,
    check_kill_and_resume,
    pretrain_args,
    pretrain_setup,
    run_python,
    run_recipe_here,
)
from litgpt.tokenizer import Tokenizer

import litgpt_mm.compare
import litgpt_mm.data.prepare_gutenberg
from litgpt_mm.config import Config
from litgpt_mm.data import tokens
from litgpt_mm.model import load_model

TINY = ["--config", "recipes/configs/pretrain_moe_tiny.yaml", "--num_workers", "0"]


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_args(data_dir, out_dir, **overrides) -> list[str]:
    args = ["recipes/pretrain_moe.py", *TINY, "--data_dir", str(data_dir), "--out_dir", str(out_dir)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def quick(**extra) -> dict:
    """Small, fast settings for in-process `setup` runs."""
    train = dict(global_batch_size=8, micro_batch_size=8, max_steps=6, max_seq_length=64, save_interval=100)
    train.update(log_interval=1, lr_warmup_steps=1, max_norm=1.0, min_lr=1e-4)
    train.update(extra.pop("train", {}))
    args = dict(
        model_name="phi-2-moe-tiny",
        precision="32-true",
        devices=1,
        num_workers=0,
        train=train,
        eval=dict(interval=100, max_iters=2, initial_validation=False) | extra.pop("eval", {}),
    )
    args.update(extra)
    return args


setup = pretrain_setup


def test_prepare_gutenberg(prepared_gutenberg):
    summary = json.loads((prepared_gutenberg / "summary.json").read_text())
    assert summary["documents"]["train"] + summary["documents"]["val"] == 13 and summary["skipped"] == []
    assert summary["documents"]["val"] >= 1
    splits = [line.split("\t") for line in (prepared_gutenberg / "books.txt").read_text().splitlines()]
    assert len({name for _, _, name in splits}) == 13  # every book in exactly one split
    tok = Tokenizer(prepared_gutenberg / "tokenizer")  # litgpt loads our tokenizer
    assert tok.vocab_size == 1024 and tok.eos_id == tok.token_to_id(tokens.EOS)
    text = "“Pieces of eight!” said the parrot.\nAlice’s cat — «très bien» —  twice."
    assert tok.decode(tok.encode(text)) == text
    for split in ("train", "val"):
        n = tokens.num_blocks(prepared_gutenberg / split, 1)
        assert n == summary["tokens"][split]
        ids = torch.cat(list(tokens.TokenBlocks(prepared_gutenberg / split, n)))
        assert int((ids == tok.eos_id).sum()) == summary["documents"][split]  # one EOS closes each book


def test_prepare_reports_bad_books_and_goes_on(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("pg43_strange_case_of_dr_jekyll_and_mr_hyde.txt", "pg5200_metamorphosis.txt", "pg4650_candide_fr.txt"):
        (raw / name).write_bytes((DATA / "gutenberg" / name).read_bytes())
    (raw / "nomarkers.txt").write_text("Just some text without any Project Gutenberg markers.\n")
    (raw / "empty.txt").write_text("")
    (raw / "badbytes.txt").write_bytes(b"\xff\xfe\x00garbage \x81\x82")
    prepare = litgpt_mm.data.prepare_gutenberg.prepare
    summary = prepare(input_dir=raw, out_dir=tmp_path / "out", vocab_size=512, languages=["en"])
    skipped = dict(summary.skipped)
    assert set(skipped) == {"nomarkers.txt", "empty.txt", "badbytes.txt", "pg4650_candide_fr.txt"}
    assert "START" in skipped["nomarkers.txt"] and "UTF-8" in skipped["badbytes.txt"]
    assert "language 'fr'" in skipped["pg4650_candide_fr.txt"]
    assert summary.documents["train"] + summary.documents["val"] == 2
    report = capsys.readouterr().out
    assert "skipped: 4" in report and "badbytes.txt" in report


def test_sampler_resumes_mid_epoch_and_strides_ranks():
    full = tokens.ResumableSampler(22, seed=3, batch_size=4)
    assert full.batches_per_epoch == 5 and len(full) == 20
    it = iter(full)
    first = [next(it) for _ in range(28)]  # one epoch of 20, then 8 of the next epoch
    assert sorted(first[:20]) == sorted(set(first[:20])) and first[20:] != first[:8]
    resumed = tokens.ResumableSampler(22, seed=3, batch_size=4)
    resumed.epoch, resumed.position = 1, 4
    it = iter(resumed)
    assert [next(it) for _ in range(4)] == first[24:28]
    ranks = [list(tokens.ResumableSampler(22, 3, 2, shuffle=False, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 10


def test_tiny_run_beats_unigram_baseline(prepared_gutenberg, pretrained_tiny):
    """A short run on the real books: validation loss ends below the unigram entropy of the validation books."""
    out, result = pretrained_tiny
    baseline = tokens.unigram_entropy(prepared_gutenberg / "val", 1024)
    val = read_log(out / "logs" / "val_log.csv")
    assert float(val[0]["val_loss"]) > 6.5  # ~ln(1024) at initialisation
    assert result["val_loss"] < baseline - 0.1, (result["val_loss"], baseline)
    experts = read_log(out / "logs" / "expert_load.csv")
    assert {int(r["layer"]) for r in experts} == {0, 1, 2, 3}
    for name in ("loss.png", "throughput.png", "expert_load.png"):
        assert (out / "logs" / name).stat().st_size > 5000
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    model = load_model(out / "final")  # litgpt layout + our config: reloads
    assert model.config.vocab_size == 1024 and len(model.moe_layers) == 4
    assert (out / "final" / "tokenizer.json").is_file() and not (out / "final" / "training_state.pth").exists()


def test_cpu_pretraining_never_computes_in_bf16(prepared_gutenberg, tmp_path, capfd):
    """The default CPU run (training with MFU, validation, checkpoints) touches no bf16 tensor on the CPU."""
    guard = NoBf16OnCpu()
    with guard:
        settings = {"train.max_steps": 2, "train.log_interval": 1, "eval.interval": 2}
        proc = run_recipe_here(capfd, pretrain_args(prepared_gutenberg, tmp_path, **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "final" / "lit_model.pth").is_file()
    assert guard.seen == set()


def test_resume_after_kill_continues_the_same_curve(prepared_gutenberg, tmp_path):
    common = {**SHORT_RUN, "train.max_steps": 16, "train.lr_warmup_steps": 3}
    check_kill_and_resume(
        lambda out: run_args(prepared_gutenberg, out, **common), tmp_path, "step-000012", "step-000008", "lit_model.pth"
    )


def test_gradient_accumulation_matches_the_large_batch(prepared_gutenberg, tmp_path):
    """Two micro-batches of 4 give the same update as one batch of 8 (SGD, so the update is the gradient)."""
    config = Config.from_name("phi-2-moe-tiny", moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
    states = []
    for micro in (8, 4):
        out = tmp_path / f"micro{micro}"
        setup(
            data_dir=prepared_gutenberg,
            out_dir=out,
            **quick(model_config=config, optimizer=sgd, train={"max_steps": 1, "micro_batch_size": micro}),
        )
        states.append(torch.load(out / "final" / "lit_model.pth")["model"])
    diffs = [(states[0][k] - states[1][k]).abs().max().item() for k in states[0]]
    assert max(diffs) < 1e-6


def test_8bit_adam_runs(prepared_gutenberg, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "adam8"
    opt = {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 3e-3}}
    result = setup(data_dir=prepared_gutenberg, out_dir=out, **quick(optimizer=opt, train={"max_steps": 8}))
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    log = read_log(out / "logs" / "train_log.csv")
    assert float(log[-1]["loss"]) < float(log[0]["loss"])
    state = torch.load(out / "step-000008" / "training_state.pth", weights_only=False)["optimizer"]["state"]
    moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state.values()]
    big = [m for m in moments if m.numel() >= 4096]
    assert big and all(m.dtype == torch.uint8 for m in big)  # 8-bit moments for the large tensors
    with pytest.raises(FileExistsError, match="--resume auto"):  # a fresh run never overwrites checkpoints
        setup(data_dir=prepared_gutenberg, out_dir=out, **quick(optimizer=opt, train={"max_steps": 8}))


def test_our_loop_matches_litgpt_pretrain_on_the_same_seed(prepared_gutenberg, tmp_path):
    """The dense twin through our loop and through `litgpt pretrain` (same shards, seed and settings, no gradient
    accumulation, where the two learning-rate schedules coincide): the same initial weights and validation curve."""
    compare = litgpt_mm.compare
    common = ["--model_name", "phi-2-tiny-twin", "--data_dir", str(prepared_gutenberg), "--seed", "3",
              "--train.global_batch_size", "8", "--train.micro_batch_size", "8", "--train.max_seq_length", "64",
              "--train.lr_warmup_steps", "2", "--train.save_interval", "6", "--eval.interval", "3",
              "--eval.max_iters", "4", "--num_workers", "0"]  # fmt: skip
    ours = ["recipes/pretrain_moe.py", "--config", "recipes/configs/pretrain_moe_tiny.yaml", "--train.max_steps", "6"]
    lit = ["recipes/pretrain_dense_litgpt.py", "--config", "recipes/configs/pretrain_dense_litgpt_tiny.yaml",
           "--data", "gutenberg", "--train.max_tokens", str(6 * 8 * 64)]  # fmt: skip
    runs, printed = [], ""
    for name, args in (("ours", ours), ("litgpt", lit)):
        proc = run_python([*args, *common, "--out_dir", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs.append(compare.load_run(name, name, 3, tmp_path / name))
        printed = proc.stdout + proc.stderr
    ours_val = {r["tokens"]: r["val_loss"] for r in runs[0].val}
    lit_val = {r["tokens"]: r["val_loss"] for r in runs[1].val}  # litgpt logs its interval evaluations
    common_points = sorted(set(ours_val) & set(lit_val))
    assert common_points and min(common_points) > 0, (ours_val, lit_val)
    for seen in common_points:
        assert ours_val[seen] == pytest.approx(lit_val[seen], abs=2e-5), (seen, ours_val, lit_val)
    final = re.search(r"Final evaluation \| val loss: ([\d.]+)", printed)  # printed with 3 decimals
    assert final and float(final.group(1)) == pytest.approx(ours_val[max(ours_val)], abs=6e-4)

    # the study's common evaluator: loss and bits per byte of both final checkpoints agree too, and are cached
    held = [compare.held_out(run, prepared_gutenberg, max_blocks=8) for run in runs]
    assert held[0]["bits_per_byte"] == pytest.approx(held[1]["bits_per_byte"], abs=1e-4)
    assert held[0]["bits_per_byte"] == pytest.approx(
        held[0]["loss"] / math.log(2) * held[0]["tokens"] / held[0]["bytes"]
    )
    assert (tmp_path / "ours" / "held_out.json").is_file() and compare.held_out(runs[0], prepared_gutenberg, 8) == held[
        0
    ]
    for run, h in zip(runs, held, strict=True):
        run.held_out, run.group = h, "dense-twin-gutenberg" if run.name == "ours" else "litgpt-dense"
    report = compare.write_report(runs, tmp_path / "report", "gutenberg").read_text()
    assert f"{held[0]['bits_per_byte']:.4f}" in report and "bits/byte" in report and "Hardware: CPU" in report


def test_width_sweep_section_reports_moe_minus_twin_per_width(tmp_path):
    """The sweep table pairs each width's MoE and twin runs: Δ = MoE − twin from their held-out scores, the
    throughput ratio, and a plot; a width missing one of the two is left out."""
    compare = litgpt_mm.compare

    def run(group: str, width: int, loss: float, tokens_per_s: float):
        r = compare.Run(f"{group}-w{width}", group, 1, tmp_path / group, active=width * 10_000)
        r.held_out = {"loss": loss, "bits_per_byte": loss / 2}
        r.train = [{"tokens_per_s": 1.0}, {"tokens_per_s": tokens_per_s}]
        return r

    sweep = {
        64: [run("moe-gutenberg", 64, 5.30, 8.0), run("dense-twin-gutenberg", 64, 5.20, 10.0)],
        128: [run("moe-gutenberg", 128, 4.90, 6.0), run("dense-twin-gutenberg", 128, 4.95, 8.0)],
        256: [run("moe-gutenberg", 256, 4.50, 3.0)],  # its twin has not finished
    }
    lines = compare._sweep_section(sweep, tmp_path / "sweep.png")
    rows = [line for line in lines if line.startswith("| 64 ") or line.startswith("| 128 ") or "| 256 " in line]
    assert len(rows) == 2
    assert "+0.1000" in rows[0] and "+0.0500" in rows[0] and "0.80×" in rows[0]
    assert "-0.0500" in rows[1] and "-0.0250" in rows[1] and "0.75×" in rows[1]
    assert (tmp_path / "sweep.png").is_file()
    assert any(
        "from +0.1000 at the smallest width to -0.0500" in line and "grows" in line and "MoE is ahead" in line
        for line in lines
    )
