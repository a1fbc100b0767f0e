"""GGUF export (`litgpt_mm.export.gguf`): names, metadata and weights read back with `gguf.GGUFReader`, the tokenizer
rebuilt from the file, the mmproj's computation re-enacted in torch as llama.cpp's CLIP graph runs it, one error for
what llama.cpp cannot express, and (when `llama-cpp-python` is installed) llama.cpp's own tokens, image embeddings
and greedy answer against ours."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DATA

gguf = pytest.importorskip("gguf", reason="the export extra (pip install -e '.[export]') brings the gguf package")

TOWER = "litgpt-mm-test-vit-quickgelu"  # OpenAI-style activation
TOWER_GELU = "litgpt-mm-test-vit-gelu"
TOWER_SQUARE = "litgpt-mm-test-vit-square-mlp"  # MLP as wide as the tower: llama.cpp's legacy up/down naming
TEXTS = [
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "  two  spaces,\nnew lines\n\n\tand tabs; numbers 12345 and 3.14; it's they're we'll I'd",
    "Ünïcödé — “quotes” and emoji 🙂 日本語 ½",
]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, dict]:
    """Tiny open_clip ViTs (32 px, 4 x 4 patches of 8 px, width 64) registered under test names."""
    import open_clip

    root = tmp_path_factory.mktemp("towers")
    text_cfg = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    vision = {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0}
    cfgs = {
        TOWER: {"embed_dim": 32, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text_cfg},
        TOWER_GELU: {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text_cfg},
        TOWER_SQUARE: {"embed_dim": 32, "vision_cfg": {**vision, "mlp_ratio": 1.0}, "text_cfg": text_cfg},
    }
    for name, cfg in cfgs.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
    return cfgs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from litgpt_mm.data.tokens import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    text = (DATA / "gutenberg" / "pg11_alices_adventures_in_wonderland.txt").read_text(encoding="utf-8")[:60_000]
    train_bpe_tokenizer([text], 400, out)
    return out


def build_checkpoint(
    root: Path,
    tokenizer_dir: Path | None,
    lm_name: str = "phi-2-tiny",
    projector: str = "mlp2x_gelu",
    clip_model: str = TOWER,
    clip_layer: int = -2,
    feature_norm: str = "standardize",
    separator: str = "learned",
) -> Path:
    """A merged checkpoint (LM, tokenizer, projector, learned separator, feature statistics) with random weights."""
    from litgpt_mm.config import Config
    from litgpt_mm.model import GPT, save_checkpoint
    from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT

    torch.manual_seed(0)
    # 400 tokens padded to 448 rows: the export must keep the padding rows (our model can pick them) as unused tokens
    lm = GPT(Config.from_name(lm_name, vocab_size=400, padded_vocab_size=448, n_layer=2))
    for name, p in lm.named_parameters():  # weights large enough for clear greedy choices that depend on the image
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
        elif name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(lm, root)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, root / f.name)
    config = MultimodalConfig(
        clip_model=clip_model,
        clip_pretrained=None,
        clip_layer=clip_layer,
        vision_width=64,
        num_patches=16,
        projector=projector,
        feature_norm=feature_norm,
        separator=separator,
        lm_checkpoint_dir=str(root),
    )
    if separator == "learned":
        mm = MultimodalGPT(lm, config)
        torch.nn.init.normal_(mm.separator, std=1.0)
    else:
        from litgpt.tokenizer import Tokenizer

        from litgpt_mm.multimodal import separator_token_id

        mm = MultimodalGPT(lm, config, separator_id=separator_token_id(Tokenizer(tokenizer_dir), separator))
    for p in mm.projector.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if feature_norm == "standardize":
        mm.set_feature_statistics(torch.randn(64, 64) * 2.0 + 0.5)
    mm.save_adapter(root)
    return root


@pytest.fixture(scope="module")
def exported(towers, tokenizer_dir, tmp_path_factory) -> dict:
    """A dense checkpoint exported once: {checkpoint, out, loaded (the reference model), lm, mmproj (readers)}."""
    from litgpt_mm.export.gguf import export_gguf
    from litgpt_mm.export.load import load_checkpoint

    root = tmp_path_factory.mktemp("gguf")
    checkpoint = build_checkpoint(root / "merged", tokenizer_dir)
    export_gguf(checkpoint, root / "out")
    return {
        "checkpoint": checkpoint,
        "out": root / "out",
        "loaded": load_checkpoint(checkpoint),
        "lm": gguf.GGUFReader(root / "out" / "model.gguf"),
        "mmproj": gguf.GGUFReader(root / "out" / "mmproj.gguf"),
    }


def metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader) -> dict[str, torch.Tensor]:
    """Tensors by name, in PyTorch layout (the reader gives ggml's dimensions reversed, as torch orders them)."""
    out = {}
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        assert tuple(t.data.shape) == tuple(int(n) for n in reversed(t.shape)), t.name
        out[t.name] = torch.from_numpy(t.data.copy())
    return out


def test_lm_gguf_names_metadata_and_weights_equal_ours(exported):
    loaded, reader = exported["loaded"], exported["lm"]
    config, state = loaded.lm_config, loaded.lm_state
    tokenizer_json = json.loads((exported["checkpoint"] / "tokenizer.json").read_text())
    meta = metadata(reader)
    vocab = {k: meta.pop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    assert meta == {
        "general.architecture": "phi2",
        "general.name": "litgpt-mm phi-2-tiny",
        "general.description": "litgpt-mm LM (phi-2-tiny); each image is the prompt text <__media__><|image_sep|> "
        "before the template's text (special tokens parsed)",
        "general.file_type": 0,
        "phi2.context_length": 256,
        "phi2.embedding_length": 128,
        "phi2.feed_forward_length": 512,
        "phi2.block_count": 2,
        "phi2.attention.head_count": 4,
        "phi2.attention.head_count_kv": 4,
        "phi2.attention.layer_norm_epsilon": pytest.approx(1e-5),
        "phi2.rope.dimension_count": 16,  # rotary_percentage 0.5 of head size 32
        "phi2.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.bos_token_id": 0,
        "litgpt_mm.image_separator": "<|image_sep|>",
        "litgpt_mm.image_prompt": "<__media__><|image_sep|>",
    }
    assert config.rope_n_elem == 16 and config.intermediate_size == 512 and config.block_size == 256

    tokens, types = vocab["tokenizer.ggml.tokens"], vocab["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 449
    assert {t: i for i, t in enumerate(tokens[:400])} == tokenizer_json["model"]["vocab"]
    assert tokens[400:448] == [f"[PAD{i}]" for i in range(400, 448)] and tokens[448] == "<|image_sep|>"
    token_type = gguf.TokenType
    assert types[0] == token_type.CONTROL and tokens[0] == "<|endoftext|>"
    assert set(types[1:400]) == {token_type.NORMAL}
    assert set(types[400:448]) == {token_type.UNUSED} and types[448] == token_type.CONTROL
    assert vocab["tokenizer.ggml.merges"] == [" ".join(m) for m in tokenizer_json["model"]["merges"]]

    got = tensors(reader)
    phi2_names = {
        gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI2] for i in range(2)
    }
    assert {n.rsplit(".", 1)[0] for n in got} <= phi2_names  # only names llama.cpp's phi2 knows
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"]
    assert set(got) == {
        "token_embd.weight",
        "output.weight",
        "output.bias",
        "output_norm.weight",
        "output_norm.bias",
    } | {f"blk.{i}.{n}.{kind}" for i in range(2) for n in per_block for kind in ("weight", "bias")}
    assert got["token_embd.weight"].shape == (449, 128) and got["output.weight"].shape == (449, 128)
    assert torch.equal(got["token_embd.weight"][:448], state["transformer.wte.weight"])
    assert torch.equal(got["token_embd.weight"][448], loaded.model.separator.detach())  # the learned vector
    assert torch.equal(got["output.weight"][:448], state["lm_head.weight"])
    assert torch.equal(got["output.weight"][448], torch.zeros(128))
    assert torch.equal(got["output.bias"][:448], state["lm_head.bias"]) and got["output.bias"][448] == -math.inf
    assert torch.equal(got["output_norm.weight"], state["transformer.ln_f.weight"])
    for i in range(2):
        h = f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([got[f"blk.{i}.attn_{x}.{kind}"] for x in "qkv"])
            assert torch.equal(qkv, state[f"{h}attn.qkv.{kind}"])
            assert torch.equal(got[f"blk.{i}.attn_norm.{kind}"], state[f"{h}norm_1.{kind}"])
            assert torch.equal(got[f"blk.{i}.attn_output.{kind}"], state[f"{h}attn.proj.{kind}"])
            assert torch.equal(got[f"blk.{i}.ffn_up.{kind}"], state[f"{h}mlp.fc.{kind}"])
            assert torch.equal(got[f"blk.{i}.ffn_down.{kind}"], state[f"{h}mlp.proj.{kind}"])
    assert got["blk.0.ffn_up.weight"].shape == (512, 128)


def test_tokenizer_rebuilt_from_the_gguf_tokenizes_as_ours(exported):
    """The tokens and merges in the file, put back into a byte-level BPE, give our token ids (incl. padding rows
    never produced and the separator reachable only as a special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    meta = metadata(exported["lm"])
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # llama.cpp's 'gpt-2' regex
    rebuilt.decoder = decoders.ByteLevel()
    ours = exported["loaded"].tokenizer
    for text in TEXTS:
        ids = ours.encode(text, bos=False, eos=False).tolist()
        assert rebuilt.encode(text).ids == ids
        assert max(ids) < 400 and rebuilt.decode(ids) == text


def clip_graph(t: dict[str, torch.Tensor], meta: dict, pixels: torch.Tensor, cls_last: bool = False) -> torch.Tensor:
    """What llama.cpp's CLIP graph for an 'mlp' mmproj computes (tools/mtmd/models/llava.cpp), from the file alone:
    patch + class + position embeddings, pre-LN, `feature_layer` blocks, post-LN if present, CLS dropped, then
    linear, GELU (tanh form, ggml_gelu), linear.

    `cls_last` re-enacts llama.cpp's bug ggml-org/llama.cpp#25814 (the graph appends the class embedding after the
    patches but adds positions and picks output rows as if it came first: patch i gets position i, patch 0's output
    is dropped and the CLS output becomes the last image token); PR #25844 fixes it."""
    eps = meta["clip.vision.attention.layer_norm_epsilon"]
    n_head, width = meta["clip.vision.attention.head_count"], meta["clip.vision.embedding_length"]
    act = (
        (lambda x: F.gelu(x, approximate="tanh")) if meta["clip.use_gelu"] else (lambda x: x * torch.sigmoid(1.702 * x))
    )

    def ln(x, name):
        return F.layer_norm(x, (width,), t[f"{name}.weight"], t[f"{name}.bias"], eps)

    def linear(x, name):
        return F.linear(x, t[f"{name}.weight"], t[f"{name}.bias"])

    x = F.conv2d(pixels, t["v.patch_embd.weight"], stride=meta["clip.vision.patch_size"]).flatten(2).transpose(1, 2)
    cls = t["v.class_embd"].expand(x.size(0), 1, -1)
    x = torch.cat([x, cls] if cls_last else [cls, x], dim=1) + t["v.position_embd.weight"]
    x = ln(x, "v.pre_ln")
    assert meta["clip.vision.feature_layer"] == [meta["clip.vision.block_count"]]  # else llama.cpp stops one early
    for i in range(meta["clip.vision.feature_layer"][0]):
        b = f"v.blk.{i}"
        B, T, _ = x.shape
        q, k, v = (linear(ln(x, f"{b}.ln1"), f"{b}.attn_{n}").view(B, T, n_head, -1).transpose(1, 2) for n in "qkv")
        x = x + linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, width), f"{b}.attn_out")
        up, down = f"{b}.ffn_up", f"{b}.ffn_down"
        if t[f"{down}.weight"].shape[1] == width:  # clip.cpp swaps up/down of such 'mlp' mmprojs (legacy naming)
            up, down = down, up
        x = x + linear(act(linear(ln(x, f"{b}.ln2"), up)), down)
    if "v.post_ln.weight" in t:
        x = ln(x, "v.post_ln")
    return linear(F.gelu(linear(x[:, 1:], "mm.0"), approximate="tanh"), "mm.2")


