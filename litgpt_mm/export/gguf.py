"""Export a dense multimodal checkpoint for llama.cpp: the LM as a `phi2` GGUF, CLIP + projector as an mmproj GGUF.

`export_gguf(checkpoint_dir, out_dir)` writes

* `model.gguf`: the LM in llama.cpp's `phi2` architecture (parallel attention + GELU MLP, shared LayerNorm, partial
  NeoX rotary, biased LM head), our byte-level BPE as a `gpt2` tokenizer with the `gpt-2` pre-tokenizer (the regex
  of `tokenizers`' `ByteLevel(use_regex=True)`), and the image separator as one extra control token,
  `<|image_sep|>`, whose embedding row is the separator vector (the learned one, or the separator token's
  embedding) and whose logit is always -inf (the model never produces it);
* `mmproj.gguf`: the open_clip ViT (only the blocks up to the feature layer) and the `mlp2x_gelu` projector as
  llama.cpp's CLIP encoder with projector type `mlp`. A `standardize` feature normalisation is folded into the
  projector's first linear layer (exact up to float rounding).

Weights are written in fp32, unchanged. Our model places each image's projected patches, then the separator, before
the text; in llama.cpp that is the prompt `<__media__><|image_sep|>` per image followed by the template's text (e.g.
`Instruct: {question}\nOutput: `), with special tokens parsed. What llama.cpp cannot express (an MoE LM, a projector
other than `mlp2x_gelu`, a tokenizer other than a byte-level BPE, other LM or tower variants) raises one `ValueError`
naming it, before anything is written. Files go to a temporary directory that is renamed to `out_dir` at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SEPARATOR_TOKEN = "<|image_sep|>"
MEDIA_MARKER = "<__media__>"  # llama.cpp's (mtmd's) default image marker
LM_FILE, MMPROJ_FILE = "model.gguf", "mmproj.gguf"
# the regex of `tokenizers`' ByteLevel(use_regex=True) pre-tokenizer, which llama.cpp's `gpt-2` pre-tokenizer applies
GPT2_PRE_TOKENIZER = "gpt-2"

# token types of llama.cpp's vocabulary (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    """A GGUF `gpt2` vocabulary: tokens (byte-level strings), their types, merges and special ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int | None
    bos_id: int | None
    separator_id: int


