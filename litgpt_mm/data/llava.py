"""LLaVA-style visual instruction data: conversation encoding with answer-only labels (templates in `prompts`), and row
validation that reports every dropped sample by id.

A conversation `[{"from": "human", "value": "<image>\\nQ1"}, {"from": "gpt", "value": "A1"}, ...]` is rendered turn
by turn through a template; each piece is tokenized on its own and concatenated, so the label mask lines up with
the tokens by construction. Labels keep the answers (and the template's end-of-answer text and EOS); the system
text, the questions and the role markers are `IGNORE_INDEX`. The `<image>` placeholder is removed from the text:
the image prefix goes before the whole sequence, as LLaVA's own preprocessing moves `<image>` to the front.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from litgpt_mm.multimodal import IGNORE_INDEX
from litgpt_mm.prompts import IMAGE_TOKEN, Template, render

LLAVA_INSTRUCT_URL = (
    "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_instruct_150k.json"
)


class BadRow(ValueError):
    """A sample that cannot be used; the message says why."""


def validate(row: dict, needs_image: bool = True) -> list[dict]:
    """The conversation of a LLaVA-schema row, or `BadRow` (no `<image>`, empty answer, wrong roles, ...)."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise BadRow("no 'conversations' list with at least one question and one answer")
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise BadRow(f"turn {i} should be {{'from': '{want}', 'value': <text>}}")
        if want == "gpt" and not turn["value"].strip():
            raise BadRow(f"turn {i}: empty answer")
    if len(conv) % 2:
        raise BadRow("the conversation ends with a question")
    if needs_image and IMAGE_TOKEN not in conv[0]["value"]:
        raise BadRow(f"the first question has no {IMAGE_TOKEN} placeholder")
    return conv


def encode(
    conversations: list[dict], template: Template, tokenizer, max_tokens: int, eos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (answers kept, the rest `IGNORE_INDEX`) of a conversation, cut at `max_tokens`.

    Raises `BadRow` if the text is cut inside the first answer at `max_tokens` (nothing left to learn from) or if
    the piecewise tokens do not decode back to the rendered text (a tokenisation that does not line up).
    """
    return truncate(*encode_full(conversations, template, tokenizer, eos), max_tokens)


def encode_full(conversations: list[dict], template: Template, tokenizer, eos: bool = True) -> tuple[list, list]:
    """Token ids and labels of a whole conversation, uncut (see `encode`)."""
    ids, labels, text = [], [], ""
    pieces = render(conversations, template)
    for n, (piece, is_answer) in enumerate(pieces):
        tok = tokenizer.encode(piece, bos=False, eos=False).tolist()
        if is_answer and eos and n == len(pieces) - 1 and tokenizer.eos_id is not None:
            tok.append(tokenizer.eos_id)
        ids += tok
        labels += tok if is_answer else [IGNORE_INDEX] * len(tok)
        text += piece
    decoded = tokenizer.decode(torch.tensor([i for i in ids if i != tokenizer.eos_id]))
    if decoded != text:
        raise BadRow("tokenization does not line up with the rendered text")
    return ids, labels


def truncate(ids: list, labels: list, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_tokens` ids and labels; raises `BadRow` if no answer token is left."""
    if len(ids) > max_tokens:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRow(f"truncated at {max_tokens} tokens before the first answer")
    return torch.tensor(ids), torch.tensor(labels)


def read_rows(path: Path) -> list[dict]:
    """Rows of a LLaVA-schema JSON list, or of a LLaVA-Bench jsonl (`instruction`/`output`) turned into it."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    conv = [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{r.get('instruction', '')}"},
                        {"from": "gpt", "value": r.get("output", "")},
                    ]
                    rows.append(
                        {
                            "id": f"{r.get('id')}-{r.get('type', len(rows))}",
                            "image": r.get("image"),
                            "conversations": conv,
                        }
                    )
            return rows
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read LLaVA data ({type(err).__name__}: {err})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, image, conversations}} rows")
    return rows
