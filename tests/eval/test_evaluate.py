"""recipes/evaluate.py and litgpt_mm/eval: conditions and batching, every task's results on the bundled data, bits
per byte against a hand-computed value, and lm-evaluation-harness through our own `LM` on a local task."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA

import litgpt_mm.data.prepare_shapes
import litgpt_mm.eval.evaluate
from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.eval import runner
from litgpt_mm.eval import tasks as eval_tasks

evaluate = litgpt_mm.eval.evaluate
IMAGES = sorted((DATA / "coco" / "val2017").glob("*.jpg"))


@pytest.fixture(scope="module")
def assistant(checkpoints) -> Assistant:
    return Assistant.load(checkpoints["merged"], device="cpu")


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "world"
    litgpt_mm.data.prepare_shapes.prepare(out_dir=out, n_train=8, n_val=4, n_test=12, seed=3)
    return out


def test_derangement_never_keeps_an_image():
    keys = [f"img{i}" for i in range(7)] * 3
    mapping = runner.derangement(keys, seed=1)
    assert set(mapping) == set(keys) and set(mapping.values()) == set(keys)
    assert all(a != b for a, b in mapping.items())
    assert mapping == runner.derangement(list(reversed(keys)), seed=1)  # depends on the set, not the order
    assert runner.derangement(["only"], seed=0) == {"only": "only"}


def test_conditions_batched_equal_one_by_one(assistant):
    items = [
        runner.Item(str(i), [p], q)
        for i, (p, q) in enumerate(
            zip(
                IMAGES[:5],
                ["What is it?", "Describe the scene in detail please.", "Colour?", "Is there a dog?", "Hi"],
                strict=True,
            )
        )
    ]
    settings = GenerationSettings(max_new_tokens=6)
    answerer = runner.Answerer(assistant, settings, batch_size=3, seed=0)
    answers = answerer.answer_all(items)
    swap = runner.derangement([p for it in items for p in it.images], 0)
    for i, it in enumerate(items):
        assert answers["image"][i] == assistant.answer(it.prompt, it.images, settings)
        assert answers["blind"][i] == assistant.answer(it.prompt, [], settings)
        assert answers["shuffled"][i] == assistant.answer(it.prompt, [swap[it.images[0]]], settings)


def test_grounded_needs_the_interval_above_both_baselines():
    def scored(image, blind, shuffled):
        return runner.score_mean("acc", {"image": image, "blind": blind, "shuffled": shuffled}, seed=0)

    assert scored([1.0] * 40, [0.0] * 40, [0.0] * 40).grounded
    assert not scored([1.0] * 40, [1.0] * 40, [0.0] * 40).grounded  # the blind model knows it too
    assert not scored([1.0, 0.0] * 5, [0.0, 1.0, 0.0, 0.0, 0.0] * 2, [0.0] * 10).grounded  # intervals overlap


def test_vqa_task_writes_results_and_predictions(assistant, checkpoints, shapes_world, tmp_path):
    out = tmp_path / "vqa"
    results = evaluate.vqa(
        checkpoint_dir=checkpoints["merged"],
        questions=shapes_world / "eval" / "vqa_test.jsonl",
        images_root=shapes_world,
        prompt_suffix="",
        limit=30,
        batch_size=8,
        device="cpu",
        out_dir=out,
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["scores"] == results["scores"] and saved["template"] == "phi2" and saved["seed"] == 0
    assert len(saved["checkpoint_hash"]) == 16
    overall = saved["scores"][0]
    assert overall["metric"] == "vqa_accuracy" and set(overall["conditions"]) == {"image", "blind", "shuffled"}
    assert overall["conditions"]["image"]["n"] == 30
    by_type = {s["metric"]: s for s in saved["scores"][1:]}
    assert by_type["accuracy/colour"]["chance"] == pytest.approx(1 / 6)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = {"image", "answers", "answer_image", "answer_blind", "answer_shuffled"}
    assert len(rows) == 30 and all(expected <= set(r) for r in rows)
    for c in ("image", "blind", "shuffled"):  # the reported mean is the mean of the per-row scores
        mean = sum(r[f"score_{c}"] for r in rows) / len(rows)
        assert overall["conditions"][c]["value"] == pytest.approx(mean)


def test_pope_built_from_coco_instances_and_read_from_files(checkpoints, tmp_path, capsys):
    out = tmp_path / "pope"
    results = evaluate.pope(
        checkpoint_dir=checkpoints["merged"],
        instances=DATA / "coco" / "annotations" / "instances_val2017_sample.json",
        images_root=DATA / "coco" / "val2017",
        n_per_image=2,
        batch_size=8,
        device="cpu",
        out_dir=out,
    )
    metrics = {s["metric"]: s for s in results["scores"]}
    for split in ("random", "popular", "adversarial"):
        f1 = metrics[f"pope_f1/{split}"]
        assert f1["chance"] == pytest.approx(2 / 3)
        image = f1["image"]  # full confusion counts per condition
        assert image["tp"] + image["fp"] + image["tn"] + image["fn"] == image["n"] == 32  # 8 images x 2 x (yes + no)
    assert "pope_f1/mean (no interval: a mean over splits)" in metrics
    # the official files name COCO val2014 images, which are not bundled: one clear error, nothing scored
    official = [DATA / "pope" / "coco_pope_random_first30.jsonl"]
    with pytest.raises(FileNotFoundError, match="none of the 30 coco_pope_random_first30 questions has its image"):
        evaluate.pope(checkpoint_dir=checkpoints["merged"], questions=official, device="cpu", out_dir=tmp_path / "o")


def test_caption_task_on_the_coco_sample(checkpoints, tmp_path):
    results = evaluate.caption(
        checkpoint_dir=checkpoints["align"],
        images_root=DATA / "coco" / "val2017",
        max_new_tokens=8,
        device="cpu",
        out_dir=tmp_path / "caption",
    )
    assert results["template"] == "plain" and results["prompt"] == ""  # an aligned projector captions right away
    metrics = {s["metric"]: s for s in results["scores"]}
    cider = metrics["CIDEr"]["conditions"]
    assert set(cider) == {"image", "blind", "shuffled"} and cider["image"]["n"] == 8
    assert all(c["value"] >= 0 for c in cider.values())


def test_speech_task_word_error_rate(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    clips = tmp_path / "clips.jsonl"
    clips.write_text('{"audio": "a.wav", "text": "ask not what your country"}\n{"audio": "b.wav", "text": "one two"}\n')
    heard = {"a.wav": "ask what your country", "b.wav": "one two three"}
    stt = SimpleNamespace(transcribe=lambda path: SimpleNamespace(text=heard[path.name]))
    scores, rows = eval_tasks.speech(stt, clips)
    assert scores[0].conditions["speech"].value == pytest.approx(2 / 7)  # 1 deletion + 1 insertion over 7 words
    assert [r["hypothesis"] for r in rows] == ["ask what your country", "one two three"]
    clips.write_text('{"audio": "a.wav"}\n')
    with pytest.raises(ValueError, match="clips.jsonl:1: expected"):
        eval_tasks.speech(stt, clips)


def test_bits_per_byte_of_a_uniform_model_is_hand_computable(checkpoints, prepared_gutenberg, tmp_path):
    from litgpt_mm.eval import lm as lm_lib
    from litgpt_mm.model import load_model
    from litgpt_mm.training.checkpoint import load_tokenizer

    model = load_model(checkpoints["lm"]).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    if model.lm_head.bias is not None:
        torch.nn.init.zeros_(model.lm_head.bias)
    tokenizer = load_tokenizer(checkpoints["lm"])
    windows = lm_lib.shard_windows(prepared_gutenberg / "val", 32, max_blocks=12)
    assert len(windows) == 12
    rows = {r.metric: r for r in lm_lib.bits_per_byte(model, tokenizer, windows, batch_size=5)}
    V = model.config.padded_vocab_size
    assert rows["loss"].value == pytest.approx(math.log(V), rel=1e-5)
    assert rows["tokens"].value == 12 * 32
    nbytes = sum(len(tokenizer.decode(w[1:]).encode()) for w in windows)
    assert rows["bytes"].value == nbytes
    assert rows["bits_per_byte"].value == pytest.approx(12 * 32 * math.log2(V) / nbytes, rel=1e-5)


def test_lm_command_on_shards_and_a_local_harness_task(checkpoints, prepared_gutenberg, tmp_path):
    from litgpt_mm.eval import lm as lm_lib
    from litgpt_mm.model import load_model
    from litgpt_mm.training.checkpoint import load_tokenizer

    docs = [
        {"q": "The sea is", "choices": [" wet", " made of cheese"], "label": 0},
        {"q": "One plus one is", "choices": [" two", " purple", " a whale"], "label": 0},
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = evaluate.lm(
        checkpoint_dir=checkpoints["lm"],
        data_dir=prepared_gutenberg,
        seq_len=32,
        max_blocks=8,
        tasks=["tiny_mc"],
        include_path=tasks_dir,
        device="cpu",
        out_dir=tmp_path / "lm",
    )
    assert results["held_out"]["bits_per_byte"]["n"] == 8
    assert "tiny_mc" in results["lm_eval"] and 0 <= results["lm_eval"]["tiny_mc"]["acc,none"] <= 1
    assert json.loads((tmp_path / "lm" / "results.json").read_text())["lm_eval"] == results["lm_eval"]

    # each choice's log-likelihood is the sum of the model's log-probabilities of its tokens
    model, tok = load_model(checkpoints["lm"]).eval(), load_tokenizer(checkpoints["lm"])
    harness_lm = lm_lib._harness_lm_class()(model, tok)
    request = SimpleNamespace(args=("One plus one is", " two"))
    ((score, _),) = harness_lm.loglikelihood([request])
    ctx, cont = harness_lm._split("One plus one is", " two")
    ids = torch.tensor(ctx + cont)
    logp = model(ids[None, :-1])[0].log_softmax(-1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert score == pytest.approx(expected, abs=1e-4)
