"""`scripts/export.py --format hf`: the exported directory, loaded by `transformers` offline, computes what our model
computes (fp32 logits over a whole image + text prompt, 20 greedy tokens), and its processor gives our ids and pixels.

Tiny random checkpoints of the three kinds `generate/mm.py` answers from (QLoRA adapters on an nf4 base, an aligned
projector, a merged model) on small open_clip ViTs (one with QuickGELU, one with GELU) registered for the test.
"""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, cli_here
from PIL import Image

import litgpt_mm.export.convert

TOWERS = {"litgpt-mm-test-vit-quickgelu": True, "litgpt-mm-test-vit-gelu": False}
PATCHES, WIDTH = 16, 64  # 32 px images, 8 px patches


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def _register_towers(root: Path) -> None:
    import open_clip

    (root / "clip").mkdir()
    for name, quick in TOWERS.items():
        vision = {"image_size": 32, "layers": 2, "width": WIDTH, "patch_size": 8, "head_width": 16}
        text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
        cfg = {"embed_dim": 32, "quick_gelu": quick, "vision_cfg": vision, "text_cfg": text}
        (root / "clip" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "clip")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Four checkpoints and their exports: {name: (checkpoint_dir, export_dir, layout)}."""
    from litgpt.tokenizer import Tokenizer

    from litgpt_mm.config import Config
    from litgpt_mm.data.tokens import train_bpe_tokenizer
    from litgpt_mm.export.hf import export_hf
    from litgpt_mm.model import GPT, save_checkpoint
    from litgpt_mm.models.qlora import LoRASettings, add_lora, lora_state_dict, quantize_nf4
    from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT

    root = tmp_path_factory.mktemp("export_hf")
    _register_towers(root)
    text = (DATA / "gutenberg" / "pg11_alices_adventures_in_wonderland.txt").read_text(encoding="utf-8")[:60000]
    train_bpe_tokenizer([text], 512, root / "lm")
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-tiny", n_layer=2, vocab_size=512, padded_vocab_size=512))
    save_checkpoint(lm, root / "lm")

    def multimodal(lm, out: Path, separator_id: int | None = None, **kw) -> MultimodalGPT:
        config = MultimodalConfig(clip_pretrained=None, vision_width=WIDTH, num_patches=PATCHES, **kw)
        mm = MultimodalGPT(lm, config, separator_id=separator_id)
        if mm.separator is not None:
            torch.nn.init.normal_(mm.separator, std=1.0)
        for p in mm.projector.parameters():
            torch.nn.init.normal_(p, std=0.3)
        if config.feature_norm == "standardize":
            mm.set_feature_statistics(torch.randn(64, WIDTH) * 2 + 0.5)
        mm.save_adapter(out)
        return mm

    ckpts = {}
    # dense + mlp2x_gelu, QuickGELU tower, standardised features, QLoRA adapters on the nf4 base
    base = dict(lm_checkpoint_dir=str(root / "lm"))
    mm = multimodal(
        lm,
        root / "dense_mlp",
        clip_model="litgpt-mm-test-vit-quickgelu",
        projector="mlp2x_gelu",
        feature_norm="standardize",
        **base,
    )
    settings = LoRASettings(dropout=0.0, mlp=True)
    lora_lm = add_lora(mm.lm, settings)
    for n, p in lora_lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    quantize_nf4(lora_lm)
    torch.save(lora_state_dict(lora_lm), root / "dense_mlp" / "lora.pth")
    (root / "dense_mlp" / "lora_config.yaml").write_text(yaml.safe_dump({**vars(settings), "quantize": "nf4"}))
    ckpts["dense_mlp"] = "llava"
    # dense + resblock, GELU tower read one block before the last, a token separator, aligned projector only
    lm = GPT(Config.from_name("phi-2-tiny", n_layer=2, vocab_size=512, padded_vocab_size=512))
    lm.load_state_dict(torch.load(root / "lm" / "lit_model.pth"))
    newline = Tokenizer(root / "lm").encode("\n", bos=False, eos=False).tolist()
    assert len(newline) == 1
    multimodal(
        lm,
        root / "dense_resblock",
        newline[0],
        clip_model="litgpt-mm-test-vit-gelu",
        projector="resblock",
        clip_layer=-2,
        separator="\n",
        **base,
    )
    ckpts["dense_resblock"] = "remote"
    # dense + linear, features of the block before the last, merged (its own tokenizer files)
    merged = root / "dense_linear"
    save_checkpoint(lm, merged)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "lm" / f, merged / f)
    multimodal(
        lm,
        merged,
        clip_model="litgpt-mm-test-vit-gelu",
        projector="linear",
        clip_layer=-2,
        lm_checkpoint_dir=str(merged),
    )
    ckpts["dense_linear"] = "llava"
    # MoE LM + mlp2x_gelu, merged
    torch.manual_seed(1)
    moe = GPT(Config.from_name("phi-2-moe-tiny", n_layer=2, vocab_size=512, padded_vocab_size=512))
    save_checkpoint(moe, root / "moe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "lm" / f, root / "moe" / f)
    multimodal(
        moe,
        root / "moe",
        clip_model="litgpt-mm-test-vit-quickgelu",
        projector="mlp2x_gelu",
        feature_norm="standardize",
        lm_checkpoint_dir=str(root / "moe"),
    )
    ckpts["moe"] = "remote"

    out = {}
    for name, layout in ckpts.items():
        target = root / f"hf-{name}"
        assert export_hf(root / name, target) == layout
        out[name] = (root / name, target, layout)
    return out


def _load_hf(directory: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(
        directory, trust_remote_code=True, output_loading_info=True, dtype=torch.float32
    )
    return model.eval(), info, AutoProcessor.from_pretrained(directory)


@pytest.mark.parametrize("name", ["dense_mlp", "dense_resblock", "dense_linear", "moe"])
def test_hf_export_gives_our_logits_and_greedy_tokens(exports, name):
    from litgpt_mm.deploy.inference import Assistant
    from litgpt_mm.multimodal import generate

    checkpoint, directory, layout = exports[name]
    model, info, processor = _load_hf(directory)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    config = json.loads((directory / "config.json").read_text())
    if layout == "llava":
        assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
        assert type(model).__name__ == "LlavaPhiForConditionalGeneration"
        want_act = (
            "quick_gelu"
            if "quickgelu" in yaml.safe_load((checkpoint / "multimodal_config.yaml").read_text())["clip_model"]
            else "gelu"
        )
        assert model.config.vision_config.hidden_act == want_act
    else:
        assert type(model).__name__ == "LitgptMMForConditionalGeneration"

    ours = Assistant.load(checkpoint, device="cpu")
    images = [_image(40, 40, 1), _image(48, 36, 2)]  # square, and non-square (crop offsets agree: see below)
    question = "What is the difference between these two pictures?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    ids = ours.prompt_ids(question, len(images), 20)
    image_id, sep_id = processor.tokenizer.convert_tokens_to_ids(["<image>", "<image_sep>"])
    want = ([image_id] * PATCHES + [sep_id]) * len(images) + ids.tolist()
    assert inputs["input_ids"][0].tolist() == want
    torch.testing.assert_close(inputs["pixel_values"], ours.encoder.pixels(images), rtol=0, atol=1e-6)

    feats = ours.features(images)
    with torch.no_grad():
        want_logits, _ = ours.model([feats], [ids])
        got = model(**inputs).logits
    vocab = want_logits.size(-1)
    assert got.shape[:2] == want_logits.shape[:2] and got.size(-1) >= vocab
    torch.testing.assert_close(got[..., :vocab], want_logits, rtol=0, atol=1e-4)
    assert want_logits.std() > 0.1  # the test means something: logits that differ from position to position
    if got.size(-1) > vocab:  # the rows added for <image> and <image_sep> never win
        assert got[..., vocab:].max() < want_logits.min()

    eos = ours.tokenizer.eos_id
    our_tokens = list(generate(ours.model, feats, ids, 20, eos_id=eos))
    hf_tokens = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].size(1) :]
    assert len(our_tokens) == 20 and hf_tokens.tolist() == our_tokens


def test_remote_package_batches_left_padded_prompts_like_one_by_one(exports):
    """The package's own attention masking: a left-padded batch greedily decodes what we decode for each prompt."""
    from litgpt_mm.deploy.inference import Assistant
    from litgpt_mm.multimodal import generate

    checkpoint, directory, _ = exports["moe"]
    model, _, processor = _load_hf(directory)
    ours = Assistant.load(checkpoint, device="cpu")
    questions, images = ["Why?", "Which colour fills most of this picture, and where?"], [_image(32, 32, 7)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    inputs = processor(images=images * 2, text=texts, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt is left-padded
    got = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].size(1) :].tolist()
    feats = ours.features(images)
    want = [list(generate(ours.model, feats, ours.prompt_ids(q, 1, 8), 8)) for q in questions]
    assert got == want


