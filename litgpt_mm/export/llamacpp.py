"""Running an exported GGUF pair (`model.gguf` + `mmproj.gguf`) with llama.cpp through `llama-cpp-python`.

Optional (extra `llamacpp`: a source build of llama.cpp). Used by the parity tests and `benchmarks/serve.py`, and
usable on its own:

* `LlamaCpp(out_dir)`: image embeddings and greedy token ids straight from llama.cpp's C API (mtmd), for parity;
* `chat_handler(mmproj)`: a `llama_cpp` chat handler that renders our `phi2` template with the image prefix,
  for `Llama.create_chat_completion` and `python -m litgpt_mm.export.llamacpp` (llama-cpp-python's OpenAI server).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from litgpt_mm.export.gguf import LM_FILE, MEDIA_MARKER, MMPROJ_FILE, SEPARATOR_TOKEN

# Our `phi2` template (litgpt_mm.prompts.TEMPLATES["phi2"], as deploy.chat.PromptBuilder renders it), with every
# image of the conversation first, each followed by the separator token. The handler replaces each image URL with the
# media marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message.role == 'user' and message.content is not string %}"
    "{% for part in message.content %}{% if part.type == 'image_url' %}"
    "{{ part.image_url.url if part.image_url is mapping else part.image_url }}" + SEPARATOR_TOKEN + "{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message.content is string %}{% set text = message.content %}"
    "{% else %}{% set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') %}{% endif %}"
    "{% if message.role == 'system' %}{{ text | trim }}{{ '\\n' }}"
    "{% elif message.role == 'user' %}Instruct: {{ text | trim }}{{ '\\n' }}Output: "
    "{% elif message.role == 'assistant' %}{{ text | trim }}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


def chat_handler(mmproj: Path, verbose: bool = False):
    """A `llama_cpp` chat handler for our template and image layout (llama-cpp-python's LLaVA-1.5 handler, which
    evaluates images through mtmd, with our template and no default system message)."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = CHAT_TEMPLATE

    return Handler(clip_model_path=str(mmproj), verbose=verbose)


class LlamaCpp:
    """llama.cpp with an exported model: tokens, image embeddings and greedy decoding through its C API.

    Args:
        out_dir: the directory `export_gguf` wrote.
        n_ctx: context length of the llama.cpp context.
        n_threads: CPU threads.
    """

    def __init__(self, out_dir: Path, n_ctx: int = 256, n_threads: int = 2) -> None:
        from llama_cpp import Llama, mtmd_cpp

        self.mtmd = mtmd_cpp
        self.llm = Llama(
            model_path=str(Path(out_dir) / LM_FILE), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, verbose=False
        )
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(Path(out_dir) / MMPROJ_FILE).encode(), self.llm.model, params)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not load {Path(out_dir) / MMPROJ_FILE}")

    def close(self) -> None:
        if self.ctx is not None:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _chunks(self, prompt: str, images: Sequence[np.ndarray]):
        bitmaps = []
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            h, w, _ = rgb.shape
            bitmaps.append(
                self.mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
            )
        text = self.mtmd.mtmd_input_text()
        raw = prompt.encode("utf-8")
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = self.mtmd.mtmd_input_chunks_init()
        array = (self.mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        status = self.mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), array, len(bitmaps))
        for b in bitmaps:
            self.mtmd.mtmd_bitmap_free(b)
        if status != 0:
            self.mtmd.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed with status {status} for {prompt!r}")
        return chunks

    def image_embeddings(self, rgb: np.ndarray) -> np.ndarray:
        """(n_patches, n_embd) embeddings llama.cpp places for one (H, W, 3) uint8 RGB image."""
        chunks = self._chunks(MEDIA_MARKER, [rgb])
        try:
            for i in range(self.mtmd.mtmd_input_chunks_size(chunks)):
                chunk = self.mtmd.mtmd_input_chunks_get(chunks, i)
                if self.mtmd.mtmd_input_chunk_get_type(chunk) != self.mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if self.mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                out = self.mtmd.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(out, shape=(n * self.llm.n_embd(),)).reshape(n, -1).copy()
        finally:
            self.mtmd.mtmd_input_chunks_free(chunks)
        raise RuntimeError("no image chunk")

    def prompt_logits(self, prompt: str, images: Sequence[np.ndarray]) -> np.ndarray:
        """Evaluate a prompt with `<__media__>` markers (one per image; special tokens parsed) from an empty cache and
        return the logits (n_vocab,) at its last position."""
        from llama_cpp import llama_cpp as C

        chunks = self._chunks(prompt, images)
        lctx = self.llm._ctx.ctx
        try:
            C.llama_memory_clear(C.llama_get_memory(lctx), True)
            n_past = C.llama_pos(0)
            status = self.mtmd.mtmd_helper_eval_chunks(
                self.ctx, lctx, chunks, 0, 0, self.llm.n_batch, True, ctypes.byref(n_past)
            )
            if status != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunks failed with status {status}")
        finally:
            self.mtmd.mtmd_input_chunks_free(chunks)
        return np.ctypeslib.as_array(C.llama_get_logits_ith(lctx, -1), shape=(self.llm.n_vocab(),)).copy()

    def greedy(self, prompt: str, images: Sequence[np.ndarray], max_new_tokens: int, eos_id: int | None) -> list[int]:
        """Greedy new token ids for a prompt with `<__media__>` markers (one per image; special tokens parsed)."""
        from llama_cpp import llama_cpp as C

        logits, lctx, out = self.prompt_logits(prompt, images), self.llm._ctx.ctx, []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token == eos_id or len(out) == max_new_tokens:
                break
            batch = C.llama_batch_get_one((C.llama_token * 1)(token), 1)
            if C.llama_decode(lctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(lctx, -1), shape=(self.llm.n_vocab(),))
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """Serve an exported GGUF pair with llama-cpp-python's OpenAI-compatible server and our chat template."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--gguf_dir", type=Path, required=True, help="the directory export_gguf wrote")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--n_ctx", type=int, default=2048)
    ap.add_argument("--n_threads", type=int, default=None, help="default: llama.cpp's choice")
    args = ap.parse_args(argv)
    import uvicorn
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    # the server builds its multimodal handler from the class named by chat_format: give that class our template
    Llava15ChatHandler.CHAT_FORMAT = CHAT_TEMPLATE
    Llava15ChatHandler.DEFAULT_SYSTEM_MESSAGE = None
    model = ModelSettings(
        model=str(args.gguf_dir / LM_FILE),
        model_alias="litgpt-mm",
        chat_format="llava-1-5",
        clip_model_path=str(args.gguf_dir / MMPROJ_FILE),
        n_ctx=args.n_ctx,
        n_batch=min(512, args.n_ctx),
        verbose=False,
        **({"n_threads": args.n_threads} if args.n_threads else {}),
    )
    # interrupt_requests (its default) ends a streaming answer as soon as another request waits: concurrent clients
    # would get cut-off answers; queue them instead (the server decodes one request at a time)
    server = ServerSettings(host=args.host, port=args.port, interrupt_requests=False)
    app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