def test_mmproj_names_metadata_and_clip_graph_match_ours(exported, towers):
    loaded, reader = exported["loaded"], exported["mmproj"]
    meta = metadata(reader)
    mean, std = meta.pop("clip.vision.image_mean"), meta.pop("clip.vision.image_std")
    assert meta == {
        "general.architecture": "clip",
        "general.name": f"litgpt-mm {TOWER} mmproj",
        "general.description": f"open_clip {TOWER} (None) + mlp2x_gelu projector",
        "general.file_type": 0,
        gguf.Keys.Clip.HAS_VISION_ENCODER: True,
        gguf.Keys.Clip.PROJECTOR_TYPE: "mlp",
        gguf.Keys.ClipVision.USE_GELU: False,  # QuickGELU tower: clip.cpp's default activation
        gguf.Keys.ClipVision.USE_SILU: False,
        gguf.Keys.ClipVision.IMAGE_SIZE: 32,
        gguf.Keys.ClipVision.PATCH_SIZE: 8,
        gguf.Keys.ClipVision.EMBEDDING_LENGTH: 64,
        gguf.Keys.ClipVision.FEED_FORWARD_LENGTH: 128,
        gguf.Keys.ClipVision.PROJECTION_DIM: 128,
        gguf.Keys.ClipVision.Attention.HEAD_COUNT: 2,
        gguf.Keys.ClipVision.Attention.LAYERNORM_EPS: pytest.approx(1e-5),
        gguf.Keys.ClipVision.BLOCK_COUNT: 2,  # clip_layer -2 of 3 blocks: the last block is not written
        "clip.vision.feature_layer": [2],
    }
    assert mean == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and std == pytest.approx(
        [0.26862954, 0.26130258, 0.27577711]
    )

    got = tensors(reader)
    per_block = ["ln1", "ln2", "attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down"]
    assert set(got) == {
        "v.patch_embd.weight",
        "v.class_embd",
        "v.position_embd.weight",
        "v.pre_ln.weight",
        "v.pre_ln.bias",
        "mm.0.weight",
        "mm.0.bias",
        "mm.2.weight",
        "mm.2.bias",
    } | {f"v.blk.{i}.{n}.{kind}" for i in range(2) for n in per_block for kind in ("weight", "bias")}
    visual = loaded.encoder.visual
    assert torch.equal(got["v.patch_embd.weight"], visual.conv1.weight) and got["v.position_embd.weight"].shape == (
        17,
        64,
    )
    block = visual.transformer.resblocks[1]
    qkv = torch.cat([got[f"v.blk.1.attn_{x}.weight"] for x in "qkv"])
    assert torch.equal(qkv, block.attn.in_proj_weight)
    assert torch.equal(got["v.blk.1.ffn_up.weight"], block.mlp.c_fc.weight)
    assert torch.equal(got["v.blk.1.ffn_down.weight"], block.mlp.c_proj.weight)
    assert torch.equal(got["mm.2.weight"], loaded.projector_state["2.weight"])

    # the file's computation (standardisation folded into mm.0) gives our projected patches
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model.image_prefix(loaded.encoder(pixels))[:, :-1]
        theirs = clip_graph(got, metadata(reader), pixels)
    assert F.cosine_similarity(theirs, ours, dim=-1).min() > 0.9999
    torch.testing.assert_close(theirs, ours, atol=5e-3 * ours.abs().max().item(), rtol=0)


