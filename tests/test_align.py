"""COCO preparation (bad input, feature cache) and `recipes/align.py`: image information reaches the loss, exact
resume after a kill."""

import csv
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import (
    DATA,
    assert_rows_close,
    check_kill_and_resume,
    read_log,
    run_python,
    run_recipe_here,
)
from litgpt.args import EvalArgs, TrainArgs
from litgpt.tokenizer import Tokenizer
from PIL import Image

import litgpt_mm.align
import litgpt_mm.data.prepare_coco
from litgpt_mm.data import coco
from litgpt_mm.model import load_model
from litgpt_mm.models.vision import CLIPPatchEncoder
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT, shifted_cross_entropy


@pytest.fixture(scope="module")
def prepared_coco(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled COCO sample prepared with a seeded random ViT-B-32 feature cache: (data dir, feature dir)."""
    root = tmp_path_factory.mktemp("coco")
    prepare = litgpt_mm.data.prepare_coco.prepare
    prepare(out_dir=root / "data", features=True, feature_dir=root / "features", clip_pretrained=None)
    return root / "data", root / "features"


def test_prepare_coco_sample(prepared_coco):
    data, features = prepared_coco
    summary = json.loads((data / "summary.json").read_text())
    assert summary["images"] == {"train": 12, "val": 8} and summary["captions"] == {"train": 60, "val": 40}
    assert summary["skipped"] == []
    train = coco.read_index(data / "train.jsonl")
    assert all(len(r.captions) == 5 and r.file.startswith("train2017/") for r in train)
    assert 397133 in {r.image_id for r in coco.read_index(data / "val.jsonl")}

    encoder = CLIPPatchEncoder("ViT-B-32", pretrained=None)
    cache = coco.FeatureCache(features, encoder.key())
    assert len(cache) == 20
    rec = train[0]
    want = encoder.encode_images([coco.load_rgb(DATA / "coco" / rec.file)[0]])[0]
    torch.testing.assert_close(cache.get(rec.image_id).float(), want, atol=2e-2, rtol=1e-2)  # fp16 storage
    assert cache.build(encoder, train, DATA / "coco", coco.CocoSummary()) == 0  # reused, nothing recomputed
    by_path = str((DATA / "coco" / rec.file).resolve())  # how instruction data names an image
    assert torch.equal(cache.get(by_path), cache.get(rec.image_id))
    by_path_record = [coco.CaptionRecord(by_path, by_path, [])]
    assert cache.build(encoder, by_path_record, Path("/"), coco.CocoSummary()) == 0 and len(cache) == 20
    other = CLIPPatchEncoder("ViT-B-32", pretrained=None, layer=-2)
    assert other.key() != encoder.key()  # another layer: another cache


def test_prepare_coco_reports_bad_input(tmp_path):
    src = DATA / "coco"
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    real = sorted((src / "train2017").glob("*.jpg"))
    img = Image.open(real[0])
    img.convert("CMYK").save(tmp_path / "train2017" / "cmyk.jpg")
    img.convert("L").save(tmp_path / "train2017" / "grey.jpg")
    img.convert("RGBA").save(tmp_path / "train2017" / "alpha.png")
    shutil.copy(real[1], tmp_path / "train2017" / "ok.jpg")
    (tmp_path / "train2017" / "truncated.jpg").write_bytes(real[2].read_bytes()[:3000])
    names = ["cmyk.jpg", "grey.jpg", "alpha.png", "ok.jpg", "truncated.jpg", "missing.jpg", "nocaption.jpg"]
    images = [{"id": i, "file_name": n, "height": 1, "width": 1} for i, n in enumerate(names)]
    anns = [{"id": 100 + i, "image_id": i, "caption": f"A photo number {i}."} for i in range(6)]
    anns += [
        {"id": 200, "image_id": 6, "caption": "   "},
        {"id": 201, "image_id": 99, "caption": "An orphan caption."},
        {"id": 202, "image_id": 3, "caption": None},
    ]
    (tmp_path / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns})
    )
    val = json.loads((src / "annotations" / "captions_val2017_sample.json").read_text())
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(val))
    for entry in val["images"]:
        shutil.copy(src / "val2017" / entry["file_name"], tmp_path / "val2017" / entry["file_name"])

    prepare = litgpt_mm.data.prepare_coco.prepare
    summary = prepare(source_dir=tmp_path, out_dir=tmp_path / "out")
    skipped = dict(summary.skipped)
    assert set(skipped) == {
        "captions_train2017.json: annotation 200",
        "captions_train2017.json: annotation 201",
        "captions_train2017.json: annotation 202",
        "train2017/nocaption.jpg",
        "train2017/truncated.jpg",
        "train2017/missing.jpg",
    }
    assert "not in 'images'" in skipped["captions_train2017.json: annotation 201"]
    assert summary.converted == {"CMYK": 1, "L": 1, "RGBA": 1}
    kept = {r.file for r in coco.read_index(tmp_path / "out" / "train.jsonl")}
    assert kept == {"train2017/cmyk.jpg", "train2017/grey.jpg", "train2017/alpha.png", "train2017/ok.jpg"}
    rgb, mode = coco.load_rgb(tmp_path / "train2017" / "alpha.png")
    assert rgb.mode == "RGB" and mode == "RGBA"


def align_args(lm_dir: Path, data: Path, features: Path, out: Path, **train) -> dict:
    settings = dict(
        save_interval=1000,
        log_interval=5,
        global_batch_size=8,
        micro_batch_size=8,
        max_steps=240,
        lr_warmup_steps=8,
        max_norm=1.0,
        min_lr=1e-4,
    )
    settings.update(train)
    return dict(
        lm_checkpoint_dir=lm_dir,
        data_dir=data,
        out_dir=out,
        clip_pretrained=None,
        feature_dir=features,
        projector="mlp2x_gelu",
        max_caption_tokens=48,
        precision="32-true",
        num_workers=0,
        num_sample_images=2,
        train=TrainArgs(**settings),
        eval=EvalArgs(interval=120, max_iters=5, initial_validation=True, max_new_tokens=8),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": 0.0}},
    )


def caption_losses(run: Path, lm_dir: Path, data: Path, features: Path, shift: int) -> list[float]:
    """Per-pair caption loss on the training pairs, with each image's features or those of another image."""
    config = MultimodalConfig.load(run / "final")
    model = MultimodalGPT(load_model(lm_dir), config).eval()
    model.load_adapter(run / "final")
    cache = coco.FeatureCache(features, CLIPPatchEncoder("ViT-B-32", None, layer=config.clip_layer).key())
    records = coco.read_index(data / "train.jsonl")
    pairs = coco.CaptionPairs(records, Tokenizer(run / "final"), 48, DATA / "coco", cache)
    losses = []
    with torch.no_grad():
        for i in range(len(pairs)):
            item, (r, _) = pairs[i], pairs.pairs[i]
            feats = cache.get(records[(r + shift) % len(records)].image_id).float()
            logits, labels = model([feats[None]], [item["ids"]])
            losses.append(shifted_cross_entropy(logits, labels).item())
    return losses


def test_align_puts_image_information_into_the_caption_loss(pretrained_tiny, prepared_coco, tmp_path):
    lm_dir = pretrained_tiny[0] / "final"
    data, features = prepared_coco
    out = tmp_path / "align"
    captions = DATA / "coco" / "annotations" / "captions_val2017_sample.json"
    args = align_args(lm_dir, data, features, out) | {
        "eval_captions": captions,
        "eval_images_root": DATA / "coco" / "val2017",
        "eval_limit": 4,
    }
    result = litgpt_mm.align.setup(**args)
    val = list(csv.DictReader(open(out / "logs" / "val_log.csv")))
    assert result["val_loss"] < float(val[0]["val_loss"]) - 0.3
    # caption scores at every validation, with both baselines: the captions move towards the references
    scores = [{k: float(v) for k, v in row.items() if k.startswith(("CIDEr_", "ROUGE_L_"))} for row in val]
    assert all(
        set(s) == {f"{m}_{c}" for m in ("CIDEr", "ROUGE_L") for c in ("image", "blind", "shuffled")} for s in scores
    )
    assert max(s["ROUGE_L_image"] for s in scores[1:]) > scores[0]["ROUGE_L_image"] + 0.04, scores
    assert len({(s["CIDEr_blind"], s["ROUGE_L_blind"]) for s in scores}) == 1  # no image: the frozen LM alone
    assert (out / "logs" / "accuracy.png").is_file()
    assert "sample_captions" in val[-1] and (out / "logs" / "samples.md").read_text().count("val2017/") == 2 * 3
    assert {p.name for p in (out / "final").iterdir()} >= {"projector.pth", "multimodal_config.yaml", "tokenizer.json"}

    true = caption_losses(out, lm_dir, data, features, shift=0)
    for shift in (1, 5):
        wrong = caption_losses(out, lm_dir, data, features, shift=shift)
        gap = sum(wrong) / len(wrong) - sum(true) / len(true)
        assert gap > 0.05, f"mismatched images (shift {shift}) cost only {gap:.3f} nats more"
        assert sum(w > t for w, t in zip(wrong, true, strict=True)) >= 0.75 * len(true)


def align_cli(pretrained_tiny, prepared_coco, **overrides) -> list[str]:
    """`recipes/align.py` on the tiny config, the tiny LM and the prepared COCO sample, with `--key value`s."""
    data, features = prepared_coco
    args = ["recipes/align.py", "--config", "recipes/configs/align_tiny.yaml", "--lm_checkpoint_dir",
            str(pretrained_tiny[0] / "final"), "--data_dir", str(data), "--feature_dir", str(features)]  # fmt: skip
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def test_align_resume_after_kill(pretrained_tiny, prepared_coco, tmp_path):
    common = align_cli(
        pretrained_tiny,
        prepared_coco,
        **{
            "train.max_steps": 12,
            "train.save_interval": 4,
            "train.log_interval": 1,
            "eval.interval": 6,
            "eval.max_new_tokens": 4,
            "train.micro_batch_size": 4,
            "train.global_batch_size": 8,
        },
    )
    check_kill_and_resume(
        lambda out: [*common, "--out_dir", str(out)], tmp_path, "step-000008", "step-000004", "projector.pth"
    )


def test_align_on_two_processes_trains_the_one_process_curve(pretrained_tiny, prepared_coco, tmp_path, capfd):
    """DDP over gloo, 2 processes x micro-batch 2 x 2 accumulation steps against 1 process x 4 accumulation steps:
    each step sees the same captions (of different lengths), so the losses and the projector agree."""
    common = align_cli(
        pretrained_tiny,
        prepared_coco,
        **{
            "train.max_steps": 5,
            "train.save_interval": 100,
            "train.log_interval": 1,
            "eval.interval": 100,
            "eval.initial_validation": "false",
            "num_sample_images": 0,
            "train.micro_batch_size": 2,
            "train.global_batch_size": 8,
        },
    )
    for devices, run in ((1, partial(run_recipe_here, capfd)), (2, run_python)):
        proc = run([*common, "--devices", str(devices), "--out_dir", str(tmp_path / f"d{devices}")])
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_log(tmp_path / f"d{d}" / "logs" / "train_log.csv") for d in (1, 2))
    assert_rows_close(two, one, ("loss", "tokens"), abs_tol=1e-5)
    a, b = (torch.load(tmp_path / f"d{d}" / "final" / "projector.pth") for d in (1, 2))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_prepare_coco_downloads_a_seeded_subset(tmp_path):
    """Annotations zip (md5-checked) and per-image downloads from a local server in COCO's URL layout."""
    import functools
    import hashlib
    import http.server
    import threading
    import zipfile

    site = tmp_path / "site"
    (site / "annotations").mkdir(parents=True)
    with zipfile.ZipFile(site / "annotations" / "annotations_trainval2017.zip", "w") as zf:
        for split in ("train", "val"):
            zf.write(
                DATA / "coco" / "annotations" / f"captions_{split}2017_sample.json",
                f"annotations/captions_{split}2017.json",
            )
    shutil.copytree(DATA / "coco" / "train2017", site / "train2017")
    shutil.copytree(DATA / "coco" / "val2017", site / "val2017")
    md5 = hashlib.md5((site / "annotations" / "annotations_trainval2017.zip").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prepare = litgpt_mm.data.prepare_coco.prepare
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(ValueError, match="md5 .* != expected"):
            prepare(download_coco=True, base_url=url, cache_dir=tmp_path / "bad", annotations_md5="0" * 32)
        kwargs = dict(download_coco=True, base_url=url, annotations_md5=md5, subset=5, val_subset=3, seed=1)
        summary = prepare(cache_dir=tmp_path / "cache", out_dir=tmp_path / "out", **kwargs)
        again = prepare(cache_dir=tmp_path / "cache2", out_dir=tmp_path / "out2", **kwargs)
    finally:
        server.shutdown()
    assert summary.images == {"train": 5, "val": 3} and summary.skipped == []
    train = coco.read_index(tmp_path / "out" / "train.jsonl")
    assert [r.image_id for r in train] == [r.image_id for r in coco.read_index(tmp_path / "out2" / "train.jsonl")]
    downloaded = sorted(p.name for p in (tmp_path / "cache" / "train2017").glob("*.jpg"))
    assert downloaded == sorted(Path(r.file).name for r in train)  # only the subset's images were fetched
    for r in train:
        assert (tmp_path / "cache" / r.file).read_bytes() == (DATA / "coco" / r.file).read_bytes()
    assert again.images == summary.images
