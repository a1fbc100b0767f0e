"""Shapes world: seeded images of coloured shapes on a 3x3 grid, with truthful captions, questions and answers.

A scene holds one to a few shapes (a colour, a kind and a grid cell each; at most one shape per cell, drawn inside
its cell, so shapes never overlap) on a plain light background or a mildly noisy one. Everything said about a
scene is rendered from the scene itself, so captions and answers are true of the drawn image by construction.
Answers are short lowercase words from a small vocabulary (`answer_choices`), to be scored by exact match.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 0),
    "purple": (140, 50, 180),
    "orange": (245, 125, 10),
}
KINDS = ("circle", "square", "triangle", "cross")
# cell index = row * 3 + col; row 0 is the top, col 0 the left
POSITIONS = tuple(
    "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"
    for row in ("top", "middle", "bottom")
    for col in ("left", "centre", "right")
)
PLACES = tuple("in the centre" if p == "centre" else f"at the {p}" for p in POSITIONS)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("colour", "kind", "count", "position", "yesno")

CROSS_THICKNESS = 0.4  # bar width as a fraction of the cross's side
_MARGIN = 0.06  # free space kept inside each cell, as a fraction of the cell's side


def answer_choices(max_shapes: int = 3) -> dict[str, list[str]]:
    """Every possible answer per question type."""
    return {
        "colour": list(COLOURS),
        "kind": list(KINDS),
        "count": list(NUMBERS[1 : max_shapes + 1]),
        "position": list(POSITIONS),
        "yesno": ["yes", "no"],
    }


@dataclass(frozen=True)
class Shape:
    """A shape: colour, kind, grid cell, and its centre and half-side as fractions of the image side."""

    colour: str
    kind: str
    cell: int
    cx: float
    cy: float
    r: float

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def place(self) -> str:
        return PLACES[self.cell]

    def box(self, size: int) -> tuple[int, int, int]:
        """Left, top and side of the shape's square box in pixels (the box spans `[x0, x0 + side)`)."""
        side = max(3, round(2 * self.r * size))
        return round((self.cx - self.r) * size), round((self.cy - self.r) * size), side

    def bbox(self, size: int) -> list[int]:
        """COCO bbox `[x, y, width, height]` in pixels."""
        x0, y0, d = self.box(size)
        return [x0, y0, d, d]

    def polygon(self, size: int) -> list[tuple[float, float]]:
        """Outline in pixel coordinates (a 24-gon for the circle)."""
        x0, y0, d = self.box(size)
        x1, y1 = x0 + d - 1, y0 + d - 1
        if self.kind == "circle":
            c, rad = (x0 + x1) / 2, (d - 1) / 2
            return [
                (c + rad * math.cos(2 * math.pi * i / 24), y0 + rad + rad * math.sin(2 * math.pi * i / 24))
                for i in range(24)
            ]
        if self.kind == "square":
            return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        if self.kind == "triangle":
            return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
        (a, b), (c, e) = self.cross_bars(size)
        return [(a, y0), (b, y0), (b, c), (x1, c), (x1, e), (b, e), (b, y1), (a, y1), (a, e), (x0, e), (x0, c), (a, c)]

    def area(self, size: int) -> float:
        """Area in pixels of the drawn outline."""
        d = self.box(size)[2]
        if self.kind == "circle":
            return math.pi * d * d / 4
        if self.kind == "square":
            return float(d * d)
        if self.kind == "triangle":
            return d * d / 2
        t = _thickness(d)
        return float(2 * d * t - t * t)

    def cross_bars(self, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """First and last pixel column of a cross's vertical bar, and first and last row of its horizontal bar."""
        x0, y0, d = self.box(size)
        t = _thickness(d)
        return (x0 + (d - t) // 2, x0 + (d - t) // 2 + t - 1), (y0 + (d - t) // 2, y0 + (d - t) // 2 + t - 1)


def _thickness(side: int) -> int:
    return max(1, round(CROSS_THICKNESS * side))


@dataclass(frozen=True)
class Background:
    """A light grey level (255 = white) and the standard deviation of the gaussian grey-level pixel noise (0 = plain;
    grey noise keeps the PNG files small and fast to write)."""

    level: int
    noise: float = 0.0

    @property
    def name(self) -> str:
        if self.noise > 0:
            return "noisy"
        return "white" if self.level >= 245 else "light grey"


@dataclass(frozen=True)
class Scene:
    """The shapes of an image (at most one per cell) and its background."""

    shapes: tuple[Shape, ...]
    background: Background

    def count(self, colour: str | None = None, kind: str | None = None) -> int:
        """How many shapes have this colour and/or kind."""
        return sum((colour is None or s.colour == colour) and (kind is None or s.kind == kind) for s in self.shapes)


@dataclass(frozen=True)
class Question:
    """A question of one of `QUESTION_TYPES`, its answer, and the index of the shape it is about (None: the count
    question and negative yes/no questions, which are about no particular shape), or `about`: the indices of every
    shape it is about when there are several (whether a kind is present, of a kind drawn twice)."""

    type: str
    text: str
    answer: str
    shape: int | None = None
    about: tuple[int, ...] = ()

    @property
    def referents(self) -> set[int]:
        """Every shape the question is about."""
        return set(self.about) | ({self.shape} if self.shape is not None else set())


def sample_scene(
    rng: random.Random,
    max_shapes: int = 3,
    noise: float = 0.5,
    min_shapes: int = 1,
    size_range: tuple[float, float] = (0.26, 0.40),
) -> Scene:
    """A random scene: `min_shapes`..`max_shapes` shapes in distinct cells, colours and kinds drawn independently.

    Args:
        rng: the random source (a seeded `random.Random` makes the scene reproducible).
        max_shapes: most shapes per image (at most 9, one per cell).
        noise: probability of a noisy background.
        min_shapes: fewest shapes per image.
        size_range: half-side of a shape as a fraction of a cell's side (low, high).
    """
    if not 1 <= min_shapes <= max_shapes <= len(POSITIONS):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, got {min_shapes}, {max_shapes}")
    n = rng.randint(min_shapes, max_shapes)
    shapes = []
    for cell in sorted(rng.sample(range(len(POSITIONS)), n)):
        row, col = divmod(cell, 3)
        r = rng.uniform(*size_range) / 3
        lo = _MARGIN / 3 + r
        hi = (1 - _MARGIN) / 3 - r
        cx, cy = (col / 3 + rng.uniform(lo, hi)), (row / 3 + rng.uniform(lo, hi))
        shapes.append(Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), cell, cx, cy, r))
    rng.shuffle(shapes)
    noisy = rng.random() < noise
    level = rng.randint(225, 255)
    return Scene(tuple(shapes), Background(level, rng.uniform(6.0, 16.0) if noisy else 0.0))


