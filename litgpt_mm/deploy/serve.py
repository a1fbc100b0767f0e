"""An OpenAI-compatible chat-completions server for the multimodal model, on LitServe (as `litgpt serve` is).

    python -m litgpt_mm.serve --checkpoint_dir out/qlora_instruct/merged --port 8000 --max_batch_size 8

`POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /health`. Messages carry text, `image_url`
parts (`data:` URIs; http(s) with `--allow_remote_images`) and `input_audio` parts (wav/mp3: the WhisperX transcript
of the first 10 s of speech joins the turn, as in `generate/mm.py`). Images of all turns go to the model's image
prefix, in order. Errors come back as OpenAI error objects: 400 for bad input, 401 for a missing or wrong key
(`--api_key`), 413 above `--max_payload_mb`. `--max_batch_size` > 1 decodes up to that many requests together
(static batches: a batch ends with its longest answer); a streaming client that disconnects frees its row.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import BackgroundTasks, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec
from litserve.utils import LitAPIStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from litgpt_mm.config import Config
from litgpt_mm.deploy.chat import PromptBuilder, TextStream, Turn
from litgpt_mm.deploy.messages import BadRequest, Conversation, decode_speech, parse_messages
from litgpt_mm.multimodal import MultimodalConfig, Sampling, stream_batch
from litgpt_mm.prompts import TEMPLATES
from litgpt_mm.training.checkpoint import load_tokenizer

REQUEST_ID = "litgpt_mm_request_id"
FINISH = "finish_reason"  # in the worker's last message: "length" when max_tokens ended the answer
log = logging.getLogger("litgpt_mm.deploy.serve")


@dataclass
class Job:
    """A decoded request, ready for the model (built in the worker)."""

    request_id: str
    images: list
    ids: torch.Tensor
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    prompt_tokens: int


class Requests:
    """Turns a chat request into prompt ids within the context: used by the HTTP process to refuse bad requests
    with a 400 before they are queued, and by the worker to build the model's input."""

    def __init__(self, checkpoint_dir: Path, template: str, default_max_tokens: int, fetch_remote: bool) -> None:
        config = MultimodalConfig.load(checkpoint_dir)
        merged = (checkpoint_dir / "lit_model.pth").is_file()
        lm_dir = checkpoint_dir if merged else Path(config.lm_checkpoint_dir)
        block_size = Config.from_file(lm_dir / "model_config.yaml").block_size
        tok_dir = checkpoint_dir if (checkpoint_dir / "tokenizer.json").is_file() else lm_dir
        self.prompts = PromptBuilder(load_tokenizer(tok_dir), TEMPLATES[template], block_size, config.num_patches)
        self.default_max_tokens, self.fetch_remote = default_max_tokens, fetch_remote

    def conversation(self, request: ChatCompletionRequest) -> Conversation:
        if request.n not in (None, 1):
            raise BadRequest(f"n={request.n}: only n=1 is supported")
        if request.tools:
            raise BadRequest("tools: this model has no tool calling")
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        return parse_messages(messages, fetch=_fetch if self.fetch_remote else None)

    def max_tokens(self, request: ChatCompletionRequest, n_images: int) -> int:
        asked = request.max_completion_tokens or request.max_tokens
        room = self.prompts.room(n_images, 0) - 8  # a few positions for the shortest prompt
        if asked is not None and not 0 < asked <= room:
            raise BadRequest(f"max_tokens {asked}: choose 1..{room} with {n_images} image(s) in the context")
        return asked or min(self.default_max_tokens, room)

    def prompt(self, turns: list[Turn], n_images: int, max_tokens: int):
        try:
            return self.prompts.build(turns, n_images, max_tokens)
        except ValueError as err:
            raise BadRequest(f"messages: {err}") from None

    def inline_remote_images(self, request: ChatCompletionRequest) -> None:
        """Fetch http(s) images once, here, and pass them on as data URIs: the worker never fetches."""
        if not self.fetch_remote:
            return
        for message in request.messages:
            for part in message.content if isinstance(message.content, list) else []:
                spec = getattr(part, "image_url", None)
                url = spec if isinstance(spec, str) else getattr(spec, "url", None)
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    part.image_url = "data:image;base64," + base64.b64encode(_fetch(url)).decode()

    def validate(self, request: ChatCompletionRequest) -> None:
        """Everything that can be checked without the model: content, images, audio decoding, context room."""
        self.inline_remote_images(request)
        conv = self.conversation(request)
        for n, speech in enumerate(conv.speech):
            decode_speech(speech, f"input_audio #{n + 1}")
        self.prompt(conv.turns, len(conv.images), self.max_tokens(request, len(conv.images)))


