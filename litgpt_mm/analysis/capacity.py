"""Capacity plan of a pretraining run: parameters, FLOPs, memory per GPU, communication, step time and cost.

Everything is computed from the model config (ours or litgpt's), never from a built model, so a 6 B-parameter plan
takes milliseconds; the tests check each count against the real model built on the meta device, the FLOPs against
`training.flops.training_flops_per_token` (the count our MFU uses) and the memory against measured peaks.

Conventions (bytes, seconds, FLOPs; GB = 1e9 bytes):

* A *step* is one micro-batch of `micro_batch` sequences of `seq_len` tokens on every GPU (all GPUs are data
  parallel; expert parallelism moves tokens between them but each still owns its batch).
* FSDP shards the state over `fsdp_size` ranks (`1`: plain data parallel). Expert parallelism, as
  `litgpt_mm.models.expert_parallel` implements it, splits each MoE layer's experts over `expert_parallel` ranks, each
  holding its share whole (FSDP ignores them); their gradients are all-reduced over the `gpus / expert_parallel`
  ranks holding the same experts. So dense state per GPU is divided by `fsdp_size`, expert state by
  `expert_parallel` (by `fsdp_size` without expert parallelism).
* Gradients are freed by `zero_grad(set_to_none=True)` (litgpt, litgpt-mm), so a full set of gradients never
  coexists with a full set of activations: the peak is at the start of the backward (all activations), at its end
  or in the optimizer step (all gradients), see `Memory.peak`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch

from litgpt_mm import REPO_ROOT
from litgpt_mm.config import Config

REPO = REPO_ROOT
RESULTS_DIR = REPO / "benchmarks" / "results"
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
# MFU when no measurement applies (no GPU `train_step_*.json` under benchmarks/results/).
FALLBACK_MFU = 0.40
# GPUs per node, joined by NVLink; collectives over larger groups run at the inter-node rate.
GPUS_PER_NODE = 8
# One 400 Gb/s (NDR InfiniBand) NIC per GPU, the usual H100/H200 cluster.
INTERNODE_GBPS = 400.0
# bitsandbytes' 8-bit optimizers: tensors below `min_8bit_size` elements keep fp32 states, the others one byte per
# state plus one fp32 absmax per block of 256 values (bitsandbytes 0.50, `Optimizer2State.init_state`).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256


@dataclass(frozen=True)
class GPU:
    """A GPU model.

    Args:
        device_name: the name `torch.cuda.get_device_name` reports, which Lightning's FLOPs table parses.
        memory_gb: datasheet memory ("80 GB"; the card shows about that many GiB, so the fit check is conservative).
        link_gbps: per-GPU bandwidth to its node's peers, each direction, in Gbit/s (NVLink, or PCIe without it).
        grouped_mm: compute capability >= 9.0, where `torch._grouped_mm` runs and the MoE takes its grouped path.
    """

    device_name: str
    memory_gb: float
    link_gbps: float
    grouped_mm: bool = False


# Datasheet numbers. NVLink 4 (H100/H200 SXM): 900 GB/s both directions; NVLink 3 (A100): 600; NVLink 2 (V100): 300;
# PCIe 5 x16: 64 GB/s each way, PCIe 4: 32, PCIe 3: 16.
GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 80GB HBM3", 80, 450 * 8, True),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 80, 64 * 8, True),
    "h200": GPU("NVIDIA H200", 141, 450 * 8, True),
    "a100": GPU("NVIDIA A100-SXM4-80GB", 80, 300 * 8),
    "a100-40gb": GPU("NVIDIA A100-SXM4-40GB", 40, 300 * 8),
    "a10g": GPU("NVIDIA A10G", 24, 32 * 8),
    "l4": GPU("NVIDIA L4", 24, 32 * 8),
    "v100": GPU("Tesla V100-SXM2-32GB", 32, 150 * 8),
    "t4": GPU("Tesla T4", 16, 16 * 8),
    "rtx4090": GPU("NVIDIA GeForce RTX 4090", 24, 32 * 8),
    "rtx3090": GPU("NVIDIA GeForce RTX 3090", 24, 32 * 8),
}


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per element under a Fabric precision setting.

    Args:
        weight: master weights (and so optimizer states of torch's AdamW, which match the parameter dtype).
        grad: gradients.
        compute: matmul inputs and outputs, i.e. most activations.
        residual: the residual stream and the normalisation inputs (fp32 under autocast).
    """

    weight: int
    grad: int
    compute: int
    residual: int

    @property
    def mixed(self) -> bool:
        return self.weight != self.compute


PRECISION_BYTES = {
    "32-true": PrecisionBytes(4, 4, 4, 4),
    "bf16-mixed": PrecisionBytes(4, 4, 2, 4),
    "16-mixed": PrecisionBytes(4, 4, 2, 4),
    "bf16-true": PrecisionBytes(2, 2, 2, 2),
    "16-true": PrecisionBytes(2, 2, 2, 2),
}


