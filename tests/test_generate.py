"""`litgpt_mm.inference` and `generate/mm.py`: the three checkpoint kinds, batch == single, multi-image prompts,
context limits, and the CLI's batch mode."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import DATA, load_script, run_python

from litgpt_mm.config import Config
from litgpt_mm.inference import Assistant, GenerationSettings
from litgpt_mm.model import GPT, save_checkpoint
from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT
from litgpt_mm.qlora import LoRASettings, add_lora, lora_state_dict, quantize_nf4

IMAGES = [
    DATA / "images" / "coffee.png",
    DATA / "images" / "rocket.jpg",
    DATA / "coco" / "val2017" / "000000397133.jpg",
]


@pytest.fixture(scope="module")
def checkpoints(prepared_gutenberg, tmp_path_factory) -> dict:
    """A tiny LM, an aligned projector on it, a QLoRA checkpoint and its merged export (random weights)."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    lm = GPT(Config.from_name("phi-2-moe-tiny", vocab_size=1024, padded_vocab_size=1024))
    save_checkpoint(lm, root / "lm")
    for f in (prepared_gutenberg / "tokenizer").iterdir():
        shutil.copy(f, root / "lm" / f.name)
    config = MultimodalConfig(clip_pretrained=None, lm_checkpoint_dir=str(root / "lm"))
    mm = MultimodalGPT(lm, config)
    torch.nn.init.normal_(mm.separator, std=1.0)
    mm.save_adapter(root / "align")
    settings = LoRASettings(dropout=0.0, mlp=True)
    add_lora(lm, settings)
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    quantize_nf4(lm)
    (root / "lora").mkdir()
    torch.save(lora_state_dict(lm), root / "lora" / "lora.pth")
    (root / "lora" / "lora_config.yaml").write_text(yaml.safe_dump({**vars(settings), "quantize": "nf4"}))
    mm.save_adapter(root / "lora")
    load_script("recipes/qlora_instruct.py").export_merged(mm, root / "lm", root / "merged")
    return {k: root / k for k in ("lm", "align", "lora", "merged")}


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
    ids = assistant.prompt_ids("word " * 400, n_images=1, max_new_tokens=16)
    assert ids.numel() == block - 50 - 16 and "cut to its last" in capsys.readouterr().err
    with pytest.raises(ValueError, match="leave no room"):
        assistant.prompt_ids("hi", n_images=5, max_new_tokens=16)


def test_cli_single_and_batch_mode(checkpoints, tmp_path):
    common = ["generate/mm.py", "--checkpoint_dir", str(checkpoints["merged"]), "--max_new_tokens", "8"]
    single = run_python([*common, "--image", str(IMAGES[0]), "--prompt", "What is in the cup?", "--stream", "false"])
    assert single.returncode == 0, single.stderr[-2000:]
    rows = [
        {"id": "a", "prompt": "What is in the cup?", "image": str(IMAGES[0])},
        {"id": "b", "prompt": "Describe.", "image": [str(IMAGES[1]), str(IMAGES[2])]},
        {"id": "c", "prompt": "Say something."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = run_python([*common, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    assert batch.returncode == 0, batch.stderr[-2000:]
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", "b", "c"]
    assert answers[0]["answer"] == single.stdout.strip().splitlines()[-1].strip()
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": 5}\n')
    bad = run_python([*common, "--input", str(tmp_path / "bad.jsonl")])
    assert bad.returncode != 0 and "bad.jsonl:1" in bad.stderr