def draw(scene: Scene, size: int = 224, rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene as an RGB image: noise (if any) on the background only, solid shapes without anti-aliasing
    (so every pixel of a shape has its palette colour exactly).

    Args:
        scene: what to draw.
        size: image side in pixels.
        rng: source of the background noise (default: seeded from nothing, i.e. not reproducible).
    """
    bg = scene.background
    if bg.noise > 0:
        rng = rng if rng is not None else np.random.default_rng()
        pixels = rng.standard_normal((size, size), dtype=np.float32) * bg.noise + bg.level
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
    else:
        image = Image.new("RGB", (size, size), (bg.level,) * 3)
    canvas = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = COLOURS[shape.colour]
        x0, y0, d = shape.box(size)
        x1, y1 = x0 + d - 1, y0 + d - 1
        if shape.kind == "circle":
            canvas.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape.kind == "square":
            canvas.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape.kind == "triangle":
            canvas.polygon(shape.polygon(size), fill=fill)
        else:
            (a, b), (c, e) = shape.cross_bars(size)
            canvas.rectangle([a, y0, b, y1], fill=fill)
            canvas.rectangle([x0, c, x1, e], fill=fill)
    return image


def article(word: str) -> str:
    """`a` or `an` for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: Shape) -> str:
    return f"{article(shape.colour)} {shape.colour} {shape.kind}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(n: int, noun: str) -> str:
    return f"{NUMBERS[n] if n < len(NUMBERS) else n} {noun}{'s' if n != 1 else ''}"