def export_gguf(checkpoint_dir: Path, out_dir: Path) -> None:
    """Write `<out_dir>/model.gguf` (LM, tokenizer, separator token) and `<out_dir>/mmproj.gguf` (CLIP + projector).

    Args:
        checkpoint_dir: any directory `generate/mm.py` answers from (merged, base + LoRA + projector, aligned).
        out_dir: a new (or empty) directory.

    Raises:
        ValueError: for what llama.cpp cannot express or a checkpoint that cannot be exported (nothing is written).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory: choose a new --out_dir")
    tokenizer_json = check_exportable(checkpoint_dir)

    from litgpt_mm.export.load import load_checkpoint, vision_spec

    loaded = load_checkpoint(checkpoint_dir)
    spec = vision_spec(loaded.encoder)
    vocab = build_vocab(tokenizer_json, loaded.lm_config.padded_vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 -> what a plain mkdir would give
        write_lm_gguf(tmp / LM_FILE, loaded, vocab)
        write_mmproj_gguf(tmp / MMPROJ_FILE, loaded, spec)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_exportable(checkpoint_dir: Path) -> Path:
    """What can be checked from the configs alone, before any weight is read; returns the `tokenizer.json` path.

    Raises:
        ValueError: an MoE LM, an LM llama.cpp's phi2 does not compute, a projector other than `mlp2x_gelu`, or no
            `tokenizer.json`.
    """
    from litgpt_mm.config import Config
    from litgpt_mm.multimodal import MultimodalConfig

    try:
        config = MultimodalConfig.load(checkpoint_dir)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    merged = (checkpoint_dir / "lit_model.pth").is_file()
    lm_dir = checkpoint_dir if merged else Path(config.lm_checkpoint_dir)
    if not (lm_dir / "model_config.yaml").is_file():
        raise ValueError(f"{checkpoint_dir}: its LM directory {lm_dir} has no model_config.yaml")
    lm_config = Config.from_file(lm_dir / "model_config.yaml")
    if lm_config.n_expert > 0:
        raise ValueError(
            f"{checkpoint_dir}: the LM is a mixture of experts ({lm_config.n_expert} experts after the MLP in "
            f"{len(lm_config.moe_layer_indices)} blocks); llama.cpp's phi2 architecture has no MoE sub-layer, so only "
            "dense models (n_expert=0) export to GGUF"
        )
    check_lm_config(lm_config)
    if config.projector != "mlp2x_gelu":
        raise ValueError(
            f"{checkpoint_dir}: projector {config.projector!r} cannot be expressed in llama.cpp's mmproj: its "
            "LLaVA projector type 'mlp' is linear, GELU, linear (our 'mlp2x_gelu'); train with --projector mlp2x_gelu"
        )
    tok_dir = checkpoint_dir if merged or (checkpoint_dir / "tokenizer.json").is_file() else lm_dir
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        sp = (tok_dir / "tokenizer.model").is_file()
        other = " (only a SentencePiece tokenizer.model, which this exporter does not convert)" if sp else ""
        raise ValueError(
            f"{checkpoint_dir}: no tokenizer.json in {tok_dir}{other}"
            "; GGUF export embeds the byte-level BPE tokenizer: copy the LM's tokenizer.json and "
            "tokenizer_config.json into the checkpoint"
        )
    return path


def check_lm_config(config) -> None:
    """`ValueError` unless `config` (a litgpt `Config`) computes exactly what llama.cpp's `phi2` graph computes."""
    wanted = {
        "parallel_residual": True,
        "shared_attention_norm": True,
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "bias": True,
        "lm_head_bias": True,
        "gelu_approximate": "tanh",
        "scale_embeddings": False,
        "rope_interleave": False,
        "norm_qk": False,
        "post_attention_norm": False,
        "post_mlp_norm": False,
        "attention_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window_size": None,
        "rope_adjustments": None,
        "rope_indices": None,
        "attention_scores_scalar": None,
        "n_expert": 0,
    }
    wrong = {k: getattr(config, k) for k, v in wanted.items() if hasattr(config, k) and getattr(config, k) != v}
    if getattr(config, "rope_condense_ratio", 1) != 1:
        wrong["rope_condense_ratio"] = config.rope_condense_ratio
    if wrong:
        raise ValueError(
            f"LM config {config.name!r} differs from llama.cpp's phi2 architecture in {wrong} "
            f"(phi2 needs { ({k: wanted.get(k, 1) for k in wrong}) })"
        )


def build_vocab(tokenizer_json: Path, n_rows: int) -> Vocab:
    """The `gpt2` vocabulary of a `tokenizers` byte-level BPE, padded to the LM's `n_rows` embedding rows with unused
    tokens, plus the separator control token (id `n_rows`).

    Raises:
        ValueError: a tokenizer llama.cpp's `gpt2` model with the `gpt-2` pre-tokenizer would not reproduce.
    """
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (needs BPE)")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        problems.append(f"pre-tokenizer {pre} (needs ByteLevel with use_regex and without add_prefix_space)")
    if spec.get("normalizer") is not None:
        problems.append(f"normalizer {spec['normalizer'].get('type')!r} (needs none)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"{key}={model[key]!r}")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        problems.append("byte_fallback/ignore_merges (needs neither)")
    if problems:
        raise ValueError(
            f"{tokenizer_json}: llama.cpp's gpt2 tokenizer with the {GPT2_PRE_TOKENIZER!r} pre-tokenizer cannot "
            f"reproduce this tokenizer: {'; '.join(problems)}"
        )
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= n_rows:
        raise ValueError(f"{tokenizer_json}: token id {max(by_id)} is outside the LM's {n_rows} embedding rows")
    if SEPARATOR_TOKEN in {t for t, _ in by_id.values()}:
        raise ValueError(f"{tokenizer_json}: already has a token {SEPARATOR_TOKEN!r}; it is reserved for the separator")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n_rows)] + [SEPARATOR_TOKEN]
    types = [by_id.get(i, (None, UNUSED))[1] for i in range(n_rows)] + [CONTROL]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = Path(tokenizer_json).with_name("tokenizer_config.json")
    special = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens[:n_rows])}

    def token_id(name: str) -> int | None:
        token = special.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return ids.get(token) if token is not None else None

    return Vocab(tokens, types, merges, token_id("eos_token"), token_id("bos_token"), n_rows)