@pytest.mark.parametrize("tower, use_gelu", [(TOWER_GELU, True), (TOWER_SQUARE, True), (TOWER, False)])
def test_tower_activation_and_square_mlp_naming(towers, tower, use_gelu):
    """nn.GELU -> clip.use_gelu, QuickGELU -> neither flag (clip.cpp's quick GELU); a square MLP is written with
    llama.cpp's legacy (swapped) up/down names, which its loader swaps back."""
    from litgpt_mm.export.gguf import mmproj_metadata, mmproj_tensors
    from litgpt_mm.export.load import vision_spec
    from litgpt_mm.models.vision import CLIPPatchEncoder

    encoder = CLIPPatchEncoder(tower, None, layer=-1)
    spec = vision_spec(encoder)
    meta = mmproj_metadata(spec, 128)
    assert (meta["clip.use_gelu"], meta["clip.use_silu"]) == (use_gelu, False)
    assert meta["clip.vision.block_count"] == 3 and meta["clip.vision.feature_layer"] == [3]
    proj = {
        "0.weight": torch.zeros(128, 64),
        "0.bias": torch.zeros(128),
        "2.weight": torch.zeros(128, 128),
        "2.bias": torch.zeros(128),
    }
    t = mmproj_tensors(encoder.visual, 3, False, proj)
    block = encoder.visual.transformer.resblocks[2]
    square = tower == TOWER_SQUARE
    assert torch.equal(
        torch.from_numpy(t["v.blk.2.ffn_down.weight" if square else "v.blk.2.ffn_up.weight"]), block.mlp.c_fc.weight
    )
    with torch.no_grad():
        pixels = torch.randn(2, 3, 32, 32)
        ours = encoder(pixels)
        # the tower alone: identity projector weights, so the graph gives GELU(features)
        eye = {
            "mm.0.weight": torch.eye(64),
            "mm.0.bias": torch.zeros(64),
            "mm.2.weight": torch.eye(64),
            "mm.2.bias": torch.zeros(64),
        }
        theirs = clip_graph({k: torch.from_numpy(v) for k, v in t.items()} | eye, meta, pixels)
    assert F.cosine_similarity(theirs, F.gelu(ours, approximate="tanh"), dim=-1).min() > 0.9999