def test_llava_layout_keeps_the_head_bias_for_stock_loaders(exports):
    """Stock `LlavaForConditionalGeneration` (no remote code) finds the bias in the weights as its one unexpected key:
    its logits are ours less the bias, which engines whose Phi keeps the bias (vLLM) add back."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    _, directory, _ = exports["dense_linear"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("language_model.lm_head.bias")
    assert bias.abs().max() > 0
    stock, info = LlavaForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True, dtype=torch.float32
    )
    assert info["unexpected_keys"] == ["lm_head.bias"] and not info["missing_keys"]
    biased, _, processor = _load_hf(directory)
    inputs = processor(images=[_image(32, 32, 3)], text="<image><image_sep>Instruct: hi\nOutput: ", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits + bias, biased(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (57, 57), (48, 32), (32, 45), (70, 40), (40, 47), (35, 32), (32, 39)])
def test_processor_pixels_equal_ours(exports, size):
    """Square and non-square images. On sizes whose resized long side exceeds the crop by 4k + 3 pixels the centre
    crops differ by one pixel (torchvision rounds the offset half to even, `transformers` floors it): such a size
    gives the same pixels one column (or row) apart, which this test pins down."""
    from transformers import AutoProcessor

    from litgpt_mm.models.vision import CLIPPatchEncoder

    _, directory, _ = exports["dense_resblock"]
    encoder = CLIPPatchEncoder("litgpt-mm-test-vit-gelu", None)
    processor = AutoProcessor.from_pretrained(directory)
    image = _image(*size, seed=sum(size))
    ours = encoder.pixels([image])
    got = processor(images=[image], text="<image>", return_tensors="pt")["pixel_values"]
    w, h = size
    long_side = int(32 * max(w, h) / min(w, h))
    if (long_side - 32) % 4 != 3:
        torch.testing.assert_close(got, ours, rtol=0, atol=1e-6)
    else:  # one pixel apart along the long side
        assert not torch.allclose(got, ours, atol=1e-3)
        dim = -1 if w > h else -2
        shifted = ours.narrow(dim, 0, 31), got.narrow(dim, 1, 31)  # ours starts one pixel further
        torch.testing.assert_close(*shifted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("template", ["phi2", "llava_v1"])
def test_chat_template_renders_conversations_like_our_prompt_builder(exports, tmp_path, template):
    from transformers import AutoProcessor

    from litgpt_mm.deploy.chat import PromptBuilder, Turn
    from litgpt_mm.export.hf import build_processor, build_tokenizer
    from litgpt_mm.export.load import load_checkpoint, vision_spec
    from litgpt_mm.prompts import TEMPLATES

    checkpoint, _, _ = exports["dense_linear"]
    ck = load_checkpoint(checkpoint)
    tokenizer, image_id, sep_id = build_tokenizer(ck)
    build_processor(ck, vision_spec(ck.encoder), tokenizer, template).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Look at this. "}]},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And this"}, {"type": "text", "text": "one?"},
                                     {"type": "image"}]},
    ]  # fmt: skip
    turns = [
        Turn("system", "Answer briefly."),
        Turn("user", "Look at this. "),
        Turn("user", "What colour is it?"),
        Turn("assistant", "Red."),
        Turn("user", "And this\none?"),
    ]
    ours = PromptBuilder(ck.tokenizer, TEMPLATES[template], 4096, PATCHES).build(turns, 2, 20).ids.tolist()
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    got = processor(images=[_image(32, 32, 4), _image(32, 32, 5)], text=text)["input_ids"][0]
    assert list(got) == ([image_id] * PATCHES + [sep_id]) * 2 + ours


def test_features_after_post_layernorm_go_to_the_remote_package(exports, tmp_path, monkeypatch):
    """A tower whose features pass `ln_post` (`clip_normalize`): no stock LLaVA reads them, the package does."""
    import litgpt_mm.export.hf as hf
    from litgpt_mm.export.load import load_checkpoint

    def normalized(checkpoint_dir):
        ck = load_checkpoint(checkpoint_dir)
        ck.encoder.normalize = True
        torch.nn.init.normal_(ck.encoder.visual.ln_post.weight, mean=1.0, std=0.5)  # not the identity
        loaded.append(ck)
        return ck

    loaded = []
    monkeypatch.setattr(hf, "load_checkpoint", normalized)
    checkpoint, _, _ = exports["dense_linear"]
    with pytest.raises(ValueError, match="post_layernorm"):
        hf.export_hf(checkpoint, tmp_path / "llava", layout="llava")
    assert hf.export_hf(checkpoint, tmp_path / "hf") == "remote"
    model, info, processor = _load_hf(tmp_path / "hf")
    assert {k: v for k, v in info.items() if v} == {} and model.config.vision_feature_normalize
    ck = loaded[-1]
    pixels = processor(images=[_image(32, 32, 6)], text="<image>", return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = ck.model.image_prefix(ck.encoder(pixels))[:, :-1]
        got = model.get_image_features(pixels)
        ck.encoder.normalize = False
        plain = ck.model.image_prefix(ck.encoder(pixels))[:, :-1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(want, plain, atol=1e-2)  # ln_post matters here


def test_remote_code_imports_only_torch_and_transformers():
    from litgpt_mm.export.hf import REMOTE_CODE

    allowed = {"math", "torch", "transformers", "configuration_litgpt_mm"}
    for path in REMOTE_CODE.glob("*_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)


def test_export_cli_refuses_bad_input_in_one_line_and_writes_nothing(exports, capfd, tmp_path):
    export = litgpt_mm.export.convert.export
    checkpoint, _, _ = exports["dense_resblock"]

    def run(src: Path, out: Path, *extra: str) -> tuple[int, str]:
        code, _, err = cli_here(capfd, export, ["--checkpoint_dir", str(src), "--out_dir", str(out), *extra])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, err
        return code, errors[0]

    bad = tmp_path / "bad_projector"
    shutil.copytree(checkpoint, bad)
    config = yaml.safe_load((bad / "multimodal_config.yaml").read_text())
    (bad / "multimodal_config.yaml").write_text(yaml.safe_dump({**config, "projector": "qformer"}))
    _, line = run(bad, tmp_path / "out1")
    assert "projector" in line and "qformer" in line
    no_tok = tmp_path / "lm_without_tokenizer"
    no_tok.mkdir()
    shutil.copy(Path(config["lm_checkpoint_dir"]) / "lit_model.pth", no_tok)
    shutil.copy(Path(config["lm_checkpoint_dir"]) / "model_config.yaml", no_tok)
    orphan = tmp_path / "orphan"
    shutil.copytree(checkpoint, orphan)
    (orphan / "multimodal_config.yaml").write_text(yaml.safe_dump({**config, "lm_checkpoint_dir": str(no_tok)}))
    _, line = run(orphan, tmp_path / "out2")
    assert "tokenizer" in line
    _, line = run(exports["moe"][0], tmp_path / "out3", "--layout", "llava")
    assert "mixture-of-experts" in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _, line = run(checkpoint, tmp_path / "full")
    assert "not empty" in line and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["bad_projector", "full", "lm_without_tokenizer", "orphan"]  # no partial export, no temporary


def test_export_cli_writes_the_directory(exports, capfd, tmp_path):
    export = litgpt_mm.export.convert.export
    checkpoint, reference, _ = exports["dense_linear"]
    out = tmp_path / "hf"
    code, stdout, err = cli_here(capfd, export, ["--checkpoint_dir", str(checkpoint), "--out_dir", str(out)])
    assert code == 0, err
    assert "llava" in stdout and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    from safetensors import safe_open

    code, _, err = cli_here(
        capfd, export, ["--checkpoint_dir", str(checkpoint), "--out_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    )
    assert code == 0, err
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        half = f.get_tensor("language_model.lm_head.bias")
    with safe_open(str(reference / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(half.float(), f.get_tensor("language_model.lm_head.bias"), rtol=1e-2, atol=1e-3)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