# ---------------------------------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of the model, named as in `GPT.named_parameters()`.

    Args:
        kind: `embedding` (wte), `norm`, `router`, `expert` (stacked expert weights and biases) or `linear`.
        block: index of the transformer block that owns it, `None` for wte, lm_head and ln_f (FSDP's root unit).
    """

    name: str
    numel: int
    kind: Literal["embedding", "norm", "router", "expert", "linear"]
    block: int | None = None


def _norm_tensors(config: Config, prefix: str, size: int, block: int | None) -> list[ParamTensor]:
    if config.norm_class_name == "RMSNorm":
        return [ParamTensor(f"{prefix}.weight", size, "norm", block)]
    if "OLMo" in config.name:  # litgpt builds OLMo's LayerNorm without affine parameters
        return []
    return [ParamTensor(f"{prefix}.weight", size, "norm", block), ParamTensor(f"{prefix}.bias", size, "norm", block)]


def _linear_tensors(prefix: str, n_in: int, n_out: int, bias: bool, block: int | None) -> list[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", n_in * n_out, "linear", block)]
    return out + ([ParamTensor(f"{prefix}.bias", n_out, "linear", block)] if bias else [])


def param_tensors(config: Config) -> list[ParamTensor]:
    """Every parameter tensor of `litgpt_mm.model.GPT(config)`, from the config alone.

    Covers litgpt's `CausalSelfAttention` (grouped queries, q/k norms), the `GptNeoxMLP`, `LLaMAMLP` and `GemmaMLP`
    blocks with optional post-norms, and our MoE sub-layer. The lm_head is its own matrix: litgpt never ties it to
    the embedding (Phi-2 does not either).
    """
    if config.latent_attention is not None:
        raise ValueError(f"{config.name!r} uses latent attention, which the capacity plan does not model")
    d, hs = config.n_embd, config.head_size
    V = config.padded_vocab_size
    tensors = _linear_tensors("lm_head", d, V, config.lm_head_bias, None)
    tensors.append(ParamTensor("transformer.wte.weight", V * d, "embedding", None))
    moe_layers = set(config.moe_layer_indices)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        if config.norm_1:
            tensors += _norm_tensors(config, f"{p}.norm_1", d, i)
        qkv_out = (config.n_head + 2 * config.n_query_groups) * hs
        tensors += _linear_tensors(f"{p}.attn.qkv", d, qkv_out, config.bias or config.attn_bias, i)
        tensors += _linear_tensors(f"{p}.attn.proj", hs * config.n_head, d, config.bias, i)
        if config.norm_qk:
            olmo2 = config.norm_qk_type == "olmo2"
            tensors += _norm_tensors(config, f"{p}.attn.norm_q", config.n_head * hs if olmo2 else hs, i)
            tensors += _norm_tensors(config, f"{p}.attn.norm_k", config.n_query_groups * hs if olmo2 else hs, i)
        if config.post_attention_norm:
            tensors += _norm_tensors(config, f"{p}.post_attention_norm", d, i)
        if config.norm_2 and not config.shared_attention_norm:
            tensors += _norm_tensors(config, f"{p}.norm_2", d, i)
        inter = config.intermediate_size
        if config.mlp_class_name == "GptNeoxMLP":
            tensors += _linear_tensors(f"{p}.mlp.fc", d, inter, config.bias, i)
        elif config.mlp_class_name in ("LLaMAMLP", "GemmaMLP"):
            tensors += _linear_tensors(f"{p}.mlp.fc_1", d, inter, config.bias, i)
            tensors += _linear_tensors(f"{p}.mlp.fc_2", d, inter, config.bias, i)
        else:
            raise ValueError(f"the capacity plan does not model mlp_class_name={config.mlp_class_name!r}")
        tensors += _linear_tensors(f"{p}.mlp.proj", inter, d, config.bias, i)
        if config.post_mlp_norm:
            tensors += _norm_tensors(config, f"{p}.post_mlp_norm", d, i)
        if i in moe_layers:
            E, H = config.n_expert, config.moe_intermediate_size
            tensors += _norm_tensors(config, f"{p}.norm_moe", d, i)
            tensors.append(ParamTensor(f"{p}.moe.router.weight", E * d, "router", i))
            tensors += [
                ParamTensor(f"{p}.moe.w1", E * H * d, "expert", i),
                ParamTensor(f"{p}.moe.w2", E * d * H, "expert", i),
            ]
            if config.bias:
                tensors += [
                    ParamTensor(f"{p}.moe.b1", E * H, "expert", i),
                    ParamTensor(f"{p}.moe.b2", E * d, "expert", i),
                ]
    tensors += _norm_tensors(config, "transformer.ln_f", d, None)
    return tensors


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a config.

    Args:
        total: all parameters.
        active: parameters one token touches, as `training.flops.active_params` counts them: all but the embedding
            table and the (E - k) experts a token does not use, in every MoE layer.
        embedding: the token embedding table.
        expert: all experts' stacked weights and biases (routers count as dense).
        root: parameters outside the blocks (wte, lm_head, ln_f): FSDP's root unit.
        largest_block_dense: largest block, without its experts.
        largest_block_expert: the experts of the largest block.
        largest_tensor: the largest parameter tensor.
    """

    total: int
    active: int
    embedding: int
    expert: int
    root: int
    largest_block_dense: int
    largest_block_expert: int
    largest_tensor: int

    @property
    def dense(self) -> int:
        return self.total - self.expert


def count_params(config: Config, tensors: list[ParamTensor] | None = None) -> ParamCounts:
    """Total, active and per-unit parameter counts of `config` (see `ParamCounts`)."""
    tensors = param_tensors(config) if tensors is None else tensors
    total = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.kind == "embedding")
    expert = sum(t.numel for t in tensors if t.kind == "expert")
    unused = (config.n_expert - config.n_expert_per_token) * sum(
        t.numel // config.n_expert for t in tensors if t.kind == "expert"
    )
    blocks: dict[int, list[int]] = {}
    for t in tensors:
        if t.block is not None:
            blocks.setdefault(t.block, [0, 0])[t.kind == "expert"] += t.numel
    largest = max(blocks.values(), key=sum, default=[0, 0])
    return ParamCounts(
        total=total,
        active=total - embedding - unused,
        embedding=embedding,
        expert=expert,
        root=sum(t.numel for t in tensors if t.block is None),
        largest_block_dense=largest[0],
        largest_block_expert=largest[1],
        largest_tensor=max(t.numel for t in tensors),
    )


