"""The preflight memory check (issue 30, item 8): a run that cannot fit is refused in one line before anything is
allocated, with alternatives that do fit. Everything is estimated from configs (no model is built, no device used);
the machine's memory is monkeypatched."""

import re
from types import SimpleNamespace

import pytest
import torch

from litgpt_mm.analysis import capacity, preflight
from litgpt_mm.cli import run_cli
from litgpt_mm.config import Config
from litgpt_mm.models.qlora import LoRASettings
from litgpt_mm.training.loop import PRETRAIN_TRAIN

GiB = 1024**3


@pytest.fixture
def cpu_ram(monkeypatch):
    """The machine of the issue: 24 GiB of RAM available, as psutil reports it."""
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: SimpleNamespace(available=24 * GiB, total=24 * GiB))


@pytest.fixture
def gpu_80(monkeypatch):
    """One 80 GiB GPU, all of it free, as torch.cuda reports it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (80 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")


def gutenberg_moe() -> Config:
    """phi-2-moe as recipes/pretrain_moe.py builds it for `--data gutenberg` (the tokenizer's 32,000 tokens)."""
    return Config.from_name("phi-2-moe").replace(vocab_size=32000, padded_vocab_size=32000)


def refused(**kwargs) -> str:
    with pytest.raises(SystemExit) as exc:
        preflight.check_fits(**kwargs)
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message
    return message


def test_the_issue_run_is_refused_in_one_line_naming_estimate_memory_tiny_config_and_flag(cpu_ram):
    cfg = gutenberg_moe()
    assert round(capacity.count_params(cfg).total / 1e6, 1) == 6038.9  # what the issue's run printed
    mb, T = PRETRAIN_TRAIN.micro_batch_size, PRETRAIN_TRAIN.max_seq_length
    message = refused(config=cfg, micro_batch_size=mb, seq_len=T, devices="auto", accelerator="cpu")
    # the capacity plan's own peak for this run: fp32 weights, gradients and AdamW (16 bytes x 6.04 B) + activations
    plan = capacity.plan(
        cfg,
        1,
        gpus=1,
        gpu="h100",
        precision="32-true",
        micro_batch=mb,
        seq_len=T,
        mfu=0.5,
        expert_hidden_copies=1,
        fused_adamw=False,
    )
    assert plan.memory.peak > 16 * 6.0e9 + 24 * GiB
    assert f"needs about {plan.memory.peak / GiB:.1f} GiB per device" in message
    assert "CPU RAM has 24.0 GiB available (21.6 GiB usable with a 10% margin)" in message
    assert f"micro-batch {mb} x {T} tokens" in message
    assert "--model_name phi-2-moe-tiny" in message and "--preflight false" in message
    assert "--train.micro_batch_size" not in message  # not even micro-batch 1 fits 24 GiB: not offered
    # on a GPU machine: the fewest 80 GB GPUs with FSDP
    n = int(re.search(r"(\d+) GPUs of 80 GB with FSDP", message).group(1))
    sharded = capacity.plan(cfg, 1, gpus=n, gpu="h100", seq_len=T, micro_batch=mb, mfu=0.5)
    assert sharded.memory.peak <= 0.9 * 80e9
    assert capacity.plan(cfg, 1, gpus=n // 2, gpu="h100", seq_len=T, micro_batch=mb, mfu=0.5).memory.peak > 0.9 * 80e9


def test_run_cli_prints_the_refusal_as_one_error_line_and_the_flag_skips_it(cpu_ram, capsys):
    def setup(micro_batch_size: int = 4, preflight: bool = True) -> str:
        preflight_check(micro_batch_size, preflight)
        return "trained"

    def preflight_check(mb: int, enabled: bool) -> None:
        preflight.check_fits(gutenberg_moe(), micro_batch_size=mb, seq_len=2048, accelerator="cpu", enabled=enabled)

    with pytest.raises(SystemExit) as exc:
        run_cli(setup, args=[])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: preflight: phi-2-moe pretraining needs about")
    assert run_cli(setup, args=["--preflight", "false"]) == "trained"


def test_the_tiny_config_passes_with_its_estimate(cpu_ram):
    tiny = Config.from_name("phi-2-moe-tiny")
    est = preflight.check_fits(tiny, micro_batch_size=8, seq_len=128, devices=1, accelerator="cpu")
    assert est.fits and est.available == 24 * GiB and est.usable == pytest.approx(0.9 * 24 * GiB)
    assert (
        est.peak
        == capacity.plan(
            tiny,
            1,
            gpus=1,
            gpu="h100",
            precision="32-true",
            micro_batch=8,
            seq_len=128,
            mfu=0.5,
            expert_hidden_copies=1,
            fused_adamw=False,
        ).memory.peak
    )
    assert 2e9 < est.peak < 2.2e9  # the plan's 2 GB runtime overhead dominates


def test_the_suggested_tiny_config_passes_when_fed_back(cpu_ram):
    message = refused(config=gutenberg_moe(), micro_batch_size=4, seq_len=2048, accelerator="cpu")
    name, T = re.search(r"--model_name (\S+) --train\.max_seq_length (\d+)", message).groups()
    est = preflight.check_fits(Config.from_name(name), micro_batch_size=4, seq_len=int(T), accelerator="cpu")
    assert est.fits and est.peak < est.usable


def test_processes_of_a_cpu_node_share_its_ram(cpu_ram):
    shallow = Config.from_name("phi-2-moe", n_layer=4)  # about 19 GiB per process
    one = preflight.check_fits(shallow, micro_batch_size=8, seq_len=512, devices=1, accelerator="cpu")
    assert one.available == 24 * GiB and 0.9 * 6 * GiB < one.peak < 0.9 * 24 * GiB
    message = refused(config=shallow, micro_batch_size=8, seq_len=512, devices=4, accelerator="cpu")
    assert "CPU RAM has 6.0 GiB available each (24.0 GiB shared by 4 processes)" in message
    assert "4 processes" in message and f"{one.peak / GiB:.1f} GiB per device" in message


def test_the_suggested_gpu_count_passes_and_half_of_it_does_not(gpu_80):
    cfg = gutenberg_moe()
    kwargs = dict(micro_batch_size=4, seq_len=2048, accelerator="cuda", precision="bf16-mixed")
    message = refused(config=cfg, devices=1, **kwargs)
    assert "GPU 0 (NVIDIA H100 80GB HBM3) has 80.0 GiB free" in message
    n, devices = map(int, re.search(r"(\d+) GPUs like this one with FSDP: --devices (\d+)", message).groups())
    assert n == devices and n > 1
    est = preflight.check_fits(cfg, devices=n, strategy="fsdp", **kwargs)
    assert est.fits and est.memory.weights == pytest.approx(4 * capacity.count_params(cfg).total / n)
    refused(config=cfg, devices=n // 2, strategy="fsdp", **kwargs)


def test_qlora_of_phi2_fits_an_80_gib_gpu_and_a_full_precision_lora_does_not(gpu_80):
    phi2 = Config.from_name("phi-2")
    common = dict(
        config=phi2,
        stage="qlora",
        micro_batch_size=8,
        seq_len=2048,
        accelerator="cuda",
        lora=LoRASettings(),
        optimizer={"class_path": "bitsandbytes.optim.PagedAdamW8bit"},
    )
    qlora = preflight.check_fits(quantize="nf4", precision="bf16-mixed", **common)
    assert qlora.fits and 30 * GiB < qlora.peak < 72 * GiB
    n = capacity.count_params(phi2).total
    assert qlora.memory.weights < 0.25 * 4 * n  # nf4 linears; the embedding and the head stay as loaded
    message = refused(quantize="none", precision="32-true", **common)
    assert message.startswith("preflight: phi-2 QLoRA finetuning needs about")
    full = preflight.memory(
        preflight.Run(
            stage="qlora",
            config=phi2,
            accelerator="cuda",
            devices=1,
            num_nodes=1,
            micro_batch_size=8,
            seq_len=2048,
            precision="32-true",
            optimizer="adamw8bit",
            lora=LoRASettings(),
        )
    )
    assert f"{full.peak / GiB:.1f} GiB" in message and full.peak > 72 * GiB and full.weights > 4 * n
    # the smaller micro-batch it offers fits, and the next larger one does not
    mb = int(re.search(r"--train\.micro_batch_size (\d+)", message).group(1))
    assert 1 <= mb < 8
    assert preflight.check_fits(**(common | dict(micro_batch_size=mb)), quantize="none", precision="32-true").fits
    refused(**(common | dict(micro_batch_size=mb + 1)), quantize="none", precision="32-true")


def test_the_flag_skips_the_check_without_asking_the_machine(monkeypatch):
    def no_query(*args, **kwargs):
        raise AssertionError("the memory was queried")

    monkeypatch.setattr(preflight, "device_memory", no_query)
    assert preflight.check_fits(gutenberg_moe(), micro_batch_size=4, accelerator="cpu", enabled=False) is None
    with pytest.raises(AssertionError, match="queried"):
        preflight.check_fits(gutenberg_moe(), micro_batch_size=4, accelerator="cpu")


def test_optimizer_specs_map_to_the_plans_optimizers():
    assert preflight.optimizer_kind({"class_path": "bitsandbytes.optim.PagedAdamW8bit"}) == "adamw8bit"
    assert preflight.optimizer_kind("bitsandbytes.optim.AdamW8bit") == "adamw8bit"
    assert preflight.optimizer_kind({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}) == "adamw"


def test_alignment_and_clip_pretraining_are_estimated_from_their_towers(gpu_80, cpu_ram):
    phi2 = Config.from_name("phi-2")
    est = preflight.check_fits(
        phi2, stage="align", micro_batch_size=16, seq_len=64, accelerator="cuda", clip_model="ViT-B-32"
    )
    n = capacity.count_params(phi2).total
    # the bf16 LM, the fp32 ViT-B/32 tower (88 M parameters) and the fp32 projector (15 M), which alone trains
    assert 2 * n + 4 * 100e6 < est.memory.weights < 2 * n + 4 * 110e6
    assert est.memory.grads == pytest.approx(4 * 15.1e6, rel=0.01)
    assert est.memory.activations == capacity.activation_bytes(phi2, "bf16-mixed", 16, 49 + 1 + 64, False, 2).start
    clip = preflight.check_fits(
        None, stage="clip", micro_batch_size=128, accelerator="cpu", clip_model="shapes-ViT-T-16"
    )
    assert clip.fits and 2e9 < clip.peak < 3e9
    message = refused(config=None, stage="clip", micro_batch_size=128, accelerator="cpu", clip_model="ViT-H-14")
    assert message.startswith("preflight: ViT-H-14 CLIP pretraining needs about")
    assert "--train.micro_batch_size" in message