def describe(shapes: Sequence[Shape], count: int | None = None) -> str:
    """The caption "there are two shapes: a red circle at the top left and a blue square in the centre" (shapes in
    reading order): one of `captions`' templates, which zero-shot prompts vary one attribute of (`count` states
    another number of shapes than the list holds)."""
    reading = sorted(shapes, key=lambda s: s.cell)
    n = len(shapes) if count is None else count
    listed = _join([f"{_noun(s)} {s.place}" for s in reading])
    return f"there {'is' if n == 1 else 'are'} {_number(n, 'shape')}: {listed}"


CHANGES = {"colour": 1.0, "kind": 2.0, "place": 2.0, "fewer": 0.5, "more": 0.5}  # kind and place are the hardest


def counterfactual(
    shapes: Sequence[Shape], rng: random.Random, max_shapes: int = 3, weights: dict[str, float] = CHANGES
) -> list[Shape]:
    """The shapes with one thing changed (a colour, a kind, a place moved to a free cell, one shape fewer or one
    more, up to `max_shapes`; drawn with `weights`), so that `describe` of the result is untrue of the image yet
    reads like a true caption (contrastive hard negatives: telling it from the true one takes the image)."""
    free = [c for c in range(len(POSITIONS)) if c not in {s.cell for s in shapes}]
    allowed = {
        "colour": True,
        "kind": True,
        "place": bool(free),
        "fewer": len(shapes) > 1,
        "more": bool(free) and len(shapes) < max_shapes,
    }
    changes = [c for c in weights if allowed[c]]
    change, out = rng.choices(changes, [weights[c] for c in changes])[0], list(shapes)
    if change == "fewer":
        out.pop(rng.randrange(len(out)))
    elif change == "more":
        out.append(Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), rng.choice(free), 0.0, 0.0, 0.0))
    else:
        i = rng.randrange(len(out))
        old = out[i]
        if change == "colour":
            out[i] = replace(old, colour=rng.choice([c for c in COLOURS if c != old.colour]))
        elif change == "kind":
            out[i] = replace(old, kind=rng.choice([k for k in KINDS if k != old.kind]))
        else:
            out[i] = replace(old, cell=rng.choice(free))
    return out


def captions(scene: Scene, rng: random.Random, n: int = 4) -> list[str]:
    """`n` (at most 5) different true captions, e.g. "a red circle at the top left and a blue square in the centre"."""
    reading = sorted(scene.shapes, key=lambda s: s.cell)
    shuffled = rng.sample(scene.shapes, len(scene.shapes))
    count = _number(len(scene.shapes), "shape")
    bg = scene.background.name
    templates = [
        _join([f"{_noun(s)} {s.place}" for s in shuffled]),
        f"{count}: " + _join([_noun(s) for s in reading]),
        _join([_noun(s) for s in shuffled]) + f" on {article(bg)} {bg} background",
        describe(scene.shapes),
        f"{article(bg)} {bg} background with " + _join([f"{_noun(s)} {s.place}" for s in shuffled]),
    ]
    return rng.sample(templates, min(n, len(templates)))


_BY_LOOKS = ("kind", "colour", "both")  # the ways to single out a shape without naming its place


def _unique_refs(scene: Scene, shape: Shape, keys: tuple[str, ...]) -> list[str]:
    """Which of the attributes `keys` single out `shape` in its scene (`"only"`: it is the only shape)."""
    refs = ["only"] if len(scene.shapes) == 1 else []
    for key in keys:
        if key == "kind" and scene.count(kind=shape.kind) == 1:
            refs.append(key)
        elif key == "colour" and scene.count(colour=shape.colour) == 1:
            refs.append(key)
        elif key == "both" and scene.count(shape.colour, shape.kind) == 1:
            refs.append(key)
        elif key == "place":
            refs.append(key)
    return refs


