"""`python -m litgpt_mm.serve` on a loopback port, driven by the official `openai` client: answers equal the CLI's
(greedy), streaming equals non-streaming, multi-turn, speech, batching, seeds, stop strings, every error code, and
a client that disconnects mid-stream."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import DATA, REPO

import litgpt_mm.deploy.tiny_whisper
import litgpt_mm.eval.evaluate
import litgpt_mm.generate
from litgpt_mm.deploy.chat import Turn
from litgpt_mm.deploy.inference import Assistant, GenerationSettings, open_image
from litgpt_mm.deploy.messages import parse_messages

openai = pytest.importorskip("openai")
pytest.importorskip("litserve")

KEY = "test-key"
IMAGE = DATA / "images" / "coffee.png"
IMAGE2 = DATA / "coco" / "val2017" / "000000397133.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path) -> str:
    kind = "png" if str(path).endswith(".png") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def jfk_wav() -> bytes:
    from litgpt_mm.deploy.audio import load_audio

    samples = (np.clip(load_audio(DATA / "audio" / "jfk.flac"), -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(samples.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory):
    pytest.importorskip("whisperx")
    build = litgpt_mm.deploy.tiny_whisper.build_tiny_whisper
    return build(tmp_path_factory.mktemp("whisper") / "tiny-ct2")


@pytest.fixture(scope="module")
def server(checkpoints, tiny_whisper_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "litgpt_mm.serve", "--checkpoint_dir", str(checkpoints["merged"]), "--port", str(port),
         "--device", "cpu", "--max_batch_size", "4", "--batch_timeout", "0.2", "--api_key", KEY,
         "--max_payload_mb", "2", "--whisper_model", str(tiny_whisper_dir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "USE_TORCH_XLA": "0"},
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not come up:\n" + log_path.read_text()[-3000:])
    yield {"url": url, "log": log_path, "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)}
    proc.terminate()  # SIGTERM: the server stops its LitServe workers too
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = _group_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "server worker processes outlived the server"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def local(checkpoints):
    return Assistant.load(checkpoints["merged"], device="cpu")


def user(text: str, *images, audio: bytes | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images]
    if audio is not None:
        parts.append(
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
        )
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def ask(server, messages, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return server["client"].chat.completions.create(model="tiny", messages=messages, **kwargs)


def test_greedy_answer_equals_the_cli_streamed_or_not(server, local, checkpoints):
    cli = litgpt_mm.generate.main(
        checkpoint_dir=checkpoints["merged"],
        image=IMAGE,
        prompt="What is in the cup?",
        max_new_tokens=12,
        stream=False,
        device="cpu",
    )
    out = ask(server, [user("What is in the cup?", IMAGE)])
    assert out.choices[0].message.content.rstrip() == cli and cli
    ids = local.prompt_ids("What is in the cup?", 1, 12)
    assert out.usage.prompt_tokens == ids.numel() + 50  # text + one image prefix (49 patches and the separator)
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(ask(server, [user("What is in the cup?", IMAGE)], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).rstrip() == cli
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    reason = "length" if out.usage.completion_tokens == 12 else "stop"  # cut by max_tokens, or ended by EOS
    assert out.choices[0].finish_reason == reason and chunks[-1].choices[0].finish_reason == reason
    short = ask(server, [user("What is in the cup?", IMAGE)], max_tokens=1)  # the answer's first token is not EOS
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"


def test_multi_turn_and_several_images_in_order(server, local):
    messages = [user("What is this?", IMAGE), {"role": "assistant", "content": "A cup."}, user("And here?", IMAGE2)]
    turns = [Turn("user", "What is this?"), Turn("assistant", "A cup."), Turn("user", "And here?")]
    want = local.answer(turns, [IMAGE, IMAGE2], GenerationSettings(12))
    assert ask(server, messages).choices[0].message.content.rstrip() == want
    conv = parse_messages(messages)  # what the server parses: images in conversation order, text per turn
    assert [np.asarray(i).shape for i in conv.images] == [np.asarray(open_image(p)).shape for p in (IMAGE, IMAGE2)]
    assert [(t.role, t.text) for t in conv.turns] == [(t.role, t.text) for t in turns]


def test_speech_joins_the_prompt_as_in_the_cli(server, local, tiny_whisper_dir, tmp_path):
    from litgpt_mm.deploy.audio import SpeechToText, prompt_with_speech

    wav = jfk_wav()
    (tmp_path / "q.wav").write_bytes(wav)
    transcript = SpeechToText(str(tiny_whisper_dir), device="cpu").transcribe(tmp_path / "q.wav")
    want = local.answer(prompt_with_speech("Answer the question.", transcript), [IMAGE], GenerationSettings(12))
    assert ask(server, [user("Answer the question.", IMAGE, audio=wav)]).choices[0].message.content.rstrip() == want


def test_concurrent_requests_are_batched_with_the_same_answers(server, local):
    prompts = ["What is in the cup?", "Describe the scene.", "Count the objects.", "Which colour?"]
    want = [local.answer(p, [IMAGE2], GenerationSettings(10)) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda p: ask(server, [user(p, IMAGE2)], max_tokens=10).choices[0].message.content, prompts)
        )
    got = [g.rstrip() for g in got]
    assert got == want
    sampled = [ask(server, [user("Describe.")], temperature=1.0, seed=7, max_tokens=10) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content


def test_stop_strings_end_the_answer_before_them(server):
    full = ask(server, [user("Describe the scene.", IMAGE2)], max_tokens=16).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    cut = ask(server, [user("Describe the scene.", IMAGE2)], max_tokens=16, stop=[words[2]]).choices[0].message.content
    assert cut == full[: full.index(words[2])]
    chunks = list(ask(server, [user("Describe the scene.", IMAGE2)], max_tokens=16, stop=[words[2]], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"  # a stop string, not the token limit


def _post(server, body: bytes, key: str | None = KEY, path: str = "/v1/chat/completions"):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server["url"] + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "content[0].image_url: not valid"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}],
         "cannot be decoded as an image"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "remote image URLs are off"),
        ([{"type": "video", "text": "x"}], "content[0].type 'video'"),
        ([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFjunk").decode(), "format": "wav"}}],
         "input_audio #1"),
    ],
)  # fmt: skip
def test_bad_content_gets_400_and_the_server_stays_up(server, content, fragment):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            ask(server, [{"role": "user", "content": content}], stream=stream)
        assert fragment in err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
    assert ask(server, [user("Still there?")], max_tokens=2).choices[0].message.content is not None


def test_limits_keys_and_routes(server, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "small.png")
    with pytest.raises(openai.BadRequestError, match="leave no room|max_tokens"):
        ask(server, [user("hi", *[tmp_path / "small.png"] * 5)])
    with pytest.raises(openai.BadRequestError, match="max_tokens 100000"):
        ask(server, [user("hi")], max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        ask(server, [user("hi")], n=2)
    long = ask(server, [user("word " * 2000)], max_tokens=4)  # cut in the middle, as the CLI does
    assert long.usage.prompt_tokens <= 256
    status, body = _post(server, b'{"messages": [{"role": "user", "content": "' + b"x" * 2_100_000 + b'"}]}')
    assert status == 413 and b'"error"' in body
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    assert _post(server, body, key=None)[0] == 401
    assert _post(server, body, key="wrong")[0] == 401
    status, text = _post(server, b'{"messages": [{"role": "user", "content": [{"type": "video"}]}]}')
    assert status == 400 and b'"error"' in text
    assert urllib.request.urlopen(server["url"] + "/health", timeout=5).status == 200  # probes carry no key
    assert [m.id for m in server["client"].models.list().data]


def test_a_client_that_disconnects_frees_its_row(server):
    stream = ask(server, [user("Tell a long story.")], stream=True, max_tokens=180, temperature=1.0, seed=3)
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()
    start = time.time()
    assert ask(server, [user("hi")], max_tokens=2).choices[0].message.content is not None
    deadline = time.time() + 30
    while "client disconnected after" not in server["log"].read_text() and time.time() < deadline:
        time.sleep(0.2)
    line = next(x for x in server["log"].read_text().splitlines() if "client disconnected after" in x)
    assert int(line.split("after ")[1].split()[0]) < 180, line
    assert time.time() - start < 60


def test_chat_app_against_the_server_answers_as_the_local_model(server, local):
    from litgpt_mm.deploy.app import LocalChat, RemoteChat

    messages = [user("What is this?", IMAGE), {"role": "assistant", "content": "A cup."}, user("Is it full?")]
    settings = GenerationSettings(12)
    remote = "".join(RemoteChat(f"{server['url']}/v1", KEY).stream(messages, settings, print)).strip()
    assert remote == "".join(LocalChat(local).stream(messages, settings, print)).strip() and remote
    with pytest.raises(ValueError, match="missing or wrong API key"):
        list(RemoteChat(f"{server['url']}/v1", "wrong").stream(messages, settings, print))


def test_evaluate_through_the_server_equals_in_process(server, checkpoints, tmp_path):
    import json

    evaluate = litgpt_mm.eval.evaluate
    images = sorted((DATA / "coco" / "val2017").glob("*.jpg"))[:4]
    rows = [
        {"id": i, "image": p.name, "question": "What is shown?", "answers": ["a cat"]} for i, p in enumerate(images)
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(questions=questions, images_root=images[0].parent, max_new_tokens=8, batch_size=4)
    local = evaluate.vqa(checkpoint_dir=checkpoints["merged"], device="cpu", out_dir=tmp_path / "local", **common)
    served = evaluate.vqa(
        checkpoint_dir=checkpoints["merged"],
        api_base=f"{server['url']}/v1",
        api_key=KEY,
        out_dir=tmp_path / "served",
        **common,
    )
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("answer_image", "answer_blind", "answer_shuffled")
    assert [[r[k] for k in keys] for r in read("served")] == [[r[k] for k in keys] for r in read("local")]
    assert served["scores"] == local["scores"]


def test_lm_eval_harness_through_the_server(server, tmp_path, monkeypatch):
    """lm-evaluation-harness's own `local-chat-completions` model evaluates the served model on a local task."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"q": "Name a colour.", "a": "red"}, {"q": "Say yes.", "a": "yes"}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = simple_evaluate(
        model="local-chat-completions",
        tasks=["tiny_gen"],
        apply_chat_template=True,
        model_args=f"base_url={server['url']}/v1/chat/completions,model=tiny,max_retries=1,tokenized_requests=False",
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = out["samples"]["tiny_gen"]
    assert len(samples) == 2 and 0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1
    want = ask(server, [{"role": "user", "content": "Name a colour."}], max_tokens=8, stop=["\n\n"])
    got = next(s for s in samples if s["doc"]["q"] == "Name a colour.")["resps"][0][0]
    assert got.strip() == want.choices[0].message.content.strip()


def test_chat_app_speech_turn_locally_equals_the_server(server, local, tiny_whisper_dir, tmp_path):
    """A recording added in the app becomes `input_audio`; the local chat transcribes it as the server does."""
    from litgpt_mm.deploy.app import Limits, LocalChat, user_message
    from litgpt_mm.deploy.audio import SpeechToText

    (tmp_path / "q.wav").write_bytes(jfk_wav())
    message = user_message("Answer the question.", [str(IMAGE), str(tmp_path / "q.wav")], Limits())
    assert [p["type"] for p in message["content"]] == ["image_url", "input_audio", "text"]
    stt = SpeechToText(str(tiny_whisper_dir), device="cpu")
    notices: list[str] = []
    got = "".join(LocalChat(local, stt.transcribe).stream([message], GenerationSettings(12), notices.append))
    assert got.strip() == ask(server, [message]).choices[0].message.content.strip()
    with pytest.raises(ValueError, match="more than 5 s"):
        user_message("", [str(tmp_path / "q.wav")], Limits(max_audio_seconds=5))
    with pytest.raises(ValueError, match="ask a question"):
        user_message("  ", [], Limits())
