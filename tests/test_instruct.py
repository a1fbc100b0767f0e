"""LLaVA instruction data (templates, label masking, bad rows), QLoRA layers, scheduled teacher forcing, and the
instruction-tuning recipe (both methods learn, merged == unmerged, exact resume)."""

import csv
import json
import shutil
from dataclasses import asdict
from functools import partial

import pytest
import torch
from conftest import (
    DATA,
    NoBf16OnCpu,
    assert_rows_close,
    check_kill_and_resume,
    cli_here,
    read_log,
    run_python,
    run_recipe_here,
)
from litgpt.tokenizer import Tokenizer

import litgpt_mm.align
import litgpt_mm.data.prepare_coco
import litgpt_mm.data.prepare_llava_instruct
import litgpt_mm.finetune.qlora
from litgpt_mm import prompts
from litgpt_mm.config import Config
from litgpt_mm.data import llava
from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.model import GPT, embed_tokens, forward_embeds
from litgpt_mm.models.qlora import LoRASettings, add_lora, dequantized, lora_state_dict, merged_state_dict, quantize_nf4
from litgpt_mm.multimodal import (
    IGNORE_INDEX,
    MultimodalConfig,
    MultimodalGPT,
    generate,
    shifted_cross_entropy,
    target_cross_entropy,
)
from litgpt_mm.training.scheduled import autoregressive_loss, scheduled_inputs, teacher_forcing_p

SAMPLE = DATA / "llava_instruct" / "llava_bench_coco_45_llava_format.json"


@pytest.fixture(scope="module")
def tokenizer(prepared_gutenberg) -> Tokenizer:
    return Tokenizer(prepared_gutenberg / "tokenizer")


@pytest.mark.parametrize("name", sorted(prompts.TEMPLATES))
def test_label_masking_on_real_conversations(tokenizer, name):
    rows = llava.read_rows(SAMPLE)
    assert len(rows) == 45
    template = prompts.TEMPLATES[name]
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
        rendered = "".join(text for text, _ in prompts.render(conv, template))
        assert tokenizer.decode(ids[:-1]) == rendered


def test_multi_turn_masks_every_question(tokenizer):
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "Black."},
    ]
    ids, labels = llava.encode(conv, prompts.TEMPLATES["phi2"], tokenizer, 4096)
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
    prepare = litgpt_mm.data.prepare_llava_instruct.prepare
    summary = prepare(
        tokenizer_dir=prepared_gutenberg / "tokenizer",
        data_path=path,
        images_dir=DATA / "coco" / "val2017",
        max_tokens=256,
        out_dir=tmp_path / "out",
        val_fraction=0.0,
    )
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


def tiny_mm(quantized: bool = True, head: bool = False) -> MultimodalGPT:
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=300, padded_vocab_size=320))
    add_lora(lm, LoRASettings(dropout=0.0, mlp=True, projection=True, head=head))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    if quantized:
        assert quantize_nf4(lm) == 4 * 4  # qkv, proj, fc, mlp proj per block; head and routers stay
    return MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4)).eval()


def sample(n: int = 24, images: int = 1):
    ids = torch.randint(0, 300, (n,))
    labels = ids.clone()
    labels[:6] = IGNORE_INDEX
    labels[14:17] = IGNORE_INDEX  # a second question
    return (torch.randn(images, 4, 32) if images else None), ids, labels


def capstone_reference(model, feats, ids, labels, p, generator):
    """The original capstone's loop with the same coin flips: one full re-forward of the sequence so far per answer
    token, the next input the truth with probability p, else the greedy prediction (a real token, not a padding id);
    summed loss."""
    embeds, lab, _ = model.build_inputs([feats], [ids], [labels])
    lab = lab[0]
    predict_at = (lab[1:] != IGNORE_INDEX).nonzero().flatten()
    inputs = predict_at + 1
    inputs = inputs[inputs <= predict_at.max()]  # an input that a later scored position reads
    fed = set(inputs[torch.rand(inputs.numel(), generator=generator) >= p].tolist()) if p < 1 else set()
    seq, losses = embeds.clone(), []
    for j in predict_at.tolist():
        last = forward_embeds(model.lm, seq[:, : j + 1])[0, -1]
        losses.append(torch.nn.functional.cross_entropy(last, lab[j + 1]))
        if j + 1 in fed:
            guess = embed_tokens(model.lm, last[: model.lm.config.vocab_size].argmax().view(1, 1).detach())
            seq = torch.cat([seq[:, : j + 1], guess, seq[:, j + 2 :]], dim=1)
    return torch.stack(losses).sum()


