"""Gradio chat: talk about images by text or speech over several turns, with the answer streamed as it is generated.

    python -m litgpt_mm.app --checkpoint_dir out/qlora_instruct/merged          # a local model, http://127.0.0.1:7860
    python -m litgpt_mm.app --api_base http://127.0.0.1:8000/v1                 # any OpenAI-compatible server

Images and recordings can be added at any turn. The conversation is kept as OpenAI chat messages, so a local model
and a server see the same thing; what outgrows the context loses its oldest exchanges first (with a notice). Uploads
above `max_image_megapixels`, `max_upload_mb` or `max_audio_seconds` are refused in the page before any work.
"""

from __future__ import annotations

import base64
import importlib.util
import mimetypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from litgpt_mm.deploy.inference import Assistant, GenerationSettings
from litgpt_mm.deploy.messages import decode_speech, parse_messages

EMPTY = "ask a question, record one, or add an image"


@dataclass
class Limits:
    max_image_megapixels: float = 40.0
    max_audio_seconds: float = 120.0
    max_upload_mb: float = 25.0


class LocalChat:
    """Answers a conversation (OpenAI messages) with a loaded `Assistant`; `transcribe(waveform)` handles speech."""

    def __init__(self, assistant: Assistant, transcribe: Callable | None = None) -> None:
        self.assistant, self.transcribe = assistant, transcribe

    def stream(
        self, messages: list[dict], settings: GenerationSettings, notify: Callable[[str], None]
    ) -> Iterator[str]:
        from litgpt_mm.deploy.audio import prompt_with_speech

        conv = parse_messages(messages)
        for speech in conv.speech:
            if self.transcribe is None:
                raise ValueError("speech input is not available: start the app with the `audio` extra installed")
            transcript = self.transcribe(decode_speech(speech))
            if transcript.notice:
                notify(transcript.notice)
            conv.turns[speech.turn].text = prompt_with_speech(conv.turns[speech.turn].text, transcript)
        built = self.assistant.prompts.build(conv.turns, len(conv.images), settings.max_new_tokens)
        if built.notice:
            notify(built.notice)
        yield from self.assistant.stream(conv.turns, conv.images, settings)


class RemoteChat:
    """Answers a conversation through an OpenAI-compatible chat-completions server (ours or any other)."""

    def __init__(self, api_base: str, api_key: str | None = None, model: str = "litgpt-mm") -> None:
        import openai

        self.client, self.model = openai.OpenAI(base_url=api_base, api_key=api_key or "none", max_retries=0), model

    def stream(
        self, messages: list[dict], settings: GenerationSettings, notify: Callable[[str], None]
    ) -> Iterator[str]:
        import openai

        extra = {"top_k": settings.top_k} if settings.top_k else {}
        try:
            chunks = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                stream=True,
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                extra_body=extra,
            )
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIStatusError as err:
            body = err.body if isinstance(err.body, dict) else {}
            raise ValueError(body.get("message") or str(err)) from None
        except openai.APIConnectionError as err:
            raise ValueError(f"the server cannot be reached ({err})") from None


