r"""Mixture of experts placed after the MLP of a Phi-2 block.

For a block input :math:`x` (Phi-2's parallel attention + MLP with one shared LayerNorm), litgpt-mm computes

.. math::

    h = x + \mathrm{Attn}(\mathrm{LN}_1(x)) + \mathrm{MLP}(\mathrm{LN}_1(x)) \\
    u = \mathrm{LN}_{moe}(h), \quad p = \mathrm{softmax}(W_r u) \ \text{(fp32)} \\
    \mathcal{T} = \mathrm{TopK}(p, k), \quad g_e = p_e / \textstyle\sum_{j \in \mathcal{T}} p_j \\
    y = h + \textstyle\sum_{e \in \mathcal{T}} g_e \, E_e(u), \quad
    E_e(u) = W^{(2)}_e \, \mathrm{GELU}_{tanh}(W^{(1)}_e u + b^{(1)}_e) + b^{(2)}_e

Routing is dropless: every token reaches its k experts, there is no capacity factor. Two auxiliary losses are exposed:

* load balancing (Switch Transformer, normalised so that perfect balance gives 1):
  :math:`L_{bal} = E \sum_e f_e P_e`, with :math:`f_e` the fraction of the N·k routing slots sent to expert e and
  :math:`P_e` the mean router probability of expert e. Total collapse on one expert gives E / k.
* router z-loss (ST-MoE): :math:`L_z = \frac{1}{N} \sum_t (\log \sum_e \exp(z_{te}))^2` on the router logits z.

Expert weights are stored stacked (`w1`: E×H×D, `w2`: E×D×H, like `nn.Linear.weight` per expert), so the reference
loop and the grouped path share one state dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from litgpt_mm.config import Config
from litgpt_mm.models import moe_kernels

FUSED_GLUE_ENV = "LITGPT_MM_MOE_FUSED_GLUE"


@dataclass
class MoEStats:
    """Per-layer routing statistics of the last forward pass, kept on the device (no host sync)."""

    tokens_per_expert: torch.Tensor  # (E,) routing slots per expert
    cv: torch.Tensor  # coefficient of variation of `tokens_per_expert`
    entropy: torch.Tensor  # mean router entropy in nats


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-style balance loss `E * sum_e f_e * P_e`; equals 1 under perfect balance.

    Args:
        probs: router probabilities, shape (N, E), fp32.
        tokens_per_expert: routing slots per expert, shape (E,).
        k: experts per token.
    """
    n_tokens, n_expert = probs.shape
    f = tokens_per_expert / (n_tokens * k)
    return n_expert * torch.sum(f * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits, shape (N, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the input's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda":
        return False
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


class MoE(nn.Module):
    """Top-k routed experts (Phi-2-style GELU MLPs) with a fp32 router and dropless routing.

    `fused_glue` picks the grouped path's glue around the expert matmuls: `True` uses the Triton kernels of
    `models.moe_kernels` (with their plain-torch references where the kernels don't run), `False` never does, and
    `None` (default) uses them under Triton's CPU interpreter (`TRITON_INTERPRET=1`, the tests) and on CUDA only when
    `LITGPT_MM_MOE_FUSED_GLUE=1`: the kernels are verified against the loop under the interpreter but have not been
    timed on a GPU yet (`make gpu-check` does), so CUDA keeps the measured torch glue until they have.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        E, D, H = config.n_expert, config.n_embd, config.moe_intermediate_size
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.w2 = nn.Parameter(torch.empty(E, D, H))
        if config.bias:
            self.b1 = nn.Parameter(torch.empty(E, H))
            self.b2 = nn.Parameter(torch.empty(E, D))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None
        self.fused_glue: bool | None = None
        # set by `models.expert_parallel.shard_experts`: this rank then holds only its `n_expert / N` experts and
        # `forward` exchanges tokens with the other ranks of the expert-parallel group
        self.expert_parallel = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal init like litgpt's `_init_weights`; `out_std` for the second projection if given."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)
        if self.b1 is not None:
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router in fp32: returns (gates (N, k) renormalised, expert ids (N, k)) and records losses and stats."""
        k, E = self.config.n_expert_per_token, self.config.n_expert
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, top_idx = probs.topk(k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)

        ones = torch.ones(top_idx.numel(), device=x.device, dtype=torch.float32)
        tokens_per_expert = torch.zeros(E, device=x.device, dtype=torch.float32)
        tokens_per_expert.index_add_(0, top_idx.reshape(-1), ones)
        aux_loss = z_loss = None
        if self.training and torch.is_grad_enabled():
            aux_loss, z_loss = load_balancing_loss(probs, tokens_per_expert, k), router_z_loss(logits)
        if torch._C._current_graph_task_id() != -1:
            # recomputed inside the backward (activation checkpointing): the same ops run, but the forward's losses
            # and statistics stand; keeping these would hold every recomputed block's activations alive
            return gates, top_idx
        self.aux_loss, self.z_loss = aux_loss, z_loss
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
            cv = tokens_per_expert.std(unbiased=False) / tokens_per_expert.mean().clamp_min(1e-9)
            self.stats = MoEStats(tokens_per_expert.detach(), cv, entropy)
        return gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, top_idx = self.route(x)
        impl = self.config.moe_impl
        if impl == "auto":
            impl = "static" if x.device.type == "xla" else "grouped"
        if self.expert_parallel is not None:
            y = self.expert_parallel.forward(self, x, gates, top_idx)
        elif impl == "loop":
            y = self._forward_loop(x, gates, top_idx)
        elif impl == "static":
            y = self._forward_static(x, gates, top_idx)
        else:
            y = self._forward_grouped(x, gates, top_idx)
        return y.reshape(shape)

    def _forward_static(self, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by its (zero unless chosen) gate: static shapes for XLA."""
        dtype = _compute_dtype(x)
        weights = torch.zeros(x.size(0), self.config.n_expert, device=x.device, dtype=gates.dtype)
        weights.scatter_(1, top_idx, gates)
        h = torch.einsum("nd,ehd->neh", x.to(dtype), self.w1.to(dtype))
        if self.b1 is not None:
            h = h + self.b1.to(dtype)
        out = torch.einsum("neh,edh->ned", self._act(h), self.w2.to(dtype))
        if self.b2 is not None:
            out = out + self.b2.to(dtype)
        return (out * weights.unsqueeze(-1).to(dtype)).sum(dim=1)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h, approximate=self.config.gelu_approximate)

    def _forward_loop(self, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Reference path: one masked gather/scatter per expert."""
        y = torch.zeros(x.shape, device=x.device, dtype=_compute_dtype(x))
        for e in range(self.config.n_expert):
            tok, slot = torch.where(top_idx == e)
            h = self._act(F.linear(x.index_select(0, tok), self.w1[e], None if self.b1 is None else self.b1[e]))
            out = F.linear(h, self.w2[e], None if self.b2 is None else self.b2[e])
            y.index_add_(0, tok, (out * gates[tok, slot, None].to(out.dtype)).to(y.dtype))
        return y

    def _forward_grouped(self, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Sort the N·k routing slots by expert, run the experts on their contiguous segments (one grouped matmul per
        projection, or one fused MLP per segment without `torch._grouped_mm`), scatter back."""
        k = self.config.n_expert_per_token
        flat_expert = top_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        inv_order = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.zeros(self.config.n_expert, device=x.device, dtype=torch.int64)
        counts.index_add_(0, flat_expert, torch.ones_like(flat_expert))
        dtype = _compute_dtype(x)
        if self._use_fused_glue(x.device, dtype):
            return self._forward_fused(x, gates, top_idx, order, inv_order, counts, dtype)

        xs = _GatherSlots.apply(x, order, inv_order, k)
        out = self.run_experts(xs, counts, lambda: flat_expert.index_select(0, order), dtype)
        out = _Permute.apply(out, inv_order, order).view(x.size(0), k, x.size(-1))
        return (out * gates.unsqueeze(-1).to(out.dtype)).sum(dim=1)

    def run_experts(
        self,
        xs: torch.Tensor,
        counts: torch.Tensor,
        sorted_expert: Callable[[], torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """This module's experts on rows grouped by expert: `counts[e]` contiguous rows for expert e (of `w1`), in
        `dtype`. `sorted_expert()` gives each row's expert (only the grouped matmul's bias needs it)."""
        if _grouped_mm_available(xs.device, dtype):
            experts = sorted_expert()
            h = self._act(grouped_linear(xs, self.w1, self.b1, counts, experts, dtype))
            return grouped_linear(h, self.w2, self.b2, counts, experts, dtype)
        b1, b2 = (None, None) if self.b1 is None else (self.b1.to(dtype), self.b2.to(dtype))
        return _segment_mlp(
            xs.to(dtype), self.w1.to(dtype), b1, self.w2.to(dtype), b2, counts, self.config.gelu_approximate
        )

    def _use_fused_glue(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.fused_glue is not None:
            return self.fused_glue
        if device.type == "cuda" and os.environ.get(FUSED_GLUE_ENV) != "1":
            return False
        grouped_mm = _grouped_mm_available(device, dtype) or device.type == "cpu"  # CPU: only under the interpreter
        return grouped_mm and moe_kernels.kernels_available(device)

    def _forward_fused(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        top_idx: torch.Tensor,
        order: torch.Tensor,
        inv_order: torch.Tensor,
        counts: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The grouped path with fused glue: one gather into expert order (cast included), the first grouped matmul,
        bias + GELU in one pass, the second grouped matmul, then the output bias, gate weighting and return to token
        order in one gather-sum per token. No atomics forward or backward."""
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        b1, b2 = (None, None) if self.b1 is None else (self.b1.to(dtype), self.b2.to(dtype))
        xs = moe_kernels.gather_slots(x, order, inv_order, self.config.n_expert_per_token, dtype)
        a = grouped_matmul(xs, self.w1.to(dtype), offs)
        h = moe_kernels.bias_act(a, b1, offs, moe_kernels.gelu_activation(self.config.gelu_approximate))
        out = grouped_matmul(h, self.w2.to(dtype), offs)
        return moe_kernels.combine_slots(out, gates, top_idx, inv_order, offs, b2)


def grouped_matmul(xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`xs[rows of group e] @ weight[e].T` for contiguous row groups ending at `offs` (int32): `torch._grouped_mm`
    where it runs, else one matmul per non-empty group (host sync)."""
    if _grouped_mm_available(xs.device, xs.dtype):
        return torch._grouped_mm(xs, weight.transpose(-2, -1), offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    parts = [xs[rows] @ weight[e].t() for e, rows in _segments(sizes)]
    return torch.cat(parts) if parts else xs.new_zeros(0, weight.size(1))


def grouped_linear(
    xs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: torch.Tensor,
    sorted_expert: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`xs[rows of group e] @ weight[e].T + bias[e]` for contiguous row groups of sizes `counts`, in one
    `torch._grouped_mm` kernel (no host sync). `sorted_expert` gives each row's group (for the bias)."""
    xs, weight = xs.to(dtype), weight.to(dtype)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    out = torch._grouped_mm(xs, weight.transpose(-2, -1), offs=offs)
    return out if bias is None else _ExpertBias.apply(out, bias.to(dtype), sorted_expert)


@torch.compiler.disable
def _segment_mlp(xs, w1, b1, w2, b2, counts: torch.Tensor, approximate: str) -> torch.Tensor:
    """`_SegmentMLP` on the host's group sizes; run eagerly under `torch.compile` (the sizes are data-dependent)."""
    return _SegmentMLP.apply(xs, w1, b1, w2, b2, counts.tolist(), approximate)


class _SegmentMLP(torch.autograd.Function):
    """The experts without `torch._grouped_mm`: for each contiguous segment of rows, its expert's whole MLP
    (`W2 act(W1 x + b1) + b2`) written into that segment of one output.

    Per segment the hidden activation stays small enough for the CPU cache, and only the pre-activations are kept
    for the backward (the activation is recomputed); each expert's weight gradient goes straight into its slice of
    the stacked gradient, instead of autograd's zero-filled full-size gradient per indexed expert.
    """

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, sizes, approximate):
        out = xs.new_empty(xs.size(0), w2.size(1))
        pre = []
        for e, rows in _segments(sizes):
            a = xs[rows] @ w1[e].t() if b1 is None else torch.addmm(b1[e], xs[rows], w1[e].t())
            h = F.gelu(a, approximate=approximate)
            if b2 is None:
                torch.mm(h, w2[e].t(), out=out[rows])
            else:
                torch.addmm(b2[e], h, w2[e].t(), out=out[rows])
            pre.append(a)
        ctx.save_for_backward(xs, w1, w2, *pre)
        ctx.sizes, ctx.approximate, ctx.bias = sizes, approximate, b1 is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        xs, w1, w2, *pre = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gx = torch.empty_like(xs) if need_x else None
        idle = [e for e, n in enumerate(ctx.sizes) if n == 0]  # experts without tokens get zero gradients
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        for gw in (gw1, gw2):
            if gw is not None and idle:
                gw[idle] = 0
        gb1 = grad.new_zeros(w1.shape[:2]) if ctx.bias and need_b1 else None
        gb2 = grad.new_zeros(w2.shape[:2]) if ctx.bias and need_b2 else None
        for (e, rows), a in zip(_segments(ctx.sizes), pre, strict=True):
            g = grad[rows]
            if gw2 is not None:
                torch.mm(g.t(), F.gelu(a, approximate=ctx.approximate), out=gw2[e])
            if gb2 is not None:
                torch.sum(g, dim=0, out=gb2[e])
            if not (need_x or need_w1 or need_b1):
                continue
            ga = torch.ops.aten.gelu_backward(g @ w2[e], a, approximate=ctx.approximate)
            if gw1 is not None:
                torch.mm(ga.t(), xs[rows], out=gw1[e])
            if gb1 is not None:
                torch.sum(ga, dim=0, out=gb1[e])
            if gx is not None:
                torch.mm(ga, w1[e], out=gx[rows])
        return gx, gw1, gb1, gw2, gb2, None, None


def _segments(sizes: list[int]) -> list[tuple[int, slice]]:
    """(group, row slice) of each non-empty contiguous group of sizes `sizes`."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, slice(start, start + n)))
        start += n
    return out


class _Permute(torch.autograd.Function):
    """`x[perm]` for a permutation `perm`; the backward is the inverse gather (no atomic adds)."""

    @staticmethod
    def forward(ctx, x, perm, inv_perm):
        ctx.save_for_backward(inv_perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(0, inv_perm), None, None


class _GatherSlots(torch.autograd.Function):
    """Rows of `x` (N, D) for the N·k routing slots in expert order: `x[order // k]`.

    The backward gathers each token's k slot gradients back (through `inv_order`) and sums them, instead of autograd's
    atomic `index_add_`.
    """

    @staticmethod
    def forward(ctx, x, order, inv_order, k):
        ctx.save_for_backward(inv_order)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (inv_order,) = ctx.saved_tensors
        return grad.index_select(0, inv_order).view(-1, ctx.k, grad.size(-1)).sum(dim=1), None, None, None


class _ExpertBias(torch.autograd.Function):
    """`out + bias[sorted_expert]` whose bias gradient is one small matmul with the one-hot expert matrix.

    Autograd's own backward for the gather is an atomic `index_add_` into only E rows, which serialises on GPUs.
    """

    @staticmethod
    def forward(ctx, out, bias, sorted_expert):
        ctx.save_for_backward(sorted_expert)
        ctx.n_expert = bias.size(0)
        return out + bias.index_select(0, sorted_expert)

    @staticmethod
    def backward(ctx, grad):
        (sorted_expert,) = ctx.saved_tensors
        experts = torch.arange(ctx.n_expert, device=grad.device)
        one_hot = (experts[:, None] == sorted_expert[None, :]).to(grad.dtype)  # (E, N·k), no host sync
        return grad, one_hot @ grad, None


def moe_flops_per_token(config: Config) -> int:
    """Active forward FLOPs of one MoE sub-layer per token (router + k experts, 2 FLOPs per MAC)."""
    D, H, E, k = config.n_embd, config.moe_intermediate_size, config.n_expert, config.n_expert_per_token
    return 2 * D * E + k * 2 * (2 * D * H)


def expert_param_count(config: Config) -> int:
    """Parameters of one MoE sub-layer (router, all experts, pre-norm excluded)."""
    D, H, E = config.n_embd, config.moe_intermediate_size, config.n_expert
    return D * E + E * 2 * D * H + (E * (H + D) if config.bias else 0)


__all__ = [
    "MoE",
    "MoEStats",
    "load_balancing_loss",
    "router_z_loss",
    "grouped_linear",
    "grouped_matmul",
    "moe_flops_per_token",
]
