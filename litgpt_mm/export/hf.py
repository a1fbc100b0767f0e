"""Hugging Face export: a `transformers` directory that gives the same logits as our model.

Two layouts, chosen by what the checkpoint holds:

* `llava` (a dense Phi LM with a `linear` or `mlp2x_gelu` projector, features before `post_layernorm`): a stock
  `LlavaForConditionalGeneration` directory. `architectures` names the stock class and the weights keep Phi-2's
  `lm_head` bias (engines such as vLLM, whose Phi keeps it, load the directory natively); `auto_map` points
  `transformers` with `trust_remote_code=True` to a one-class subclass with a biased head (`modeling_llava_phi.py`),
  which loads it with no missing or unexpected keys. Without remote code `transformers` drops the bias (it says
  `unexpected_keys: ['lm_head.bias']`) and every logit shifts by it.
* `remote` (the MoE LM, the `resblock` projector, features after `post_layernorm`): a `trust_remote_code` package
  (`configuration_litgpt_mm.py`, `modeling_litgpt_mm.py`) that needs only `torch` and `transformers`.

Both share the processor: `LlavaProcessor` with a `CLIPImageProcessor` read from the tower's own preprocessing, a
tokenizer with `<image>` and `<image_sep>` added as special tokens (`<image_sep>`'s embedding row is the separator
vector), and a chat template that renders our prompt template (images first, as the model was trained). The projector
is a `linear` map (as `linear_1` of a LLaVA projector whose `linear_2` is the identity), `mlp2x_gelu` or `resblock`;
`feature_norm=standardize` is folded into its first linear layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from litgpt_mm.export.load import LoadedCheckpoint, VisionSpec, load_checkpoint, vision_spec
from litgpt_mm.prompts import TEMPLATES

IMAGE_TOKEN = "<image>"
SEPARATOR_TOKEN = "<image_sep>"
LAYOUTS = ("auto", "llava", "remote")
REMOTE_CODE = Path(__file__).parent / "remote_code"
# what a row that no token of ours reaches gets in the head: it never wins a greedy step
UNREACHABLE_LOGIT = -1e4


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(
    checkpoint_dir: Path, out_dir: Path, template: str = "phi2", layout: str = "auto", dtype: str = "float32"
) -> str:
    """Write `checkpoint_dir`'s model as a Hugging Face directory into `out_dir` (created; expected empty).

    Args:
        checkpoint_dir: anything `generate/mm.py` answers from (merged, adapters + base, aligned projector).
        out_dir: the directory to write.
        template: the prompt template the model was tuned with (`generate/mm.py --template`); the chat template
            renders it.
        layout: `llava`, `remote`, or `auto` (`llava` wherever stock classes express the model).
        dtype: the weights' dtype in the files (`float32`: what our model computes; `bfloat16` or `float16`: half the
            size, rounded).

    Returns:
        The layout written (`llava` or `remote`).
    """
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r}: choose from {sorted(TEMPLATES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose from {LAYOUTS}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {sorted(DTYPES)}")
    ck = load_checkpoint(checkpoint_dir)
    spec = vision_spec(ck.encoder)
    check_language_model(ck)
    stock = ck.lm_config.n_expert == 0 and ck.config.projector in ("linear", "mlp2x_gelu") and not spec.normalize
    if layout == "llava" and not stock:
        raise ValueError(
            f"--layout llava: a stock LlavaForConditionalGeneration cannot express this model ({_why_remote(ck, spec)})"
            "; use --layout remote (or auto)"
        )
    chosen = "llava" if layout == "llava" or (layout == "auto" and stock) else "remote"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, image_id, sep_id = build_tokenizer(ck)
    vocab = max(ck.lm_config.padded_vocab_size, len(tokenizer))
    lm_state = resized_lm_state(ck, vocab, image_id, sep_id)
    projector = folded_projector(ck)
    vision = clip_vision_state(ck.encoder.visual)
    eos, bos = ck.tokenizer.eos_id, ck.tokenizer.bos_id
    if chosen == "llava":
        config, state = llava_config(ck, spec, vocab, image_id), {}
        state.update({f"vision_tower.{k}": v for k, v in vision.items()})
        state.update({f"multi_modal_projector.{k}": v for k, v in llava_projector(ck, projector).items()})
        state.update({f"language_model.{k}": v for k, v in phi_hf_state(ck, lm_state).items()})
        shutil.copy2(REMOTE_CODE / "modeling_llava_phi.py", out_dir / "modeling_llava_phi.py")
    else:
        config, state = remote_config(ck, spec, vocab, image_id), {}
        state.update({f"vision_tower.{k}": v for k, v in vision.items()})
        state.update({f"projector.{k}": v for k, v in projector.items()})
        state.update({f"language_model.{k}": v for k, v in lm_state.items() if not k.startswith("lm_head.")})
        state.update({k: v for k, v in lm_state.items() if k.startswith("lm_head.")})
        for name in ("configuration_litgpt_mm.py", "modeling_litgpt_mm.py"):
            shutil.copy2(REMOTE_CODE / name, out_dir / name)
    config.update(bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype, transformers_version=_tf_version())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_safetensors({k: v.to(DTYPES[dtype]) for k, v in state.items()}, out_dir / "model.safetensors")
    build_processor(ck, spec, tokenizer, template).save_pretrained(out_dir)
    return chosen


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _why_remote(ck: LoadedCheckpoint, spec: VisionSpec) -> str:
    reasons = []
    if ck.lm_config.n_expert:
        reasons.append("a mixture-of-experts LM")
    if ck.config.projector not in ("linear", "mlp2x_gelu"):
        reasons.append(f"the {ck.config.projector} projector")
    if spec.normalize:
        reasons.append("features after post_layernorm (clip_normalize)")
    return ", ".join(reasons)


def check_language_model(ck: LoadedCheckpoint) -> None:
    """`ValueError` naming the first property of the LM that the Phi-2 layouts cannot express."""
    c = ck.lm_config
    checks = {
        "a GptNeoxMLP (Phi-2's fc, GELU, proj)": c.mlp_class_name == "GptNeoxMLP",
        "parallel attention and MLP on one LayerNorm": c.parallel_residual and c.shared_attention_norm,
        "LayerNorm": c.norm_class_name == "LayerNorm",
        "biases on every linear layer": c.bias,
        "as many key/value heads as query heads": c.n_query_groups == c.n_head,
        "head_size = n_embd / n_head": c.head_size * c.n_head == c.n_embd,
        "plain rotary embeddings": c.rope_condense_ratio == 1 and not c.rope_adjustments and c.rope_indices is None,
        "no embedding scaling or soft-capping": not c.scale_embeddings
        and c.final_logit_softcapping is None
        and c.attention_logit_softcapping is None,
        "no extra norms": not c.post_attention_norm and not c.post_mlp_norm and not c.norm_qk,
        "a GELU of approximate 'tanh' or 'none'": c.gelu_approximate in ("tanh", "none"),
    }
    for what, ok in checks.items():
        if not ok:
            raise ValueError(f"LM {c.name!r}: the Hugging Face export needs a Phi-2 architecture with {what}")


def build_tokenizer(ck: LoadedCheckpoint):
    """The `transformers` tokenizer of the checkpoint plus `<image>` and `<image_sep>` special tokens; (tokenizer,
    image id, separator id). `ValueError` when it does not encode text exactly as our tokenizer does."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = ck.tokenizer_dir
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: the Hugging Face export needs a tokenizer.json (a fast tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(directory, use_fast=True)
    except (OSError, ValueError, KeyError):
        tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    eos = ck.tokenizer.processor.id_to_token(ck.tokenizer.eos_id) if ck.tokenizer.eos_id is not None else None
    if eos is not None and tok.eos_token is None:
        tok.eos_token = eos
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batches of prompts pad (masked out of attention)
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"  # a batch generates from aligned ends
    tok.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids (generate() refuses them)
    tok.init_kwargs["model_input_names"] = tok.model_input_names
    existing = set(tok.get_vocab())
    for token in (IMAGE_TOKEN, SEPARATOR_TOKEN):
        if token in existing:
            raise ValueError(f"{directory}: the tokenizer already has a token {token!r}; it must be free for images")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, SEPARATOR_TOKEN]})
    image_id, sep_id = tok.convert_tokens_to_ids([IMAGE_TOKEN, SEPARATOR_TOKEN])
    for probe in ("Instruct: What is in the picture?\nOutput: ", "  two spaces, tabs\tand\n\nnew lines", "é ü 漢字 🙂"):
        ours = ck.tokenizer.encode(probe, bos=False, eos=False).tolist()
        theirs = tok(probe)["input_ids"]
        if ours != theirs:
            raise ValueError(
                f"{directory}: transformers encodes {probe!r} as {theirs[:8]}... and our tokenizer as {ours[:8]}...: "
                "the chat template could not reproduce our prompts"
            )
    return tok, image_id, sep_id