def flops_per_token(config: Config, seq_len: int, params: ParamCounts | None = None) -> float:
    """Training FLOPs per token, 6 N_active + 12 L d T (PaLM, appendix B): `training.flops.training_flops_per_token`
    from the config. Activation checkpointing's recomputation is not counted (MFU convention); `plan` adds it to
    the step time."""
    params = count_params(config) if params is None else params
    return 6 * params.active + 12 * config.n_layer * config.n_embd * seq_len


# ----------------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activations:
    """Activation memory of one micro-batch, in bytes.

    Args:
        saved: what the blocks keep for the backward (with checkpointing: only each block's input).
        head: ln_f, the fp32 log-probabilities `F.cross_entropy` keeps, and the two vocabulary-sized gradients the
            backward creates first (of the log-probabilities and of the logits), all alive at its start.
        recompute: with checkpointing, the largest block recomputed in the backward, plus the gradients of its input
            and output; 0 without.
    """

    saved: float
    head: float
    recompute: float

    @property
    def start(self) -> float:
        """At the start of the backward: everything saved plus the head."""
        return self.saved + self.head


def _norm_saved(config: Config, pb: PrecisionBytes, d: int, readers: int) -> float:
    """Bytes per token a normalisation keeps: its input and statistics, plus its output as each reading linear
    keeps it (one shared tensor, or one autocast copy per reader under mixed precision)."""
    if config.norm_class_name == "RMSNorm":  # litgpt's RMSNorm: fp32 copy of the input, normalised input, rstd
        kept = pb.residual * d + (4 * d if pb.residual < 4 else 0) + pb.residual * d + 4
    else:
        kept = pb.residual * d + 8  # input, mean and rstd
    return kept + pb.compute * d * (readers if pb.mixed else min(readers, 1))


def block_activation_bytes(
    config: Config, precision: str, seq_len: int, moe: bool, expert_hidden_copies: int = 2
) -> float:
    """Bytes per token one block keeps for its backward (no checkpointing).

    The method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4:
    34 s b h + 5 a s^2 b for a GPT layer in 16-bit), i.e. counting every tensor autograd saves, adapted to litgpt's
    blocks: no dropout (no masks), fused SDPA/flash attention (no s^2 scores, only a log-sum-exp per head), and one
    shared LayerNorm feeding attention and MLP in Phi-2's parallel block. With d = n_embd, d_q = n_head * head_size,
    d_kv = n_query_groups * head_size, I = intermediate_size, H = moe_intermediate_size, T = seq_len,
    a = compute bytes, r = residual bytes, per token:

    * norm: r d + 8 (LayerNorm: input, mean, rstd; RMSNorm: input, normalised input, rstd) + a d per reading
      linear (one shared tensor when there is a single dtype);
    * attention: a (d_q + 2 d_kv) (the qkv output, kept whole since v is a view of it) + a (d_q + d_kv) (q and k
      after RoPE), or with grouped queries 3 a d_q (q, and k and v expanded to every head), + a d_q (SDPA output)
      + 4 n_head (log-sum-exp) + a d_q (proj input); q/k norms add their normalised outputs. Attention-logit
      soft-capping (Gemma 2) cannot use SDPA and keeps the scores (capped, and their fp32 softmax, cast to a if
      a < 4): about 8 n_head T, Korthikanti's s^2 term;
    * MLP: 2 a I (GELU input and output), or 4 a I for the gated LLaMA/Gemma MLP;
    * MoE (top-k of E experts): norm r d + 8, router input 4 d (fp32), router 4 (2E + 2k + 2) + 24 k
      (logits, probabilities, top-k, gates, int64 indices and permutations), then per routing slot (k per token)
      the gathered input a d, the expert hidden state `expert_hidden_copies` x a H (2 on the GPU grouped path:
      GELU input and output; 1 on the CPU segment path, which recomputes the GELU) and the expert output a d.

    For Phi-2 in bf16-mixed with I = 4d this gives about 38 d bytes (Korthikanti's 34 d minus the dropout masks,
    plus the RoPE copies and the second autocast copy of the LayerNorm output) and 20 d + 4 k H for the MoE.
    """
    pb = PRECISION_BYTES[precision]
    a, r, d = pb.compute, pb.residual, config.n_embd
    dq, dkv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    gated = config.mlp_class_name in ("LLaMAMLP", "GemmaMLP")
    mlp_readers = 2 if gated else 1
    if config.attention_logit_softcapping is not None:  # eager attention: q, k, v, the scores, the proj input
        attention = 4 * a * dq + (a + 4 + (a if a < 4 else 0)) * config.n_head * seq_len
    else:
        qkv = 3 * a * dq if dkv < dq else a * (dq + 2 * dkv) + a * (dq + dkv)
        attention = qkv + 2 * a * dq + 4 * config.n_head
    if config.norm_qk:
        attention += (a + (4 if a < 4 else 0)) * (dq + dkv) + 4 * (config.n_head + config.n_query_groups)
    mlp = (4 if gated else 2) * a * config.intermediate_size
    if config.shared_attention_norm:
        norms = _norm_saved(config, pb, d, 1 + mlp_readers)
    else:
        norms = _norm_saved(config, pb, d, 1) + _norm_saved(config, pb, d, mlp_readers)
        if config.parallel_residual:  # both norms read the same block input: count it once
            norms -= r * d
    norms += (config.post_attention_norm + config.post_mlp_norm) * _norm_saved(config, pb, d, 0)
    total = norms + attention + mlp
    if moe:
        E, k, H = config.n_expert, config.n_expert_per_token, config.moe_intermediate_size
        router = 4 * d + 4 * (2 * E + 2 * k + 2) + 24 * k
        total += r * d + 8 + router + k * (2 * a * d + expert_hidden_copies * a * H)
    return total


