"""Prompt templates: how a conversation's turns become the text the LM reads and writes, shared by the training data
(`data.llava`), generation and serving."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Template:
    """How turns are rendered: `system`, then per turn `user.format(q)` and `assistant.format(a)` + `answer_end`."""

    system: str
    user: str
    assistant_prefix: str
    answer_end: str


TEMPLATES = {
    # Phi-2's documented QA format
    "phi2": Template(system="", user="Instruct: {}\n", assistant_prefix="Output: ", answer_end="\n"),
    # the raw text right after the image prefix, as alignment trains captions (evaluating an aligned projector)
    "plain": Template(system="", user="{}", assistant_prefix="", answer_end="\n"),
    # LLaVA v1 conversation format
    "llava_v1": Template(
        system=(
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions. "
        ),
        user="USER: {} ",
        assistant_prefix="ASSISTANT: ",
        answer_end=" ",
    ),
}


def render(conversations: list[dict], template: Template) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of a conversation, `<image>` removed."""
    pieces = [(template.system, False)] if template.system else []
    for turn in conversations:
        text = turn["value"].replace(IMAGE_TOKEN, "").strip()
        if turn["from"] == "human":
            pieces.append((template.user.format(text) + template.assistant_prefix, False))
        else:
            pieces.append((text + template.answer_end, True))
    return pieces
