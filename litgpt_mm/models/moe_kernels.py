"""Triton kernels for the memory-bound glue around the grouped expert matmuls of `litgpt_mm.models.moe`.

The grouped MoE path works on the N·k routing slots sorted by expert (`order`: sorted position -> slot `t*k + j`,
`inv_order` its inverse, `offs`: the cumulative segment ends per expert, as `torch._grouped_mm` takes them). Around
its two grouped matmuls three passes remain, each one kernel here, forward and backward, none with atomics:

* `gather_slots`: `x[order // k]` in expert order, cast to the matmul dtype on the way; its backward is the
  gather-sum of each token's k slot gradients.
* `bias_act`: `act(a + b[expert of row])` with `act` GELU (exact or tanh) or none; the backward writes the
  pre-activation gradient and reduces the bias gradient per expert segment (each program owns a slice of one
  segment and a column block, the slices' partial sums are added by torch; deterministic).
* `combine_slots`: `y[t] = sum_j g[t, j] * (out[inv_order[t*k + j]] + b[e(t, j)])`, the output in expert order
  gathered back per token; its backward writes each slot's gradient once (a permutation, no atomics) and the gate
  gradient `dot(grad_y[t], out[slot] + b)`.

Each op has a plain-torch reference (`*_reference`), used wherever the kernels are not (`kernels_available`): CUDA
with Triton, or CPU under Triton's interpreter (`TRITON_INTERPRET=1` before `triton` is imported, for tests).
"""

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None
    tl = SimpleNamespace(constexpr=int)  # the kernels' annotations still evaluate

_jit = triton.jit if triton is not None else (lambda fn: fn)

ACTIVATIONS = {"identity": 0, "gelu": 1, "gelu_tanh": 2}

# Block sizes (rows, columns; `act_*` for `bias_act`; `rows_per_program`: rows of one segment slice in `bias_act`).
# CUDA: bf16 rows of 2560 in 16-byte vector loads with 4 warps. CPU (the interpreter runs each program in Python):
# whole rows (`cols: None`); tests shrink them to cover several blocks and loop steps.
CUDA_BLOCKS = {"rows": 16, "cols": 256, "act_rows": 32, "act_cols": 128, "rows_per_program": 256, "warps": 4}
CPU_BLOCKS = {"rows": 64, "cols": None, "act_rows": 64, "act_cols": None, "rows_per_program": 256, "warps": 1}


