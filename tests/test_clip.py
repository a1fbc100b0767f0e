"""The vision tower: the activation its weights were trained with, local towers with their own configs, and stage 0
(`scripts/pretrain_clip.py`): a small CLIP pretrained on the shapes world that loses, resumes and sees."""

import json
import warnings

import open_clip
import pytest
import torch
import yaml
from conftest import check_kill_and_resume
from open_clip.transformer import QuickGELU
from PIL import Image

import litgpt_mm.data.prepare_shapes
import litgpt_mm.pretrain_clip
from litgpt_mm.eval.zero_shot import zero_shot
from litgpt_mm.models.vision import CLIPPatchEncoder, tag_quick_gelu
from litgpt_mm.multimodal import MultimodalConfig


def _activation(encoder: CLIPPatchEncoder) -> type:
    acts = {type(block.mlp.gelu) for block in encoder.visual.transformer.resblocks}
    assert len(acts) == 1
    return acts.pop()


def test_openai_tags_run_quick_gelu_without_a_download(monkeypatch):
    # every tag's own config decides, read from open_clip's local tables
    assert tag_quick_gelu("ViT-B-32", "openai") and tag_quick_gelu("ViT-L-14", "openai")
    assert not tag_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") and not tag_quick_gelu("ViT-B-32", None)
    # build ViT-B-32 as `pretrained="openai"` does, with the download and the weight loading stubbed out
    import open_clip.factory as factory

    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, cache_dir=None: "openai-weights.pt")
    monkeypatch.setattr(factory, "load_checkpoint", lambda model, path, **kwargs: {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # open_clip warns "QuickGELU mismatch" when the tower is built wrong
        tower = CLIPPatchEncoder("ViT-B-32", pretrained="openai")
    assert tower.quick_gelu and _activation(tower) is QuickGELU
    assert "-qgelu" in tower.key()  # features cached with the wrong activation are never reused
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        CLIPPatchEncoder("ViT-B-32", pretrained="not-a-tag")


def test_checkpoints_load_with_the_activation_they_were_trained_with(tmp_path):
    old = MultimodalConfig(clip_model="shapes-ViT-T-16", clip_pretrained=None)
    text = yaml.safe_load(yaml.safe_dump(vars(old)))
    text.pop("clip_quick_gelu")  # what checkpoints written before the field say
    (tmp_path / "multimodal_config.yaml").write_text(yaml.safe_dump(text))
    loaded = MultimodalConfig.load(tmp_path)
    assert loaded.clip_quick_gelu is False
    assert _activation(CLIPPatchEncoder.from_config(loaded)) is torch.nn.GELU
    quick = CLIPPatchEncoder.from_config(
        MultimodalConfig(clip_model="shapes-ViT-T-16", clip_pretrained=None, clip_quick_gelu=True)
    )
    assert _activation(quick) is QuickGELU


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "shapes"
    litgpt_mm.data.prepare_shapes.prepare(out_dir=out, n_train=256, n_val=16, n_test=60, seed=3)
    return out


def clip_args(world, out_dir, steps: int = 32) -> list[str]:
    return [
        "scripts/pretrain_clip.py", "--data_dir", str(world), "--out_dir", str(out_dir),
        "--train.max_steps", str(steps), "--train.global_batch_size", "32", "--train.micro_batch_size", "16",
        "--train.lr_warmup_steps", "4", "--train.save_interval", "16", "--train.log_interval", "1",
        "--eval.interval", "16", "--eval.max_iters", "1", "--zero_shot_images", "4",
    ]  # fmt: skip


@pytest.mark.slow
def test_clip_pretraining_loss_falls_and_resumes_exactly_after_sigkill(world, tmp_path):
    check_kill_and_resume(
        lambda out: clip_args(world, out),
        tmp_path,
        kill_at="step-000032",
        resumed_at="at step 16",
        weights="open_clip_model.safetensors",
    )
    losses = [float(r["loss"]) for r in _csv(tmp_path / "ref" / "logs" / "train_log.csv")]
    assert sum(losses[-8:]) / 8 < sum(losses[:4]) / 4 - 0.3, losses  # contrastive loss; chance: ln 16 = 2.77
    val = _csv(tmp_path / "ref" / "logs" / "val_log.csv")
    assert {"zero_shot_colour", "zero_shot_yesno", "zero_shot_all"} <= set(val[-1])
    final = tmp_path / "ref" / "final"
    assert {p.name for p in final.iterdir()} >= {
        "open_clip_model.safetensors",
        "shapes-ViT-T-16.json",
        "open_clip_config.json",
        "zero_shot.json",
    }


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_tower_loads_from_its_local_file_with_its_config_beside_it(tmp_path):
    """A tower trained from a `--model_config` unknown to open_clip loads through `CLIPPatchEncoder` from the file
    alone (its config is registered from beside the weights), as `--clip_pretrained` passes it."""
    script = litgpt_mm.pretrain_clip
    name = "tiny-test-ViT-8"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "pool_type": "avg",
        },
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    out = tmp_path / "ckpt"
    script.save_clip(model, name, dict(model.visual.preprocess_cfg), out)
    open_clip.factory._MODEL_CONFIGS.pop(name)  # a fresh process: the name is known only from the file
    tower = CLIPPatchEncoder(name, pretrained=str(out / script.WEIGHTS))
    pixels = torch.randn(2, 3, 32, 32)
    captured = {}
    hook = model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        model.visual(pixels)
    hook.remove()
    assert tower.num_patches == 16 and not tower.quick_gelu
    torch.testing.assert_close(tower(pixels), captured["out"][:, 1:])
    same = open_clip.create_model(f"local-dir:{out}")  # open_clip's Hub layout loads the directory as well
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values(), strict=True))