def activation_bytes(
    config: Config,
    precision: str,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = False,
    expert_hidden_copies: int = 2,
) -> Activations:
    """Activation memory of one micro-batch (see `block_activation_bytes` for the per-block formula).

    With activation checkpointing (one checkpoint per block, as `GPT.activation_checkpointing` does) each block
    keeps only its input (r d per token) and the backward recomputes one block at a time: L r d, plus one block's
    full activations and two r d gradients while it is recomputed. The head keeps ln_f (as any norm), the fp32
    log-probabilities of `F.cross_entropy` (4 V) and, at the start of the backward, the gradients of the
    log-probabilities and of the logits (2 x 4 V).
    """
    pb = PRECISION_BYTES[precision]
    d, V = config.n_embd, config.padded_vocab_size
    moe_layers = set(config.moe_layer_indices)
    per_block = [
        block_activation_bytes(config, precision, seq_len, i in moe_layers, expert_hidden_copies)
        for i in range(config.n_layer)
    ]
    tokens = micro_batch * seq_len
    head = tokens * (_norm_saved(config, pb, d, 1) + 3 * 4 * V)
    if config.final_logit_softcapping is not None:  # the capped logits
        head += tokens * pb.compute * V
    if checkpointing:
        inputs = tokens * config.n_layer * pb.residual * d
        return Activations(inputs, head, tokens * (max(per_block) + 2 * pb.residual * d))
    return Activations(tokens * sum(per_block), head, 0.0)


# --------------------------------------------------------------------------------------------------------- hardware


def gpu_spec(gpu: str) -> GPU:
    """The `GPUS` entry for a name like `h100` (case and `-`/`_`/space insensitive)."""
    key = gpu.lower().replace("_", "-").replace(" ", "-")
    if key not in GPUS:
        raise ValueError(
            f"unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or pass --peak_tflops, --gpu_memory_gb and --link_gbps)"
        )
    return GPUS[key]


def gpu_peak_flops(gpu: str, precision: str) -> tuple[float, str]:
    """Dense peak FLOP/s of one GPU computing under `precision`, and where the number comes from.

    Looks the chip up the way `litgpt_mm.training.flops.peak_flops` does on a real device: Lightning's datasheet table
    (`get_available_flops`, fed the device name that torch reports for that chip), then our `PEAK_FLOPS` for
    chips Lightning does not parse (the H200). fp32 runs count TF32 tensor cores when the table has them.
    """
    from lightning.fabric.utilities.throughput import get_available_flops

    from litgpt_mm.training.flops import PEAK_FLOPS, compute_dtype

    spec = gpu_spec(gpu)
    dtype = compute_dtype(precision)
    with warnings.catch_warnings(), mock.patch("torch.cuda.get_device_name", return_value=spec.device_name):
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": our table below
        for key in ("tfloat32", torch.float32) if dtype == torch.float32 else (dtype,):
            found = get_available_flops(torch.device("cuda"), key)
            if found:
                return float(found), f"Lightning's table ({spec.device_name}, {key})"
    if dtype in (torch.bfloat16, torch.float16):
        for key, value in PEAK_FLOPS.items():
            if key in spec.device_name:
                return value, f"litgpt_mm.training.flops.PEAK_FLOPS[{key!r}] (dense bf16 datasheet)"
    raise ValueError(f"no {dtype} peak for {spec.device_name!r}; pass --peak_tflops")