@pytest.mark.parametrize(
    "kind, match",
    [
        ("moe", r"mixture of experts \(4 experts after the MLP in 2 blocks\); llama.cpp's phi2 architecture"),
        ("resblock", r"projector 'resblock' cannot be expressed in llama.cpp's mmproj"),
        ("linear", r"projector 'linear' cannot be expressed in llama.cpp's mmproj"),
        ("no_tokenizer", r"no tokenizer.json in .*GGUF export embeds the byte-level BPE tokenizer"),
        ("not_empty", r"exists and is not an empty directory"),
    ],
)
def test_unsupported_input_stops_with_one_error_and_writes_nothing(towers, tokenizer_dir, tmp_path, kind, match):
    from litgpt_mm.export.gguf import export_gguf

    args = {
        "moe": dict(lm_name="phi-2-moe-tiny"),
        "resblock": dict(projector="resblock"),
        "linear": dict(projector="linear"),
        "no_tokenizer": dict(tokenizer_dir=None),
        "not_empty": {},
    }[kind]
    checkpoint = build_checkpoint(tmp_path / "ckpt", **({"tokenizer_dir": tokenizer_dir} | args))
    out = tmp_path / "export" / "gguf"
    if kind == "not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=match) as err:
        export_gguf(checkpoint, out)
    assert "\n" not in str(err.value)
    if kind == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_bad_tokenizer_is_refused_by_name(tmp_path, tokenizer_dir):
    from litgpt_mm.export.gguf import build_vocab

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"pre-tokenizer .*add_prefix_space"):
        build_vocab(tmp_path / "tokenizer.json", 448)
    with pytest.raises(ValueError, match=r"token id 399 is outside the LM's 300 embedding rows"):
        build_vocab(tokenizer_dir / "tokenizer.json", 300)


