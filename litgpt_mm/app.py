"""Gradio app: ask about an image, by text and/or speech, and read the answer as it is generated.

    python -m litgpt_mm.app --checkpoint_dir out/qlora_instruct/merged          # http://127.0.0.1:7860

Uploads are checked before any work: images above `max_image_megapixels` or `max_upload_mb`, and recordings
longer than `max_audio_seconds`, are refused with a message in the page, as is a request with no question.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from litgpt_mm.cli import run_cli
from litgpt_mm.inference import Assistant, GenerationSettings


def check_upload(path: str | None, max_upload_mb: float) -> None:
    if path and os.path.getsize(path) > max_upload_mb * 1e6:
        raise ValueError(f"{Path(path).name} is larger than {max_upload_mb:g} MB")


def build_app(
    assistant: Assistant,
    transcribe: Callable[[str], tuple[str, str | None]] | None = None,
    max_image_megapixels: float = 40.0,
    max_audio_seconds: float = 120.0,
    max_upload_mb: float = 25.0,
):
    """The Gradio Blocks app around a loaded `Assistant`; `transcribe(path) -> (text, notice)` handles speech."""
    import gradio as gr
    from PIL import Image

    def ask(image_path, audio_path, question, max_new_tokens, temperature, top_k, top_p) -> Iterator[str]:
        try:
            check_upload(image_path, max_upload_mb)
            check_upload(audio_path, max_upload_mb)
            images = []
            if image_path:
                with Image.open(image_path) as img:
                    megapixels = img.width * img.height / 1e6
                if megapixels > max_image_megapixels:
                    raise ValueError(f"the image has {megapixels:.1f} MP, more than {max_image_megapixels:g} MP")
                images.append(Path(image_path))
            prompt = (question or "").strip()
            if audio_path:
                if transcribe is None:
                    raise ValueError("speech input is not available: start the app with the `audio` extra installed")
                duration = _duration(audio_path)
                if duration > max_audio_seconds:
                    raise ValueError(f"the recording lasts {duration:.0f} s, more than {max_audio_seconds:g} s")
                text, notice = transcribe(audio_path)
                if notice:
                    gr.Info(notice)
                prompt = f"{prompt}\n{text}".strip() if text else prompt
            if not prompt and not images:
                raise ValueError("ask a question, record one, or add an image")
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from None
        settings = GenerationSettings(int(max_new_tokens), float(temperature), int(top_k) or None, float(top_p))
        answer = ""
        for piece in assistant.stream(prompt, images, settings):
            answer += piece
            yield answer
        yield answer.strip() or "(the model answered with end of text)"

    with gr.Blocks(title="litgpt-mm") as app:
        gr.Markdown("## litgpt-mm\nAsk about an image by typing or speaking.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", elem_id="image")
                audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speech", elem_id="audio")
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
            answer = gr.Textbox(label="Answer", lines=12, elem_id="answer")
        ask_button.click(
            ask, [image, audio, question, max_new_tokens, temperature, top_k, top_p], answer, api_name="ask"
        )
    return app


def _duration(path: str) -> float:
    from litgpt_mm.audio import load_audio

    return len(load_audio(path)) / 16000


def main(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    quantize: str | None = None,
    template: str = "phi2",
    whisper_model: str = "large-v3",
    max_image_megapixels: float = 40.0,
    max_audio_seconds: float = 120.0,
    max_upload_mb: float = 25.0,
) -> None:
    """Serve the app.

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory.
        host: interface to listen on.
        port: port to listen on.
        device: `cuda` or `cpu` (default: CUDA when available).
        quantize: `nf4` to store the LM's linear weights in 4 bits.
        template: prompt template the model was tuned with.
        whisper_model: WhisperX model name or local CTranslate2 directory for speech.
        max_image_megapixels: larger images are refused.
        max_audio_seconds: longer recordings are refused (only the first 10 s of speech are used anyway).
        max_upload_mb: larger uploads are refused.
    """
    assistant = Assistant.load(checkpoint_dir, device=device, quantize=quantize, template=template)
    transcribe = None
    if importlib.util.find_spec("whisperx") is not None:
        from litgpt_mm.audio import SpeechToText

        stt: list = []

        def transcribe(path: str) -> tuple[str, str | None]:
            if not stt:
                stt.append(SpeechToText(whisper_model, device=device))
            t = stt[0].transcribe(Path(path))
            return t.text, t.notice

    app = build_app(assistant, transcribe, max_image_megapixels, max_audio_seconds, max_upload_mb)
    app.queue().launch(server_name=host, server_port=port, show_error=True)


if __name__ == "__main__":
    run_cli(main)