def lora_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for n, p in model.named_parameters() if "lora_" in n or "projector" in n]
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in trained])


def test_autoregressive_with_p1_equals_standard():
    model = tiny_mm()
    batch = [sample(24), sample(19, images=2), sample(21, images=0)]
    feats, ids, labels = (list(x) for x in zip(*batch, strict=True))
    standard = target_cross_entropy(*model(feats, ids, labels, targets_only=True))
    loss, info = autoregressive_loss(model, feats, ids, labels, 1.0)
    assert torch.equal(loss, standard) and info.model_fed == info.chunks == 0 and info.candidates > 0
    torch.testing.assert_close(loss, shifted_cross_entropy(*model(feats, ids, labels)))


@pytest.mark.parametrize("lookahead", [0, 3])
@pytest.mark.parametrize("p", [0.7, 0.0])
def test_autoregressive_equals_the_quadratic_loop_in_loss_and_gradients(p, lookahead):
    model = tiny_mm()
    batch = [sample(24), sample(19, images=2), sample(21, images=0)]
    refs, ref_grads, n, n_b = [], 0, 0, []
    gen = torch.Generator().manual_seed(5)
    for feats, ids, labels in batch:  # the reference loop, one sample at a time, coin flips drawn in order
        ref = capstone_reference(model, feats, ids, labels, p, gen)
        refs.append(ref.detach())
        ref_grads = ref_grads + lora_grads(model, ref)
        n_b.append(int((labels[1:] != IGNORE_INDEX).sum()))
        n += n_b[-1]
    feats, ids, labels = (list(x) for x in zip(*batch, strict=True))
    loss, info = autoregressive_loss(model, feats, ids, labels, p, torch.Generator().manual_seed(5), lookahead)
    assert torch.allclose(loss * n, sum(refs), atol=1e-4), (loss * n, sum(refs))
    assert torch.allclose(lora_grads(model, loss) * n, ref_grads, atol=1e-4)
    assert info.candidates == n - len(batch)  # every answer input but the last is read by a later scored position
    if p == 0.0:
        assert info.model_fed == info.candidates and info.changed > 0
        assert 0 < info.chunks <= (max(n_b) - 1 if lookahead == 0 else info.model_fed)
    assert model.lm.mask_cache is None and all(b.attn.kv_cache is None for b in model.lm.transformer.h)


def test_decoding_pass_is_dropout_free_never_feeds_padding_ids_and_restores_train_mode():
    model = tiny_mm().train()
    for m in model.lm.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = torch.nn.Dropout(0.5)
    batch = [sample(24), sample(19, images=2)]
    feats, ids, labels = (list(x) for x in zip(*batch, strict=True))
    runs = [
        scheduled_inputs(model, feats, ids, labels, 0.0, torch.Generator().manual_seed(3), dequantize=d)
        for d in (True, True, False)
    ]
    assert model.training and all(m.training for m in model.modules())
    assert runs[0].changed > 0
    for run in runs[1:]:  # eval mode: the same picks every time, with or without the dequantised weights
        assert all(torch.equal(a, b) for a, b in zip(runs[0].input_ids, run.input_ids, strict=True))
    assert max(int(x.max()) for x in runs[0].input_ids) < model.lm.config.vocab_size < 320


def test_autoregressive_speculation_saves_chunks_when_the_model_is_right():
    """With a model that predicts the ground truth, model-fed inputs change nothing and lookahead skips chunks."""
    model = tiny_mm()
    with torch.no_grad():
        model.lm.lm_head.bias[300:] = -1e4  # greedy generation picks no padding id either
    feats, ids, labels = sample(40)
    ids = torch.cat([ids[:6], torch.tensor(list(generate(model, feats, ids[:6], 34)))])
    labels = ids.clone()
    labels[:6] = IGNORE_INDEX
    plain = scheduled_inputs(model, [feats], [ids], [labels], 0.0, torch.Generator().manual_seed(0), lookahead=0)
    spec = scheduled_inputs(model, [feats], [ids], [labels], 0.0, torch.Generator().manual_seed(0), lookahead=8)
    assert plain.changed == spec.changed == 0 and torch.equal(plain.input_ids[0], ids)
    assert plain.chunks == plain.model_fed == 33 and spec.chunks == 4  # ceil(33 / (8 + 1))


