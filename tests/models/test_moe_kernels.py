"""The Triton glue of the grouped MoE path (`litgpt_mm.models.moe_kernels`) against plain torch and the reference loop.

Triton's interpreter must be switched on before `triton` is first imported, so on a CPU-only machine
`test_kernels_under_triton_interpreter` runs this file again in a child process with `TRITON_INTERPRET=1`; there the
kernel tests run on CPU (and the launcher skips itself). On a CUDA machine the kernel tests also run in-process on the
GPU.
"""

import re

import pytest
import torch
from conftest import run_python

from litgpt_mm.config import Config
from litgpt_mm.models import moe_kernels
from litgpt_mm.models.moe import FUSED_GLUE_ENV, MoE

INTERPRETED = moe_kernels.kernels_available("cpu")
N_KERNEL_TESTS = 27  # tests per kernel device; the launcher checks that the child ran them all (and 2 more)


@pytest.fixture(
    params=[
        pytest.param(
            "cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="runs in a child process under the interpreter")
        ),
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
)
def device(request) -> str:
    return request.param


@pytest.fixture
def small_blocks(monkeypatch) -> None:
    """CPU blocks smaller than the test tensors: several row and column blocks, partial blocks, several steps of
    bias_act's row loop."""
    for key, value in dict(rows=8, cols=16, act_rows=4, act_cols=16).items():
        monkeypatch.setitem(moe_kernels.CPU_BLOCKS, key, value)


def _routing(n_tokens: int, k: int, n_expert: int, device: str, seed: int = 0):
    """Uneven random routing in which the last expert gets no token: (top_idx, order, inv_order, offs)."""
    g = torch.Generator().manual_seed(seed)
    top_idx = torch.stack([torch.randperm(n_expert - 1, generator=g)[:k] for _ in range(n_tokens)])
    top_idx[: n_tokens // 2] = torch.arange(k)  # expert 0 gets at least half the tokens
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv_order = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    offs = torch.cumsum(torch.bincount(flat, minlength=n_expert), 0, dtype=torch.int32)
    assert offs[-1] == offs[-2] and len(set(torch.diff(offs).tolist())) > 2  # uneven, last one empty
    return top_idx.to(device), order.to(device), inv_order.to(device), offs.to(device)


def _rand(*shape, device: str, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _grads(fn, inputs: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Output of `fn(*inputs)` and the gradients of its inputs for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*leaves)
    y.backward(_rand(*y.shape, device=y.device, seed=seed).to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves if t.requires_grad]


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], **tol) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tol or dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gather_slots_matches_reference(device, small_blocks, k):
    N, D, E = 37, 40, 5
    _, order, inv_order, _ = _routing(N, k, E, device)
    x = _rand(N, D, device=device, seed=1)
    got = _grads(lambda x: moe_kernels.gather_slots(x, order, inv_order, k, use_kernels=True), [x])
    want = _grads(lambda x: moe_kernels.gather_slots_reference(x, order, k, x.dtype), [x])
    assert torch.equal(got[0], want[0])
    _assert_all_close(got, want)


def test_gather_slots_casts_to_the_matmul_dtype(device, small_blocks):
    N, D, E, k = 37, 40, 5, 2
    _, order, inv_order, _ = _routing(N, k, E, device)
    x = _rand(N, D, device=device, seed=1)
    got = _grads(lambda x: moe_kernels.gather_slots(x, order, inv_order, k, torch.bfloat16, use_kernels=True), [x])
    want = _grads(lambda x: moe_kernels.gather_slots_reference(x, order, k, torch.bfloat16), [x])
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    # the interpreter rounds fp32 -> bf16 towards zero, CUDA to nearest: within one bf16 step either way
    _assert_all_close(got, want, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "identity"])
@pytest.mark.parametrize("rows_per_program", [None, 3])
def test_bias_act_matches_reference(device, small_blocks, act, bias, rows_per_program):
    N, H, E, k = 37, 40, 5, 2
    _, _, _, offs = _routing(N, k, E, device)
    a = _rand(N * k, H, device=device, seed=2) * 3
    b = _rand(E, H, device=device, seed=3) if bias else None
    inputs = [a] + ([b] if bias else [])

    def fused(a, b=None):
        return moe_kernels.bias_act(a, b, offs, act, use_kernels=True, rows_per_program=rows_per_program)

    got = _grads(fused, inputs)
    want = _grads(lambda a, b=None: moe_kernels.bias_act_reference(a, b, offs, act), inputs)
    # pre-activations up to ~10: torch's tanh-GELU forms 1 + tanh(u) and 1 - tanh(u)^2, which lose ~1e-6 (absolute)
    # in the tails to cancellation; the kernel's z * sigmoid(2u) does not
    _assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    if bias:
        assert torch.all(got[2][-1] == 0)  # the expert without tokens


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_combine_slots_matches_reference(device, small_blocks, k, bias):
    N, D, E = 37, 40, 5
    top_idx, _, inv_order, offs = _routing(N, k, E, device)
    out = _rand(N * k, D, device=device, seed=4)
    gates = torch.rand(N, k, generator=torch.Generator().manual_seed(5)).to(device)
    b = _rand(E, D, device=device, seed=6) if bias else None
    inputs = [out, gates] + ([b] if bias else [])

    def fused(out, gates, b=None):
        return moe_kernels.combine_slots(out, gates, top_idx, inv_order, offs, b, use_kernels=True)

    got = _grads(fused, inputs)
    want = _grads(
        lambda out, gates, b=None: moe_kernels.combine_slots_reference(out, gates, top_idx, inv_order, b), inputs
    )
    _assert_all_close(got, want)


