"""Conversations: turns rendered through a prompt template into token ids that fit the context, and answers turned
back into text while they are generated.

Shared by the CLI (`generate/mm.py`, one user turn), the chat app and the OpenAI-compatible server (many turns). The
model was trained with every image in a prefix before the text, so the images of all turns go there, in the order
they appear in the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from litgpt_mm.prompts import Template

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    """One message of a conversation (its images travel separately, in the image prefix)."""

    role: str
    text: str


@dataclass
class Prompt:
    """Token ids of a rendered conversation, how many turns were dropped to fit, and a notice for the user."""

    ids: torch.Tensor
    dropped_turns: int = 0
    notice: str | None = None


def merge_turns(turns: Sequence[Turn]) -> list[Turn]:
    """Consecutive messages of one role joined into one turn; checks roles and that the last turn is the user's."""
    merged: list[Turn] = []
    for n, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise ValueError(f"messages[{n}].role {turn.role!r}: use one of {', '.join(ROLES)}")
        if turn.role == "system" and any(t.role != "system" for t in merged):
            raise ValueError(f"messages[{n}]: a system message must come before the conversation")
        if merged and merged[-1].role == turn.role:
            merged[-1] = Turn(turn.role, f"{merged[-1].text}\n{turn.text}".strip())
        else:
            merged.append(Turn(turn.role, turn.text.strip()))
    if not merged or merged[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    return merged


class PromptBuilder:
    """Renders conversations with a template into ids that leave room for the images and the answer.

    What does not fit loses its oldest user/assistant exchanges first; a last question still too long loses its
    middle (the template around it is kept), as the CLI always did.
    """

    def __init__(self, tokenizer, template: Template, block_size: int, num_patches: int) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.block_size, self.num_patches = block_size, num_patches

    def encode(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def room(self, n_images: int, max_new_tokens: int) -> int:
        """Text positions left by `n_images` images and `max_new_tokens` in the context."""
        return self.block_size - n_images * (self.num_patches + 1) - max_new_tokens

    def render(self, turns: Sequence[Turn]) -> tuple[str, str]:
        """(history, last question) as text: the system part and earlier exchanges, then the final user turn."""
        t = self.template
        history = t.system
        for turn in turns[:-1]:
            if turn.role == "system":
                history += turn.text + "\n"
            elif turn.role == "user":
                history += t.user.format(turn.text) + t.assistant_prefix
            else:
                history += turn.text + t.answer_end
        return history, turns[-1].text

    def build(self, turns: Sequence[Turn], n_images: int, max_new_tokens: int) -> Prompt:
        """Token ids of the conversation, cut to fit (see the class docstring); `ValueError` when nothing fits."""
        turns = merge_turns(turns)
        room = self.room(n_images, max_new_tokens)
        system = [t for t in turns if t.role == "system"]
        chat = turns[len(system) :]
        dropped = 0
        while True:
            ids = self._ids(system + chat)
            if ids.numel() <= room or len(chat) == 1:
                break
            chat, dropped = chat[2:], dropped + 2  # the oldest question and its answer
        notice = f"the {dropped} oldest messages were left out to fit the context" if dropped else None
        if ids.numel() > room:
            ids, cut = self._cut_middle(system + chat, room, n_images, max_new_tokens)
            notice = "; ".join(filter(None, [notice, cut]))
        return Prompt(ids, dropped, notice)

    def _ids(self, turns: Sequence[Turn]) -> torch.Tensor:
        history, question = self.render(turns)
        t = self.template
        return self.encode(history + t.user.format(question) + t.assistant_prefix)

    def _cut_middle(
        self, turns: Sequence[Turn], room: int, n_images: int, max_new_tokens: int
    ) -> tuple[torch.Tensor, str]:
        t = self.template
        history, question = self.render(turns)
        user_head, user_tail = t.user.split("{}", 1)
        ids = self._ids(turns)
        head = self.encode(history + user_head).numel()
        tail = self.encode(user_tail + t.assistant_prefix).numel()
        if room < head + tail + 2:
            raise ValueError(
                f"{n_images} image(s) ({n_images * (self.num_patches + 1)} positions) + max_new_tokens "
                f"{max_new_tokens} leave no room for the prompt in the model's context of {self.block_size}: use "
                "fewer images or tokens"
            )
        first = head + (room - head - tail) // 2
        notice = (
            f"prompt of {ids.numel() - head - tail} tokens cut to its first {first - head} and last "
            f"{room - first - tail} to fit the context"
        )
        return torch.cat([ids[:first], ids[ids.numel() - (room - first) :]]), notice


class TextStream:
    """Turns an answer's tokens into text pieces as they come: whole characters only, and nothing of a stop string.

    Text that could still grow into a stop string is held back until it cannot; at a stop string the answer ends
    before it (`stopped` turns true). The answer's leading whitespace (the template's "Output: " is often followed
    by a space token) is dropped.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.shown, self.stopped = "", False

    def push(self, token: int) -> str:
        """The new text that `token` makes safe to show ('' while a character or a possible stop is incomplete)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(torch.tensor(self.tokens)).lstrip()
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(text[: min(hits)])
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._show(text[: len(text) - held])

    def flush(self) -> str:
        """Whatever was held back, once the answer has ended without completing a stop string."""
        if self.stopped or not self.tokens:
            return ""
        return self._show(self.tokenizer.decode(torch.tensor(self.tokens)).lstrip())

    def _show(self, text: str) -> str:
        if not text.startswith(self.shown):  # a tokenizer that rewrites earlier text: keep what was shown
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece
