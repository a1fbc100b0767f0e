"""The Gradio app in a real headless browser (Debian chromium driven by playwright): upload an image, type a
question, read the streamed answer; an empty request shows its error in the page."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import DATA, REPO, require_tool

from litgpt_mm.inference import Assistant, GenerationSettings

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


def test_upload_ask_and_read_the_streamed_answer(app_url, checkpoints, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = DATA / "images" / "coffee.png"
    question = "What is in the cup?"
    expected = Assistant.load(checkpoints["merged"], device="cpu").answer(question, [image], GenerationSettings(128))
    assert expected  # a non-empty answer to look for in the page

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(app_url)
        page.locator("#image input[type=file]").set_input_files(str(image))
        page.locator("#question textarea").fill(question)
        seen: list[str] = []
        page.locator("#ask").click()
        answer = page.locator("#answer textarea")
        deadline = time.time() + 120
        while time.time() < deadline:
            value = answer.input_value()
            if value and (not seen or seen[-1] != value):
                seen.append(value)
            if value == expected:
                break
            time.sleep(0.05)
        page.screenshot(path=str(tmp_path / "answer.png"))
        expect(answer).to_have_value(expected)
        assert all(expected.startswith(v) for v in seen)  # every value shown on the way is a prefix: streamed

        page.reload()  # a fresh form: no image, no question
        page.locator("#ask").click()
        expect(page.get_by_text("ask a question, record one, or add an image").first).to_be_visible(timeout=30000)
        browser.close()