def test_the_position_loss_trains_the_patch_tokens_the_lm_reads(tmp_path):
    """`PatchPositions` scores exactly the tokens `CLIPPatchEncoder` hands the LM, and training on it alone teaches
    a tower to tell its patches apart."""
    script = litgpt_mm.pretrain_clip
    torch.manual_seed(0)
    model = open_clip.create_model("shapes-ViT-T-16")
    positions = script.PatchPositions(model.visual, seed=1)
    pixels = torch.randn(4, 3, 112, 112)
    script.save_clip(model, "shapes-ViT-T-16", dict(model.visual.preprocess_cfg), tmp_path)
    tower = CLIPPatchEncoder("shapes-ViT-T-16", pretrained=str(tmp_path / script.WEIGHTS))
    model.encode_image(pixels)
    torch.testing.assert_close(positions._tokens, tower(pixels))
    assert positions.readout.shape == (49, 128)
    torch.testing.assert_close(script.PatchPositions(model.visual, seed=1).readout, positions.readout)

    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        model.encode_image(pixels)
        loss = positions.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_pretrained_tower_sees_colour_beyond_a_random_one(shapes_clip):
    """The demo's pretraining (short) against the same architecture at random: held-out zero-shot colour accuracy
    above the random tower's by more than both intervals."""
    world, clip_dir = shapes_clip
    trained = json.loads((clip_dir / "final" / "zero_shot.json").read_text())
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("shapes-ViT-T-16")
    random = zero_shot(model, open_clip.get_tokenizer("shapes-ViT-T-16"), preprocess, world, "test")
    summary = json.dumps({k: (round(trained[k]["accuracy"], 3), round(random[k]["accuracy"], 3)) for k in trained})
    assert trained["colour"]["low"] > random["colour"]["high"], summary
    assert trained["colour"]["accuracy"] > 0.6, summary
    assert random["colour"]["high"] < 0.45, summary


@pytest.mark.slow
def test_pretrained_tower_keeps_where_each_patch_is(shapes_clip):
    """With the patch-position loss (on by default), a ridge probe reads each patch's row and column from its token
    on held-out images (60 steps: 0.89 and 0.92 measured; 0.53 and 0.54 without the loss, 0.94 at random init)."""
    world, clip_dir = shapes_clip
    tower = CLIPPatchEncoder("shapes-ViT-T-16", str(clip_dir / "final" / litgpt_mm.pretrain_clip.WEIGHTS))
    images = [Image.open(p).convert("RGB") for p in sorted((world / "test").iterdir())]
    tokens = tower.encode_images(images).float()
    n, side = len(images), 7
    x = tokens.reshape(n * side * side, -1)
    index = torch.arange(side * side).repeat(n)
    train = 40 * side * side  # 40 images to fit, the other 20 to score
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    gram = x[:train].T @ x[:train] + 10 * torch.eye(x.size(1))
    for name, y in (("row", index // side), ("column", index % side)):
        weights = torch.linalg.solve(gram, x[:train].T @ torch.nn.functional.one_hot(y).float()[:train])
        accuracy = ((x[train:] @ weights).argmax(1) == y[train:]).float().mean().item()
        assert accuracy > 0.8, (name, accuracy)


def test_zero_shot_prompts_and_hard_negatives_differ_from_the_truth_in_one_thing():
    import random

    from litgpt_mm.data import shapes
    from litgpt_mm.eval.zero_shot import Choice, choices

    rng = random.Random(0)
    seen = set()
    for image_id in range(1, 60):
        example = shapes.make_example(7, image_id)
        truth = shapes.describe(example.scene.shapes)
        for q in choices(example, max_shapes=3):
            if isinstance(q, Choice):
                assert q.prompts[q.answer] == truth and len(set(q.prompts)) == len(q.prompts)
                seen.add(q.type)
            else:
                assert q.type == "yesno"
        for _ in range(5):
            changed = shapes.counterfactual(example.scene.shapes, rng)
            negative = shapes.describe(changed)
            assert negative != truth and negative.startswith("there ")
            assert 1 <= len(changed) <= 3 and len({s.cell for s in changed}) == len(changed)
    assert seen == {"colour", "kind", "count", "position"}