def measured_mfu(config: Config, gpu: str | None = None, results_dir: Path = RESULTS_DIR) -> tuple[float, str]:
    """The MFU our GPU train-step benchmark measured, and a sentence saying where it comes from.

    Reads `train_step_*.json` files run on a GPU: the `ours_moe` row for a model with experts, `ours_dense` for a
    dense one, preferring a file measured on `gpu`. Without one: `FALLBACK_MFU`, said to be assumed.
    """
    variant = "ours_moe" if config.n_expert else "ours_dense"
    found = []
    for path in sorted(Path(results_dir).glob("train_step_*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = result.get("machine", {}).get("gpu")
        row = next((r for r in result.get("rows", []) if r.get("variant") == variant), None)
        if device and row and isinstance(row.get("MFU_active"), (int, float)) and row["MFU_active"] > 0:
            found.append((path, device, result.get("params", {}), float(row["MFU_active"])))
    if not found:
        return FALLBACK_MFU, f"MFU {FALLBACK_MFU} assumed: no GPU train_step_*.json in {results_dir}"
    chip = None if gpu is None else gpu.lower().replace("_", "-").split("-")[0]
    on_chip = [f for f in found if chip and chip in f[1].lower().replace(" ", "")]
    path, device, params, mfu = (on_chip or found)[0]
    shape = ", ".join(
        f"{k} {params[k]}" for k in ("n_layer", "moe_n_layer", "n_embd", "seq_len", "batch") if k in params
    )
    where = path.resolve()
    where = where.relative_to(REPO) if where.is_relative_to(REPO) else where
    source = f"MFU {mfu:.3f} measured: {where}, row {variant} (1 x {device}, {shape})"
    if chip and not on_chip:
        source += f"; nothing measured on {gpu}, so assumed the same"
    return mfu, source


# ------------------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Memory:
    """Memory per GPU in bytes.

    Args:
        weights: this GPU's share of the master weights; `grads` and `optimizer` likewise.
        activations: at the start of the backward (`Activations.start`).
        recompute: with activation checkpointing, the block being recomputed (`Activations.recompute`).
        optimizer_step: temporaries of the optimizer step (beside the gradients): none for the fused CUDA AdamW and
            bitsandbytes, two copies of the largest parameter for torch's single-tensor AdamW (`sqrt`, then `/`).
        working: compute-dtype copies of the weights: autocast's under mixed precision without FSDP, or FSDP's
            gathered units; counted throughout (conservative for autocast's, which the backward frees).
        overhead: memory outside tensors (CUDA context, workspaces, allocator fragmentation).
    """

    weights: float
    grads: float
    optimizer: float
    activations: float
    recompute: float
    optimizer_step: float
    working: float
    overhead: float

    @property
    def peak(self) -> float:
        """Weights, optimizer, working copies and overhead, plus the largest of the backward's start (all activations),
        its end (all gradients and the last recomputed block) and the optimizer step (gradients and temporaries)."""
        transient = max(self.activations, self.grads + self.recompute, self.grads + self.optimizer_step)
        return self.weights + self.optimizer + self.working + self.overhead + transient


@dataclass(frozen=True)
class Communication:
    """Bytes each GPU sends per step, and the seconds they take at the link rate."""

    fsdp_bytes: float  # FSDP all-gathers (forward + backward) and gradient reduce-scatter, or DDP's all-reduce
    all_to_all_bytes: float  # expert parallelism: tokens to their experts and back, forward, backward (+ recompute)
    fsdp_s: float
    all_to_all_s: float


@dataclass
class Plan:
    """A capacity plan; `to_dict` gives its JSON form.

    Times are per step (one micro-batch on every GPU): `compute_s` runs `flops_per_token` at `mfu` of `peak_flops`
    (x 4/3 with activation checkpointing); `step_s` = max(compute, FSDP/DDP traffic, which prefetching overlaps)
    + expert all-to-all, which sits on the critical path.
    """

    model: str
    gpu: str
    gpus: int
    tokens: float
    precision: str
    optimizer: str
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    fsdp_size: int
    expert_parallel: int
    params: ParamCounts
    flops_per_token: float
    peak_flops: float
    peak_source: str
    mfu: float
    mfu_source: str
    memory: Memory
    gpu_memory_gb: float
    communication: Communication
    compute_s: float
    step_s: float
    tokens_per_step: int
    steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def days(self) -> float:
        return self.steps * self.step_s / 86400

    @property
    def gpu_hours(self) -> float:
        return self.steps * self.step_s * self.gpus / 3600

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.gpu_memory_gb * 1e9

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"]["dense"] = self.params.dense
        out["memory"]["peak"] = self.memory.peak
        out.update(tokens_per_s=self.tokens_per_s, days=self.days, gpu_hours=self.gpu_hours, fits=self.fits)
        return out


def _ring_bytes(size: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-gather or reduce-scatter of `size` bytes over `ranks` ranks."""
    return size * (ranks - 1) / ranks if ranks > 1 else 0.0


@dataclass(frozen=True)
class RunSettings:
    """The run a plan is for, with `plan`'s defaults resolved (see `plan` for each field): what its steps share."""

    tokens: float
    gpus: int
    gpu: str
    precision: str
    optimizer: str
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    fsdp_size: int
    expert_parallel: int
    overhead_gb: float
    fused_adamw: bool


@dataclass(frozen=True)
class Hardware:
    """What a plan assumes of the GPUs, resolved from the `GPUS` table, the measured MFU and `plan`'s overrides.

    Args:
        intra_bytes_s: link rate within a node, bytes/s per GPU and direction.
        inter_bytes_s: link rate across nodes, likewise.
        expert_hidden_copies: expert hidden tensors kept per routing slot (see `block_activation_bytes`).
    """

    peak_flops: float
    peak_source: str
    mfu: float
    mfu_source: str
    memory_gb: float
    intra_bytes_s: float
    inter_bytes_s: float
    gpus_per_node: int
    expert_hidden_copies: int

    def rate(self, group: int) -> float:
        """Bytes/s per GPU of a collective over `group` GPUs: the intra-node link within a node, else the slower."""
        return self.intra_bytes_s if group <= self.gpus_per_node else min(self.intra_bytes_s, self.inter_bytes_s)


def plan(
    config: Config,
    tokens: float,
    gpus: int = 8,
    gpu: str = "h100",
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    micro_batch: int = 4,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    fsdp_size: int | None = None,
    expert_parallel: int = 1,
    mfu: float | None = None,
    peak_tflops: float | None = None,
    gpu_memory_gb: float | None = None,
    link_gbps: float | None = None,
    internode_gbps: float = INTERNODE_GBPS,
    gpus_per_node: int = GPUS_PER_NODE,
    overhead_gb: float = 2.0,
    expert_hidden_copies: int | None = None,
    fused_adamw: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> Plan:
    """Plan a run of `config` on `tokens` tokens.

    Args:
        config: the model.
        tokens: training tokens.
        gpus: GPUs in all (every one data parallel).
        gpu: a `GPUS` name (`h100`, `h200`, `a100`, ...) for its peak FLOP/s, memory and NVLink rate.
        precision: Fabric precision (`bf16-mixed`: fp32 master weights, gradients and AdamW states, bf16 matmuls).
        optimizer: `adamw` (two states in the weights' dtype) or `adamw8bit` (bitsandbytes: one byte per state).
        micro_batch: sequences per GPU per step.
        seq_len: tokens per sequence (default: the config's block size).
        activation_checkpointing: checkpoint every block (activations drop to the block inputs plus one block;
            the forward runs twice, so compute time is 4/3).
        fsdp_size: ranks that shard the dense state (default: all `gpus`; 1 = DDP).
        expert_parallel: ranks that split each MoE layer's experts, each holding its share whole, outside FSDP
            (`litgpt_mm.models.expert_parallel`).
        mfu: model FLOPs utilisation (default: the one we measured, see `measured_mfu`).
        peak_tflops: override the GPU's peak (dense, in the run's compute dtype).
        gpu_memory_gb: override the GPU's memory.
        link_gbps: override the intra-node link rate, Gbit/s per GPU per direction.
        internode_gbps: inter-node rate per GPU (one 400 Gb/s NIC per GPU by default).
        gpus_per_node: GPUs sharing the intra-node link.
        overhead_gb: memory outside tensors: CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation.
        expert_hidden_copies: expert hidden tensors kept per routing slot (default: 2 where the grouped path runs,
            Hopper GPUs; 1 elsewhere, where the segment path recomputes the GELU).
        fused_adamw: torch's AdamW runs fused (`fused=True`, litgpt's choice on CUDA); `False`: the single-tensor
            loop it runs on a CPU, with two temporary copies of a parameter.
        results_dir: where `measured_mfu` looks.
    """
    run = RunSettings(
        tokens=tokens,
        gpus=gpus,
        gpu=gpu,
        precision=precision,
        optimizer=optimizer,
        micro_batch=micro_batch,
        seq_len=config.block_size if seq_len is None else seq_len,
        activation_checkpointing=activation_checkpointing,
        fsdp_size=gpus if fsdp_size is None else fsdp_size,
        expert_parallel=expert_parallel,
        overhead_gb=overhead_gb,
        fused_adamw=fused_adamw,
    )
    _check_run(config, run, gpus_per_node, mfu)
    hardware = _resolve_hardware(
        config,
        run,
        mfu,
        peak_tflops,
        gpu_memory_gb,
        link_gbps,
        internode_gbps,
        gpus_per_node,
        expert_hidden_copies,
        results_dir,
    )
    tensors = param_tensors(config)
    params = count_params(config, tensors)
    memory = _memory_per_gpu(config, run, hardware, tensors, params)
    communication = _communication_per_step(config, run, hardware, params)
    return _timed_plan(config, run, hardware, params, memory, communication)


def _check_run(config: Config, run: RunSettings, gpus_per_node: int, mfu: float | None) -> None:
    """Refuse settings that no run can have, naming the setting."""
    if run.precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {run.precision!r}")
    if run.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {run.optimizer!r}")
    gpus, fsdp_size, ep = run.gpus, run.fsdp_size, run.expert_parallel
    if min(gpus, run.micro_batch, run.seq_len, fsdp_size, ep, gpus_per_node) < 1 or run.tokens <= 0:
        raise ValueError("gpus, micro_batch, seq_len, fsdp_size, expert_parallel, gpus_per_node and tokens must be > 0")
    if gpus % fsdp_size:
        raise ValueError(f"fsdp_size {fsdp_size} must divide gpus {gpus}")
    if ep > 1 and (not config.n_expert or config.n_expert % ep or gpus % ep):
        raise ValueError(f"expert_parallel {ep} must divide n_expert ({config.n_expert}) and gpus ({gpus})")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")


def _resolve_hardware(
    config: Config,
    run: RunSettings,
    mfu: float | None,
    peak_tflops: float | None,
    gpu_memory_gb: float | None,
    link_gbps: float | None,
    internode_gbps: float,
    gpus_per_node: int,
    expert_hidden_copies: int | None,
    results_dir: Path,
) -> Hardware:
    """The GPU's peak FLOP/s, MFU, memory and link rates: `plan`'s overrides, else the `GPUS` table and the MFU we
    measured. A GPU missing from the table needs all of `peak_tflops`, `gpu_memory_gb` and `link_gbps`."""
    gpu = run.gpu
    overridden = peak_tflops is not None and gpu_memory_gb is not None and link_gbps is not None
    spec = None if overridden and gpu.lower() not in GPUS else gpu_spec(gpu)
    if expert_hidden_copies is None:
        expert_hidden_copies = 2 if spec is None or spec.grouped_mm else 1
    if peak_tflops is None:
        peak, peak_source = gpu_peak_flops(gpu, run.precision)
    else:
        peak, peak_source = peak_tflops * 1e12, "--peak_tflops"
    if mfu is None:
        mfu, mfu_source = measured_mfu(config, gpu, results_dir)
    else:
        mfu_source = f"MFU {mfu} given"
    return Hardware(
        peak_flops=peak,
        peak_source=peak_source,
        mfu=mfu,
        mfu_source=mfu_source,
        memory_gb=spec.memory_gb if gpu_memory_gb is None else gpu_memory_gb,
        intra_bytes_s=(link_gbps if link_gbps is not None else spec.link_gbps) * 1e9 / 8,
        inter_bytes_s=internode_gbps * 1e9 / 8,
        gpus_per_node=gpus_per_node,
        expert_hidden_copies=expert_hidden_copies,
    )


def _held_params(params: ParamCounts, ep: int) -> tuple[float, float]:
    """Parameters FSDP shards, and the expert parameters one GPU holds whole outside FSDP.

    With expert parallelism (`litgpt_mm.models.expert_parallel`) each rank holds its E / ep experts whole: FSDP
    ignores them and their gradients are all-reduced over the gpus / ep replicas; without it they are ordinary
    parameters.
    """
    sharded = params.total if ep == 1 else params.dense
    experts = 0 if ep == 1 else params.expert / ep
    return sharded, experts


def _memory_per_gpu(
    config: Config, run: RunSettings, hardware: Hardware, tensors: list[ParamTensor], params: ParamCounts
) -> Memory:
    """This GPU's share of weights, gradients and optimizer states, its activations, working weight copies and the
    optimizer step's temporaries (see `Memory`)."""
    pb = PRECISION_BYTES[run.precision]
    ep, fsdp_size = run.expert_parallel, run.fsdp_size
    sharded, experts = _held_params(params, ep)
    held = sharded / fsdp_size + experts
    weights, grads = pb.weight * held, pb.grad * held
    if run.optimizer == "adamw":
        opt = 2 * pb.weight * held
    else:
        opt = sum(
            (8.0 if t.numel < BNB_MIN_8BIT_SIZE else 2 + 2 * 4 / BNB_BLOCKSIZE)
            * t.numel
            / (ep if ep > 1 and t.kind == "expert" else fsdp_size)
            for t in tensors
        )

    acts = activation_bytes(
        config, run.precision, run.micro_batch, run.seq_len, run.activation_checkpointing, hardware.expert_hidden_copies
    )
    a = pb.compute
    if fsdp_size > 1:
        # root unit (wte, lm_head, ln_f) stays gathered through the forward; two blocks gathered (current +
        # prefetched) and one block of unsharded gradients before its reduce-scatter
        block = params.largest_block_dense + (params.largest_block_expert if ep == 1 else 0)
        working = a * (params.root + 3 * block)
        if pb.mixed:  # FSDP leaves the ignored experts in fp32: the MoE casts them, autocast-style, every forward
            working += a * experts
    elif pb.mixed:
        # autocast's compute-dtype copies of every matmul weight (this GPU's experts included), kept for the backward
        working = a * (sum(t.numel for t in tensors if t.kind == "linear") + params.expert / ep)
    else:
        working = 0.0
    largest = params.largest_tensor / (fsdp_size if fsdp_size > 1 else 1)
    opt_step = 0.0 if run.fused_adamw or run.optimizer != "adamw" else 2 * pb.weight * largest
    return Memory(weights, grads, opt, acts.start, acts.recompute, opt_step, working, run.overhead_gb * 1e9)


def _communication_per_step(config: Config, run: RunSettings, hardware: Hardware, params: ParamCounts) -> Communication:
    """Bytes each GPU sends per step and the seconds they take: FSDP's collectives, the gradient all-reduces over
    replicas and the expert all-to-all."""
    pb = PRECISION_BYTES[run.precision]
    a, gpus, fsdp_size, ep = pb.compute, run.gpus, run.fsdp_size, run.expert_parallel
    sharded, experts = _held_params(params, ep)
    comm_s, comm_bytes = 0.0, 0.0
    if fsdp_size > 1:  # FSDP: all-gathers (forward, backward) and a reduce-scatter, all in the compute dtype
        b = 3 * _ring_bytes(sharded * a, fsdp_size)
        comm_bytes, comm_s = comm_bytes + b, comm_s + b / hardware.rate(fsdp_size)
    # all-reduces (reduce-scatter + all-gather) of gradients over replicas: the dense ones over the FSDP replicas
    # (in the reduce dtype; DDP: in the gradients' dtype), this rank's experts over the gpus / ep ranks holding them
    for n, size, replicas in (
        (sharded / fsdp_size, a if fsdp_size > 1 else pb.grad, gpus // fsdp_size),
        (experts, pb.grad, gpus // ep),
    ):
        if n and replicas > 1:
            b = 2 * _ring_bytes(n * size, replicas)
            comm_bytes, comm_s = comm_bytes + b, comm_s + b / hardware.rate(gpus)
    a2a_bytes = 0.0
    if ep > 1:
        k, L_moe = config.n_expert_per_token, len(config.moe_layer_indices)
        passes = 3 if run.activation_checkpointing else 2  # forward, backward (+ recomputed forward)
        a2a_bytes = run.micro_batch * run.seq_len * k * config.n_embd * a * (ep - 1) / ep * 2 * passes * L_moe
    return Communication(comm_bytes, a2a_bytes, comm_s, a2a_bytes / hardware.rate(ep))


def _timed_plan(
    config: Config,
    run: RunSettings,
    hardware: Hardware,
    params: ParamCounts,
    memory: Memory,
    communication: Communication,
) -> Plan:
    """Compute and step time at the MFU, the steps for the run's tokens, and the notes saying what was assumed."""
    fpt = flops_per_token(config, run.seq_len, params)
    tokens_per_gpu = run.micro_batch * run.seq_len
    peak, mfu = hardware.peak_flops, hardware.mfu
    compute_s = tokens_per_gpu * fpt * (4 / 3 if run.activation_checkpointing else 1) / (peak * mfu)
    step_s = max(compute_s, communication.fsdp_s) + communication.all_to_all_s
    tokens_per_step = tokens_per_gpu * run.gpus
    notes = [hardware.mfu_source, f"peak {peak / 1e12:.1f} TFLOP/s per GPU from {hardware.peak_source}"]
    notes.append(
        "step time = max(compute at that MFU, FSDP/DDP traffic: overlapped by prefetching) + expert all-to-all"
        " (on the critical path); link rates are datasheet peaks (NCCL reaches ~70-85 %)"
    )
    if run.activation_checkpointing:
        notes.append("activation checkpointing recomputes the forward: compute time x 4/3 (not counted in MFU)")
    return Plan(
        model=config.name,
        gpu=run.gpu,
        gpus=run.gpus,
        tokens=float(run.tokens),
        precision=run.precision,
        optimizer=run.optimizer,
        micro_batch=run.micro_batch,
        seq_len=run.seq_len,
        activation_checkpointing=run.activation_checkpointing,
        fsdp_size=run.fsdp_size,
        expert_parallel=run.expert_parallel,
        params=params,
        flops_per_token=fpt,
        peak_flops=peak,
        peak_source=hardware.peak_source,
        mfu=mfu,
        mfu_source=hardware.mfu_source,
        memory=memory,
        gpu_memory_gb=hardware.memory_gb,
        communication=communication,
        compute_s=compute_s,
        step_s=step_s,
        tokens_per_step=tokens_per_step,
        steps=math.ceil(run.tokens / tokens_per_step),
        notes=notes,
    )


def format_plan(p: Plan) -> str:
    """A Markdown table of the plan, then its assumptions."""
    GB = 1e9
    m, c = p.memory, p.communication
    run = (
        f"{p.gpus} x {p.gpu}, {p.precision}, {p.optimizer}, micro-batch {p.micro_batch} x {p.seq_len} tokens, "
        f"FSDP {p.fsdp_size}, EP {p.expert_parallel}, checkpointing {'on' if p.activation_checkpointing else 'off'}"
    )
    activations = f"{m.activations / GB:.2f} GB"
    if m.recompute:
        activations += f" (+ {m.recompute / GB:.2f} GB for the recomputed block)"
    fits = "fits" if p.fits else "DOES NOT FIT"
    rows = [
        ("model", f"{p.model}: {p.params.total / 1e9:.3f} B parameters, {p.params.active / 1e9:.3f} B active"),
        ("run", run),
        ("FLOPs per token", f"{p.flops_per_token / 1e9:.2f} GFLOP (6 N_active + 12 L d T)"),
        ("weights / GPU", f"{m.weights / GB:.2f} GB"),
        ("gradients / GPU", f"{m.grads / GB:.2f} GB"),
        ("optimizer state / GPU", f"{m.optimizer / GB:.2f} GB"),
        ("activations / GPU", activations),
        ("working weight copies / GPU", f"{m.working / GB:.2f} GB"),
        ("runtime overhead / GPU", f"{m.overhead / GB:.2f} GB"),
        ("peak memory / GPU", f"{m.peak / GB:.1f} GB of {p.gpu_memory_gb:g} GB: {fits}"),
        ("FSDP/DDP traffic / step", f"{c.fsdp_bytes / GB:.2f} GB per GPU, {c.fsdp_s * 1e3:.0f} ms"),
        ("expert all-to-all / step", f"{c.all_to_all_bytes / GB:.2f} GB per GPU, {c.all_to_all_s * 1e3:.0f} ms"),
        ("compute / step", f"{p.compute_s * 1e3:.0f} ms at MFU {p.mfu:.3f}"),
        ("step time", f"{p.step_s * 1e3:.0f} ms ({p.tokens_per_step:,} tokens)"),
        ("throughput", f"{p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / p.gpus:,.0f} per GPU)"),
        ("steps", f"{p.steps:,} for {p.tokens:.3g} tokens"),
        ("wall clock", f"{p.days:.2f} days"),
        ("GPU-hours", f"{p.gpu_hours:,.0f}"),
    ]
    lines = ["| quantity | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    return "\n".join(lines + [f"- {n}" for n in p.notes])
