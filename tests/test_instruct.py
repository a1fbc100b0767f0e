"""LLaVA instruction data (templates, label masking, bad rows), QLoRA layers, scheduled teacher forcing, and the
instruction-tuning recipe (both methods learn, merged == unmerged, exact resume)."""

import csv
import json

import pytest
import torch
from conftest import DATA, check_kill_and_resume, load_script, run_python
from litgpt.tokenizer import Tokenizer

from litgpt_mm.config import Config
from litgpt_mm.data import llava
from litgpt_mm.model import GPT, embed_tokens, forward_embeds
from litgpt_mm.multimodal import IGNORE_INDEX, MultimodalConfig, MultimodalGPT, shifted_cross_entropy
from litgpt_mm.qlora import LoRASettings, add_lora, lora_state_dict, merged_state_dict, quantize_nf4
from litgpt_mm.scheduled import autoregressive_loss, teacher_forcing_p

SAMPLE = DATA / "llava_instruct" / "llava_bench_coco_45_llava_format.json"


@pytest.fixture(scope="module")
def tokenizer(prepared_gutenberg) -> Tokenizer:
    return Tokenizer(prepared_gutenberg / "tokenizer")


@pytest.mark.parametrize("name", sorted(llava.TEMPLATES))
def test_label_masking_on_real_conversations(tokenizer, name):
    rows = llava.read_rows(SAMPLE)
    assert len(rows) == 45
    template = llava.TEMPLATES[name]
    for row in rows[:10]:
        conv = llava.validate(row)
        ids, labels = llava.encode(conv, template, tokenizer, max_tokens=4096)
        kept = labels != IGNORE_INDEX
        assert torch.equal(ids[kept], labels[kept])
        assert tokenizer.decode(ids[kept][:-1]) == conv[1]["value"].strip() + template.answer_end  # the answer only
        assert int(ids[kept][-1]) == tokenizer.eos_id
        prompt = tokenizer.decode(ids[~kept])
        assert conv[0]["value"].replace("<image>", "").strip() in prompt and "<image>" not in prompt
        assert prompt.endswith(template.assistant_prefix)
        # template round trip: the pieces decode to the rendered conversation
        rendered = "".join(text for text, _ in llava.render(conv, template))
        assert tokenizer.decode(ids[:-1]) == rendered


def test_multi_turn_masks_every_question(tokenizer):
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "Black."},
    ]
    ids, labels = llava.encode(conv, llava.TEMPLATES["phi2"], tokenizer, 4096)
    kept = tokenizer.decode(ids[(labels != IGNORE_INDEX) & (ids != tokenizer.eos_id)])
    assert kept == "A cat.\nBlack.\n"


def test_bad_rows_are_reported_not_fatal(prepared_gutenberg, tmp_path):
    rows = llava.read_rows(SAMPLE)[:4]
    bad = [
        {"id": "noimage", "image": "000000397133.jpg", "conversations": [
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Here."}]},
        {"id": "empty", "image": "000000397133.jpg", "conversations": [
            {"from": "human", "value": "<image>\\nWhere?"}, {"from": "gpt", "value": "  "}]},
        {"id": "missing", "image": "not_there.jpg", "conversations": rows[0]["conversations"]},
        {"id": "long", "image": "000000397133.jpg", "conversations": [
            {"from": "human", "value": "<image>\\n" + "Why? " * 400}, {"from": "gpt", "value": "Because."}]},
    ]  # fmt: skip
    good = [dict(r, image="000000397133.jpg") for r in rows]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(good + bad))
    prepare = load_script("scripts/prepare_llava_instruct.py").prepare
    summary = prepare(
        tokenizer_dir=prepared_gutenberg / "tokenizer", data_path=path, images_dir=DATA / "coco" / "val2017",
        max_tokens=256, out_dir=tmp_path / "out", val_fraction=0.0,
    )  # fmt: skip
    reasons = {s["id"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"noimage", "empty", "missing", "not_there.jpg", "long"}
    assert "<image>" in reasons["noimage"] and "empty answer" in reasons["empty"]
    assert "missing" in reasons["missing"] and "truncated" in reasons["long"]
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    written += [json.loads(line) for line in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    assert len(written) == 4 and all(len(s["ids"]) == len(s["labels"]) for s in written)


def test_teacher_forcing_schedules():
    assert teacher_forcing_p("constant", 50, 100, 0.9, 0.1) == 0.9
    assert teacher_forcing_p("linear", 50, 100, 1.0, 0.5) == pytest.approx(0.75)
    assert teacher_forcing_p("exponential", 0, 100, 1.0, 0.5) == 1.0
    assert teacher_forcing_p("exponential", 100, 100, 1.0, 0.5) == pytest.approx(0.5 + 0.5 * 2.718281828**-5)
    cyc = [teacher_forcing_p("cyclic", s, 100, 1.0, 0.5, cycles=2) for s in (0, 25, 50, 75)]
    assert cyc == pytest.approx([1.0, 0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="choose from"):
        teacher_forcing_p("cosine", 0, 1)


def tiny_mm(quantized: bool = True) -> MultimodalGPT:
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=300, padded_vocab_size=320))
    add_lora(lm, LoRASettings(dropout=0.0, mlp=True, projection=True))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    if quantized:
        assert quantize_nf4(lm) == 4 * 4  # qkv, proj, fc, mlp proj per block; head and routers stay
    return MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4)).eval()