def test_lm_configs_llama_cpp_phi2_does_not_compute_are_refused():
    from litgpt_mm.config import Config
    from litgpt_mm.export.gguf import check_lm_config

    for name in ("phi-2", "phi-2-twin", "phi-2-tiny"):
        check_lm_config(Config.from_name(name))
    with pytest.raises(ValueError, match=r"'pythia-14m' differs from llama.cpp's phi2 architecture in \{'shared_atte"):
        check_lm_config(Config.from_name("pythia-14m"))
    with pytest.raises(ValueError, match=r"'gelu_approximate': 'none'"):
        check_lm_config(Config.from_name("phi-2", gelu_approximate="none"))


@pytest.fixture(scope="module")
def llama(exported):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (extra llamacpp: a CMake source build)")
    from litgpt_mm.export.llamacpp import LlamaCpp

    runner = LlamaCpp(exported["out"], n_ctx=256, n_threads=2)
    yield runner
    runner.close()


def test_llama_cpp_tokenizes_as_ours(exported, llama):
    ours = exported["loaded"].tokenizer
    for text in TEXTS + ["Instruct: What is in the picture?\nOutput: "]:
        assert llama.tokenize(text) == ours.encode(text, bos=False, eos=False).tolist(), text
    # the separator is one control token, only when special tokens are parsed (as mtmd parses the prompt)
    assert (
        llama.tokenize("<|image_sep|>Instruct:", special=True)
        == [448] + ours.encode("Instruct:", bos=False, eos=False).tolist()
    )
    assert 448 not in llama.tokenize("<|image_sep|>")