def lm_tensors(lm_state: dict[str, torch.Tensor], config, separator: torch.Tensor) -> dict[str, np.ndarray]:
    """llama.cpp `phi2` tensors (GGUF names, PyTorch layout, fp32) from litgpt's state dict; the separator adds one
    embedding row (the vector) and one output row (zero weights, -inf bias)."""
    q_size = config.n_head * config.head_size
    kv_size = config.n_query_groups * config.head_size
    sep = separator.detach().float().reshape(1, -1)
    head_w, head_b = lm_state["lm_head.weight"], lm_state["lm_head.bias"]
    out = {
        "token_embd.weight": torch.cat([lm_state["transformer.wte.weight"], sep]),
        "output_norm.weight": lm_state["transformer.ln_f.weight"],
        "output_norm.bias": lm_state["transformer.ln_f.bias"],
        "output.weight": torch.cat([head_w, head_w.new_zeros(1, head_w.size(1))]),
        "output.bias": torch.cat([head_b, head_b.new_full((1,), -math.inf)]),
    }
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            q, k, v = lm_state[f"{h}attn.qkv.{kind}"].split((q_size, kv_size, kv_size))
            out |= {
                f"blk.{i}.attn_norm.{kind}": lm_state[f"{h}norm_1.{kind}"],
                f"blk.{i}.attn_q.{kind}": q,
                f"blk.{i}.attn_k.{kind}": k,
                f"blk.{i}.attn_v.{kind}": v,
                f"blk.{i}.attn_output.{kind}": lm_state[f"{h}attn.proj.{kind}"],
                f"blk.{i}.ffn_up.{kind}": lm_state[f"{h}mlp.fc.{kind}"],
                f"blk.{i}.ffn_down.{kind}": lm_state[f"{h}mlp.proj.{kind}"],
            }
    return {name: t.detach().float().contiguous().numpy() for name, t in out.items()}