def sample():
    ids = torch.randint(0, 300, (24,))
    labels = ids.clone()
    labels[:6] = IGNORE_INDEX
    labels[14:17] = IGNORE_INDEX  # a second question
    return torch.randn(1, 4, 32), ids, labels


def capstone_reference(model, feats, ids, labels, p, generator):
    """O(n^2) token-by-token re-forward with the same coin flips (the original capstone's loop)."""
    embeds, lab, _ = model.build_inputs([feats], [ids], [labels])
    lab = lab[0]
    predict_at = (lab[1:] != IGNORE_INDEX).nonzero().flatten()
    inputs = predict_at[1:] + 1
    fed = set(inputs[torch.rand(inputs.numel(), generator=generator) >= p].tolist()) if p < 1 else set()
    seq = embeds.clone()
    for pos in sorted(fed):
        guess = forward_embeds(model.lm, seq[:, :pos])[:, -1].argmax(-1).view(1, 1)
        seq = torch.cat([seq[:, :pos], embed_tokens(model.lm, guess), seq[:, pos + 1 :]], dim=1)
    logits = forward_embeds(model.lm, seq)[0]
    return torch.nn.functional.cross_entropy(logits[predict_at], lab[predict_at + 1], reduction="sum")


def test_autoregressive_with_p1_equals_standard_and_matches_the_quadratic_loop():
    model = tiny_mm()
    feats, ids, labels = sample()
    logits, lab = model([feats], [ids], [labels])
    standard = shifted_cross_entropy(logits, lab)
    total, n = autoregressive_loss(model, feats, ids, labels, 1.0)
    assert n == 15 and torch.allclose(total / n, standard, atol=1e-5)
    for p in (0.7, 0.0):
        ours, _ = autoregressive_loss(model, feats, ids, labels, p, torch.Generator().manual_seed(5))
        ref = capstone_reference(model, feats, ids, labels, p, torch.Generator().manual_seed(5))
        assert torch.allclose(ours, ref, atol=1e-4), (p, ours, ref)
    model.train()
    loss, _ = autoregressive_loss(model, feats, ids, labels, 0.5, torch.Generator().manual_seed(1))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert model.lm.mask_cache is None


def test_merged_equals_unmerged_and_lora_checkpoint_is_small():
    model = tiny_mm()
    feats, ids, labels = sample()
    with torch.no_grad():
        unmerged = model([feats], [ids])[0]
        plain = GPT(model.lm.config).eval()
        plain.load_state_dict(merged_state_dict(model.lm))
        merged = MultimodalGPT(plain, model.config).eval()
        merged.load_state_dict(model.adapter_state_dict(), strict=False)
        torch.testing.assert_close(merged([feats], [ids])[0], unmerged, atol=1e-4, rtol=1e-4)
    adapters = lora_state_dict(model.lm)
    assert adapters and all("lora_" in k for k in adapters)
    assert sum(v.numel() for v in adapters.values()) < 0.2 * sum(p.numel() for p in plain.parameters())


