"""`litgpt_mm.deploy.inference` and `generate/mm.py`: the three checkpoint kinds, batch == single, multi-image prompts,
context limits, and the CLI's batch mode."""

import json

import pytest
import torch
from conftest import DATA, cli_here

import litgpt_mm.deploy.tiny_whisper
import litgpt_mm.generate
from litgpt_mm.deploy.inference import Assistant, GenerationSettings

IMAGES = [
    DATA / "images" / "coffee.png",
    DATA / "images" / "rocket.jpg",
    DATA / "coco" / "val2017" / "000000397133.jpg",
]


def test_lora_checkpoint_and_merged_export_answer_alike(checkpoints):
    settings = GenerationSettings(max_new_tokens=12)
    lora = Assistant.load(checkpoints["lora"], device="cpu")
    merged = Assistant.load(checkpoints["merged"], device="cpu")
    for images in ([IMAGES[0]], [IMAGES[1], IMAGES[2]], []):
        a = lora.answer("What is shown here?", images, settings)
        assert a == merged.answer("What is shown here?", images, settings)
    align = Assistant.load(checkpoints["align"], device="cpu")
    assert isinstance(align.answer("Describe.", [IMAGES[0]], settings), str)


def test_batch_equals_one_by_one_and_images_matter(checkpoints):
    assistant = Assistant.load(checkpoints["merged"], device="cpu")
    settings = GenerationSettings(max_new_tokens=10)
    prompts = ["What is in the cup?", "Which two things are here, and how do they differ?", "Describe."]
    images = [[IMAGES[0]], [IMAGES[1], IMAGES[2]], []]
    batched = assistant.answer_batch(prompts, images, settings)
    single = [assistant.answer(p, i, settings) for p, i in zip(prompts, images, strict=True)]
    assert batched == single
    feats = assistant.features([IMAGES[1], IMAGES[2]])
    assert feats.shape == (2, 49, 768)
    swapped = assistant.features([IMAGES[2], IMAGES[1]])
    assert not torch.equal(feats, swapped)  # order is kept: the model sees image 1 then image 2


def test_context_limits(checkpoints, capsys):
    assistant = Assistant.load(checkpoints["merged"], device="cpu")
    block = assistant.model.lm.config.block_size  # 256 for the tiny preset
    long = "First words. " + "word " * 400 + "Last question?"
    ids = assistant.prompt_ids(long, n_images=1, max_new_tokens=16)
    assert ids.numel() == block - 50 - 16 and "cut to its first" in capsys.readouterr().err
    text = assistant.tokenizer.decode(ids)
    assert text.startswith("Instruct: First words. word") and text.endswith("word Last question?\nOutput: ")
    whole = assistant.tokenizer.encode(f"Instruct: {long}\nOutput: ", bos=False, eos=False)
    assert torch.equal(ids[:20].cpu(), whole[:20]) and torch.equal(ids[-20:].cpu(), whole[-20:])  # as trained
    short = assistant.tokenizer.encode("Instruct: hi\nOutput: ", bos=False, eos=False)
    exact = assistant.prompt_ids("hi", n_images=0, max_new_tokens=block - short.numel())  # fills the context
    assert torch.equal(exact.cpu(), short) and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="leave no room"):
        assistant.prompt_ids("hi", n_images=5, max_new_tokens=16)


def test_cli_single_and_batch_mode(checkpoints, tmp_path, capfd):
    main = litgpt_mm.generate.main
    common = ["--checkpoint_dir", str(checkpoints["merged"]), "--max_new_tokens", "8", "--device", "cpu"]
    code, single, err = cli_here(capfd, main, [*common, "--image", str(IMAGES[0]), "--prompt", "What is in the cup?",
                                               "--stream", "false"])  # fmt: skip
    assert code == 0, err[-2000:]
    rows = [
        {"id": "a", "prompt": "What is in the cup?", "image": str(IMAGES[0])},
        {"id": "b", "prompt": "Describe.", "image": [str(IMAGES[1]), str(IMAGES[2])]},
        {"id": "c", "prompt": "Say something."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli_here(capfd, main, [*common, "--input", str(tmp_path / "in.jsonl"), "--output",
                                          str(tmp_path / "out.jsonl")])  # fmt: skip
    assert code == 0, err[-2000:]
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", "b", "c"]
    assert answers[0]["answer"] == single.strip().splitlines()[-1].strip()
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": 5}\n')
    code, _, err = cli_here(capfd, main, [*common, "--input", str(tmp_path / "bad.jsonl")])
    assert code == 2 and "error: " in err and "bad.jsonl:1: not a prompt row" in err


def test_cli_reports_an_empty_answer(checkpoints, monkeypatch, capsys):
    mm = litgpt_mm.generate
    for pieces, told in (([" \n"], "[empty answer"), (["Yes", " it is"], "tokens, first after")):
        monkeypatch.setattr(Assistant, "stream", lambda self, *a, p=pieces, **k: iter(p))
        text = mm.main(checkpoint_dir=checkpoints["merged"], prompt="Anything?", device="cpu")
        assert text == "".join(pieces).strip() and told in capsys.readouterr().err


def test_cli_feeds_the_speech_transcript_into_the_prompt(checkpoints, tmp_path, capfd):
    from litgpt_mm.deploy.audio import SpeechToText, prompt_with_speech

    whisper = litgpt_mm.deploy.tiny_whisper.build_tiny_whisper(tmp_path / "whisper")
    jfk = DATA / "audio" / "jfk.flac"
    code, out, err = cli_here(
        capfd, litgpt_mm.generate.main,
        ["--checkpoint_dir", str(checkpoints["merged"]), "--max_new_tokens", "8", "--stream", "false", "--image",
         str(IMAGES[0]), "--audio", str(jfk), "--prompt", "Answer:", "--whisper_model", str(whisper), "--device",
         "cpu"],
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert "only the first 10 s of speech" in err  # the 11 s clip is cut, and the user is told
    transcript = SpeechToText(str(whisper), device="cpu").transcribe(jfk)
    assert transcript.text and transcript.clipped
    want = Assistant.load(checkpoints["merged"], device="cpu").answer(
        prompt_with_speech("Answer:", transcript), [IMAGES[0]], GenerationSettings(8)
    )
    assert out.strip().splitlines()[-1].strip() == want
