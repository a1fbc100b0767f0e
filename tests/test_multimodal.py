"""CLIP patch features, projectors, and the multimodal LM: prefix layout, padding, gradients, KV-cache generation."""

import pytest
import torch
from conftest import DATA
from litgpt import lora
from PIL import Image

from litgpt_mm.config import Config
from litgpt_mm.model import GPT, embed_tokens
from litgpt_mm.models.projector import PROJECTORS, build_projector
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import (
    IGNORE_INDEX,
    MultimodalConfig,
    MultimodalGPT,
    generate,
    shifted_cross_entropy,
    target_cross_entropy,
)

COCO = DATA / "coco"


@pytest.fixture(scope="module")
def clip() -> CLIPPatchEncoder:
    torch.manual_seed(0)
    return CLIPPatchEncoder("ViT-B-32", pretrained=None)


def coco_images(n: int) -> list[Image.Image]:
    return [Image.open(p) for p in sorted((COCO / "train2017").glob("*.jpg"))[:n]]


def test_patch_features_match_open_clip(clip):
    images = coco_images(2)
    feats = clip.encode_images(images)
    assert feats.shape == (2, 49, 768) and clip.num_patches == 49 and clip.width == 768
    assert not feats.requires_grad and not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training  # stays frozen in eval mode

    pixels = clip.pixels(images)
    captured = {}
    hook = clip.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: captured.update(out=o))
    clip.visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = clip.visual(pixels)  # open_clip's own patch tokens (after ln_post)
    finally:
        clip.visual.output_tokens = False
        hook.remove()
    torch.testing.assert_close(feats, captured["out"][:, 1:])  # last block, class token dropped
    clip.normalize = True
    try:
        torch.testing.assert_close(clip(pixels), tokens)
    finally:
        clip.normalize = False


def test_earlier_layer_and_bad_arguments(clip):
    pixels = clip.pixels(coco_images(1))
    captured = {}
    hook = clip.visual.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.update(out=o))
    layer = clip.layer
    clip.layer = 10
    try:
        feats = clip(pixels)
    finally:
        clip.layer = layer
        hook.remove()
    torch.testing.assert_close(feats, captured["out"][:, 1:])
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        CLIPPatchEncoder("ViT-Q-99", pretrained=None)
    with pytest.raises(ValueError, match="out of range"):
        CLIPPatchEncoder("ViT-B-32", pretrained=None, layer=12)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_projectors(kind):
    proj = build_projector(kind, 768, 96)
    x = torch.randn(2, 49, 768)
    y = proj(x)
    assert y.shape == (2, 49, 96)
    y.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    with pytest.raises(ValueError, match="choose from"):
        build_projector("qformer", 768, 96)


def tiny_mm(kind: str = "resblock", separator: str = "learned", lm=None, **kwargs) -> MultimodalGPT:
    lm = lm or GPT(Config.from_name("phi-2-moe-tiny", vocab_size=300, padded_vocab_size=320))
    config = MultimodalConfig(vision_width=32, num_patches=4, projector=kind, separator=separator)
    return MultimodalGPT(lm, config, **kwargs).eval()