def mmproj_tensors(
    visual,
    n_blocks: int,
    normalize: bool,
    projector_state: dict[str, torch.Tensor],
    feature_mean: torch.Tensor | None = None,
    feature_std: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """llama.cpp CLIP tensors (GGUF names, PyTorch layout, fp32) of an open_clip `VisionTransformer`'s first
    `n_blocks` blocks, `ln_post` when `normalize`, and the `mlp2x_gelu` projector with the feature standardisation
    (`(x - mean) / std`) folded into its first layer."""
    width = visual.transformer.width
    out = {
        "v.patch_embd.weight": visual.conv1.weight,
        "v.class_embd": visual.class_embedding,
        "v.position_embd.weight": visual.positional_embedding,
        "v.pre_ln.weight": visual.ln_pre.weight,
        "v.pre_ln.bias": visual.ln_pre.bias,
    }
    for i, block in enumerate(list(visual.transformer.resblocks)[:n_blocks]):
        q_w, k_w, v_w = block.attn.in_proj_weight.split(width)
        q_b, k_b, v_b = block.attn.in_proj_bias.split(width)
        # llama.cpp swaps up/down of 'mlp' mmprojs whose ffn_down has n_embd inputs (the legacy converter's naming):
        # with a square MLP (mlp width == width) both match, so the legacy naming is the one it reads back right
        up, down = ("ffn_down", "ffn_up") if block.mlp.c_fc.out_features == width else ("ffn_up", "ffn_down")
        out |= {
            f"v.blk.{i}.ln1.weight": block.ln_1.weight,
            f"v.blk.{i}.ln1.bias": block.ln_1.bias,
            f"v.blk.{i}.attn_q.weight": q_w,
            f"v.blk.{i}.attn_q.bias": q_b,
            f"v.blk.{i}.attn_k.weight": k_w,
            f"v.blk.{i}.attn_k.bias": k_b,
            f"v.blk.{i}.attn_v.weight": v_w,
            f"v.blk.{i}.attn_v.bias": v_b,
            f"v.blk.{i}.attn_out.weight": block.attn.out_proj.weight,
            f"v.blk.{i}.attn_out.bias": block.attn.out_proj.bias,
            f"v.blk.{i}.ln2.weight": block.ln_2.weight,
            f"v.blk.{i}.ln2.bias": block.ln_2.bias,
            f"v.blk.{i}.{up}.weight": block.mlp.c_fc.weight,
            f"v.blk.{i}.{up}.bias": block.mlp.c_fc.bias,
            f"v.blk.{i}.{down}.weight": block.mlp.c_proj.weight,
            f"v.blk.{i}.{down}.bias": block.mlp.c_proj.bias,
        }
    if normalize:
        out |= {"v.post_ln.weight": visual.ln_post.weight, "v.post_ln.bias": visual.ln_post.bias}
    w0, b0 = projector_state["0.weight"].double(), projector_state["0.bias"].double()
    if feature_mean is not None:
        w0 = w0 / feature_std.double()
        b0 = b0 - w0 @ feature_mean.double()
    out |= {
        "mm.0.weight": w0,
        "mm.0.bias": b0,
        "mm.2.weight": projector_state["2.weight"],
        "mm.2.bias": projector_state["2.bias"],
    }
    return {name: t.detach().float().contiguous().numpy() for name, t in out.items()}


def lm_metadata(config, vocab: Vocab) -> dict[str, object]:
    """The `phi2` and tokenizer keys of `model.gguf` (besides `general.*`), as llama.cpp reads them."""
    meta: dict[str, object] = {
        "phi2.context_length": config.block_size,
        "phi2.embedding_length": config.n_embd,
        "phi2.feed_forward_length": config.intermediate_size,
        "phi2.block_count": config.n_layer,
        "phi2.attention.head_count": config.n_head,
        "phi2.attention.head_count_kv": config.n_query_groups,
        "phi2.attention.layer_norm_epsilon": float(config.norm_eps),
        "phi2.rope.dimension_count": config.rope_n_elem,
        "phi2.rope.freq_base": float(config.rope_base),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": GPT2_PRE_TOKENIZER,
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.types,
        "tokenizer.ggml.merges": vocab.merges,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "litgpt_mm.image_separator": SEPARATOR_TOKEN,
        "litgpt_mm.image_prompt": MEDIA_MARKER + SEPARATOR_TOKEN,
    }
    if vocab.eos_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = vocab.eos_id
    if vocab.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = vocab.bos_id
    return meta


def mmproj_metadata(spec, n_embd: int) -> dict[str, object]:
    """The `clip.*` keys of `mmproj.gguf`, as llama.cpp's CLIP loader reads them (`spec`: the tower's `VisionSpec`)."""
    n_blocks = spec.feature_block + 1
    return {
        "clip.has_vision_encoder": True,
        "clip.projector_type": "mlp",
        # clip.cpp: use_gelu -> GELU (tanh form), use_silu -> SiLU, neither -> QuickGELU (x * sigmoid(1.702 x))
        "clip.use_gelu": spec.hidden_act == "gelu",
        "clip.use_silu": False,
        "clip.vision.image_size": spec.image_size,
        "clip.vision.patch_size": spec.patch_size,
        "clip.vision.embedding_length": spec.hidden_size,
        "clip.vision.feed_forward_length": spec.intermediate_size,
        "clip.vision.projection_dim": n_embd,
        "clip.vision.attention.head_count": spec.num_attention_heads,
        "clip.vision.attention.layer_norm_epsilon": float(spec.layer_norm_eps),
        "clip.vision.block_count": n_blocks,
        # without it an 'mlp' mmproj stops one block early (LLaVA's penultimate layer); with it the features are the
        # output of block n_blocks - 1 (after ln_post when present)
        "clip.vision.feature_layer": [n_blocks],
        "clip.vision.image_mean": [float(m) for m in spec.mean],
        "clip.vision.image_std": [float(s) for s in spec.std],
    }


def write_lm_gguf(path: Path, loaded, vocab: Vocab) -> None:
    """`model.gguf` of a loaded checkpoint (`litgpt_mm.export.load.LoadedCheckpoint`)."""
    config = loaded.lm_config
    tensors = lm_tensors(loaded.lm_state, config, loaded.separator)
    description = (
        f"litgpt-mm LM ({config.name}); each image is the prompt text {MEDIA_MARKER}{SEPARATOR_TOKEN} before the "
        "template's text (special tokens parsed)"
    )
    _write(path, "phi2", f"litgpt-mm {config.name}", description, lm_metadata(config, vocab), tensors)


def write_mmproj_gguf(path: Path, loaded, spec) -> None:
    """`mmproj.gguf` of a loaded checkpoint and its tower's `VisionSpec`."""
    tensors = mmproj_tensors(
        loaded.encoder.visual,
        spec.feature_block + 1,
        spec.normalize,
        loaded.projector_state,
        loaded.feature_mean,
        loaded.feature_std,
    )
    config = loaded.config
    description = f"open_clip {config.clip_model} ({config.clip_pretrained}) + mlp2x_gelu projector"
    meta = mmproj_metadata(spec, loaded.lm_config.n_embd)
    _write(path, "clip", f"litgpt-mm {config.clip_model} mmproj", description, meta, tensors)


def _write(path: Path, arch: str, name: str, description: str, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