def _interpreted(fn: Any) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def kernels_available(device: torch.device | str) -> bool:
    """Whether the ops here run as Triton kernels on `device`: CUDA with Triton, or CPU under Triton's interpreter.

    The interpreter is on when `TRITON_INTERPRET=1` was set before `triton` was first imported (Triton's own
    library functions are jitted at import, in the mode of that moment).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreted(tl.zeros) and _interpreted(_gather_rows_kernel)


def _blocks(n_cols: int, device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return CUDA_BLOCKS
    whole = triton.next_power_of_2(max(n_cols, 1))
    return {key: whole if value is None else value for key, value in CPU_BLOCKS.items()}


# ----------------------------------------------------------------------------------------------------------- kernels


@_jit
def _gather_rows_kernel(src, idx, dst, n_rows, div, N_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst[r] = src[idx[r] // div] for contiguous row-major src and dst of width N_COLS."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < N_COLS)[None, :]
    src_rows = tl.load(idx + rows, mask=row_mask, other=0).to(tl.int64) // div
    v = tl.load(src + src_rows[:, None] * N_COLS + cols[None, :], mask=mask)
    dst_ptrs = dst + rows.to(tl.int64)[:, None] * N_COLS + cols[None, :]
    tl.store(dst_ptrs, v.to(dst.dtype.element_ty), mask=mask)


@_jit
def _gather_sum_kernel(
    src,
    idx,
    weight,
    expert,
    bias,
    dst,
    n_tokens,
    N_COLS: tl.constexpr,
    K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dst[t] = sum_j weight[t, j] * (src[idx[t*K + j]] + bias[expert[t, j]]), accumulated in fp32."""
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = toks < n_tokens
    mask = tok_mask[:, None] & (cols < N_COLS)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(idx + toks * K + j, mask=tok_mask, other=0).to(tl.int64)
        v = tl.load(src + slot[:, None] * N_COLS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(expert + toks * K + j, mask=tok_mask, other=0).to(tl.int64)
            v += tl.load(bias + e[:, None] * N_COLS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v *= tl.load(weight + toks * K + j, mask=tok_mask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(dst + toks.to(tl.int64)[:, None] * N_COLS + cols[None, :], acc.to(dst.dtype.element_ty), mask=mask)


@_jit
def _combine_bwd_kernel(
    grad_y,
    out,
    gates,
    idx,
    expert,
    bias,
    grad_out,
    grad_gates,
    n_tokens,
    N_COLS: tl.constexpr,
    K: tl.constexpr,
    K_P2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For BLOCK_M tokens, over all columns: grad_out[slot] = g * grad_y[t] (each slot written once) and
    grad_gates[t, j] = dot(grad_y[t], out[slot] + bias[e])."""
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_mask = toks < n_tokens
    ks = tl.arange(0, K_P2)
    dots = tl.zeros((BLOCK_M, K_P2), dtype=tl.float32)
    for c0 in range(0, N_COLS, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = tok_mask[:, None] & (cols < N_COLS)[None, :]
        gy = tl.load(grad_y + toks.to(tl.int64)[:, None] * N_COLS + cols[None, :], mask=mask, other=0.0)
        gy = gy.to(tl.float32)
        for j in tl.static_range(K):
            slot = tl.load(idx + toks * K + j, mask=tok_mask, other=0).to(tl.int64)
            g = tl.load(gates + toks * K + j, mask=tok_mask, other=0.0).to(tl.float32)
            o = tl.load(out + slot[:, None] * N_COLS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                e = tl.load(expert + toks * K + j, mask=tok_mask, other=0).to(tl.int64)
                o += tl.load(bias + e[:, None] * N_COLS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            go = (gy * g[:, None]).to(grad_out.dtype.element_ty)
            tl.store(grad_out + slot[:, None] * N_COLS + cols[None, :], go, mask=mask)
            dots += tl.where(ks[None, :] == j, tl.sum(gy * o, axis=1)[:, None], 0.0)
    gg_ptrs = grad_gates + toks[:, None] * K + ks[None, :]
    tl.store(gg_ptrs, dots.to(grad_gates.dtype.element_ty), mask=tok_mask[:, None] & (ks < K)[None, :])


@_jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in fp32 for ACT 0 (identity), 1 (exact GELU), 2 (tanh GELU)."""
    if ACT == 1:  # z * Phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:  # 0.5 z (1 + tanh(u)) = z * sigmoid(2u)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
        return z * s, s + 2.0 * z * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        return z, tl.full(z.shape, 1.0, tl.float32)


@_jit
def _bias_act_kernel(
    a,
    bias,
    offs,
    grad_h,
    out,
    partial,
    chunks,
    N_COLS: tl.constexpr,
    N_ITER: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: slice `pid % chunks` of expert `pid // chunks`'s row segment (`offs`: segment ends) × a column
    block. Forward: out = act(a + bias[e]). Backward: out = grad_h * act'(a + bias[e]) (if WRITE_OUT), and the
    column sums of that gradient over the slice go to partial[e, chunk] (the bias gradient, once summed over chunks).
    With ACT == 0 the backward needs no `a`: the gradient is grad_h itself.

    The row loop runs `N_ITER` (enough for a slice of all rows) steps and skips those past the slice: Triton's
    interpreter cannot loop over bounds loaded from memory."""
    e = tl.program_id(0) // chunks
    chunk = tl.program_id(0) % chunks
    start = tl.where(e > 0, tl.load(offs + tl.maximum(e - 1, 0)), 0)
    end = tl.load(offs + e)
    per = (end - start + chunks - 1) // chunks
    lo = start + chunk * per
    hi = tl.minimum(lo + per, end)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_COLS
    if HAS_BIAS:
        b = tl.load(bias + e * N_COLS + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, N_ITER):
        r0 = lo + i * BLOCK_M
        if r0 < hi:
            rows = r0 + tl.arange(0, BLOCK_M)
            mask = (rows < hi)[:, None] & col_mask[None, :]
            ptrs = rows.to(tl.int64)[:, None] * N_COLS + cols[None, :]
            if BACKWARD:
                g = tl.load(grad_h + ptrs, mask=mask, other=0.0).to(tl.float32)
            if ACT != 0 or not BACKWARD:
                z = tl.load(a + ptrs, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    z += b[None, :]
                v, d = _act_and_grad(z, ACT)
                if BACKWARD:
                    g = g * d
            if BACKWARD:
                acc += tl.sum(g, axis=0)
                if WRITE_OUT:
                    tl.store(out + ptrs, g.to(out.dtype.element_ty), mask=mask)
            else:
                tl.store(out + ptrs, v.to(out.dtype.element_ty), mask=mask)
    if BACKWARD and HAS_BIAS:
        tl.store(partial + (e * chunks + chunk) * N_COLS + cols, acc, mask=col_mask)


# ----------------------------------------------------------------------------------------------------------- launches


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, div: int, dtype: torch.dtype) -> torch.Tensor:
    """`src[idx // div].to(dtype)` in one pass."""
    n_rows, n_cols = idx.numel(), src.size(1)
    dst = src.new_empty(n_rows, n_cols, dtype=dtype)
    if dst.numel():
        bl = _blocks(n_cols, src.device)
        grid = (triton.cdiv(n_rows, bl["rows"]), triton.cdiv(n_cols, bl["cols"]))
        _gather_rows_kernel[grid](
            src, idx, dst, n_rows, div, N_COLS=n_cols, BLOCK_M=bl["rows"], BLOCK_N=bl["cols"], num_warps=bl["warps"]
        )
    return dst


def _gather_sum(
    src: torch.Tensor,
    idx: torch.Tensor,
    k: int,
    dtype: torch.dtype,
    weight: torch.Tensor | None = None,
    expert: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dst[t] = sum_j weight[t, j] * (src[idx[t*k + j]] + bias[expert[t, j]])` for the `idx.numel() // k` tokens."""
    n_tokens, n_cols = idx.numel() // k, src.size(1)
    dst = src.new_empty(n_tokens, n_cols, dtype=dtype)
    if dst.numel():
        bl = _blocks(n_cols, src.device)
        grid = (triton.cdiv(n_tokens, bl["rows"]), triton.cdiv(n_cols, bl["cols"]))
        _gather_sum_kernel[grid](
            src,
            idx,
            src if weight is None else weight,
            idx if expert is None else expert,
            src if bias is None else bias,
            dst,
            n_tokens,
            N_COLS=n_cols,
            K=k,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=bl["rows"],
            BLOCK_N=bl["cols"],
            num_warps=bl["warps"],
        )
    return dst


def _bias_act(
    a: torch.Tensor | None,
    bias: torch.Tensor | None,
    offs: torch.Tensor,
    act: str,
    grad_h: torch.Tensor | None = None,
    write_out: bool = True,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Forward (`grad_h` None): `(act(a + bias[e]), None)`. Backward: `(grad_a or None, bias gradient or None)`."""
    ref = a if a is not None else grad_h
    n_rows, n_cols, n_expert = ref.size(0), ref.size(1), offs.numel()
    backward = grad_h is not None
    out = torch.empty_like(ref) if write_out else None
    bl = _blocks(n_cols, ref.device)
    chunks = max(1, triton.cdiv(n_rows, n_expert * (rows_per_program or bl["rows_per_program"])))
    partial = ref.new_empty(n_expert, chunks, n_cols, dtype=torch.float32) if backward and bias is not None else None
    if n_rows and n_cols:
        grid = (n_expert * chunks, triton.cdiv(n_cols, bl["act_cols"]))
        _bias_act_kernel[grid](
            ref,
            ref if bias is None else bias,
            offs,
            ref if grad_h is None else grad_h,
            ref if out is None else out,
            ref if partial is None else partial,
            chunks,
            N_COLS=n_cols,
            N_ITER=triton.next_power_of_2(triton.cdiv(triton.cdiv(n_rows, chunks), bl["act_rows"])),
            ACT=ACTIVATIONS[act],
            HAS_BIAS=bias is not None,
            BACKWARD=backward,
            WRITE_OUT=write_out,
            BLOCK_M=bl["act_rows"],
            BLOCK_N=bl["act_cols"],
            num_warps=bl["warps"],
        )
    elif partial is not None:
        partial.zero_()
    if not backward:
        return out, None
    return out, None if partial is None else partial.sum(dim=1)


def _combine_bwd(
    grad_y: torch.Tensor,
    out: torch.Tensor,
    gates: torch.Tensor,
    top_idx: torch.Tensor,
    inv_order: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the expert-ordered output, gradient of the gates) of `combine_slots`."""
    n_tokens, k = gates.shape
    n_cols = out.size(1)
    grad_out = torch.empty_like(out)
    grad_gates = torch.empty_like(gates)
    if n_tokens:
        bl = _blocks(n_cols, out.device)
        _combine_bwd_kernel[(triton.cdiv(n_tokens, bl["rows"]),)](
            grad_y,
            out,
            gates,
            inv_order,
            top_idx,
            out if bias is None else bias,
            grad_out,
            grad_gates,
            n_tokens,
            N_COLS=n_cols,
            K=k,
            K_P2=triton.next_power_of_2(k),
            HAS_BIAS=bias is not None,
            BLOCK_M=bl["rows"],
            BLOCK_N=bl["cols"],
            num_warps=bl["warps"],
        )
    return grad_out, grad_gates


# ------------------------------------------------------------------------------------------------- autograd functions


class _GatherSlotsFn(torch.autograd.Function):
    """`gather_slots` with the Triton kernels: forward one gather pass, backward one gather-sum pass."""

    @staticmethod
    def forward(ctx, x, order, inv_order, k, dtype):
        ctx.save_for_backward(inv_order)
        ctx.k, ctx.x_dtype = k, x.dtype
        return _gather_rows(x.contiguous(), order, k, dtype)

    @staticmethod
    def backward(ctx, grad):
        (inv_order,) = ctx.saved_tensors
        return _gather_sum(grad.contiguous(), inv_order, ctx.k, ctx.x_dtype), None, None, None, None


class _BiasActFn(torch.autograd.Function):
    """`bias_act` with the Triton kernel; saves the pre-bias input (the grouped matmul's output), not the result."""

    @staticmethod
    def forward(ctx, a, bias, offs, act, rows_per_program):
        a = a.contiguous()
        ctx.save_for_backward(a, bias, offs)
        ctx.act, ctx.rows_per_program = act, rows_per_program
        return _bias_act(a, bias, offs, act, rows_per_program=rows_per_program)[0]

    @staticmethod
    def backward(ctx, grad):
        a, bias, offs = ctx.saved_tensors
        grad_a, grad_bias = _bias_act(a, bias, offs, ctx.act, grad.contiguous(), rows_per_program=ctx.rows_per_program)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_bias, None, None, None


class _CombineFn(torch.autograd.Function):
    """`combine_slots` with the Triton kernels; the output bias gradient reuses `_bias_act_kernel`'s reduction."""

    @staticmethod
    def forward(ctx, out, gates, top_idx, inv_order, offs, bias):
        out, gates, top_idx = out.contiguous(), gates.contiguous(), top_idx.contiguous()
        ctx.save_for_backward(out, gates, top_idx, inv_order, offs, bias)
        return _gather_sum(out, inv_order, gates.size(1), out.dtype, gates, top_idx, bias)

    @staticmethod
    def backward(ctx, grad):
        out, gates, top_idx, inv_order, offs, bias = ctx.saved_tensors
        grad_out, grad_gates = _combine_bwd(grad.contiguous(), out, gates, top_idx, inv_order, bias)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[5]:
            grad_bias = _bias_act(None, bias, offs, "identity", grad_out, write_out=False)[1].to(bias.dtype)
        return grad_out, grad_gates, None, None, None, grad_bias


# ---------------------------------------------------------------------------------------------------------- public ops


def _use(device: torch.device, use_kernels: bool | None) -> bool:
    return kernels_available(device) if use_kernels is None else use_kernels


def gather_slots(
    x: torch.Tensor,
    order: torch.Tensor,
    inv_order: torch.Tensor,
    k: int,
    dtype: torch.dtype | None = None,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """Rows of `x` (N, D) for the N·k routing slots in expert order, `x[order // k]`, cast to `dtype`.

    Args:
        x: token rows, shape (N, D).
        order: sorted position -> slot `t*k + j`, shape (N·k,).
        inv_order: the inverse permutation (the backward's gather-sum reads it).
        k: experts per token.
        dtype: output dtype (the matmul dtype); default `x.dtype`.
        use_kernels: force (True) or refuse (False) the Triton kernel; default `kernels_available(x.device)`.
    """
    dtype = dtype or x.dtype
    if _use(x.device, use_kernels):
        return _GatherSlotsFn.apply(x, order, inv_order, k, dtype)
    return gather_slots_reference(x, order, k, dtype)


def bias_act(
    a: torch.Tensor,
    bias: torch.Tensor | None,
    offs: torch.Tensor,
    act: str = "gelu",
    use_kernels: bool | None = None,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """`act(a + bias[expert of row])` for rows grouped by expert.

    Args:
        a: rows in expert order, shape (S, H).
        bias: per-expert bias, shape (E, H), or None.
        offs: int32 cumulative segment ends, shape (E,), `offs[-1] == S`.
        act: `identity`, `gelu` (exact) or `gelu_tanh`.
        use_kernels: as in `gather_slots`.
        rows_per_program: rows of one segment slice in the kernel's backward reduction (tests make it small).
    """
    if _use(a.device, use_kernels):
        return _BiasActFn.apply(a, bias, offs, act, rows_per_program)
    return bias_act_reference(a, bias, offs, act)


def combine_slots(
    out: torch.Tensor,
    gates: torch.Tensor,
    top_idx: torch.Tensor,
    inv_order: torch.Tensor,
    offs: torch.Tensor,
    bias: torch.Tensor | None = None,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """`y[t] = sum_j gates[t, j] * (out[inv_order[t*k + j]] + bias[top_idx[t, j]])` in `out`'s dtype.

    Args:
        out: expert outputs in expert order, shape (N·k, D).
        gates: routing weights, shape (N, k).
        top_idx: expert of each slot, shape (N, k).
        inv_order: slot `t*k + j` -> its row in `out`.
        offs: int32 cumulative segment ends per expert (the bias gradient's reduction).
        bias: per-expert output bias, shape (E, D), or None.
        use_kernels: as in `gather_slots`.
    """
    if _use(out.device, use_kernels):
        return _CombineFn.apply(out, gates, top_idx, inv_order, offs, bias)
    return combine_slots_reference(out, gates, top_idx, inv_order, bias)


def gather_slots_reference(x: torch.Tensor, order: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain-torch `gather_slots`."""
    return x.index_select(0, order // k).to(dtype)


def bias_act_reference(a: torch.Tensor, bias: torch.Tensor | None, offs: torch.Tensor, act: str) -> torch.Tensor:
    """Plain-torch `bias_act`."""
    if bias is not None:
        rows = torch.arange(a.size(0), device=a.device, dtype=offs.dtype)
        a = a + bias.index_select(0, torch.searchsorted(offs, rows, right=True))
    return a if act == "identity" else F.gelu(a, approximate="tanh" if act == "gelu_tanh" else "none")


def combine_slots_reference(
    out: torch.Tensor,
    gates: torch.Tensor,
    top_idx: torch.Tensor,
    inv_order: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch `combine_slots` (fp32 accumulation like the kernel)."""
    o = out.index_select(0, inv_order).view(*top_idx.shape, out.size(-1)).float()
    if bias is not None:
        o = o + bias[top_idx].float()
    return (o * gates.unsqueeze(-1).float()).sum(dim=1).to(out.dtype)


def gelu_activation(approximate: str) -> str:
    """The `act` name of `F.gelu(..., approximate=approximate)`."""
    return "gelu_tanh" if approximate == "tanh" else "gelu"


__all__ = [
    "ACTIVATIONS",
    "bias_act",
    "bias_act_reference",
    "combine_slots",
    "combine_slots_reference",
    "gather_slots",
    "gather_slots_reference",
    "gelu_activation",
    "kernels_available",
]