def _fetch(url: str, limit: int = 20_000_000) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10, follow_redirects=True) as response:
            response.raise_for_status()
            data = b""
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise BadRequest(f"{url}: larger than {limit / 1e6:g} MB")
            return data
    except httpx.HTTPError as err:
        raise BadRequest(f"{url}: could not be fetched ({err})") from None


class MultimodalAPI(ls.LitAPI):
    """The model behind the OpenAI spec: decode_request builds a `Job`, predict streams a batch of them."""

    def __init__(
        self,
        checkpoint_dir: Path,
        quantize: str | None,
        template: str,
        whisper_model: str,
        default_max_tokens: int,
        allow_remote_images: bool,
        api_key: str | None,
        cancel_dir: Path,
        spec: OpenAISpec,
        **kwargs,
    ) -> None:
        super().__init__(spec=spec, **kwargs)
        self.checkpoint_dir, self.quantize, self.template = Path(checkpoint_dir), quantize, template
        self.whisper_model, self.api_key, self.cancel_dir = whisper_model, api_key, Path(cancel_dir)
        self.default_max_tokens, self.allow_remote_images = default_max_tokens, allow_remote_images

    def setup(self, device: str) -> None:
        from litgpt_mm.deploy.inference import Assistant

        self.assistant = Assistant.load(
            self.checkpoint_dir, device=device, quantize=self.quantize, template=self.template
        )
        self.requests = Requests(self.checkpoint_dir, self.template, self.default_max_tokens, self.allow_remote_images)
        self.requests.prompts = self.assistant.prompts
        self.assistant.model.lm.max_seq_length = self.assistant.model.lm.config.block_size
        self.stt = None

    def authorize(
        self, request: Request, auth: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))
    ):
        """`Authorization: Bearer <key>` on every route but `/health` (probes carry no key) when a key is set."""
        if self.api_key is None or request.url.path == "/health":
            return
        if auth is None or auth.credentials != self.api_key:
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    def decode_request(self, request: ChatCompletionRequest, context: dict) -> Job:
        try:
            return self._job(request)
        except BadRequest as err:
            raise HTTPException(400, str(err)) from None

    def _job(self, request: ChatCompletionRequest) -> Job:
        conv = self.requests.conversation(request)
        for speech in conv.speech:
            conv.turns[speech.turn].text = self._with_speech(conv.turns[speech.turn].text, speech)
        max_tokens = self.requests.max_tokens(request, len(conv.images))
        prompt = self.requests.prompt(conv.turns, len(conv.images), max_tokens)
        if prompt.notice:
            log.warning("notice: %s", prompt.notice)
        generator = None
        seed = getattr(request, "seed", None) or (request.metadata or {}).get("seed")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        top_k = getattr(request, "top_k", None)
        sampling = Sampling(
            request.temperature or 0.0, top_k, request.top_p if request.top_p is not None else 1.0, generator
        )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        positions = prompt.ids.numel() + len(conv.images) * (self.assistant.model.config.num_patches + 1)
        request_id = (request.metadata or {}).get(REQUEST_ID, uuid.uuid4().hex)
        return Job(request_id, conv.images, prompt.ids, max_tokens, sampling, stop, positions)

    def _with_speech(self, text: str, speech) -> str:
        from litgpt_mm.deploy.audio import SpeechToText, prompt_with_speech

        if self.stt is None:
            self.stt = SpeechToText(self.whisper_model, device=str(self.assistant.device))
        return prompt_with_speech(text, self.stt.transcribe(decode_speech(speech)))

    def batch(self, inputs: list[Job]) -> list[Job]:
        return inputs

    def predict(self, jobs: Job | list[Job]):
        """Per decoding step, one message per job (a single one when batching is off); usage in the last one."""
        batched = isinstance(jobs, list)
        jobs = jobs if batched else [jobs]
        texts = [TextStream(self.assistant.tokenizer, job.stop) for job in jobs]
        counts, ended = [0] * len(jobs), [False] * len(jobs)
        eos = self.assistant.tokenizer.eos_id

        def cancelled(row: int) -> bool:
            return texts[row].stopped or (self.cancel_dir / jobs[row].request_id).exists()

        steps = stream_batch(
            self.assistant.model,
            self._features(jobs),
            [j.ids for j in jobs],
            [j.max_tokens for j in jobs],
            [j.sampling for j in jobs],
            eos_id=eos,
            cancelled=cancelled,
        )
        for step in steps:
            out = []
            for row, token in enumerate(step):
                piece = ""
                if token is not None:
                    counts[row] += 1
                    ended[row] = token == eos
                    piece = texts[row].push(token) if token != eos else ""
                out.append({"role": "assistant", "content": piece})
            yield out if batched else out[0]
        final = []
        for row, job in enumerate(jobs):
            if (self.cancel_dir / job.request_id).exists():
                log.warning("request %s: client disconnected after %d tokens", job.request_id, counts[row])
                (self.cancel_dir / job.request_id).unlink(missing_ok=True)
            usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": counts[row]}
            length = counts[row] >= job.max_tokens and not ended[row] and not texts[row].stopped
            final.append(
                {
                    "role": "assistant",
                    "content": texts[row].flush(),
                    **usage,
                    "total_tokens": sum(usage.values()),
                    FINISH: "length" if length else "stop",
                }
            )
        yield final if batched else final[0]

    def _features(self, jobs: list[Job]) -> list[torch.Tensor | None]:
        """CLIP features of every image in the batch, encoded in one call and split per job."""
        counts = [len(j.images) for j in jobs]
        if not sum(counts):
            return [None] * len(jobs)
        flat = iter(self.assistant.features([img for j in jobs for img in j.images]).split([n for n in counts if n]))
        return [next(flat) if n else None for n in counts]

    def unbatch(self, output):
        yield from output

    def encode_response(self, outputs):
        yield from outputs


