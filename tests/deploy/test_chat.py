"""Conversations without a server: OpenAI message parsing, multi-turn prompts cut to the context, streamed text with
stop strings."""

import base64

import pytest
import torch
from conftest import DATA
from PIL import Image

from litgpt_mm.deploy.chat import PromptBuilder, TextStream, Turn, merge_turns
from litgpt_mm.deploy.messages import BadRequest, parse_messages
from litgpt_mm.prompts import TEMPLATES


class CharTokenizer:
    """One token per character (ids are code points), enough to test prompt lengths and streaming."""

    eos_id = 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        return torch.tensor([ord(c) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(chr(int(i)) for i in ids)


def uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_messages_keep_image_order_roles_and_name_the_bad_field():
    a, b = DATA / "images" / "coffee.png", DATA / "images" / "rocket.jpg"
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri(a)}}, {"type": "text", "text": "A?"}],
        },
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [{"type": "text", "text": "B?"}, {"type": "image_url", "image_url": uri(b)}]},
    ]
    conv = parse_messages(messages)
    assert [img.size for img in conv.images] == [Image.open(p).size for p in (a, b)]
    assert [(t.role, t.text) for t in conv.turns] == [
        ("system", "Be brief."),
        ("user", "A?"),
        ("assistant", "Yes."),
        ("user", "B?"),
    ]
    with pytest.raises(BadRequest, match=r"messages\[0\]\.content\[1\]\.input_audio\.format 'ogg'"):
        parse_messages(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}},
                    ],
                }
            ]
        )
    with pytest.raises(BadRequest, match="only user messages"):
        parse_messages([{"role": "assistant", "content": [{"type": "image_url", "image_url": uri(a)}]}])
    with pytest.raises(ValueError, match="must end with a user message"):
        merge_turns([Turn("user", "q"), Turn("assistant", "a")])
    with pytest.raises(ValueError, match="role 'robot'"):
        merge_turns([Turn("robot", "q")])


def test_multi_turn_prompt_drops_the_oldest_exchanges_then_cuts_the_middle():
    builder = PromptBuilder(CharTokenizer(), TEMPLATES["phi2"], block_size=200, num_patches=9)
    turns = [
        Turn("system", "S."),
        Turn("user", "q1" * 20),
        Turn("assistant", "a1" * 20),
        Turn("user", "q2"),
        Turn("assistant", "a2"),
        Turn("user", "last?"),
    ]
    whole = builder.build(turns, n_images=1, max_new_tokens=10)
    text = CharTokenizer().decode(whole.ids)
    assert whole.dropped_turns == 0 and text == (
        "S.\nInstruct: "
        + "q1" * 20
        + "\nOutput: "
        + "a1" * 20
        + "\nInstruct: q2\nOutput: a2\nInstruct: last?\nOutput: "
    )
    tight = builder.build(turns, n_images=1, max_new_tokens=200 - 10 - 60)  # room for 60 characters
    assert tight.dropped_turns == 2 and "q1" not in CharTokenizer().decode(tight.ids)
    assert CharTokenizer().decode(tight.ids).startswith("S.\nInstruct: q2") and "left out" in tight.notice
    assert tight.ids.numel() <= 60
    long = builder.build([Turn("user", "x" * 300 + "END")], n_images=0, max_new_tokens=50)
    assert long.ids.numel() == 150 and CharTokenizer().decode(long.ids).endswith("END\nOutput: ")
    assert "cut to its first" in long.notice


def test_text_stream_holds_back_possible_stops_and_cuts_at_the_first():
    tok = CharTokenizer()
    stream = TextStream(tok, stop=["END", "\n\n"])
    pieces = [stream.push(ord(c)) for c in "  Hello EN"]
    assert "".join(pieces) == "Hello " and not stream.stopped  # "EN" may become "END": held back
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.push(ord("x")) == "" and stream.flush() == ""
    other = TextStream(tok, stop=["END"])
    assert "".join(other.push(ord(c)) for c in "the EN") + other.flush() == "the EN"


def test_remote_images_are_fetched_only_when_allowed(tmp_path):
    """An http image URL goes through the fetcher (here a loopback HTTP server); without one it is refused."""
    import functools
    import http.server
    import threading

    from litgpt_mm.deploy.serve import _fetch

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DATA / "images"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/coffee.png"
        message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        conv = parse_messages(message, fetch=_fetch)
        assert conv.images[0].size == Image.open(DATA / "images" / "coffee.png").size
        with pytest.raises(BadRequest, match="remote image URLs are off"):
            parse_messages(message)
        with pytest.raises(BadRequest, match="could not be fetched"):
            parse_messages(
                [{"role": "user", "content": [{"type": "image_url", "image_url": url + ".missing"}]}], fetch=_fetch
            )
        with pytest.raises(BadRequest, match="larger than"):
            _fetch(url, limit=1000)
        # the server's HTTP process fetches once and hands the worker a data URI
        from litgpt_mm.deploy.serve import ChatRequest, Requests

        requests = Requests.__new__(Requests)
        requests.fetch_remote = True
        request = ChatRequest(messages=message)
        requests.inline_remote_images(request)
        inlined = request.messages[0].content[0].image_url
        assert inlined.startswith("data:image;base64,")
        assert parse_messages([m.model_dump() for m in request.messages]).images[0].size == conv.images[0].size
    finally:
        httpd.shutdown()
