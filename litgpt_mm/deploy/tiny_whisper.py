"""Build a random tiny Whisper model in CTranslate2 format, fully offline, for the speech tests and the demo.

    python scripts/build_tiny_whisper.py --out_dir out/demo/whisper-tiny-random

The model has random weights, so its transcripts are gibberish; it only exercises the real WhisperX / faster-whisper /
CTranslate2 code path (VAD, feature extraction, batched decoding) without downloading anything. CTranslate2 treats a
Whisper vocabulary under 51865 tokens as English-only, so the model behaves like `tiny.en`: the language tokens are in
the tokenizer but the prompt is `<|startoftranscript|><|notimestamps|>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from litgpt_mm import REPO_ROOT

REPO = REPO_ROOT
DATA = REPO / "data"

# Whisper's special tokens, in Whisper's id order, right after the BPE vocabulary. `<|nocaptions|>` (not
# `<|nospeech|>`) because CTranslate2 looks the no-speech token up by that name; faster-whisper accepts both.
SPECIAL_BEFORE_LANGUAGES = ["<|endoftext|>", "<|startoftranscript|>"]
SPECIAL_AFTER_LANGUAGES = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
NUM_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in steps of 0.02 s


def training_text(max_book_lines: int = 300) -> list[str]:
    """The lines the tiny BPE tokenizer is trained on: the JFK transcript and the start of each bundled book."""
    lines = (DATA / "audio" / "jfk.txt").read_text(encoding="utf-8").splitlines()
    for book in sorted((DATA / "gutenberg").glob("*.txt")):
        with open(book, encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                if i >= max_book_lines:
                    break
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
    return lines


def build_tokenizer(bpe_vocab_size: int = 1000):
    """A byte-level BPE `tokenizers.Tokenizer` with Whisper's special, language and timestamp tokens.

    Returns:
        The tokenizer and the list of special tokens other than the timestamps (in id order).
    """
    from faster_whisper.tokenizer import _LANGUAGE_CODES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)

    specials = SPECIAL_BEFORE_LANGUAGES + [f"<|{code}|>" for code in _LANGUAGE_CODES] + SPECIAL_AFTER_LANGUAGES
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    eot = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(specials + timestamps)
    assert tokenizer.token_to_id("<|endoftext|>") == eot
    assert tokenizer.token_to_id("<|0.00|>") == tokenizer.token_to_id("<|notimestamps|>") + 1
    return tokenizer, specials


def build_tiny_whisper(out_dir: Path, seed: int = 0) -> Path:
    """Build a random tiny Whisper (d_model 64, 2 + 2 layers, 80 mel bins) and convert it to CTranslate2.

    `out_dir` then holds `model.bin`, `config.json`, `vocabulary.json`, `tokenizer.json` and
    `preprocessor_config.json`, which is all `whisperx.load_model(str(out_dir), device="cpu", ...)` and
    `faster_whisper.WhisperModel` need: with `tokenizer.json` present they never contact the Hugging Face Hub.

    Args:
        out_dir: the CTranslate2 model directory to create (replaced if it exists).
        seed: seed for the random weights.

    Returns:
        `out_dir`.
    """
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    tokenizer, specials = build_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    space = tokenizer.token_to_id("Ġ")  # the byte-level token for " "
    # never generate special tokens other than <|endoftext|>, nor timestamps (whisperx decodes without timestamps)
    suppress = list(range(eot + 1, tokenizer.get_vocab_size()))
    languages = {t: i for t, i in ids.items() if t not in SPECIAL_BEFORE_LANGUAGES + SPECIAL_AFTER_LANGUAGES}

    config = WhisperConfig(
        vocab_size=tokenizer.get_vocab_size(),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        init_std=0.2,  # larger than the default 0.02, so that the random transcripts depend on the audio
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = suppress
    model.generation_config.begin_suppress_tokens = [space, eot]
    model.generation_config.lang_to_id = languages
    model.generation_config.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config.no_timestamps_token_id = ids["<|notimestamps|>"]

    hf_dir = out_dir.with_name(out_dir.name + ".hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    model.save_pretrained(hf_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    ).save_pretrained(hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))  # the plain `tokenizers` file faster-whisper reads
    WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    ).save_pretrained(hf_dir)
    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(out_dir), force=True
    )
    shutil.rmtree(hf_dir, ignore_errors=True)
    assert json.loads((out_dir / "preprocessor_config.json").read_text())["feature_size"] == 80
    return out_dir


def main(out_dir: Path = Path("out/whisper-tiny-random"), seed: int = 0) -> None:
    """Write the model to `out_dir` (pass it as `--whisper_model` to generate/mm.py or the app)."""
    print(f"Random tiny Whisper (CTranslate2): {build_tiny_whisper(out_dir, seed)}")