def resized_lm_state(ck: LoadedCheckpoint, vocab: int, image_id: int, sep_id: int) -> dict[str, torch.Tensor]:
    """The LM's weights with `vocab` embedding and head rows; `<image_sep>`'s embedding row is the separator.

    Rows beyond the trained vocabulary get a zero embedding, a zero head row and a head bias of `UNREACHABLE_LOGIT`
    (never chosen); rows of the padded vocabulary keep what the LM learned there, as our model computes them.
    """
    state = dict(ck.lm_state)
    wte, head_w = state["transformer.wte.weight"], state["lm_head.weight"]
    old, width = wte.size(0), wte.size(1)
    state.setdefault("lm_head.bias", head_w.new_zeros(old))  # both layouts have a biased head
    if vocab > old:
        state["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(vocab - old, width)])
        state["lm_head.weight"] = torch.cat([head_w, head_w.new_zeros(vocab - old, width)])
        bias = state["lm_head.bias"]
        state["lm_head.bias"] = torch.cat([bias, bias.new_full((vocab - old,), UNREACHABLE_LOGIT)])
    wte = state["transformer.wte.weight"] = state["transformer.wte.weight"].clone()
    wte[sep_id] = ck.separator
    if image_id >= old:
        wte[image_id] = 0.0
    return state


def folded_projector(ck: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The projector's weights with `feature_norm=standardize` folded into its first linear layer:
    W (f - mu) / sigma + b = (W / sigma) f + (b - (W / sigma) mu), computed in float64."""
    state = dict(ck.projector_state)
    if ck.feature_mean is None:
        return state
    first = {"linear": "", "mlp2x_gelu": "0.", "resblock": "proj."}[ck.config.projector]
    w, b = state[f"{first}weight"].double(), state[f"{first}bias"].double()
    w = w / ck.feature_std.double()
    state[f"{first}weight"] = w.float()
    state[f"{first}bias"] = (b - w @ ck.feature_mean.double()).float()
    return state


def llava_projector(ck: LoadedCheckpoint, projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folded `linear` or `mlp2x_gelu` projector in `LlavaMultiModalProjector`'s keys (a `linear` projector gets an
    identity `linear_2` behind an identity activation)."""
    if ck.config.projector == "mlp2x_gelu":
        return {
            "linear_1.weight": projector["0.weight"],
            "linear_1.bias": projector["0.bias"],
            "linear_2.weight": projector["2.weight"],
            "linear_2.bias": projector["2.bias"],
        }
    n = projector["weight"].size(0)
    return {
        "linear_1.weight": projector["weight"],
        "linear_1.bias": projector["bias"],
        "linear_2.weight": torch.eye(n),
        "linear_2.bias": torch.zeros(n),
    }


def phi_hf_state(ck: LoadedCheckpoint, lm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense Phi LM in `PhiForCausalLM`'s keys (`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.bias`)."""
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_phi

    out: dict[str, torch.Tensor] = {}
    copy_weights_phi(ck.lm_config, out, lm_state)
    return {k: v.contiguous() for k, v in out.items()}


def clip_vision_state(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip `VisionTransformer`'s weights in `CLIPVisionModel`'s keys (OpenAI's layout)."""
    p = "vision_model."
    sd = {k: v.detach().float() for k, v in visual.state_dict().items()}
    out = {
        f"{p}embeddings.class_embedding": sd["class_embedding"],
        f"{p}embeddings.patch_embedding.weight": sd["conv1.weight"],
        f"{p}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{p}pre_layrnorm.weight": sd["ln_pre.weight"],
        f"{p}pre_layrnorm.bias": sd["ln_pre.bias"],
        f"{p}post_layernorm.weight": sd["ln_post.weight"],
        f"{p}post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)
            out |= {f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k}
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.out_proj.{kind}"] = sd[f"{src}attn.out_proj.{kind}"]
            out[f"{dst}layer_norm1.{kind}"] = sd[f"{src}ln_1.{kind}"]
            out[f"{dst}layer_norm2.{kind}"] = sd[f"{src}ln_2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.c_fc.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.c_proj.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def clip_vision_config(spec: VisionSpec) -> dict:
    """`CLIPVisionConfig` fields of the tower."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_channels": 3,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "hidden_act": spec.hidden_act,
        "layer_norm_eps": spec.layer_norm_eps,
        "projection_dim": spec.hidden_size,
    }


def phi_text_config(ck: LoadedCheckpoint, vocab: int) -> dict:
    """`PhiConfig` fields of a dense LM."""
    c = ck.lm_config
    return {
        "architectures": ["PhiForCausalLM"],  # engines that build the text model by name (vLLM) pick Phi's biased head
        "model_type": "phi",
        "vocab_size": vocab,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_query_groups,
        "partial_rotary_factor": c.rope_n_elem / c.head_size,
        "max_position_embeddings": c.block_size,
        "layer_norm_eps": c.norm_eps,
        "hidden_act": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
        "rope_theta": c.rope_base,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "bos_token_id": ck.tokenizer.bos_id,
        "eos_token_id": ck.tokenizer.eos_id,
    }


def llava_config(ck: LoadedCheckpoint, spec: VisionSpec, vocab: int, image_id: int) -> dict:
    """`LlavaConfig` of the stock layout, with `auto_map` to the biased-head subclass."""
    remote = "modeling_llava_phi.LlavaPhiForConditionalGeneration"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "auto_map": {"AutoModelForImageTextToText": remote, "AutoModelForVision2Seq": remote},
        "model_type": "llava",
        "vision_config": clip_vision_config(spec),
        "text_config": phi_text_config(ck, vocab),
        "image_token_index": image_id,
        "image_seq_length": ck.config.num_patches,
        "projector_hidden_act": "gelu" if ck.config.projector == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True,
        "vision_feature_layer": spec.feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    }


def remote_config(ck: LoadedCheckpoint, spec: VisionSpec, vocab: int, image_id: int) -> dict:
    """`LitgptMMConfig` of the remote-code layout."""
    c = ck.lm_config
    text = {
        "vocab_size": vocab,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_query_groups,
        "head_dim": c.head_size,
        "rotary_dim": c.rope_n_elem,
        "rope_theta": c.rope_base,
        "layer_norm_eps": c.norm_eps,
        "gelu_approximate": c.gelu_approximate,
        "max_position_embeddings": c.block_size,
        "bias": c.bias,
        "lm_head_bias": True,
        "n_expert": c.n_expert,
        "n_expert_per_token": c.n_expert_per_token,
        "moe_intermediate_size": c.moe_intermediate_size,
        "moe_layers": c.moe_layer_indices,
    }
    return {
        "architectures": ["LitgptMMForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_litgpt_mm.LitgptMMConfig",
            "AutoModel": "modeling_litgpt_mm.LitgptMMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_litgpt_mm.LitgptMMForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_litgpt_mm.LitgptMMForConditionalGeneration",
            "AutoModelForVision2Seq": "modeling_litgpt_mm.LitgptMMForConditionalGeneration",
        },
        "model_type": "litgpt_mm",
        "vision_tower_config": clip_vision_config(spec),
        "language_config": text,
        "projector": ck.config.projector,
        "vision_feature_layer": spec.feature_layer,
        "vision_feature_normalize": spec.normalize,
        "image_token_index": image_id,
        "image_seq_length": ck.config.num_patches,
        "tie_word_embeddings": False,
    }


def chat_template(template: str) -> str:
    """A Jinja chat template that renders `messages` exactly as `litgpt_mm.deploy.chat.PromptBuilder` does (consecutive
    messages of one role joined by a newline and stripped; a message's text parts joined by newlines), with every
    image of the conversation first (`<image><image_sep>` each; the processor expands `<image>`)."""
    t = TEMPLATES[template]
    head, tail = t.user.split("{}", 1)

    def lit(s: str) -> str:
        return json.dumps(s)  # a valid Jinja string literal

    return (
        "{%- set ns = namespace(roles=[], texts=[], images='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set parts = namespace(t=[]) -%}"
        "{%- for c in m['content'] -%}"
        "{%- if c['type'] in ['image', 'image_url'] -%}"
        f"{{%- set ns.images = ns.images + {lit(IMAGE_TOKEN + SEPARATOR_TOKEN)} -%}}"
        "{%- elif c['type'] == 'text' -%}{%- set parts.t = parts.t + [c['text']] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set text = parts.t | join('\\n') -%}"
        "{%- endif -%}"
        "{%- if ns.roles and ns.roles[-1] == m['role'] -%}"
        "{%- set ns.texts = ns.texts[:-1] + [(ns.texts[-1] + '\\n' + text) | trim] -%}"
        "{%- else -%}{%- set ns.roles = ns.roles + [m['role']] -%}{%- set ns.texts = ns.texts + [text | trim] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{{{- ns.images -}}}}{{{{- {lit(t.system)} -}}}}"
        "{%- for i in range(ns.roles | length) -%}"
        "{%- if ns.roles[i] == 'system' -%}{{- ns.texts[i] + '\\n' -}}"
        f"{{%- elif ns.roles[i] == 'user' -%}}{{{{- {lit(head)} + ns.texts[i] + {lit(tail + t.assistant_prefix)} -}}}}"
        f"{{%- else -%}}{{{{- ns.texts[i] + {lit(t.answer_end)} -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def build_processor(ck: LoadedCheckpoint, spec: VisionSpec, tokenizer, template: str):
    """`LlavaProcessor` with a `CLIPImageProcessor` doing the tower's own preprocessing."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": spec.resize},
        resample=spec.resample,
        do_center_crop=True,
        crop_size={"height": spec.crop, "width": spec.crop},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=chat_template(template),
    )


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