class MultimodalSpec(OpenAISpec):
    """LitServe's OpenAI spec, with requests checked before they are queued (a bad one gets a 400 even when it
    asked for a stream) and disconnected streams reported to the worker."""

    def __init__(self, requests_factory, cancel_dir: Path) -> None:
        super().__init__()
        self.requests_factory, self.cancel_dir, self._requests = requests_factory, Path(cancel_dir), None

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks):
        if self._requests is None:
            self._requests = self.requests_factory()
        try:
            await asyncio.to_thread(self._requests.validate, request)
        except BadRequest as err:
            raise HTTPException(400, str(err)) from None
        request.metadata = {**(request.metadata or {}), REQUEST_ID: uuid.uuid4().hex}
        return await super().chat_completion(request, background_tasks)

    async def streaming_completion(self, request: ChatCompletionRequest, pipe_responses: list):
        finished, reasons = False, {}
        try:
            pipes = [_finish_reasons(p, reasons, i) for i, p in enumerate(pipe_responses)]
            async for chunk in super().streaming_completion(request, pipes):
                if reasons.get(0, "stop") != "stop" and '"finish_reason":"stop"' in chunk:  # LitServe says "stop"
                    chunk = chunk.replace('"finish_reason":"stop"', f'"finish_reason":"{reasons[0]}"')
                yield chunk
            finished = True
        finally:
            if not finished:
                (self.cancel_dir / request.metadata[REQUEST_ID]).touch()

    async def non_streaming_completion(self, request: ChatCompletionRequest, generator_list: list):
        reasons = {}
        pipes = [_finish_reasons(g, reasons, i) for i, g in enumerate(generator_list)]
        response = await super().non_streaming_completion(request, pipes)
        for i, choice in enumerate(response.choices):
            choice.finish_reason = reasons.get(i, "stop")
        return response


async def _finish_reasons(responses, reasons: dict[int, str], index: int):
    """Pass a worker's responses through, noting the finish reason its last message carries."""
    async for response, status in responses:
        if status == LitAPIStatus.OK:
            reason = json.loads(response).get(FINISH)
            if reason:
                reasons[index] = reason
        yield response, status