def _moe_pair(device: str, **kw) -> tuple[MoE, MoE]:
    """(reference loop, grouped with fused glue) sharing weights; expert 0 gets no token."""
    kw = dict(n_embd=32, moe_intermediate_size=48, n_expert=4) | kw
    torch.manual_seed(0)
    loop = MoE(Config.from_name("phi-2-moe-tiny", moe_impl="loop", **kw))
    with torch.no_grad():
        if loop.b1 is not None:
            loop.b1.normal_(std=0.1)
            loop.b2.normal_(std=0.1)
        loop.router.weight.abs_()
        loop.router.weight[0] = -1.0  # positive inputs never pick expert 0
    fused = MoE(Config.from_name("phi-2-moe-tiny", moe_impl="grouped", **kw))
    fused.load_state_dict(loop.state_dict())
    fused.fused_glue = True
    return loop.to(device), fused.to(device)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_expert_per_token=2),
        dict(n_expert_per_token=1),
        dict(n_expert_per_token=3, n_expert=5, gelu_approximate="none"),
        dict(n_expert_per_token=2, bias=False),
    ],
    ids=["top2", "top1", "top3-exact-gelu", "top2-no-bias"],
)
def test_moe_with_fused_glue_matches_loop(device, kw):
    loop, fused = _moe_pair(device, **kw)
    x = torch.rand(37, 32, generator=torch.Generator().manual_seed(1)).to(device) + 0.1
    upstream = _rand(37, 32, device=device, seed=2)
    results = []
    for m in (loop, fused):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * upstream).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    counts = fused.stats.tokens_per_expert
    assert counts[0] == 0 and len(set(counts[1:].tolist())) > 1  # one idle expert, uneven segments
    _assert_all_close(results[1], results[0])
    assert torch.all(fused.w1.grad[0] == 0) and fused.router.weight.grad.abs().sum() > 0


def test_moe_frozen_experts_with_fused_glue_match_loop(device):
    """Frozen experts (as under QLoRA) still pass input and router gradients."""
    loop, fused = _moe_pair(device)
    x = torch.rand(29, 32, generator=torch.Generator().manual_seed(3)).to(device) + 0.1
    results = []
    for m in (loop, fused):
        for name in ("w1", "w2", "b1", "b2"):
            getattr(m, name).requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        results.append([y.detach(), xi.grad, m.router.weight.grad])
    _assert_all_close(results[1], results[0])


def test_auto_uses_fused_glue_where_kernels_run(monkeypatch):
    _, grouped = _moe_pair("cpu")
    grouped.fused_glue = None
    calls, combine = [], moe_kernels.combine_slots
    monkeypatch.setattr(moe_kernels, "combine_slots", lambda *a, **kw: calls.append(1) or combine(*a, **kw))
    grouped(torch.rand(5, 32))
    assert bool(calls) == INTERPRETED
    monkeypatch.delenv(FUSED_GLUE_ENV, raising=False)
    assert not grouped._use_fused_glue(torch.device("cuda"), torch.bfloat16)  # CUDA: opt-in until timed on a GPU


def test_fused_glue_torch_fallback_matches_loop(monkeypatch):
    """`fused_glue=True` without the kernels: the plain-torch references and per-expert matmuls."""
    monkeypatch.setattr(moe_kernels, "kernels_available", lambda device: False)
    loop, fused = _moe_pair("cpu")
    x = torch.rand(37, 32) + 0.1
    results = []
    for m in (loop, fused):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    _assert_all_close(results[1], results[0])


def _compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, int]):
    """Triton's compiler on `fn` for an H100 (sm_90) down to ptxas, no GPU needed; pointers 16-byte aligned as the
    launcher specialises them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels are not compiled")
def test_kernels_compile_for_sm90_with_vector_loads():
    """The interpreter accepts code the compiler refuses: compile each kernel as the phi-2 bf16 layer launches it."""
    bl, D, k = moe_kernels.CUDA_BLOCKS, 2560, 2
    tiles = dict(N_COLS=D, BLOCK_M=bl["rows"], BLOCK_N=bl["cols"])
    gather_sum = dict(src="*bf16", idx="*i64", weight="*fp32", expert="*i64", bias="*bf16", dst="*bf16", n_tokens="i32")
    combine_bwd = dict(gather_sum, grad_y="*bf16", out="*bf16", gates="*fp32", grad_out="*bf16", grad_gates="*fp32")
    bias_act = dict(a="*bf16", bias="*bf16", offs="*i32", grad_h="*bf16", out="*bf16", partial="*fp32", chunks="i32")
    act = dict(N_COLS=D, N_ITER=64, HAS_BIAS=True, WRITE_OUT=True, BLOCK_M=bl["act_rows"], BLOCK_N=bl["act_cols"])
    kernels = [
        (moe_kernels._gather_rows_kernel, dict(src="*fp32", idx="*i64", dst="*bf16", n_rows="i32", div="i32"), tiles),
        (moe_kernels._gather_sum_kernel, gather_sum, dict(tiles, K=k, HAS_WEIGHT=True, HAS_BIAS=True)),
        (moe_kernels._combine_bwd_kernel, combine_bwd, dict(tiles, K=k, K_P2=k, HAS_BIAS=True)),
        (moe_kernels._bias_act_kernel, bias_act, dict(act, ACT=2, BACKWARD=False)),
        (moe_kernels._bias_act_kernel, bias_act, dict(act, ACT=1, BACKWARD=True)),
    ]
    for fn, signature, constexprs in kernels:
        ptx = _compile_sm90(fn, signature, constexprs).asm["ptx"]
        assert "ld.global.v4.b32" in ptx, fn.__name__  # 16-byte loads of the bf16 rows


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_kernels_under_triton_interpreter():
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not cuda", __file__]
    proc = run_python(args, env={"TRITON_INTERPRET": "1"}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == N_KERNEL_TESTS + 2 and "failed" not in out, out