def manual_logits(model: MultimodalGPT, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    lm = model.lm
    parts = []
    for f in feats:
        parts += [model.projector(f), model.separator_embedding()[None]]
    x = torch.cat([*parts, lm.transformer.wte(ids)])[None]
    T = x.size(1)
    cos, sin = lm.cos[:T][None], lm.sin[:T][None]
    for block in lm.transformer.h:
        x = block(x, cos, sin)
    return lm.lm_head(lm.transformer.ln_f(x))


def test_prefixed_forward_equals_manual_concatenation():
    model = tiny_mm()
    feats, ids = torch.randn(2, 4, 32), torch.randint(0, 300, (7,))
    logits, labels = model([feats], [ids])
    torch.testing.assert_close(logits, manual_logits(model, feats, ids))
    assert logits.shape == (1, 2 * 5 + 7, 320)
    assert (labels[0, :10] == IGNORE_INDEX).all() and torch.equal(labels[0, 10:], ids)


def test_batch_with_padding_and_several_images_matches_single_samples():
    model = tiny_mm()
    feats = [torch.randn(2, 4, 32), None, torch.randn(1, 4, 32)]
    ids = [torch.randint(0, 300, (n,)) for n in (5, 9, 3)]
    logits, labels = model(feats, ids)
    for i in range(3):
        single, single_labels = model([feats[i]], [ids[i]])
        n = single.size(1)
        torch.testing.assert_close(logits[i, :n], single[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(labels[i, :n], single_labels[0]) and (labels[i, n:] == IGNORE_INDEX).all()


def test_only_projector_and_separator_receive_gradients():
    model = tiny_mm().train()
    model.lm.requires_grad_(False)
    logits, labels = model([torch.randn(1, 4, 32)], [torch.randint(0, 300, (6,))])
    shifted_cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.lm.parameters())
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all(n.startswith(("projector.", "separator")) for n in trained)
    assert "separator" in trained


def test_targets_only_gives_the_full_loss_and_gradients():
    """The LM head on labelled positions only: the same loss and gradients as the full logits."""
    model = tiny_mm().train()
    feats = [torch.randn(2, 4, 32), None, torch.randn(1, 4, 32)]
    ids = [torch.randint(0, 300, (n,)) for n in (6, 9, 4)]
    labels = [i.clone() for i in ids]
    labels[0][:4] = IGNORE_INDEX  # a prompt without loss, as in instruction tuning
    labels[1][:7] = IGNORE_INDEX

    full = shifted_cross_entropy(*model(feats, ids, labels))
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits, targets = model(feats, ids, labels, targets_only=True)
    # each labelled token is predicted from the position before it: the separator for a first token after images
    assert logits.shape == (2 + 2 + 4, 320)
    assert torch.equal(targets, torch.cat([ids[0][4:], ids[1][7:], ids[2]]))
    loss = target_cross_entropy(logits, targets)
    loss.backward()
    torch.testing.assert_close(loss, full)
    assert expected.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_token_separator_uses_the_lm_embedding():
    model = tiny_mm(separator="<|endoftext|>", separator_id=7)
    torch.testing.assert_close(model.separator_embedding(), embed_tokens(model.lm, torch.tensor([7]))[0])
    assert "separator_id" not in model.state_dict()  # the id comes from the tokenizer, not the checkpoint
    with pytest.raises(ValueError, match="separator_id"):
        tiny_mm(separator="<|endoftext|>")


@pytest.mark.parametrize("impl", ["ours_moe", "litgpt_lora"])
def test_generation_with_image_prefix_cache_equals_recompute(impl):
    if impl == "litgpt_lora":
        config = lora.Config.from_name(
            "phi-2",
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=300,
            padded_vocab_size=320,
            block_size=128,
            lora_r=4,
            lora_alpha=8,
            lora_query=True,
            lora_value=True,
        )
        lm = lora.GPT(config)
        for n, p in lm.named_parameters():  # LoRA B starts at zero: make the adapters matter
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        model = tiny_mm(lm=lm)
    else:
        model = tiny_mm()
    feats, prompt = torch.randn(2, 4, 32), torch.randint(0, 300, (5,))
    cached = list(generate(model, feats, prompt, max_new_tokens=12))
    recomputed = list(generate(model, feats, prompt, max_new_tokens=12, use_cache=False))
    assert cached == recomputed and len(cached) == 12
    assert model.lm.mask_cache is None  # the cache is released
    torch.testing.assert_close(model([feats], [prompt])[0], manual_logits(model, feats, prompt))
    with pytest.raises(ValueError, match="context"):
        list(generate(model, feats, prompt, max_new_tokens=model.lm.max_seq_length))


def test_adapter_round_trip(tmp_path):
    model = tiny_mm(kind="mlp2x_gelu")
    model.save_adapter(tmp_path)
    assert set(torch.load(tmp_path / "projector.pth")) == {"separator"} | {
        f"projector.{k}" for k in model.projector.state_dict()
    }
    other = MultimodalGPT(model.lm, MultimodalConfig.load(tmp_path)).eval()
    other.load_adapter(tmp_path)
    feats, ids = torch.randn(1, 4, 32), torch.randint(0, 300, (4,))
    torch.testing.assert_close(other([feats], [ids])[0], model([feats], [ids])[0])


def test_standardized_features_reach_the_projector_and_travel_with_it(tmp_path):
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=300, padded_vocab_size=320))
    config = MultimodalConfig(vision_width=32, num_patches=4, feature_norm="standardize")
    model = MultimodalGPT(lm, config).eval()
    train = torch.randn(50, 4, 32) * torch.linspace(0.5, 3, 32) + 7.0  # a large shared offset, uneven scales
    model.set_feature_statistics(train)
    flat = train.reshape(-1, 32)
    assert torch.allclose(model.feature_mean, flat.mean(0)) and torch.allclose(model.feature_std, flat.std(0))
    feats = torch.randn(2, 4, 32) + 7.0
    want = model.projector((feats - flat.mean(0)) / flat.std(0))
    assert torch.allclose(model.image_prefix(feats)[:, :4], want, atol=1e-6)
    model.save_adapter(tmp_path)
    again = MultimodalGPT(lm, MultimodalConfig.load(tmp_path)).eval()
    again.load_adapter(tmp_path)
    assert torch.equal(again.feature_mean, model.feature_mean) and torch.equal(again.feature_std, model.feature_std)
    with pytest.raises(ValueError, match="feature_norm 'whiten'"):
        MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4, feature_norm="whiten"))