def user_message(text: str, files: list[str], limits: Limits) -> dict:
    """An OpenAI user message from the textbox: images as data URIs, recordings as `input_audio`, checked first."""
    from PIL import Image

    parts = []
    for path in files:
        if os.path.getsize(path) > limits.max_upload_mb * 1e6:
            raise ValueError(f"{Path(path).name} is larger than {limits.max_upload_mb:g} MB")
        kind = mimetypes.guess_type(path)[0] or ""
        data = base64.b64encode(Path(path).read_bytes()).decode()
        if kind.startswith("image/"):
            with Image.open(path) as img:
                megapixels = img.width * img.height / 1e6
            if megapixels > limits.max_image_megapixels:
                raise ValueError(f"the image has {megapixels:.1f} MP, more than {limits.max_image_megapixels:g} MP")
            parts.append({"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}})
        elif kind.startswith("audio/") or Path(path).suffix.lower() in (".wav", ".mp3", ".webm", ".flac", ".ogg"):
            parts.append({"type": "input_audio", "input_audio": _as_wav_or_mp3(path, limits)})
        else:
            raise ValueError(f"{Path(path).name}: add an image or a recording")
    if text.strip():
        parts.append({"type": "text", "text": text.strip()})
    if not parts:
        raise ValueError(EMPTY)
    return {"role": "user", "content": parts}


def _as_wav_or_mp3(path: str, limits: Limits) -> dict:
    """A recording as OpenAI `input_audio` (wav/mp3; other formats, e.g. the browser's webm, re-encoded as wav)."""
    import io
    import wave

    import numpy as np

    from litgpt_mm.deploy.audio import load_audio

    audio = load_audio(path)
    if len(audio) / 16000 > limits.max_audio_seconds:
        raise ValueError(f"the recording lasts {len(audio) / 16000:.0f} s, more than {limits.max_audio_seconds:g} s")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("wav", "mp3"):
        return {"data": base64.b64encode(Path(path).read_bytes()).decode(), "format": suffix}
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}


def build_app(chat: LocalChat | RemoteChat, limits: Limits | None = None):
    """The Gradio Blocks chat around a local model or a server."""
    import gradio as gr

    limits = limits or Limits()

    def respond(box: dict, history: list, messages: list, max_new_tokens, temperature, top_k, top_p):
        try:
            message = user_message((box or {}).get("text", ""), (box or {}).get("files", []), limits)
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from None
        messages = [*messages, message]
        history = [*history, *_shown(box)]
        settings = GenerationSettings(int(max_new_tokens), float(temperature), int(top_k) or None, float(top_p))
        answer = ""
        yield history + [{"role": "assistant", "content": ""}], messages, None
        try:
            for piece in chat.stream(messages, settings, gr.Info):
                answer += piece
                yield history + [{"role": "assistant", "content": answer}], messages, None
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from None
        answer = answer.strip()
        messages = [*messages, {"role": "assistant", "content": answer}]
        yield (
            history + [{"role": "assistant", "content": answer or "(the model answered with end of text)"}],
            messages,
            None,
        )

    with gr.Blocks(title="litgpt-mm") as app:
        gr.Markdown("## litgpt-mm\nTalk about images: type, or record a question; add images at any turn.")
        chatbot = gr.Chatbot(elem_id="chat", height=460, label="Conversation")
        messages = gr.State([])
        box = gr.MultimodalTextbox(
            file_types=["image", "audio"],
            file_count="multiple",
            sources=["upload", "microphone"],
            placeholder="Ask about an image…",
            elem_id="box",
            show_label=False,
        )
        with gr.Row():
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="max new tokens", elem_id="max_new_tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
        box.submit(
            respond,
            [box, chatbot, messages, max_new_tokens, temperature, top_k, top_p],
            [chatbot, messages, box],
            api_name="chat",
        )
        clear.click(lambda: ([], [], None), None, [chatbot, messages, box], api_name="clear")
    return app


def _shown(box: dict | None) -> list[dict]:
    """The chat bubbles of a user turn: its files, then its text."""
    box = box or {}
    shown = [{"role": "user", "content": {"path": f}} for f in box.get("files", [])]
    if (box.get("text") or "").strip():
        shown.append({"role": "user", "content": box["text"].strip()})
    return shown


def main(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    api_base: str | None = None,
    api_key: str | None = None,
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
    """Serve the chat.

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory (a local model).
        api_base: chat with an OpenAI-compatible server instead (e.g. `http://127.0.0.1:8000/v1`).
        api_key: the server's key, if it wants one.
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
    if api_base:
        chat = RemoteChat(api_base, api_key)
    else:
        assistant = Assistant.load(checkpoint_dir, device=device, quantize=quantize, template=template)
        transcribe = None
        if importlib.util.find_spec("whisperx") is not None:
            from litgpt_mm.deploy.audio import SpeechToText

            stt: list = []

            def transcribe(waveform):
                if not stt:
                    stt.append(SpeechToText(whisper_model, device=device))
                return stt[0].transcribe(waveform)

        chat = LocalChat(assistant, transcribe)
    app = build_app(chat, Limits(max_image_megapixels, max_audio_seconds, max_upload_mb))
    app.queue().launch(server_name=host, server_port=port, show_error=True)