def test_llama_cpp_text_logits_and_greedy_answer_match_ours(exported, llama):
    """The LM alone: llama.cpp's logits after a prompt equal ours (the separator's is -inf) and greedy ids agree."""
    import numpy as np

    from litgpt_mm.model import forward_embeds
    from litgpt_mm.multimodal import generate

    loaded, prompt = exported["loaded"], "Instruct: Where is the white rabbit going?\nOutput: "
    ids = loaded.tokenizer.encode(prompt, bos=False, eos=False)
    with torch.no_grad():
        ours = forward_embeds(loaded.model.lm, loaded.model.build_inputs([None], [ids])[0])[0, -1]
    theirs = torch.from_numpy(llama.prompt_logits(prompt, []))
    assert theirs.shape == (449,) and theirs[448] == -math.inf
    torch.testing.assert_close(theirs[:448], ours, atol=1e-3 * ours.abs().max().item(), rtol=0)
    want = list(generate(loaded.model, None, ids, 16, eos_id=loaded.tokenizer.eos_id))
    assert llama.greedy(prompt, [], 16, loaded.tokenizer.eos_id) == want
    assert np.argmax(theirs.numpy()) == want[0]
    # the same through llama-cpp-python's chat API with our chat handler (what the benchmark's server runs)
    from litgpt_mm.export.llamacpp import chat_handler

    llama.llm.chat_handler = chat_handler(exported["out"] / "mmproj.gguf")
    reply = llama.llm.create_chat_completion(
        messages=[{"role": "user", "content": "Where is the white rabbit going?"}],
        temperature=0.0,
        repeat_penalty=1.0,
        max_tokens=16,
    )
    # random weights answer in stray bytes: llama-cpp-python drops incomplete UTF-8 where ours shows U+FFFD, and it
    # decodes one token more when max_tokens ends inside a character
    expected = llama.llm.detokenize(want).decode("utf-8", errors="ignore")
    assert len(expected) >= 8 and reply["choices"][0]["message"]["content"].startswith(expected)
    assert reply["usage"]["completion_tokens"] in (len(want), len(want) + 1)


def test_llama_cpp_image_embeddings_and_greedy_answer_match_ours(exported, llama):
    import numpy as np
    from PIL import Image

    from litgpt_mm.multimodal import generate

    loaded = exported["loaded"]
    photos = sorted((DATA / "coco" / "val2017").glob("*.jpg"))[:2]
    # square images at the tower's size: llama.cpp's LLaVA preprocessing (pad to square, resize) and open_clip's
    # (resize the short side, centre-crop) then agree
    images = [Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC) for p in photos]
    reader = exported["mmproj"]
    embeddings = []
    for image in images:
        with torch.no_grad():
            pixels = loaded.encoder.pixels([image])
            ours = loaded.model.image_prefix(loaded.encoder(pixels))[0, :-1]  # the 16 projected patches
            cls_last = clip_graph(tensors(reader), metadata(reader), pixels, cls_last=True)[0]
        theirs = torch.from_numpy(llama.image_embeddings(np.asarray(image)))
        assert theirs.shape == (16, 128)
        embeddings.append((theirs, ours, cls_last))
    if F.cosine_similarity(embeddings[0][0], embeddings[0][1], dim=-1).min() < 0.999:
        # this llama.cpp has the CLS-order bug: its output must then be exactly the bug applied to our tower
        for theirs, _, cls_last in embeddings:
            assert F.cosine_similarity(theirs, cls_last, dim=-1).min() >= 0.999
        pytest.skip(
            "this llama.cpp build has ggml-org/llama.cpp#25814 (the LLaVA graph puts CLS after the patches; fix: PR "
            "#25844): its image embeddings equal our tower under that bug, so no CLIP export can match ours until "
            "llama.cpp is built with the fix"
        )
    for theirs, ours, _ in embeddings:
        assert F.cosine_similarity(theirs, ours, dim=-1).min() >= 0.999
    prompt = "Instruct: What is in the picture?\nOutput: "
    ids = loaded.tokenizer.encode(prompt, bos=False, eos=False)
    answers = []
    for image in images:
        features = loaded.encoder.encode_images([image])
        want = list(generate(loaded.model, features, ids, 16, eos_id=loaded.tokenizer.eos_id))
        got = llama.greedy("<__media__><|image_sep|>" + prompt, [np.asarray(image)], 16, loaded.tokenizer.eos_id)
        assert got == want
        answers.append(want)
    assert answers[0] != answers[1]  # the answer depends on the image: not the parity of a blind model