def openai_error(status: int, message: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error"}
    body = {"message": message, "type": kind.get(status, "server_error"), "param": None, "code": status}
    return JSONResponse({"error": body}, status_code=status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return openai_error(exc.status_code, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return openai_error(400, f"{where}: {first.get('msg', 'invalid request')}")


class PayloadLimit:
    """ASGI middleware: bodies over `max_bytes` get an OpenAI-style 413 before they are read into memory."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = openai_error(413, f"request body over {self.max_bytes / 1e6:g} MB (--max_payload_mb)")
        if length is not None and int(length) > self.max_bytes:
            await self._drain(receive, limit=max(4 * self.max_bytes, 64_000_000))
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes / 1e6:g} MB (--max_payload_mb)")
            return message

        return await self.app(scope, counted, send)

    @staticmethod
    async def _drain(receive, limit: int) -> None:
        """Read and drop a refused body (up to `limit` bytes), so the client reads the 413 instead of a reset."""
        drained = 0
        while drained <= limit:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class ChatRequest(ChatCompletionRequest):
    """The OpenAI request with the sampling fields LitServe's model lacks (`seed`; `top_k` as an extension)."""

    seed: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class ServerSettings:
    """What `build_server` serves and how: `main`'s flags but `host` and `port` (see `main` for each field)."""

    checkpoint_dir: Path
    quantize: str | None = None
    template: str = "phi2"
    whisper_model: str = "large-v3"
    device: str = "auto"
    devices: int | str = "auto"
    workers_per_device: int = 1
    max_batch_size: int = 1
    batch_timeout: float = 0.05
    max_tokens: int = 256
    max_payload_mb: float = 20.0
    allow_remote_images: bool = False
    api_key: str | None = None
    timeout: float = 120.0

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> ServerSettings:
        """The settings out of `main`'s `locals()`."""
        return cls(**{f.name: flags[f.name] for f in fields(cls)})


def build_server(settings: ServerSettings, cancel_dir: Path | None = None) -> ls.LitServer:
    """A `LitServer` for a checkpoint; `cancel_dir` receives a file per disconnected stream (default: a new
    temporary directory)."""
    checkpoint_dir, template = Path(settings.checkpoint_dir), settings.template
    max_tokens, allow_remote_images = settings.max_tokens, settings.allow_remote_images
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r}: choose from {sorted(TEMPLATES)}")
    Requests(checkpoint_dir, template, max_tokens, allow_remote_images)  # a wrong directory fails here, in one line
    cancel_dir = Path(cancel_dir or tempfile.mkdtemp(prefix="litgpt-mm-serve-"))
    spec = MultimodalSpec(_RequestsFactory(checkpoint_dir, template, max_tokens, allow_remote_images), cancel_dir)
    api = MultimodalAPI(
        checkpoint_dir,
        settings.quantize,
        template,
        settings.whisper_model,
        max_tokens,
        allow_remote_images,
        settings.api_key,
        cancel_dir,
        spec=spec,
        max_batch_size=settings.max_batch_size,
        batch_timeout=settings.batch_timeout if settings.max_batch_size > 1 else 0.0,
    )
    server = ls.LitServer(
        api,
        accelerator=settings.device,
        devices=settings.devices,
        workers_per_device=settings.workers_per_device,
        timeout=settings.timeout,
        middlewares=[(PayloadLimit, {"max_bytes": int(settings.max_payload_mb * 1e6)})],
    )
    _add_openai_routes(server, api, checkpoint_dir)
    return server


def _add_openai_routes(server: ls.LitServer, api: MultimodalAPI, checkpoint_dir: Path) -> None:
    """OpenAI-style error bodies for HTTP and validation errors, and `GET /v1/models` (behind the key, if any)."""
    server.app.add_exception_handler(StarletteHTTPException, _http_error)
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    model_id = checkpoint_dir.name if checkpoint_dir.name not in ("final", "merged") else str(checkpoint_dir)
    created = int(time.time())

    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "litgpt-mm"}],
        }

    server.app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(server.setup_auth(api))])


@dataclass
class _RequestsFactory:
    """Builds `Requests` lazily in the HTTP process (the spec is pickled into it)."""

    checkpoint_dir: Path
    template: str
    max_tokens: int
    allow_remote_images: bool

    def __call__(self) -> Requests:
        return Requests(self.checkpoint_dir, self.template, self.max_tokens, self.allow_remote_images)


def main(
    checkpoint_dir: Path = Path("out/qlora_instruct/merged"),
    host: str = "127.0.0.1",
    port: int = 8000,
    quantize: str | None = None,
    template: str = "phi2",
    whisper_model: str = "large-v3",
    device: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 1,
    batch_timeout: float = 0.05,
    max_tokens: int = 256,
    max_payload_mb: float = 20.0,
    allow_remote_images: bool = False,
    api_key: str | None = None,
    timeout: float = 120.0,
) -> None:
    """Serve the model with an OpenAI-compatible API.

    Args:
        checkpoint_dir: merged model, LoRA checkpoint or aligned projector directory.
        host: interface to listen on (`0.0.0.0` for every interface).
        port: port to listen on.
        quantize: `nf4` to store the LM's linear weights in 4 bits.
        template: prompt template the model was tuned with.
        whisper_model: WhisperX model name or local CTranslate2 directory for `input_audio`.
        device: `cpu`, `cuda` or `auto`.
        devices: number of devices to serve on (`auto`: all).
        workers_per_device: model copies per device.
        max_batch_size: requests decoded together (1: one at a time).
        batch_timeout: seconds a worker waits to fill a batch.
        max_tokens: answer length when a request does not set `max_tokens`.
        max_payload_mb: larger request bodies get 413.
        allow_remote_images: fetch http(s) `image_url`s (off: only `data:` URIs).
        api_key: require `Authorization: Bearer <api_key>` (every route but `/health`).
        timeout: seconds a request may wait in the queue.
    """
    server = build_server(ServerSettings.from_flags(locals()))
    print(f"Serving {checkpoint_dir} on http://{host}:{port}/v1 (OpenAI chat completions)", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # LitServe stops its workers on KeyboardInterrupt only
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