def test_dequantized_linear_layers_compute_what_nf4_computes():
    model = tiny_mm()
    feats, ids, labels = sample()
    with torch.no_grad():
        nf4, _ = model([feats], [ids], [labels])
        with dequantized(model.lm) as n:
            plain, _ = model([feats], [ids], [labels])
            assert not any(m.__class__.__name__ == "Linear4bit" for m in model.lm.modules())
    assert n == 16 and sum(m.__class__.__name__ == "Linear4bit" for m in model.lm.modules()) == 16
    assert torch.allclose(plain, nf4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    import litgpt_mm.model

    calls = []
    real = litgpt_mm.model.checkpoint
    monkeypatch.setattr(litgpt_mm.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for flag in (False, True):
        model = tiny_mm().train()
        model.lm.activation_checkpointing = flag
        feats, ids, labels = sample()
        loss = shifted_cross_entropy(*model([feats], [ids], [labels]))
        results.append((loss.detach(), lora_grads(model, loss)))
    assert len(calls) == model.lm.config.n_layer  # only the checkpointed run, once per block
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("head", [False, True], ids=["blocks", "blocks+head"])
def test_merged_equals_unmerged_and_lora_checkpoint_is_small(head):
    model = tiny_mm(head=head)
    assert any("lm_head.lora_B" in n for n, _ in model.lm.named_parameters()) == head
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
    litgpt_mm.data.prepare_coco.prepare(
        out_dir=root / "coco", features=True, feature_dir=root / "features", clip_pretrained=None
    )
    litgpt_mm.align.setup(
        lm_checkpoint_dir=lm_dir,
        data_dir=root / "coco",
        out_dir=root / "align",
        clip_pretrained=None,
        feature_dir=root / "features",
        max_caption_tokens=32,
        precision="32-true",
        num_workers=0,
        train=TrainArgs(
            save_interval=100,
            log_interval=5,
            global_batch_size=8,
            micro_batch_size=8,
            max_steps=20,
            lr_warmup_steps=2,
            max_norm=1.0,
            min_lr=1e-4,
        ),
        eval=EvalArgs(interval=100, max_iters=2, initial_validation=False, max_new_tokens=4),
    )
    litgpt_mm.data.prepare_llava_instruct.prepare(
        tokenizer_dir=lm_dir,
        map_missing_to=DATA / "coco" / "val2017",
        max_tokens=160,
        val_fraction=0.2,
        out_dir=root / "llava",
    )
    return root


def instruct_args(root, out, method, steps=24):
    return [
        "recipes/qlora_instruct.py", "--config", "recipes/configs/qlora_instruct_tiny.yaml",
        "--align_dir", str(root / "align" / "final"), "--data_dir", str(root / "llava"),
        "--feature_dir", str(root / "features"), "--out_dir", str(out), "--method", method,
        "--train.max_steps", str(steps), "--train.save_interval", "4", "--train.log_interval", "1",
        "--eval.interval", str(steps), "--train.micro_batch_size", "2", "--train.global_batch_size", "4",
    ]  # fmt: skip


def test_cpu_paths_never_compute_in_bf16(aligned, tmp_path, capfd):
    """QLoRA training (both passes of the autoregressive method, validation), merging, and answering about an image
    from the nf4 adapters and from the merged model: no operator touches a bf16 tensor on the CPU (bf16 is emulated,
    up to 100x slower than fp32, on CPUs without native bf16)."""
    guard = NoBf16OnCpu()
    image = sorted((DATA / "coco" / "val2017").glob("*.jpg"))[0]
    with guard:
        proc = run_recipe_here(capfd, instruct_args(aligned, tmp_path, "autoregressive", steps=2))
        assert proc.returncode == 0, proc.stderr[-3000:]
        for checkpoint in ("final", "merged"):
            assistant = Assistant.load(tmp_path / checkpoint, device="cpu")
            assert list(assistant.stream("What is this?", [image], GenerationSettings(max_new_tokens=3)))
    assert guard.seen == set()
    with guard:  # the guard itself sees bf16 work
        torch.ones(4, dtype=torch.bfloat16) @ torch.ones(4, dtype=torch.bfloat16)
    assert guard.seen


@pytest.mark.parametrize("method", ["standard", "autoregressive"])
def test_both_methods_lower_the_loss(aligned, tmp_path, method, capfd):
    steps = 24 if method == "standard" else 12
    extra = ["--p_end", "0.8", "--activation_checkpointing", str(method == "autoregressive").lower()]
    proc = run_recipe_here(capfd, [*instruct_args(aligned, tmp_path / method, method, steps), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = list(csv.DictReader(open(tmp_path / method / "logs" / "val_log.csv")))
    assert float(val[-1]["val_loss"]) < float(val[0]["val_loss"]) - 0.05
    merged = tmp_path / method / "merged"
    assert {"lit_model.pth", "model_config.yaml", "projector.pth", "multimodal_config.yaml"} <= {
        p.name for p in merged.iterdir()
    }
    if method == "autoregressive":
        rows = list(csv.DictReader(open(tmp_path / method / "logs" / "train_log.csv")))
        p = [float(r["teacher_forcing_p"]) for r in rows]
        fed = [float(r["model_fed"]) for r in rows]
        assert fed[0] == 0 and max(fed) > 0  # nothing model-fed at p = 1, some once p < 1
        assert p[0] == 1.0 and p[-1] == pytest.approx(1 - 0.2 * 11 / 12)  # linear 1.0 -> 0.8 over the run
        assert p == sorted(p, reverse=True)


def test_instruct_after_alignment_with_a_token_separator(aligned, tmp_path, capfd):
    """An alignment whose separator is a tokenizer token (`--separator "\\n"`), not a learned vector: the instruction
    stage places that token's embedding after the image, as inference does, and its merged model answers."""
    align = tmp_path / "align"
    shutil.copytree(aligned / "align" / "final", align)
    config = MultimodalConfig.load(align)
    MultimodalConfig(**{**asdict(config), "separator": "\n"}).save(align)
    state = torch.load(align / "projector.pth", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "separator"}, align / "projector.pth")
    args = instruct_args(aligned, tmp_path / "out", "standard", steps=2)
    args[args.index("--align_dir") + 1] = str(align)
    proc = run_recipe_here(capfd, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assistant = Assistant.load(tmp_path / "out" / "merged", device="cpu")
    newline = assistant.tokenizer.encode("\n", bos=False, eos=False)
    assert assistant.model.separator is None and assistant.model.separator_id.item() == newline.item()
    image = sorted((DATA / "coco" / "val2017").glob("*.jpg"))[0]
    assert list(assistant.stream("What is this?", [image], GenerationSettings(max_new_tokens=3)))


def test_bad_scheduling_arguments_fail_before_any_work(tmp_path, capfd):
    setup = litgpt_mm.finetune.qlora.setup
    args = ["--align_dir", str(tmp_path / "none"), "--p_end", "1.5", "--lookahead", "-1"]
    code, _, err = cli_here(capfd, setup, args, fail_untyped=False)
    assert code == 2 and "--p_end 1.5, --lookahead -1: p_start and p_end are probabilities in [0, 1]" in err


def test_instruct_resume_after_kill(aligned, tmp_path):
    check_kill_and_resume(
        lambda out: [*instruct_args(aligned, out, "standard", 12), "--merge", "false"],
        tmp_path,
        "step-000008",
        "step-000004",
        "lora.pth",
    )


def test_two_processes_train_the_one_process_curve(aligned, tmp_path, capfd):
    """DDP over gloo on the nf4 model, 2 processes x 1 accumulation step against 1 process x 2, with scheduled
    teacher forcing: the same samples and teacher-forcing draws per micro-batch, so the same losses and adapters."""
    for devices, run in ((1, partial(run_recipe_here, capfd)), (2, run_python)):
        args = [*instruct_args(aligned, tmp_path / f"d{devices}", "autoregressive", 4), "--merge", "false"]
        proc = run([*args, "--p_end", "0.5", "--devices", str(devices), "--eval.interval", "100"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_log(tmp_path / f"d{d}" / "logs" / "train_log.csv") for d in (1, 2))
    assert_rows_close(two, one, ("loss", "tokens", "model_fed"), abs_tol=1e-5)
    assert max(float(r["model_fed"]) for r in one) > 0  # the draws matter
    a, b = (torch.load(tmp_path / f"d{d}" / "final" / "lora.pth") for d in (1, 2))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_merged_dense_phi_exports_to_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = Config.from_name(
        "phi-2",
        n_layer=2,
        n_embd=160,
        n_head=2,
        intermediate_size=640,
        vocab_size=300,
        padded_vocab_size=320,
        block_size=128,
    )
    lm = GPT(cfg)
    add_lora(lm, LoRASettings(dropout=0.0, mlp=True, projection=True))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    quantize_nf4(lm)
    model = MultimodalGPT(lm, MultimodalConfig(vision_width=32, num_patches=4)).eval()
    litgpt_mm.finetune.qlora.export_merged(model, tmp_path, tmp_path / "merged")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "merged" / "hf").eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ours = lm(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    assert MultimodalConfig.load(tmp_path / "merged").lm_checkpoint_dir == str((tmp_path / "merged").resolve())