def ask_colour(scene: Scene, index: int, rng: random.Random) -> Question:
    """Ask "What colour is the circle?" (by kind only when that kind occurs once, else by place)."""
    shape = scene.shapes[index]
    ref = rng.choice(_unique_refs(scene, shape, ("kind", "place")))
    noun = {"only": "shape", "kind": shape.kind, "place": f"shape {shape.place}"}[ref]
    text = rng.choice(("What colour is the {}?", "What is the colour of the {}?")).format(noun)
    return Question("colour", text, shape.colour, index)


def ask_kind(scene: Scene, index: int, rng: random.Random) -> Question:
    """Ask "What shape is the red object?" (by colour only when that colour occurs once, else by place)."""
    shape = scene.shapes[index]
    ref = rng.choice(_unique_refs(scene, shape, ("colour", "place")))
    noun = {"only": "object", "colour": f"{shape.colour} object", "place": f"object {shape.place}"}[ref]
    text = rng.choice(("What shape is the {}?", "What kind of shape is the {}?")).format(noun)
    return Question("kind", text, shape.kind, index)


def ask_position(scene: Scene, index: int, rng: random.Random) -> Question | None:
    """Ask "Where is the blue square?" (None when nothing but its place singles the shape out)."""
    shape = scene.shapes[index]
    refs = _unique_refs(scene, shape, _BY_LOOKS)
    if not refs:
        return None
    ref = rng.choice(refs)
    noun = {
        "only": "shape",
        "kind": shape.kind,
        "colour": f"{shape.colour} shape",
        "both": f"{shape.colour} {shape.kind}",
    }[ref]
    text = rng.choice(("Where is the {}?", "In which part of the image is the {}?")).format(noun)
    return Question("position", text, shape.position, index)


def ask_count(scene: Scene, rng: random.Random) -> Question:
    """Ask "How many shapes are there?"."""
    text = rng.choice(("How many shapes are there?", "How many shapes are in the image?"))
    return Question("count", text, NUMBERS[len(scene.shapes)])


def ask_yesno(scene: Scene, rng: random.Random, yes: bool) -> Question:
    """Ask "Is there a green triangle in the image?": about a present shape when `yes`, else about an absent colour
    and kind pair (half the time one that shares the colour or the kind of a present shape, the harder negative)."""
    template = rng.choice(("Is there {} in the image?", "Does the image contain {}?"))
    if yes:
        index = rng.randrange(len(scene.shapes))
        s = scene.shapes[index]
        return Question("yesno", template.format(f"{article(s.colour)} {s.colour} {s.kind}"), "yes", index)
    absent = [(c, k) for c in COLOURS for k in KINDS if scene.count(c, k) == 0]
    near = [(c, k) for c, k in absent if scene.count(colour=c) or scene.count(kind=k)]
    colour, kind = rng.choice(near if near and rng.random() < 0.5 else absent)
    return Question("yesno", template.format(f"{article(colour)} {colour} {kind}"), "no")


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """The questions asked about a scene: the colour of every shape, the kind and the position of one shape each
    (different shapes where possible), the count, and one yes and one no question (so yes/no is balanced)."""
    n = len(scene.shapes)
    order = rng.sample(range(n), n)
    out = [ask_colour(scene, i, rng) for i in order]
    out.append(ask_kind(scene, order[1 % n], rng))
    candidates = [i for i in order[2 % n :] + order[: 2 % n] if _unique_refs(scene, scene.shapes[i], _BY_LOOKS)]
    if candidates:
        out.append(ask_position(scene, candidates[0], rng))
    out.append(ask_count(scene, rng))
    out += [ask_yesno(scene, rng, yes=True), ask_yesno(scene, rng, yes=False)]
    return out


