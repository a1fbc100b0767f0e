"""The XLA-specific logic of `xla/` without a TPU: buckets and padding, the FSDP wrap policy, sequential loading,
recipe reuse, static-shape generation, and (when torch_xla is installed) a training step on the XLA CPU device."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from litgpt.args import TrainArgs

import litgpt_mm.align
import litgpt_mm.data.prepare_coco
from litgpt_mm.config import Config
from litgpt_mm.model import GPT, Block
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, generate_batch
from litgpt_mm.training import xla as utils

# LLVM without optimisation passes: the graphs compile several times faster, and a test runs each only a few times
XLA_FLAGS = "--xla_backend_optimization_level=0"


def test_buckets_and_padding():
    assert utils.bucket(1) == 64 and utils.bucket(64) == 64 and utils.bucket(65) == 128
    with pytest.raises(ValueError, match="largest bucket"):
        utils.bucket(5000)
    ids = [torch.arange(5), torch.arange(70)]
    labels = [torch.tensor([-100, -100, 2, 3, 4]), torch.arange(70)]
    out_ids, out_labels, lengths = utils.pad_batch(ids, labels, batch_size=4, pad_id=9)
    assert out_ids.shape == out_labels.shape == (4, 128) and lengths.tolist() == [5, 70, 0, 0]
    assert (out_ids[0, 5:] == 9).all() and (out_labels[0, 5:] == -100).all() and (out_labels[2:] == -100).all()
    assert torch.equal(out_labels[0, :5], labels[0])
    with pytest.raises(ValueError, match="static batch"):
        utils.pad_batch(ids * 3, None, batch_size=4, pad_id=0)


def test_static_caption_collate_gives_fixed_shapes():
    collate = utils.static_caption_collate(16)
    items = [{"image_id": i, "ids": torch.arange(n), "features": torch.zeros(49, 8)} for i, n in ((1, 3), (2, 30))]
    batch = collate(items)
    assert [len(x) for x in batch["ids"]] == [16, 16] and batch["features"].shape == (2, 49, 8)
    assert (batch["labels"][0][3:] == -100).all() and torch.equal(batch["labels"][1], torch.arange(16))


def test_wrap_policy_wraps_every_block():
    model = GPT(Config.from_name("phi-2-moe-tiny"))
    policy = utils.block_wrap_policy()
    wrapped = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == 4 and all(isinstance(m, Block) for m in wrapped)
    assert policy(module=model, recurse=True, nonwrapped_numel=0)  # recursion reaches the blocks


class FakeFabric:
    def __init__(self, local_rank: int, world_size: int, num_nodes: int, log: list) -> None:
        self.local_rank, self.world_size, self.num_nodes, self.log = local_rank, world_size, num_nodes, log

    def barrier(self) -> None:
        self.log.append(("barrier", self.local_rank))


def test_checkpoint_is_loaded_one_process_per_host_at_a_time(tmp_path, monkeypatch):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "lit_model.pth")
    events = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: events.append("load") or real_load(*a, **k))
    for local_rank in range(4):  # 8 processes on 2 hosts: 4 turns on each host
        log: list = []
        state = utils.load_sequentially(FakeFabric(local_rank, 8, 2, log), tmp_path / "lit_model.pth")
        assert torch.equal(state["w"], torch.ones(2)) and len(log) == 4  # waits for every turn of its host
    assert events == ["load"] * 4


def test_recipe_arguments_come_from_the_recipe_config():
    recipe = litgpt_mm.align
    args = utils.recipe_arguments(recipe.setup, REPO / "recipes/configs/align_tiny.yaml", {"max_caption_tokens": 32})
    assert isinstance(args["train"], TrainArgs) and args["train"].max_steps == 240
    assert args["max_caption_tokens"] == 32 and args["clip_pretrained"] is None


def test_static_generation_equals_dynamic():
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=300, padded_vocab_size=320, moe_impl="static"))
    model = MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4)).eval()
    feats = [torch.randn(1, 4, 32), None]
    prompts = [torch.randint(0, 300, (n,)) for n in (3, 7)]
    dynamic = generate_batch(model, feats, prompts, 8)
    assert generate_batch(model, feats, prompts, 8, pad_to=utils.bucket(8), static=True) == dynamic


def test_memory_estimate_for_the_readme():
    phi2 = utils.memory_per_chip_gb(2.78e9, chips=8, seq=2048, micro_batch=4, n_layer=32, n_embd=2560)
    assert 5.5 < phi2 < 7.5  # 44.5 GB of sharded state / 8 + 1.3 GB of activations


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")
def test_training_step_on_the_xla_cpu_device():
    """The tiny MoE (static path) trains on XLA's CPU device with the same loss as eager CPU."""
    code = textwrap.dedent(
        """
        import torch, torch_xla
        from litgpt_mm.config import Config
        from litgpt_mm.model import GPT
        torch.manual_seed(0)
        cfg = Config.from_name("phi-2-moe-tiny", moe_impl="static")
        x = torch.randint(0, cfg.vocab_size, (2, 33))
        losses = []
        for device in ("cpu", torch_xla.device()):
            torch.manual_seed(1)
            model = GPT(cfg).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            run = []
            for _ in range(3):
                logits = model(x[:, :-1].to(device))
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten().to(device))
                loss = loss + model.moe_aux_objective()
                loss.backward(); opt.step(); opt.zero_grad()
                torch_xla.sync()
                run.append(loss.item())
            losses.append(run)
        print(losses)
        assert all(abs(a - b) < 1e-3 for a, b in zip(*losses)), losses
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": XLA_FLAGS},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")
def test_pretrain_launcher_runs_on_the_xla_cpu_device(prepared_gutenberg, tmp_path):
    """`xla/pretrain_moe.py` through Lightning Fabric's XLA strategy on XLA's CPU device: a few real steps."""
    from litgpt_mm.training.checkpoint import save_config

    out = tmp_path / "xla"
    save_config(Config.from_name("phi-2-moe-tiny", n_layer=2), tmp_path)  # a smaller graph compiles faster
    proc = subprocess.run(
        [sys.executable, "xla/pretrain_moe.py", "--model_config", str(tmp_path / "model_config.yaml"),
         "--data_dir", str(prepared_gutenberg),
         "--out_dir", str(out), "--precision", "32-true", "--num_workers", "0", "--train.max_steps", "4",
         "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_seq_length", "32",
         "--train.log_interval", "1", "--train.save_interval", "4", "--train.lr_warmup_steps", "1",
         "--eval.interval", "4", "--eval.max_iters", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": XLA_FLAGS},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "logs" / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    from litgpt_mm.model import load_model

    model = load_model(out / "final")  # saved from the XLA device in litgpt's layout, reloads on CPU
    assert model.config.moe_impl == "static" and len(model.moe_layers) == 2


def _xla_cpu(args: list[str], timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": XLA_FLAGS, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")
def test_align_launcher_runs_on_the_xla_cpu_device(pretrained_tiny, tmp_path):
    """`xla/align.py`: `recipes/align.py`'s stage with static caption buckets, on XLA's CPU device."""
    import yaml

    litgpt_mm.data.prepare_coco.prepare(
        out_dir=tmp_path / "coco", features=True, feature_dir=tmp_path / "features", clip_pretrained=None
    )
    config = {
        "lm_checkpoint_dir": str(pretrained_tiny[0] / "final"), "data_dir": str(tmp_path / "coco"),
        "out_dir": str(tmp_path / "align"), "clip_pretrained": None, "feature_dir": str(tmp_path / "features"),
        "num_workers": 0, "num_sample_images": 0,
        "train": {"save_interval": 3, "log_interval": 1, "global_batch_size": 4, "micro_batch_size": 4,
                  "max_steps": 3, "lr_warmup_steps": 1, "max_norm": 1.0, "min_lr": 1e-4},
        "eval": {"interval": 3, "max_iters": 1, "initial_validation": False, "max_new_tokens": 4},
    }  # fmt: skip
    (tmp_path / "align.yaml").write_text(yaml.safe_dump(config))
    proc = _xla_cpu(["xla/align.py", "--recipe_config", str(tmp_path / "align.yaml"), "--caption_bucket", "32",
                     "--precision", "32-true"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "align" / "logs" / "train_log.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(0 < float(r.split(",")[3]) < 10 for r in rows)
    assert (tmp_path / "align" / "final" / "projector.pth").is_file()


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is not installed")
def test_generate_launcher_on_the_xla_cpu_device_matches_cpu(checkpoints, tmp_path):
    """`xla/generate_mm.py` (bucketed prompts, fixed batch, static decoding) gives the CPU's greedy answers."""
    import json

    from litgpt_mm.deploy.inference import Assistant, GenerationSettings

    image = REPO / "data" / "images" / "coffee.png"
    rows = [{"id": "a", "prompt": "What is in the cup?", "image": str(image)}, {"id": "b", "prompt": "Describe."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _xla_cpu(["xla/generate_mm.py", "--checkpoint_dir", str(checkpoints["merged"]), "--input",
                     str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--batch_size", "2",
                     "--max_new_tokens", "6"], env={"PT_XLA_DEBUG_LEVEL": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # features, prefill and one decode graph (recompiling at each new token made this test take minutes)
    compiles = proc.stderr.count("Compilation Cause")
    assert 0 < compiles <= 5, f"{compiles} XLA compilations for 6 new tokens"
    got = [json.loads(line)["answer"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    cpu = Assistant.load(checkpoints["merged"], device="cpu")
    want = cpu.answer_batch([r["prompt"] for r in rows], [[image], []], GenerationSettings(6))
    assert got == want
