import math

import pytest
import torch

from litgpt_mm.config import Config
from litgpt_mm.models.moe import MoE, load_balancing_loss, router_z_loss


def _moe(impl: str, **kw) -> MoE:
    torch.manual_seed(0)
    cfg = Config.from_name("phi-2-moe-tiny", moe_impl=impl, **kw)
    return MoE(cfg)


@pytest.mark.parametrize("other", ["grouped", "static"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_loop_and_grouped_give_same_outputs_and_gradients(k, other):
    loop, grouped = _moe("loop", n_expert_per_token=k), _moe(other, n_expert_per_token=k)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 37, loop.config.n_embd)
    upstream = torch.randn_like(x)
    outs, grads = [], []
    for m in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * upstream).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for g_loop, g_grouped in zip(*grads, strict=True):
        torch.testing.assert_close(g_loop, g_grouped, rtol=1e-5, atol=1e-6)
    # every expert that received tokens got a non-zero gradient
    used = loop.stats.tokens_per_expert > 0
    assert torch.all(loop.w1.grad.flatten(1).abs().sum(1)[used] > 0)


@pytest.mark.parametrize("frozen_experts", [False, True])
def test_grouped_handles_idle_and_frozen_experts(frozen_experts):
    """Experts that get no tokens have zero gradients; frozen experts (as under QLoRA) still pass input gradients."""
    loop, grouped = _moe("loop"), _moe("grouped")
    with torch.no_grad():
        loop.router.weight.abs_()
        loop.router.weight[:2] = -1.0  # positive inputs never pick experts 0 and 1
    grouped.load_state_dict(loop.state_dict())
    x = torch.rand(2, 29, loop.config.n_embd) + 0.1
    grads = []
    for m in (loop, grouped):
        for name in ("w1", "w2", "b1", "b2"):
            getattr(m, name).requires_grad_(not frozen_experts)
        xi = x.clone().requires_grad_(True)
        (m(xi) * torch.linspace(-1, 1, x.size(-1))).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    assert grouped.stats.tokens_per_expert[:2].sum() == 0 and grouped.stats.tokens_per_expert[2:].min() > 0
    for g_loop, g_grouped in zip(*grads, strict=True):
        torch.testing.assert_close(g_loop, g_grouped, rtol=1e-5, atol=1e-6)
    if not frozen_experts:
        assert torch.equal(grouped.w1.grad[:2], torch.zeros_like(grouped.w1.grad[:2]))


def test_balance_loss_is_one_for_uniform_routing_and_e_over_k_for_collapse():
    N, E, k = 64, 8, 2
    probs = torch.full((N, E), 1.0 / E)
    tokens = torch.full((E,), N * k / E)
    assert load_balancing_loss(probs, tokens, k).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.tensor([N] + [0] * (E - 1)).float(), 1).item() == pytest.approx(E)
    two = torch.zeros(E)
    two[0], two[1] = N, N  # top-2 of a collapsed router: expert 0 plus one more
    assert load_balancing_loss(collapsed, two, 2).item() == pytest.approx(E / 2)


def test_module_records_collapse_value_when_router_prefers_one_expert():
    m = _moe("grouped", n_expert_per_token=1).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 50.0
    x = torch.randn(2, 16, m.config.n_embd)
    x[..., 0] = 1.0
    m(x)
    E = m.config.n_expert
    assert m.aux_loss.item() == pytest.approx(E, rel=1e-3)
    assert m.stats.tokens_per_expert.tolist() == [32.0] + [0.0] * (E - 1)
    assert m.stats.cv.item() == pytest.approx(math.sqrt(E - 1), rel=1e-5)
    assert m.stats.entropy.item() < 1e-3


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -1.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(2 + math.exp(-1))]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_router_runs_in_fp32_and_gates_renormalise():
    m = _moe("grouped")
    x = torch.randn(10, m.config.n_embd, dtype=torch.bfloat16)
    gates, idx = m.to(torch.bfloat16).route(x)
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    assert idx.shape == (10, m.config.n_expert_per_token)
    assert m.stats.tokens_per_expert.sum().item() == 10 * m.config.n_expert_per_token


def test_losses_only_recorded_in_training():
    m = _moe("loop").eval()
    m(torch.randn(4, m.config.n_embd))
    assert m.aux_loss is None and m.stats is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_matches_loop_on_cuda_bf16():
    loop = _moe("loop", n_embd=256, moe_intermediate_size=512)
    grouped = _moe("grouped", n_embd=256, moe_intermediate_size=512)
    grouped.load_state_dict(loop.state_dict())
    outs, grads = [], []
    x = torch.randn(4, 1000, 256, device="cuda")
    upstream = torch.randn_like(x)
    for m in (loop, grouped):
        m.cuda()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        (y.float() * upstream).sum().backward()
        outs.append(y.float())
        grads.append([xi.grad, m.w1.grad, m.w2.grad, m.router.weight.grad])
    for a, b in zip([outs[0]] + grads[0], [outs[1]] + grads[1], strict=True):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 1e-2, rel  # bf16 matmuls in a different order


def test_compiled_moe_model_matches_eager_on_the_cpu_fallback_path():
    """`torch.compile` traces the MoE model (the per-segment expert path runs eagerly: its group sizes are
    data-dependent) and gives the eager loss and gradients."""
    from litgpt_mm.model import GPT

    torch.manual_seed(0)
    model = GPT(Config.from_name("phi-2-moe-tiny", n_layer=2))
    x = torch.randint(0, model.config.padded_vocab_size, (2, 16))

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(x).float().logsumexp(-1).mean() + model.moe_aux_objective()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, backend="eager", fullgraph=False))
    assert torch.allclose(eager[0], compiled[0], atol=1e-6)
    assert len(eager[1]) == len(compiled[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager[1], compiled[1], strict=True))
