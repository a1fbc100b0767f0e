"""Expert parallelism on CPU over gloo: ranks that each hold `E / N` experts give the outputs, losses, statistics,
gradients, clipping, optimizer steps and checkpoints of one process holding all experts, on the same micro-batches;
and `recipes/pretrain_moe.py --expert_parallel 2` follows the single-process loss curve, also across a resume that
changes `--expert_parallel`."""

import copy
import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_rows_close, pretrain_args, read_log
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import litgpt_mm.pretrain
from litgpt_mm.config import Config
from litgpt_mm.model import GPT
from litgpt_mm.models.expert_parallel import (
    check_expert_parallel,
    expert_parallel_mesh,
    finish_gradients,
    shard_experts,
    shard_optimizer_state,
)
from litgpt_mm.models.moe import MoE

TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` processes joined by a gloo process group; a failure in any re-raises."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _average_dense_grads(model: torch.nn.Module, experts: set[int]) -> None:
    """What DDP does to the dense gradients: the mean over all ranks."""
    for p in model.parameters():
        if p.grad is not None and id(p) not in experts:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _moe_inputs(config: Config, world: int, scenario: str) -> tuple[MoE, list[torch.Tensor], list[torch.Tensor]]:
    """A MoE whose router sends every token to expert 0, most second choices to expert 1, a few to expert 2 and none
    to expert 3 (`skewed`), or only experts 0 and 1 (`idle_rank`: the ranks holding experts 2 and 3 receive no
    token); per-rank inputs of different lengths and regression targets."""
    torch.manual_seed(0)
    moe = MoE(config)
    D = config.n_embd
    nn = torch.nn
    nn.init.normal_(moe.b1, std=0.02)
    nn.init.normal_(moe.b2, std=0.02)
    v = torch.randn(D)
    v /= v.norm()
    noise = torch.randn(4, D) / D**0.5
    scale = [2.0, 1.0, 0.8, -5.0] if scenario == "skewed" else [2.0, 1.0, -5.0, -5.0]
    with torch.no_grad():
        moe.router.weight.copy_(torch.stack([s * v for s in scale]) + 0.3 * noise * torch.tensor([1, 1, 1, 0])[:, None])
    xs = [torch.randn(8 + 4 * r, D) + 3 * v for r in range(world)]
    targets = [torch.randn(8 + 4 * r, D) for r in range(world)]
    return moe, xs, targets


def _moe_objective(moe: MoE, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).square().mean() + 0.1 * moe.aux_loss + 0.01 * moe.z_loss


def _check_moe(rank: int, world: int, ep_size: int, scenario: str) -> None:
    config = Config.from_name("phi-2-moe-tiny", n_embd=32, n_head=2, moe_intermediate_size=16)
    assert config.n_expert == 4 and config.n_expert_per_token == 2 and config.bias
    moe, xs, targets = _moe_inputs(config, world, scenario)

    # one process: every rank's micro-batch through the full layer, the mean of their losses (data parallelism)
    ref = copy.deepcopy(moe)
    ref_out, ref_stats, ref_losses, total = [], [], [], 0.0
    for x, t in zip(xs, targets, strict=True):
        y = ref(x)
        loss = _moe_objective(ref, y, t)
        total = total + loss / world
        ref_out.append(y.detach())
        ref_stats.append(ref.stats)
        ref_losses.append((loss.detach(), ref.aux_loss.detach(), ref.z_loss.detach()))
    total.backward()
    counts = sum(s.tokens_per_expert for s in ref_stats)
    assert counts[3] == 0 and counts[0] >= counts[1] > 0 and counts[0] > counts[2], counts  # skewed, expert 3 idle
    assert (counts[2] > 0) == (scenario == "skewed"), counts
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    max_norm = 0.5 * ref_norm.item()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)

    # expert parallel: this rank's micro-batch only, E / N experts
    mesh = expert_parallel_mesh("cpu", world, ep_size)
    ep_moe = copy.deepcopy(moe)
    shard_experts(ep_moe, mesh)
    ep = ep_moe.expert_parallel
    assert ep_moe.w1.shape[0] == config.n_expert // ep_size and ep.rank == rank % ep_size
    keep = ep.local_slice
    y = ep_moe(xs[rank])
    loss = _moe_objective(ep_moe, y, targets[rank])
    torch.testing.assert_close(y, ref_out[rank], **TOL)
    for got, want in zip((loss, ep_moe.aux_loss, ep_moe.z_loss), ref_losses[rank], strict=True):
        torch.testing.assert_close(got, want, **TOL)
    for field in ("tokens_per_expert", "cv", "entropy"):
        torch.testing.assert_close(getattr(ep_moe.stats, field), getattr(ref_stats[rank], field), **TOL)
    loss.backward()
    experts = {id(getattr(ep_moe, n)) for n in ("w1", "w2", "b1", "b2")}
    _average_dense_grads(ep_moe, experts)
    norm = finish_gradients(ep_moe, max_norm)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    torch.testing.assert_close(ep_moe.router.weight.grad, ref.router.weight.grad, **TOL)
    for name in ("w1", "w2", "b1", "b2"):
        torch.testing.assert_close(getattr(ep_moe, name).grad, getattr(ref, name).grad[keep], **TOL)

    # checkpoints: the single-device layout on save, the local slice on load; the optimizer's state likewise
    full = ep_moe.state_dict()
    assert full.keys() == moe.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in moe.state_dict().items())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(ep_moe.parameters(), lr=1e-2)
    shard_optimizer_state(opt, ep_moe)
    ref_opt.step()
    opt.step()
    saved, ref_saved = opt.state_dict(), ref_opt.state_dict()
    assert saved["state"].keys() == ref_saved["state"].keys()
    for i, state in ref_saved["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(saved["state"][i][key], value, **TOL)
    after = ep_moe.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(after[k], v, **TOL)

    fresh = copy.deepcopy(moe)
    shard_experts(fresh, mesh)
    fresh.load_state_dict(ref.state_dict())
    for name in ("w1", "w2", "b1", "b2"):
        torch.testing.assert_close(getattr(fresh, name), getattr(ref, name)[keep], **TOL)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    shard_optimizer_state(fresh_opt, fresh)
    fresh_opt.load_state_dict(ref_saved)
    w1 = fresh_opt.state[fresh.w1]["exp_avg"]
    torch.testing.assert_close(w1, ref_opt.state[ref.w1]["exp_avg"][keep], **TOL)


def _check_gpt(rank: int, world: int, fsdp: bool = False) -> None:
    """The whole model: logits, LM/balance/z losses and every gradient (random routing, 2 MoE layers); with `fsdp`,
    the dense parameters sharded by FSDP2 over both ranks (the experts left out of it), as `--strategy fsdp` does."""
    config = Config.from_name("phi-2-moe-tiny", n_layer=2, vocab_size=128, padded_vocab_size=128, block_size=16)
    torch.manual_seed(1)
    model = GPT(config)
    batches = [torch.randint(0, 128, (2, 17)) for _ in range(world)]

    def objective(m: GPT, batch: torch.Tensor):
        logits = m(batch[:, :-1])
        lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        aux, z = m.moe_losses()
        return logits, lm + m.moe_aux_objective(), (lm, aux, z)

    ref = copy.deepcopy(model)
    results = [objective(ref, b) for b in batches]
    (sum(r[1] for r in results) / world).backward()

    if fsdp:  # the recipe's `parallelize_fn` for `--strategy fsdp --expert_parallel 2`
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        litgpt_mm.pretrain.fully_shard_blocks(model, mesh, expert_parallel=world)
        assert any(isinstance(p, DTensor) for p in model.parameters())
    else:
        shard_experts(model, expert_parallel_mesh("cpu", world, world))
    experts = {id(p) for m in model.moe_layers for p in (m.w1, m.w2, m.b1, m.b2)}
    logits, loss, parts = objective(model, batches[rank])
    torch.testing.assert_close(logits, results[rank][0], **TOL)
    for got, want in zip(parts, results[rank][2], strict=True):
        torch.testing.assert_close(got, want, **TOL)
    loss.backward()
    if not fsdp:  # DDP's part
        _average_dense_grads(model, experts)
    max_norm = 0.5 * torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    finish_gradients(model, max_norm)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if id(p) in experts:
            want = want[model.moe_layers[0].expert_parallel.local_slice]
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _two_ranks(rank: int, world: int) -> None:
    _check_moe(rank, world, 2, "skewed")
    _check_moe(rank, world, 2, "idle_rank")
    _check_moe(rank, world, 1, "skewed")  # a 2 × 1 mesh: expert gradients reduced over the data-parallel dimension
    _check_gpt(rank, world)
    _check_gpt(rank, world, fsdp=True)


def _dp_times_ep(rank: int, world: int) -> None:
    _check_moe(rank, world, 2, "skewed")


def test_two_ranks_match_one_process():
    """2 ranks × 2 experts each vs one process with 4: skewed routing with an idle expert, then a rank whose
    experts receive no token at all, then the whole GPT (fp32, tolerance 1e-5)."""
    spawn(_two_ranks, 2)


@pytest.mark.slow
def test_data_parallel_times_expert_parallel_matches_one_process():
    """A 2 × 2 (`dp × ep`) mesh of 4 processes: expert gradients are also reduced over the data-parallel replicas
    (about 2 minutes on a busy 2-core machine: four interpreters start)."""
    spawn(_dp_times_ep, 4)


@pytest.mark.parametrize(
    ("ep", "n_expert", "world", "match"),
    [
        (3, 4, 6, "does not divide the model's 4 experts"),
        (2, 4, 3, "does not divide the world size 3"),
        (2, 0, 2, "has no experts"),
        (0, 4, 2, "positive number"),
    ],
)
def test_bad_expert_parallel_is_one_clear_error(ep, n_expert, world, match):
    with pytest.raises(ValueError, match=match):
        check_expert_parallel(ep, n_expert, world)
    check_expert_parallel(1, n_expert, world)  # off: always fine


@pytest.mark.slow
def test_pretrain_expert_parallel_matches_single_process_and_resumes_without_it(prepared_gutenberg, tmp_path, capfd):
    """`--devices 2 --expert_parallel 2` follows the one-process loss curve (balance and z losses included) and writes
    the single-device checkpoint layout; resuming its step-2 checkpoint with `--expert_parallel 1` (plain DDP)
    continues the same curve and the same expert statistics."""
    from conftest import run_python, run_recipe_here

    from litgpt_mm.training.checkpoint import save_config

    save_config(Config.from_name("phi-2-moe-tiny", n_layer=2), tmp_path)
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
    runs = {
        "one": dict(devices=1),
        "ep": dict(devices=2, expert_parallel=2),
        "resumed": dict(devices=2, expert_parallel=1, resume=tmp_path / "ep" / "step-000002"),
    }
    for name, extra in runs.items():
        run = partial(run_recipe_here, capfd) if extra["devices"] == 1 else run_python
        proc = run(pretrain_args(prepared_gutenberg, tmp_path / name, **common, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {n: read_log(tmp_path / n / "logs" / "train_log.csv") for n in runs}
    # one process accumulating 2 micro-batches sees the micro-batches of the 2 ranks: the balance loss agrees too
    assert_rows_close(logs["ep"], logs["one"], ("tokens", "loss", "aux_loss", "z_loss"))
    # plain DDP on the same ranks (the resumed run) sees the same micro-batches: everything agrees
    assert_rows_close(logs["resumed"], logs["ep"][2:], ("tokens", "loss", "aux_loss", "z_loss"), 1e-5)
    val = {n: read_log(tmp_path / n / "logs" / "val_log.csv") for n in runs}
    assert_rows_close(val["resumed"][-1:], val["ep"][-1:], ("val_loss",), 1e-5)  # (one process reads other rows)
    experts = {n: read_log(tmp_path / n / "logs" / "expert_load.csv") for n in ("ep", "resumed")}
    stat_columns = ("layer", "cv", "entropy", "e0", "e1", "e2", "e3")
    assert_rows_close(experts["resumed"], [r for r in experts["ep"] if int(r["step"]) > 2], stat_columns, 1e-5)

    one, ep, resumed = (torch.load(tmp_path / n / "final" / "lit_model.pth")["model"] for n in runs)
    assert ep.keys() == one.keys() and all(ep[k].shape == one[k].shape for k in one)  # the single-device layout
    assert ep["transformer.h.0.moe.w1"].shape[0] == 4
    step2 = torch.load(tmp_path / "ep" / "step-000002" / "lit_model.pth")["model"]
    for k in one:
        assert not torch.equal(resumed[k], step2[k]), k  # trained on from the expert-parallel checkpoint
    ep4 = torch.load(tmp_path / "ep" / "step-000004" / "lit_model.pth")["model"]
    for k in one:
        torch.testing.assert_close(resumed[k], ep4[k], rtol=0, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_pretrain_refuses_bad_expert_parallel_before_any_work(prepared_gutenberg, tmp_path):
    from conftest import pretrain_setup

    common = dict(
        data_dir=prepared_gutenberg,
        out_dir=tmp_path,
        model_name="phi-2-moe-tiny",
        num_workers=0,
        train=dict(micro_batch_size=4, global_batch_size=8, max_steps=1, lr_warmup_steps=0),
        eval=dict(),
    )
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        pretrain_setup(devices=1, expert_parallel=2, **common)
    with pytest.raises(ValueError, match="does not divide the model's 4 experts"):
        pretrain_setup(devices=3, expert_parallel=3, **common)
    with pytest.raises(ValueError, match="has no experts"):
        pretrain_setup(devices=2, expert_parallel=2, **{**common, "model_name": "phi-2-tiny"})
    assert not any(tmp_path.iterdir())