def test_aligned_projector_exports_with_the_tokenizer_of_the_lm_it_names(exported, tokenizer_dir, tmp_path):
    """An aligned checkpoint (projector only) takes LM weights and tokenizer from `lm_checkpoint_dir`."""
    from litgpt_mm.export.gguf import export_gguf
    from litgpt_mm.multimodal import CONFIG_FILE, WEIGHTS_FILE

    aligned = tmp_path / "align"
    aligned.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(exported["checkpoint"] / name, aligned / name)
    export_gguf(aligned, tmp_path / "out")
    for name in ("model.gguf", "mmproj.gguf"):
        assert (tmp_path / "out" / name).read_bytes() == (exported["out"] / name).read_bytes()
    lm_dir = tmp_path / "lm"
    shutil.copytree(exported["checkpoint"], lm_dir)
    (lm_dir / "tokenizer.json").unlink()
    (aligned / CONFIG_FILE).write_text(
        (aligned / CONFIG_FILE).read_text().replace(str(exported["checkpoint"]), str(lm_dir))
    )
    with pytest.raises(ValueError, match=f"no tokenizer.json in {lm_dir}"):
        export_gguf(aligned, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_llama_cpp_chat_template_renders_our_prompt():
    """The Jinja template given to llama-cpp-python renders what our server renders for the same OpenAI messages
    (`deploy.messages` + `PromptBuilder`), with each image (its URL, which the handler swaps for the media marker)
    and the separator before the text."""
    import base64
    import io

    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from PIL import Image

    from litgpt_mm.deploy.chat import PromptBuilder, merge_turns
    from litgpt_mm.deploy.messages import parse_messages
    from litgpt_mm.export.llamacpp import CHAT_TEMPLATE
    from litgpt_mm.prompts import TEMPLATES

    urls = []
    for colour in ("red", "blue"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [
            {"type": "text", "text": " And here? "}, {"type": "image_url", "image_url": urls[1]},
            {"type": "text", "text": "Left side."}]},
    ]  # fmt: skip
    # as llama-cpp-python's LLaVA handler renders it (then it replaces each URL with the media marker)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    conversation = parse_messages(messages)
    t = TEMPLATES["phi2"]
    history, question = PromptBuilder(None, t, 256, 16).render(merge_turns(conversation.turns))
    images = "".join(url + "<|image_sep|>" for url in urls)
    assert len(conversation.images) == 2
    assert text == images + history + t.user.format(question) + t.assistant_prefix
    assert text.endswith("A square.\nInstruct: And here? \nLeft side.\nOutput: ")


def test_token_separator_becomes_a_control_token_with_that_tokens_embedding(towers, tokenizer_dir, tmp_path):
    """A separator named by a token (`separator: "\\n"`) is exported like the learned one: `<|image_sep|>` whose
    embedding row is that token's, so the prompt layout is the same for both kinds."""
    from litgpt.tokenizer import Tokenizer

    from litgpt_mm.export.gguf import export_gguf

    checkpoint = build_checkpoint(tmp_path / "ckpt", tokenizer_dir, separator="\n")
    export_gguf(checkpoint, tmp_path / "out")
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    got, meta = tensors(reader), metadata(reader)
    newline = Tokenizer(tokenizer_dir).encode("\n", bos=False, eos=False).tolist()
    assert len(newline) == 1 and meta["tokenizer.ggml.tokens"][448] == "<|image_sep|>"
    assert torch.equal(got["token_embd.weight"][448], got["token_embd.weight"][newline[0]])
    assert got["output.bias"][448] == -math.inf
