"""OpenAI chat messages -> our conversation: text turns, the images in order, and speech to transcribe.

Content is a string or a list of parts: `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url"}}`
(a `data:` URI; http(s) only when remote images are allowed) and `{"type": "input_audio", "input_audio": {"data",
"format": "wav" | "mp3"}}`. Every problem is a `BadRequest` naming the field (`messages[1].content[0].image_url`).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from litgpt_mm.deploy.chat import Turn

AUDIO_FORMATS = ("wav", "mp3")


class BadRequest(ValueError):
    """A request the server answers with 400; the message says which field and what to send instead."""


@dataclass
class Speech:
    """A recording attached to turn `turn` (its transcript joins that turn's text)."""

    turn: int
    data: bytes
    format: str


@dataclass
class Conversation:
    turns: list[Turn]
    images: list[Image.Image] = field(default_factory=list)
    speech: list[Speech] = field(default_factory=list)


def decode_data_uri(url: str, where: str) -> bytes:
    """The bytes of a base64 `data:` URI."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequest(f"{where}: expected a data URI 'data:<type>;base64,<data>'")
    return decode_base64(payload, where)


def decode_base64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: not valid base64") from None


def decode_image(data: bytes, where: str, max_megapixels: float) -> Image.Image:
    """An RGB image from encoded bytes, refusing undecodable data and images over `max_megapixels`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_megapixels * 1e6:
                raise BadRequest(f"{where}: {img.width}x{img.height} is more than {max_megapixels:g} megapixels")
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, BadRequest):
            raise
        raise BadRequest(
            f"{where}: cannot be decoded as an image ({type(err).__name__}); send JPEG, PNG or WebP"
        ) from None


def parse_messages(
    messages: Sequence[dict],
    fetch: Callable[[str], bytes] | None = None,
    max_megapixels: float = 40.0,
) -> Conversation:
    """Turns, images and speech of OpenAI-format `messages` (dicts); `fetch(url)` reads http(s) images, if given."""
    conv = Conversation(turns=[])
    for m, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str) or content is None:
            conv.turns.append(Turn(str(role), content or ""))
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{m}].content: a string or a list of parts")
        texts = []
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text") or ""))
            elif kind == "image_url":
                conv.images.append(_image(part.get("image_url"), f"{where}.image_url", fetch, max_megapixels))
            elif kind == "input_audio":
                conv.speech.append(_speech(part.get("input_audio"), f"{where}.input_audio", len(conv.turns)))
            else:
                raise BadRequest(f"{where}.type {kind!r}: use 'text', 'image_url' or 'input_audio'")
        if role != "user" and (len(texts) < len(content)):
            raise BadRequest(f"messages[{m}]: only user messages may carry images or audio")
        conv.turns.append(Turn(str(role), "\n".join(texts)))
    return conv


def _image(spec, where: str, fetch: Callable[[str], bytes] | None, max_megapixels: float) -> Image.Image:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise BadRequest(f"{where}: expected {{'url': <data URI>}}")
    if url.startswith(("http://", "https://")):
        if fetch is None:
            raise BadRequest(
                f"{where}: remote image URLs are off; send the image as a data: URI or start the server with "
                "--allow_remote_images true"
            )
        return decode_image(fetch(url), where, max_megapixels)
    return decode_image(decode_data_uri(url, where), where, max_megapixels)


def _speech(spec, where: str, turn: int) -> Speech:
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise BadRequest(f"{where}: expected {{'data': <base64>, 'format': 'wav' | 'mp3'}}")
    fmt = spec.get("format")
    if fmt not in AUDIO_FORMATS:
        raise BadRequest(f"{where}.format {fmt!r}: use 'wav' or 'mp3'")
    return Speech(turn, decode_base64(spec["data"], where), fmt)


def decode_speech(speech: Speech, where: str = "input_audio"):
    """The waveform (16 kHz float32) of a recording, or `BadRequest` when it is not decodable audio."""
    from litgpt_mm.deploy.audio import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"speech.{speech.format}"
        path.write_bytes(speech.data)
        try:
            return load_audio(path)
        except ValueError as err:
            raise BadRequest(f"{where}: {str(err).replace(str(path), 'the recording')}") from None
