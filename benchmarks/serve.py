"""Serving throughput, measured side by side in one run: N concurrent clients stream chat completions (an image and
a short question each) from `python -m litgpt_mm.serve` on the loopback address, with batching off
(`--max_batch_size 1`) and on (`--max_batch_size N`), and the same model exported to GGUF
(`litgpt_mm.export.gguf`) served by llama.cpp through llama-cpp-python's OpenAI-compatible server
(`python -m litgpt_mm.export.llamacpp`, our chat template; it decodes one request at a time), when `llama_cpp` is
installed (extra `llamacpp`). Same prompts, same clients, one run.

Reports requests/s, new tokens/s, p50/p95 latency and time to first token, and errors; every request must come back
complete. Target: with 8 clients, batching gives >= 2x the requests/s of one-at-a-time, with no errors.

    python benchmarks/serve.py                              # a random Phi-2-shaped LM (4 x 640) on CPU
    python benchmarks/serve.py --checkpoint_dir out/qlora_instruct/merged --device cuda --llamacpp false
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from litgpt_mm.analysis.bench import save

REPO = Path(__file__).resolve().parents[1]

IMAGE = REPO / "data" / "coco" / "val2017" / "000000397133.jpg"


def build_checkpoint(out: Path, n_layer: int, n_embd: int) -> Path:
    """A random merged checkpoint (LM, projector, tokenizer of the bundled books) that `Assistant.load` reads."""

    from litgpt_mm.config import Config
    from litgpt_mm.data.prepare_gutenberg import prepare
    from litgpt_mm.model import GPT, save_checkpoint
    from litgpt_mm.multimodal import MultimodalConfig, MultimodalGPT

    prepare(out_dir=out / "prepared", vocab_size=1024)
    torch.manual_seed(0)
    config = Config.from_name(
        "phi-2",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_embd // 80,
        intermediate_size=4 * n_embd,
        vocab_size=1024,
        padded_vocab_size=1024,
        block_size=512,
    )
    lm = GPT(config)
    model_dir = out / "model"
    save_checkpoint(lm, model_dir)
    for f in (out / "prepared" / "tokenizer").iterdir():
        shutil.copy(f, model_dir / f.name)
    # mlp2x_gelu: the projector llama.cpp's mmproj can express, so that the llama.cpp row serves this same model
    config = MultimodalConfig(clip_pretrained=None, projector="mlp2x_gelu", lm_checkpoint_dir=str(model_dir))
    MultimodalGPT(lm, config).save_adapter(model_dir)
    return model_dir


def start_server(
    checkpoint_dir: Path, device: str, max_batch_size: int, log: Path, gguf_dir: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Our server on `checkpoint_dir`, or (with `gguf_dir`) llama-cpp-python's server on the exported GGUF pair."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if gguf_dir is None:
        cmd = [sys.executable, "-m", "litgpt_mm.serve", "--checkpoint_dir", str(checkpoint_dir), "--port", str(port),
               "--device", device, "--max_batch_size", str(max_batch_size), "--batch_timeout", "0.05"]  # fmt: skip
        health = "/health"
    else:
        cmd = [sys.executable, "-m", "litgpt_mm.export.llamacpp", "--gguf_dir", str(gguf_dir), "--port", str(port),
               "--n_ctx", "512", "--n_threads", str(torch.get_num_threads())]  # fmt: skip
        health = "/v1/models"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "USE_TORCH_XLA": "0"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"{url}{health}", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up in 300 s:\n{log.read_text()[-3000:]}")


def one_request(client, messages: list, max_tokens: int) -> dict:
    start, first, text, tokens, pieces = time.perf_counter(), None, "", 0, 0
    try:
        stream = client.chat.completions.create(
            model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                pieces += 1  # llama-cpp-python: one chunk per token, '' while a UTF-8 character is incomplete
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        tokens = tokens or pieces  # llama-cpp-python streams one token per chunk and no usage
        ok = tokens > 0
    except Exception as err:  # counted and reported: a benchmark must not hide failures
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    if not ok:
        return {"ok": False, "error": f"no tokens came back (text {text!r})"}
    return {"ok": ok, "latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def load(url: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` threads send `requests` streaming requests in all (or until `time_limit` s)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    prompts = [f"Question {i}: what is in this picture?" for i in range(requests)]
    deadline = time.perf_counter() + time_limit

    def run(prompt: str) -> dict:
        if time.perf_counter() > deadline:
            return {"ok": False, "error": "not sent: time limit"}
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
        return one_request(client, [{"role": "user", "content": content}], max_tokens)

    one_request(client, [{"role": "user", "content": "warm up"}], 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, prompts))
    wall = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in done) or [float("nan")]
    ttft = sorted(r["ttft"] for r in done) or [float("nan")]

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "requests": len(results), "completed": len(done), "errors": len(results) - len(done),
        "requests_per_s": len(done) / wall, "new_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "p50_latency_s": pct(lat, 0.5), "p95_latency_s": pct(lat, 0.95),
        "p50_ttft_s": pct(ttft, 0.5), "p95_ttft_s": pct(ttft, 0.95), "wall_s": wall,
        "first_error": next((r["error"] for r in results if not r["ok"]), ""),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", type=Path, default=None, help="default: a random Phi-2-shaped model")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=640)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests in all, per setting")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--time_limit", type=float, default=300, help="seconds per setting; later requests are not sent")
    ap.add_argument(
        "--llamacpp",
        default="auto",
        choices=["auto", "true", "false"],
        help="add the llama.cpp row (auto: when llama_cpp is installed)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt = args.checkpoint_dir or build_checkpoint(tmp, args.n_layer, args.n_embd)
    settings: list[tuple[str, int, Path | None]] = [
        ("one_at_a_time", 1, None),
        (f"batched_{args.clients}", args.clients, None),
    ]
    if args.llamacpp == "true" or (args.llamacpp == "auto" and importlib.util.find_spec("llama_cpp") is not None):
        from litgpt_mm.export.gguf import export_gguf

        export_gguf(ckpt, tmp / "gguf")
        settings.append(("llama_cpp", 1, tmp / "gguf"))
    rows = []
    for name, batch, gguf_dir in settings:
        proc, url = start_server(ckpt, args.device, batch, tmp / f"server_{name}.log", gguf_dir)
        try:
            row = {"setting": name, "max_batch_size": batch}
            rows.append({**row, **load(url, args.clients, args.requests, args.max_tokens, args.time_limit)})
            # the machine's 1-minute load average at the end of the row: other work on the machine shows here
            rows[-1]["loadavg_1m"] = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            time.sleep(2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the server's still running
        print(rows[-1], flush=True)
    speedup = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
    for row in rows:
        row["x_requests_per_s"] = row["requests_per_s"] / rows[0]["requests_per_s"]
    errors = sum(r["errors"] for r in rows)
    notes = [
        f"batching gives {speedup:.2f}x the requests/s of one-at-a-time with {args.clients} clients (target >= 2x)",
        f"errors or dropped requests: {errors} (target 0)",
        *(
            [
                f"llama.cpp (llama-cpp-python {llama_cpp_version()} server, the same model exported to GGUF in fp32, "
                f"{torch.get_num_threads()} threads, one request at a time): {rows[2]['requests_per_s']:.2f} "
                f"requests/s and {rows[2]['new_tokens_per_s']:.1f} new tokens/s against our "
                f"{rows[0]['requests_per_s']:.2f} / {rows[0]['new_tokens_per_s']:.1f} one at a time and "
                f"{rows[1]['requests_per_s']:.2f} / {rows[1]['new_tokens_per_s']:.1f} batched; answers end at EOS or "
                "max_tokens, so compare tokens/s where answer lengths differ"
            ]
            if len(rows) > 2
            else []
        ),
        f"the machine has {os.cpu_count()} cores: a loadavg_1m above that means other work shared them during the row",
        "static batches: a batch's requests are decoded together and it ends with its longest answer; the p95 "
        "latency of the one-at-a-time row includes the queueing behind the other clients",
    ]
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save("serve", torch.device(args.device), rows, notes, params)
    shutil.rmtree(tmp, ignore_errors=True)


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


if __name__ == "__main__":
    main()
