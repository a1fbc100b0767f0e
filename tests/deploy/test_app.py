"""The Gradio chat in a real headless browser (Debian chromium driven by playwright): an image and a question, a
follow-up that needs the first turn, streamed answers equal to the model's, clear, and an empty request's error."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import DATA, REPO, require_tool, run_python

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(checkpoints, tmp_path):
    if CHROMIUM is None:
        require_tool("chromium", "chromium")
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "litgpt_mm.app", "--checkpoint_dir", str(checkpoints["merged"]), "--port", str(port),
         "--device", "cpu"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the app did not start: {(tmp_path / 'app.log').read_text()[-2000:]}") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _last_bot_text(page) -> str:
    bots = page.locator('#chat [data-testid="bot"]')
    return bots.last.inner_text().strip() if bots.count() else ""


def _wait_for_answer(page, expected: str, timeout: float = 120) -> list[str]:
    seen: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = _last_bot_text(page)
        if value and (not seen or seen[-1] != value):
            seen.append(value)
        if value == expected:
            break
        time.sleep(0.05)
    return seen


def _local_answers(checkpoint_dir, image, q1: str, q2: str) -> list[str]:
    """The model's greedy answers to `q1`, then `q2` after it, and `q2` alone, computed as the app computes them: in
    a fresh process (the random test model's near-tied logits make its answers sensitive to state that earlier tests
    leave in this worker process)."""
    code = (
        "import json, sys\n"
        "from litgpt_mm.deploy.chat import Turn\n"
        "from litgpt_mm.deploy.inference import Assistant, GenerationSettings\n"
        "ckpt, image, q1, q2 = sys.argv[1:]\n"
        "local, settings = Assistant.load(ckpt, device='cpu'), GenerationSettings(24)\n"
        "a1 = local.answer(q1, [image], settings)\n"
        "a2 = local.answer([Turn('user', q1), Turn('assistant', a1), Turn('user', q2)], [image], settings)\n"
        "print(json.dumps([a1, a2, local.answer(q2, [image], settings)]))\n"
    )
    proc = run_python(["-c", code, str(checkpoint_dir), str(image), q1, q2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_turn_chat_with_an_image_in_the_first(app_url, checkpoints, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = DATA / "images" / "coffee.png"
    q1, q2 = "What is in the cup?", "And what colour is it?"
    a1, a2, a2_alone = _local_answers(checkpoints["merged"], image, q1, q2)
    assert a1 and a2  # non-empty answers to look for in the page
    assert a2 != a2_alone  # so the page's second answer shows the history was used

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(app_url)
        page.get_by_text("Generation settings").click()
        page.locator("#max_new_tokens input[type=number]").fill("24")
        page.locator("#max_new_tokens input[type=number]").press("Enter")
        page.locator("#box input[type=file]").set_input_files(str(image))
        expect(page.locator("#box img").first).to_be_visible(timeout=30000)  # the upload is attached
        page.locator("#box textarea").fill(q1)
        page.locator("#box textarea").press("Enter")
        seen = _wait_for_answer(page, a1)
        page.screenshot(path=str(tmp_path / "turn1.png"))
        assert seen and seen[-1] == a1, seen[-3:]
        assert all(a1.startswith(v) for v in seen)  # every value shown on the way is a prefix: streamed

        page.locator("#box textarea").fill(q2)
        page.locator("#box textarea").press("Enter")
        seen = _wait_for_answer(page, a2)
        page.screenshot(path=str(tmp_path / "turn2.png"))
        assert seen and seen[-1] == a2, seen[-3:]  # the second answer saw the first turn and its image

        page.locator("#clear").click()
        expect(page.locator('#chat [data-testid="bot"]')).to_have_count(0, timeout=30000)
        page.locator("#box textarea").press("Enter")  # nothing to send
        expect(page.get_by_text("ask a question, record one, or add an image").first).to_be_visible(timeout=30000)
        browser.close()
