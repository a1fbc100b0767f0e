"""Answer a prompt about images and speech with the instruction-tuned multimodal model, streaming the text.

    python generate/mm.py --checkpoint_dir out/qlora_instruct/merged --image photo.jpg --prompt "What is shown?"
    python generate/mm.py --checkpoint_dir out/qlora_instruct/final --image "[a.jpg, b.jpg]" --audio q.flac
    python generate/mm.py --checkpoint_dir out/qlora_instruct/merged --input prompts.jsonl --output answers.jsonl

`--checkpoint_dir` is a merged model, base + LoRA + projector, or an aligned projector (see
`litgpt_mm.deploy.inference`). Speech (`--audio`) is transcribed with WhisperX (first 10 s of speech; extra `audio`) and
the transcript is fed into the prompt. Batch mode reads jsonl rows `{"id", "prompt", "image": path or [paths],
"audio": optional path}` and writes `{"id", "answer"}` rows, decoding `--batch_size` prompts together.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from litgpt_mm.deploy.inference import Assistant, GenerationSettings


def main(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    image: Path | list[Path] | None = None,
    audio: Path | None = None,
    prompt: str = "",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 42,
    stream: bool = True,
    quantize: Literal["nf4"] | None = None,
    template: str = "phi2",
    input: Path | None = None,
    output: Path | None = None,
    batch_size: int = 8,
    whisper_model: str = "large-v3",
    device: str | None = None,
) -> str | None:
    """Generate an answer (or answers, in batch mode).

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory.
        image: an image file, or a list (`--image "[a.jpg, b.jpg]"`) placed before the prompt in order.
        audio: a speech recording whose transcript (first 10 s of speech) joins the prompt.
        prompt: the question or instruction.
        max_new_tokens: tokens to generate at most (stops earlier at EOS).
        temperature: 0 for greedy decoding.
        top_k: sample among the k most likely tokens.
        top_p: nucleus sampling threshold.
        seed: sampling seed.
        stream: print tokens as they come.
        quantize: `nf4` stores the LM's linear weights in 4 bits (bitsandbytes; meant for CUDA).
        template: prompt template the model was tuned with (`phi2` or `llava_v1`).
        input: batch mode: jsonl of prompts.
        output: batch mode: jsonl of answers (default: `<input>.answers.jsonl`).
        batch_size: prompts decoded together in batch mode.
        whisper_model: WhisperX model name or local CTranslate2 directory for `--audio`.
        device: `cuda` or `cpu` (default: CUDA when available).
    """
    torch.manual_seed(seed)
    assistant = Assistant.load(checkpoint_dir, device=device, quantize=quantize, template=template)
    settings = GenerationSettings(max_new_tokens, temperature, top_k, top_p)
    speech = _Speech(whisper_model, device)
    if input is not None:
        return _batch(assistant, settings, speech, Path(input), Path(output or f"{input}.answers.jsonl"), batch_size)
    full_prompt = speech.join(prompt, audio)
    start, first, pieces = time.perf_counter(), None, []
    images = [image] if isinstance(image, (str, Path)) else list(image or [])
    for piece in assistant.stream(full_prompt, images, settings):
        first = first or time.perf_counter()
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    text = "".join(pieces).strip()
    if not stream:
        print(text)
    else:
        print()
    if not text:
        print(f"[empty answer (only EOS or whitespace), after {time.perf_counter() - start:.2f} s]", file=sys.stderr)
    else:
        print(f"[{len(assistant.tokenizer.encode(text))} tokens, first after {first - start:.2f} s]", file=sys.stderr)
    return text


class _Speech:
    """Transcribes `--audio` on first use (WhisperX is loaded only when speech is given)."""

    def __init__(self, model: str, device: str | None) -> None:
        self.model_name, self.device, self.stt = model, device, None

    def join(self, prompt: str, audio: Path | None) -> str:
        if audio is None:
            return prompt
        from litgpt_mm.deploy.audio import SpeechToText, prompt_with_speech

        self.stt = self.stt or SpeechToText(self.model_name, device=self.device)
        transcript = self.stt.transcribe(Path(audio))
        if transcript.notice:
            print(f"notice: {transcript.notice}", file=sys.stderr)
        return prompt_with_speech(prompt, transcript)


def _batch(assistant, settings, speech: _Speech, input: Path, output: Path, batch_size: int) -> None:
    rows = []
    for n, line in enumerate(input.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row.get("prompt", ""), str):
                raise ValueError("'prompt' must be a string")
        except (json.JSONDecodeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{input}:{n}: not a prompt row ({err}); expected {{'id', 'prompt', 'image', 'audio'}}"
            ) from None
        images = row.get("image") or []
        row["images"] = [Path(p) for p in ([images] if isinstance(images, str) else images)]
        row["prompt"] = speech.join(row.get("prompt", ""), row.get("audio"))
        rows.append(row)
    with open(output, "w") as f:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            answers = assistant.answer_batch([r["prompt"] for r in chunk], [r["images"] for r in chunk], settings)
            for row, answer in zip(chunk, answers, strict=True):
                f.write(json.dumps({"id": row.get("id", i), "answer": answer}) + "\n")
            print(f"{min(i + batch_size, len(rows))}/{len(rows)} answered", file=sys.stderr)
    print(f"Answers: {output}", file=sys.stderr)