@pytest.fixture(scope="module")
def aligned(pretrained_tiny, tmp_path_factory):
    """Prepared bundled LLaVA rows (on bundled photos) and a short alignment run of the tiny LM."""
    from litgpt.args import EvalArgs, TrainArgs

    root = tmp_path_factory.mktemp("instruct")
    lm_dir = pretrained_tiny[0] / "final"
    load_script("scripts/prepare_coco.py").prepare(
        out_dir=root / "coco", features=True, feature_dir=root / "features", clip_pretrained=None
    )
    load_script("recipes/align.py").setup(
        lm_checkpoint_dir=lm_dir, data_dir=root / "coco", out_dir=root / "align", clip_pretrained=None,
        feature_dir=root / "features", max_caption_tokens=32, precision="32-true", num_workers=0,
        train=TrainArgs(save_interval=100, log_interval=5, global_batch_size=8, micro_batch_size=8, max_steps=20,
                        lr_warmup_steps=2, max_norm=1.0, min_lr=1e-4),
        eval=EvalArgs(interval=100, max_iters=2, initial_validation=False, max_new_tokens=4),
    )  # fmt: skip
    load_script("scripts/prepare_llava_instruct.py").prepare(
        tokenizer_dir=lm_dir, map_missing_to=DATA / "coco" / "val2017", max_tokens=160, val_fraction=0.2,
        out_dir=root / "llava",
    )  # fmt: skip
    return root


def instruct_args(root, out, method, steps=24):
    return [
        "recipes/qlora_instruct.py", "--config", "recipes/configs/qlora_instruct_tiny.yaml",
        "--align_dir", str(root / "align" / "final"), "--data_dir", str(root / "llava"),
        "--feature_dir", str(root / "features"), "--out_dir", str(out), "--method", method,
        "--train.max_steps", str(steps), "--train.save_interval", "4", "--train.log_interval", "1",
        "--eval.interval", str(steps), "--train.micro_batch_size", "2", "--train.global_batch_size", "4",
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["standard", "autoregressive"])
def test_both_methods_lower_the_loss(aligned, tmp_path, method):
    steps = 24 if method == "standard" else 12
    proc = run_python([*instruct_args(aligned, tmp_path / method, method, steps), "--p_end", "0.8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = list(csv.DictReader(open(tmp_path / method / "logs" / "val_log.csv")))
    assert float(val[-1]["val_loss"]) < float(val[0]["val_loss"]) - 0.05
    merged = tmp_path / method / "merged"
    assert {"lit_model.pth", "model_config.yaml", "projector.pth", "multimodal_config.yaml"} <= {
        p.name for p in merged.iterdir()
    }
    if method == "autoregressive":
        p = [float(r["teacher_forcing_p"]) for r in csv.DictReader(open(tmp_path / method / "logs" / "train_log.csv"))]
        assert p[0] == 1.0 and p[-1] == pytest.approx(1 - 0.2 * 11 / 12)  # linear 1.0 -> 0.8 over the run
        assert p == sorted(p, reverse=True)


def test_instruct_resume_after_kill(aligned, tmp_path):
    check_kill_and_resume(
        lambda out: [*instruct_args(aligned, out, "standard", 12), "--merge", "false"], tmp_path, "step-000008",
        "step-000004", "lora.pth",
    )  # fmt: skip


def test_merged_dense_phi_exports_to_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = Config.from_name(
        "phi-2", n_layer=2, n_embd=160, n_head=2, intermediate_size=640, vocab_size=300, padded_vocab_size=320,
        block_size=128,
    )  # fmt: skip
    lm = GPT(cfg)
    add_lora(lm, LoRASettings(dropout=0.0, mlp=True, projection=True))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    quantize_nf4(lm)
    model = MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4)).eval()
    load_script("recipes/qlora_instruct.py").export_merged(model, tmp_path, tmp_path / "merged")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "merged" / "hf").eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ours = lm(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    assert MultimodalConfig.load(tmp_path / "merged").lm_checkpoint_dir == str((tmp_path / "merged").resolve())
