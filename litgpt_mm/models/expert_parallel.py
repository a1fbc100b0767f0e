"""Expert parallelism: the experts of each MoE layer split over the N ranks of an expert-parallel group.

The world is a 2-D `DeviceMesh` `dp × ep` (`expert_parallel_mesh`): ranks `d·N .. d·N + N-1` form one
expert-parallel group, and every rank is a data-parallel replica for the dense parameters (router included), whose
gradients the strategy (DDP, or FSDP sharding them over the whole world) averages over all ranks as usual. Rank `r`
of an expert-parallel group holds experts `r·E/N .. (r+1)·E/N - 1` of every MoE layer (`shard_experts`); the same
expert on the `dp` groups' ranks is a data-parallel replica of it.

A MoE layer routes its own tokens (so the balance and z losses and `MoE.stats` are computed from the rank's tokens,
exactly as without expert parallelism), sorts the N·k routing slots by expert, which also groups them by the rank
that owns the expert, exchanges the slot counts, then sends every slot to its expert's rank with
`all_to_all_single` (variable split sizes, dropless: no capacity, no dropped token), runs the local experts and sends
the results back the same way. Both exchanges are differentiable (`_AllToAll`): the backward sends the gradients
along the reverse route, so an expert's weight gradient collects the contributions of every rank's tokens.

After the backward, `finish_gradients` gives the expert weights the gradient plain data parallelism would give them
(sum over the `dp` replicas, divided by the world size: the mean over ranks of each rank's loss) and clips all
gradients by their global norm (the experts' share summed over the expert-parallel group), so every rank applies the
same clipping factor.

Checkpoints keep the single-device layout: `MoE.state_dict()` gathers the experts of the group (a collective: every
rank of the group calls it, as `fabric.save` does) and `load_state_dict` takes a full `(E, ...)` tensor and keeps this
rank's slice; `shard_optimizer_state` does the same for the optimizer's per-parameter state. A run can therefore
change `--expert_parallel` between resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from litgpt_mm.models.moe import MoE, _compute_dtype, _GatherSlots, _Permute

EXPERT_PARAMS = ("w1", "w2", "b1", "b2")


def check_expert_parallel(expert_parallel: int, n_expert: int, world_size: int) -> None:
    """Raise a one-line `ValueError` when `expert_parallel` cannot split `n_expert` experts over `world_size` ranks."""
    if expert_parallel < 1:
        raise ValueError(f"--expert_parallel {expert_parallel}: pass a positive number of ranks (1 turns it off)")
    if expert_parallel == 1:
        return
    if n_expert == 0:
        raise ValueError(f"--expert_parallel {expert_parallel}: the model has no experts; drop --expert_parallel")
    if n_expert % expert_parallel:
        raise ValueError(
            f"--expert_parallel {expert_parallel} does not divide the model's {n_expert} experts: pass a divisor of "
            f"{n_expert}"
        )
    if world_size % expert_parallel:
        raise ValueError(
            f"--expert_parallel {expert_parallel} does not divide the world size {world_size} (devices × nodes): "
            f"pass a divisor of {world_size} or run on a multiple of {expert_parallel} devices"
        )


def expert_parallel_mesh(device_type: str, world_size: int, expert_parallel: int) -> DeviceMesh:
    """The `(dp, ep)` mesh of an initialised process group: `ep` over consecutive ranks (one node's, on GPUs)."""
    if world_size % expert_parallel:
        raise ValueError(f"--expert_parallel {expert_parallel} does not divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))


@dataclass
class ExpertParallel:
    """What a sharded `MoE` knows about its expert-parallel group; `forward` replaces its single-device expert path."""

    group: dist.ProcessGroup  # the ranks that share the experts of one layer
    rank: int  # this rank's index in `group`
    size: int  # N
    n_expert: int  # E, all experts of the layer
    dp_group: dist.ProcessGroup | None  # the replicas of this rank's experts (None: no replica)
    dp_size: int

    @property
    def n_local(self) -> int:
        return self.n_expert // self.size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def forward(self, moe: MoE, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """`sum_k gate · expert(x)` for the tokens `x` (N, D) routed to global experts `top_idx` (N, k), with the
        experts spread over the group."""
        k, n_local, size = top_idx.size(1), self.n_local, self.size
        dtype = _compute_dtype(x)
        flat_expert = top_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # expert order is also owner-rank order
        inv_order = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(flat_expert, minlength=self.n_expert)
        # recv_counts[s, e]: slots that rank s sends to this rank's local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(size, n_local)
        send_splits = counts.view(size, n_local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        xs = _GatherSlots.apply(x, order, inv_order, k).to(dtype)
        received = _AllToAll.apply(xs, recv_splits, send_splits, self.group)  # grouped by source, then expert
        local_expert = torch.arange(n_local, device=x.device).repeat(size).repeat_interleave(recv_counts.reshape(-1))
        by_expert = torch.argsort(local_expert, stable=True)
        inv_by_expert = torch.empty_like(by_expert).scatter_(
            0, by_expert, torch.arange(by_expert.numel(), device=by_expert.device)
        )
        grouped = _Permute.apply(received, by_expert, inv_by_expert)
        out = moe.run_experts(grouped, recv_counts.sum(0), lambda: local_expert.index_select(0, by_expert), dtype)
        out = _Permute.apply(out, inv_by_expert, by_expert)  # back to source order
        out = _AllToAll.apply(out, send_splits, recv_splits, self.group)  # this rank's slots, in expert order
        out = _Permute.apply(out, inv_order, order).view(x.size(0), k, x.size(-1))
        return (out * gates.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` of rows: `input_splits[j]` rows go to rank j, `output_splits[j]` rows come
    from rank j. The backward sends the gradients back along the reverse route."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty(sum(input_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> list[MoE]:
    """Keep only this rank's `E / N` experts in every `MoE` of `model` (N = the mesh's `ep` size) and route their
    tokens over the `ep` group. The model must hold all experts, identical on every rank (same seed or checkpoint).

    Returns the sharded layers. Their `state_dict()` gathers the experts back (all ranks of the group must call it) and
    `load_state_dict` accepts the single-device layout.
    """
    ep_size = mesh["ep"].size()
    dp_size = mesh["dp"].size()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        if moe.expert_parallel is not None:
            raise ValueError("the model's experts are already sharded")
        check_expert_parallel(ep_size, moe.config.n_expert, dist.get_world_size())
        moe.expert_parallel = ExpertParallel(
            group=mesh["ep"].get_group(),
            rank=mesh["ep"].get_local_rank(),
            size=ep_size,
            n_expert=moe.config.n_expert,
            dp_group=mesh["dp"].get_group() if dp_size > 1 else None,
            dp_size=dp_size,
        )
        keep = moe.expert_parallel.local_slice
        for name in EXPERT_PARAMS:
            p = getattr(moe, name)
            if p is not None:
                setattr(moe, name, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
        moe.register_state_dict_post_hook(_gather_experts_hook)
        moe.register_load_state_dict_pre_hook(_split_experts_hook)
        moe.reset_parameters = partial(_reset_all_keep_local, moe, moe.reset_parameters)
    return layers


def _reset_all_keep_local(moe: MoE, reset: Callable[..., None], *args, **kwargs) -> None:
    """`reset` (the layer's initialisation) on all E experts, keeping this rank's slice: a sharded layer initialised
    later (FSDP's materialisation of a meta-device model) gets the experts one device would have given it."""
    ep = moe.expert_parallel
    local = {n: p for n in EXPERT_PARAMS if (p := moe._parameters.get(n)) is not None}
    for n, p in local.items():
        moe._parameters[n] = nn.Parameter(p.new_empty((ep.n_expert, *p.shape[1:])), requires_grad=p.requires_grad)
    try:
        reset(*args, **kwargs)
    finally:
        full = {n: moe._parameters[n] for n in local}
        for n, p in local.items():
            moe._parameters[n] = p
            with torch.no_grad():
                p.copy_(full[n][ep.local_slice])


def _gather(shard: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """The `(E, ...)` tensor whose consecutive `E / N` rows are held by the ranks of the group."""
    shard = shard.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(ep.size)]
    dist.all_gather(parts, shard, group=ep.group)
    return torch.cat(parts)


def _gather_experts_hook(module: MoE, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in EXPERT_PARAMS:
        if (key := prefix + name) in state_dict:
            state_dict[key] = _gather(state_dict[key], module.expert_parallel)


def _split_experts_hook(module: MoE, state_dict: dict, prefix: str, *args) -> None:
    ep = module.expert_parallel
    for name in EXPERT_PARAMS:
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() > 0 and value.size(0) == ep.n_expert:
            state_dict[prefix + name] = value[ep.local_slice]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights of the sharded MoE layers of `model` (the parameters data parallelism must not touch)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, MoE) and m.expert_parallel is not None
        for p in (getattr(m, name) for name in EXPERT_PARAMS)
        if p is not None
    ]


def ddp_ignore_experts(module: nn.Module) -> list[str]:
    """Tell `DistributedDataParallel` (before it wraps `module`) to leave the sharded experts alone: no broadcast
    from rank 0 at wrap time, no gradient all-reduce over the world. Returns the ignored names."""
    experts = {id(p) for p in expert_parameters(module)}
    names = [n for n, p in module.named_parameters() if id(p) in experts]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def _ep_of(model: nn.Module) -> tuple[ExpertParallel | None, list[nn.Parameter]]:
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.expert_parallel is not None]
    return (layers[0].expert_parallel if layers else None), expert_parameters(model)


@torch.no_grad()
def finish_gradients(model: nn.Module, max_norm: float | None = None) -> torch.Tensor | None:
    """After the last backward of a step: give the experts data parallelism's gradient, then clip every gradient by
    the global norm (`max_norm` None or 0: no clipping). Returns the global norm before clipping (None if not clipped).

    An expert's gradient on its owner is the sum over the expert-parallel group of each rank's loss gradient; data
    parallelism averages each rank's loss over the world, so the owner sums over its `dp` replicas and divides by the
    world size. The dense gradients are the strategy's (already averaged over the world).
    """
    ep, experts = _ep_of(model)
    if ep is None:
        raise ValueError("finish_gradients: the model has no expert-parallel MoE layer (call shard_experts first)")
    for p in experts:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in experts]
    if ep.dp_size > 1:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=ep.dp_group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)
    for g in grads:
        g.div_(ep.dp_size * ep.size)
    if not max_norm:
        return None
    expert_ids = {id(p) for p in experts}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    # FSDP's gradients are DTensors sharded over all ranks: their local shards, summed over the world
    sharded = [g.to_local() for g in dense if isinstance(g, DTensor)]
    dense = [g for g in dense if not isinstance(g, DTensor)]
    device = grads[0].device
    dense_sq = _sum_of_squares(dense, device)
    if sharded:
        sharded_sq = _sum_of_squares(sharded, device)
        dist.all_reduce(sharded_sq)
        dense_sq = dense_sq + sharded_sq
    expert_sq = _sum_of_squares(grads, device)
    dist.all_reduce(expert_sq, group=ep.group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as `torch.nn.utils.clip_grad_norm_`
    for g in dense + sharded + grads:
        g.mul_(coef.to(g.dtype))
    return total


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack([t.detach().float().square().sum() for t in tensors]).sum()


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make `optimizer.state_dict()` hold the single-device layout for the sharded experts (gathered over the group,
    a collective) and `load_state_dict` accept it (each rank keeps its slice). Call before the first step."""
    owner = {}
    for m in model.modules():
        if isinstance(m, MoE) and m.expert_parallel is not None:
            for name in EXPERT_PARAMS:
                if (p := getattr(m, name)) is not None:
                    owner[id(p)] = m.expert_parallel

    def experts_by_key(state_dict: dict) -> list[tuple[object, torch.Tensor, ExpertParallel]]:
        # the state's keys (indices, or names in `torch.distributed.checkpoint`'s layout) pair with the parameters
        # of `optimizer.param_groups` by position, as `Optimizer.load_state_dict` pairs them
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(k, p, owner[id(p)]) for k, p in zip(keys, params, strict=True) if id(p) in owner]

    def gather(opt, state_dict: dict) -> dict:
        state = dict(state_dict["state"])
        for key, p, ep in experts_by_key(state_dict):
            if key in state:
                state[key] = {
                    k: _gather(v, ep) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in state[key].items()
                }
        return {**state_dict, "state": state}

    def split(opt, state_dict: dict) -> dict:
        state = dict(state_dict["state"])
        for key, p, ep in experts_by_key(state_dict):
            full = (ep.n_expert, *p.shape[1:])
            if key in state:
                state[key] = {
                    k: v[ep.local_slice] if isinstance(v, torch.Tensor) and tuple(v.shape) == full else v
                    for k, v in state[key].items()
                }
        return {**state_dict, "state": state}

    optimizer.register_state_dict_post_hook(gather)
    optimizer.register_load_state_dict_pre_hook(split)


__all__ = [
    "ExpertParallel",
    "check_expert_parallel",
    "ddp_ignore_experts",
    "expert_parallel_mesh",
    "expert_parameters",
    "finish_gradients",
    "shard_experts",
    "shard_optimizer_state",
]