def conversations(qs: list[Question], rng: random.Random, n_conversations: int = 5) -> list[list[Question]]:
    """Group questions into conversations in which no two turns are about the same shape, so no answer can be read
    off an earlier turn (e.g. "What colour is the circle?" after "Is there a red circle?").

    A question goes to a uniformly random conversation (of `n_conversations`, or more if one shape has more questions;
    empty ones dropped) among those holding no other question about its shapes, and to a uniformly random turn in it.
    A "no" question is placed as if it were about a random shape, as its "yes" twin is, so where a yes/no question is
    asked tells nothing about its answer. (Filling the first conversation greedily put the questions about no shape
    in its late turns and left "yes" questions first, and a model learnt "a first question: yes".)
    """
    shape_ids = sorted({i for q in qs for i in q.referents})
    about = [q.referents or ({rng.choice(shape_ids)} if q.type == "yesno" else set()) for q in qs]
    per_shape = Counter(i for refs in about for i in refs)
    k = max([n_conversations, *per_shape.values()])
    groups: list[list[Question]] = [[] for _ in range(k)]
    taken: list[set[int]] = [set() for _ in range(k)]
    # questions about several shapes first: each shape has at most k questions, so every later one finds a place
    for j in sorted(range(len(qs)), key=lambda j: -len(about[j])):
        free = [g for g in range(k) if not about[j] & taken[g]] if about[j] else range(k)
        g = rng.choice(free)
        groups[g].append(qs[j])
        taken[g] |= about[j]
    for group in groups:
        rng.shuffle(group)
    return [group for group in groups if group]


def ask_presence(scene: Scene, pope: list[tuple[str, str]], rng: random.Random) -> Question:
    """One of the image's POPE-style `(kind, label)` pairs (`pope_pairs`: half of them "no") as a training question
    ("Is there a triangle in the image?") about every shape of that kind."""
    kind, label = rng.choice(pope)
    return Question(
        "yesno", presence_text(kind), label, about=tuple(i for i, s in enumerate(scene.shapes) if s.kind == kind)
    )


@dataclass(frozen=True)
class Example:
    """A scene, everything said about it, and the seed of its background noise (for `draw`). The conversations
    (training data) hold the questions, and one of the POPE-style questions in a conversation of its own."""

    scene: Scene
    captions: list[str]
    questions: list[Question]
    conversations: list[list[Question]]
    pope: list[tuple[str, str]]
    noise_seed: int


def make_example(seed: int, image_id: int, max_shapes: int = 3, noise: float = 0.5, n_captions: int = 4) -> Example:
    """The example of one image id: it depends only on `seed` and `image_id`, so images can be made in any order.

    Args:
        seed: dataset seed.
        image_id: the image's id.
        max_shapes: most shapes per image.
        noise: probability of a noisy background.
        n_captions: captions per image.
    """
    rng = random.Random(f"shapes_world/{seed}/{image_id}")
    scene = sample_scene(rng, max_shapes=max_shapes, noise=noise)
    noise_seed = rng.getrandbits(64)
    qs = questions(scene, rng)
    texts = captions(scene, rng, n_captions)
    rng.sample(qs, len(qs))  # the draw conversations were once grouped by: the POPE questions after it stay the same
    pope = pope_pairs(scene, rng)
    turn_rng = random.Random(f"shapes_world/{seed}/{image_id}/conversations")
    # a turn of its own, first as at evaluation (placed among other turns, "yes" would come first more often: a
    # kind drawn twice leaves fewer turns free of its shapes)
    turns = [*conversations(qs, turn_rng), [ask_presence(scene, pope, turn_rng)]]
    return Example(scene, texts, qs, turns, [(presence_text(kind), label) for kind, label in pope], noise_seed)


def llava_turns(turns: list[Question]) -> list[dict]:
    """A conversation in the LLaVA schema: `<image>` in the first question, short answers."""
    out = []
    for i, q in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.text})
        out.append({"from": "gpt", "value": q.answer})
    return out


def presence_text(kind: str) -> str:
    """POPE's question: "Is there a <kind> in the image?"."""
    return f"Is there {article(kind)} {kind} in the image?"


def pope_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """POPE-style `(kind, "yes"|"no")` pairs: as many absent kinds as present ones (the smaller number of both), so
    every image is balanced."""
    present = sorted({s.kind for s in scene.shapes}, key=KINDS.index)
    absent = [k for k in KINDS if k not in present]
    k = min(len(present), len(absent))
    pairs = [(kind, "yes") for kind in rng.sample(present, k)] + [(kind, "no") for kind in rng.sample(absent, k)]
    rng.shuffle(pairs)
    return pairs
