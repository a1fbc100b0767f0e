"""The shapes world (scripts/prepare_shapes.py): reproducible, every caption and answer true of the pixels, every
question unambiguous, and readable unchanged by scripts/prepare_coco.py and scripts/prepare_llava_instruct.py.

Truth is checked against the images themselves: `read_image` finds the shapes from the pixels alone (colour by
palette, kind by fill ratio and centroid, cell by location) and `answer` re-answers each question from that.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import litgpt_mm.data.prepare_coco
import litgpt_mm.data.prepare_llava_instruct
import litgpt_mm.data.prepare_shapes
from litgpt_mm.data import shapes

POPE_SHA256 = "74970a63b08e927beaff260e9bef26c6d39c6bd1d341e06ded496234f7369898"  # ids 1-100 of seed 42, as ever
N = {"train": 40, "val": 10, "test": 20}
DIRS = {"train": "train2017", "val": "val2017", "test": "test"}
PALETTE = np.array(list(shapes.COLOURS.values()), dtype=float)
PLACES_LONGEST_FIRST = sorted(shapes.PLACES, key=len, reverse=True)


@pytest.fixture(scope="module")
def script():
    return litgpt_mm.data.prepare_shapes


def make(script, out: Path, seed: int = 7, **kwargs) -> Path:
    script.prepare(out_dir=out, n_train=N["train"], n_val=N["val"], n_test=N["test"], seed=seed, **kwargs)
    return out


@pytest.fixture(scope="module")
def world(script, tmp_path_factory) -> Path:
    return make(script, tmp_path_factory.mktemp("shapes") / "world")


def load(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def read_image(path: Path) -> tuple[list[dict], bool]:
    """The shapes drawn in an image, found from its pixels alone, and whether its background is noisy."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    size = px.shape[0]
    dist = np.linalg.norm(px[:, :, None, :] - PALETTE[None, None], axis=-1)
    nearest, ink = dist.argmin(-1), dist.min(-1) < 40
    edges = [round(k * size / 3) for k in (1, 2)]
    assert not ink[edges, :].any() and not ink[:, edges].any(), f"{path.name}: a shape crosses a cell border"
    found = []
    for cell in range(9):
        row, col = divmod(cell, 3)
        ys = slice(round(row * size / 3), round((row + 1) * size / 3))
        xs = slice(round(col * size / 3), round((col + 1) * size / 3))
        mask = ink[ys, xs]
        if mask.sum() < 30:
            assert mask.sum() == 0, f"{path.name}: stray coloured pixels in cell {cell}"
            continue
        colours = np.unique(nearest[ys, xs][mask])
        assert len(colours) == 1, f"{path.name}: cell {cell} holds several colours"
        yy, xx = np.nonzero(mask)
        w, h = int(xx.max() - xx.min() + 1), int(yy.max() - yy.min() + 1)
        fill = mask.sum() / (w * h)
        drop = (yy.mean() - (yy.min() + yy.max()) / 2) / h  # a triangle's centroid sits below its box's centre
        kind = "triangle" if drop > 0.08 else "square" if fill > 0.92 else "circle" if fill > 0.71 else "cross"
        found.append(
            {
                "colour": list(shapes.COLOURS)[colours[0]],
                "kind": kind,
                "position": shapes.POSITIONS[cell],
                "bbox": [xs.start + int(xx.min()), ys.start + int(yy.min()), w, h],
            }
        )
    background = px[~ink]
    return found, bool(background.std() > 2)


@pytest.fixture(scope="module")
def seen(world) -> dict[str, tuple[list[dict], bool]]:
    """`read_image` of every image, keyed by its path relative to the world."""
    return {f"{d}/{p.name}": read_image(p) for d in DIRS.values() for p in sorted((world / d).iterdir())}


WORDING = {
    "What colour": "colour",
    "What is the colour": "colour",
    "What shape": "kind",
    "What kind of shape": "kind",
    "Where": "position",
    "In which part": "position",
    "How many": "count",
    "Is there": "yesno",
    "Does the image contain": "yesno",
}


def question_type(text: str) -> str:
    kinds = [kind for prefix, kind in WORDING.items() if text.startswith(prefix)]
    assert len(kinds) == 1, f"unknown question wording: {text!r}"
    return kinds[0]


def referents(text: str, scene: list[dict]) -> list[int]:
    """Indices of the shapes that match every colour, kind and place the text names."""
    colours = [c for c in shapes.COLOURS if re.search(rf"\b{c}\b", text)]
    kinds = [k for k in shapes.KINDS if re.search(rf"\b{k}\b", text)]
    place = next((p for p in PLACES_LONGEST_FIRST if text.rstrip("?").endswith(p)), None)
    return [
        i
        for i, s in enumerate(scene)
        if all(s["colour"] == c for c in colours)
        and all(s["kind"] == k for k in kinds)
        and (place is None or shapes.PLACES[shapes.POSITIONS.index(s["position"])] == place)
    ]


def answer(text: str, scene: list[dict]) -> tuple[str, set[int]]:
    """The true answer to a question about a scene read from pixels, and the shapes it is about. Fails if the
    question names the attribute it asks for or does not single out one shape."""
    qtype, refs = question_type(text), referents(text, scene)
    if qtype == "count":
        return shapes.NUMBERS[len(scene)], set()
    if qtype == "yesno":
        return ("yes" if refs else "no"), set(refs)
    asked = {"colour": shapes.COLOURS, "kind": shapes.KINDS, "position": shapes.PLACES}[qtype]
    assert not any(re.search(rf"\b{w}\b", text) for w in asked), f"{text!r} gives its answer away"
    assert len(refs) == 1, f"{text!r} is ambiguous or wrong: matches {len(refs)} shapes of {scene}"
    return scene[refs[0]][qtype], set(refs)


def test_same_seed_same_world_other_seed_other_world(script, world, tmp_path):
    again = make(script, tmp_path / "again")
    other = make(script, tmp_path / "other", seed=8)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    differ = 0
    for rel in files:
        if rel.suffix in (".json", ".jsonl"):
            assert (world / rel).read_bytes() == (again / rel).read_bytes(), rel
            differ += rel.name != "summary.json" and (world / rel).read_bytes() != (other / rel).read_bytes()
        else:
            a, b, c = (np.asarray(Image.open(root / rel)) for root in (world, again, other))
            assert np.array_equal(a, b), rel
            differ += not np.array_equal(a, c)
    annotation_files = sum(rel.suffix in (".json", ".jsonl") and rel.name != "summary.json" for rel in files)
    assert differ == annotation_files + sum(N.values())  # every annotation file and every image changes


def test_layout_counts_and_ids(world):
    ids = []
    summary = load(world / "summary.json")
    for split, directory in DIRS.items():
        files = sorted((world / directory).iterdir())
        assert len(files) == N[split] and all(re.fullmatch(r"\d{12}\.png", f.name) for f in files)
        captions = load(world / "annotations" / f"captions_{directory}.json")
        instances = load(world / "annotations" / f"instances_{directory}.json")
        assert captions["images"] == instances["images"]
        assert [img["file_name"] for img in captions["images"]] == [f.name for f in files]
        assert all(int(img["file_name"][:12]) == img["id"] for img in captions["images"])
        ids += [img["id"] for img in captions["images"]]
        with Image.open(files[0]) as img:
            assert img.size == (224, 224) and img.mode == "RGB"
        per_image = Counter(a["image_id"] for a in captions["annotations"])
        assert set(per_image) == {img["id"] for img in captions["images"]} and set(per_image.values()) == {4}
        assert len({a["caption"] for a in captions["annotations"]}) > 3 * N[split]  # varied captions
        assert [c["name"] for c in instances["categories"]] == list(shapes.KINDS)
        assert {c["supercategory"] for c in instances["categories"]} == {"shape"}
        for a in instances["annotations"]:
            assert a["iscrowd"] == 0 and a["area"] > 0 and a["category_id"] in range(1, 5) and len(a["bbox"]) == 4
        stats = summary["splits"][split]
        assert stats["images"] == N[split] and stats["captions"] == 4 * N[split]
        assert stats["shapes"] == len(instances["annotations"])
        if split != "test":
            rows = load(world / f"llava_{split}.json")
            assert stats["llava_rows"] == len(rows) and {r["image"] for r in rows} == {f.name for f in files}
        if split != "train":
            vqa = load(world / "eval" / f"vqa_{split}.jsonl")
            assert stats["questions"] == dict(Counter(r["type"] for r in vqa))
    assert len(ids) == len(set(ids)) == sum(N.values())
    assert summary["seed"] == 7 and summary["size"] == 224 and summary["colours"]["red"] == list(shapes.COLOURS["red"])
    assert 0 < sum(s["noisy_images"] for s in summary["splits"].values()) < sum(N.values())


def test_instances_match_the_pixels(world, seen):
    for directory in DIRS.values():
        instances = load(world / "annotations" / f"instances_{directory}.json")
        names = {c["id"]: c["name"] for c in instances["categories"]}
        by_image = {img["id"]: [] for img in instances["images"]}
        for a in instances["annotations"]:
            by_image[a["image_id"]].append(a)
        for img in instances["images"]:
            found, _ = seen[f"{directory}/{img['file_name']}"]
            assert len(found) == len(by_image[img["id"]]) and 1 <= len(found) <= 3
            for a in by_image[img["id"]]:
                match = [s for s in found if np.abs(np.subtract(s["bbox"], a["bbox"])).max() <= 1]
                assert len(match) == 1, (img["file_name"], a, found)
                assert (match[0]["colour"], match[0]["kind"]) == (a["colour"], names[a["category_id"]])


def test_single_shape_plain_images_centre_pixel_and_cell(world, seen):
    """The stated colour is the pixel at the shape's centre; the bbox lies in the stated grid cell."""
    checked = 0
    for split in ("val", "test"):
        for row in load(world / "eval" / f"vqa_{split}.jsonl"):
            found, noisy = seen[row["image"]]
            if len(found) != 1 or noisy or row["type"] not in ("colour", "position"):
                continue
            instance = found[0]
            x, y, w, h = instance["bbox"]
            if row["type"] == "colour":
                with Image.open(world / row["image"]) as img:
                    pixel = img.getpixel((x + w // 2, y + h // 2))
                assert np.abs(np.subtract(pixel, shapes.COLOURS[row["answers"][0]])).max() <= 8
                checked += 1
            else:
                r, c = divmod(shapes.POSITIONS.index(row["answers"][0]), 3)
                assert (
                    224 * c / 3 <= x and x + w <= 224 * (c + 1) / 3 and 224 * r / 3 <= y and y + h <= 224 * (r + 1) / 3
                )
    assert checked >= 2


def test_every_answer_is_true_and_every_question_unambiguous(world, seen):
    choices = shapes.answer_choices(3)
    for split in ("val", "test"):
        rows = load(world / "eval" / f"vqa_{split}.jsonl")
        assert {r["type"] for r in rows} == set(shapes.QUESTION_TYPES)
        for r in rows:
            assert question_type(r["question"]) == r["type"] and r["choices"] == choices[r["type"]]
            assert r["answers"][0] in r["choices"]
            assert r["answers"] == [answer(r["question"], seen[r["image"]][0])[0]], r
        yesno = Counter(r["answers"][0] for r in rows if r["type"] == "yesno")
        assert yesno["yes"] == yesno["no"] > 0
    for split in ("train", "val"):
        rows = load(world / f"llava_{split}.json")
        types = Counter()
        for row in rows:
            scene = seen[f"{DIRS[split]}/{row['image']}"][0]
            conv = row["conversations"]
            assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
            about: set[int] = set()
            for q, a in zip(conv[::2], conv[1::2], strict=True):
                assert (q["from"], a["from"]) == ("human", "gpt")
                truth, refs = answer(q["value"].removeprefix("<image>\n"), scene)
                assert a["value"] == truth, (row["id"], q["value"], a["value"], scene)
                assert not refs & about, f"{row['id']}: two turns about the same shape (the answer leaks)"
                about |= refs
                types[question_type(q["value"].removeprefix("<image>\n"))] += 1
        # the headline question: at least one per image (one per shape), a fifth of all turns or more
        assert types["colour"] >= N[split] and types["colour"] >= 0.2 * sum(types.values())
        assert types["yesno"] == 3 * N[split]  # one "yes", one "no" and one POPE-style question per image


def test_captions_are_true(world, seen):
    pattern = re.compile(
        rf"\b({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.KINDS)})(?: ({'|'.join(PLACES_LONGEST_FIRST)}))?"
    )
    for directory in DIRS.values():
        captions = load(world / "annotations" / f"captions_{directory}.json")
        files = {img["id"]: img["file_name"] for img in captions["images"]}
        for a in captions["annotations"]:
            found, noisy = seen[f"{directory}/{files[a['image_id']]}"]
            text = a["caption"]
            mentioned = pattern.findall(text)
            assert Counter((c, k) for c, k, _ in mentioned) == Counter((s["colour"], s["kind"]) for s in found), text
            for c, k, place in mentioned:
                if place:
                    assert any(
                        (s["colour"], s["kind"], shapes.PLACES[shapes.POSITIONS.index(s["position"])]) == (c, k, place)
                        for s in found
                    ), text
            number = re.search(r"\b(one|two|three) shapes?\b", text)
            assert number is None or number.group(1) == shapes.NUMBERS[len(found)], text
            if "background" in text:
                assert ("noisy" in text) == noisy, text


def test_pope_is_balanced_and_matches_instances(world):
    for split in ("val", "test"):
        instances = load(world / "annotations" / f"instances_{DIRS[split]}.json")
        names = {c["id"]: c["name"] for c in instances["categories"]}
        files = {img["id"]: f"{DIRS[split]}/{img['file_name']}" for img in instances["images"]}
        kinds = {f: set() for f in files.values()}
        for a in instances["annotations"]:
            kinds[files[a["image_id"]]].add(names[a["category_id"]])
        rows = load(world / "eval" / f"pope_{split}.jsonl")
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert {r["image"] for r in rows} == set(files.values())
        labels = Counter(r["label"] for r in rows)
        assert labels["yes"] == labels["no"] >= N[split] and set(labels) == {"yes", "no"}
        for r in rows:
            kind = re.fullmatch(r"Is there an? (\w+) in the image\?", r["text"]).group(1)
            assert r["label"] == ("yes" if kind in kinds[r["image"]] else "no"), r


def test_prepare_coco_reads_the_world_unchanged(world, tmp_path):
    summary = litgpt_mm.data.prepare_coco.prepare(
        source_dir=world, out_dir=tmp_path / "coco", features=False, subset=None, val_subset=None
    )
    assert summary.skipped == [] and summary.images == {"train": N["train"], "val": N["val"]}
    assert summary.captions == {"train": 4 * N["train"], "val": 4 * N["val"]}
    first = json.loads((tmp_path / "coco" / "train.jsonl").read_text().splitlines()[0])
    assert first["file"] == "train2017/000000000001.png" and len(first["captions"]) == 4


def test_prepare_llava_reads_the_world_unchanged(world, prepared_gutenberg, tmp_path):
    rows = load(world / "llava_train.json")
    summary = litgpt_mm.data.prepare_llava_instruct.prepare(
        tokenizer_dir=prepared_gutenberg / "tokenizer",
        data_path=world / "llava_train.json",
        images_dir=world / "train2017",
        subset_images=None,
        out_dir=tmp_path / "llava",
    )
    assert summary["skipped"] == [] and summary.get("images_mapped", 0) == 0
    assert summary["train_samples"] + summary["val_samples"] == len(rows)
    turns = sum(len(r["conversations"]) // 2 for r in rows)
    samples = [json.loads(line) for s in ("train", "val") for line in (tmp_path / "llava" / f"{s}.jsonl").open()]
    assert (
        sum(1 for s in samples for a, b in zip(s["labels"], s["labels"][1:], strict=False) if a == -100 and b != -100)
        == turns
    )
    assert summary["train_truncated_samples"] == summary["train_answer_tokens_cut"] == 0
    # cut where every sample keeps its first answer: the longer ones lose later answers, counted
    cut = max(_first_answer_end(s["labels"]) for s in samples)
    assert any(len(s["ids"]) > cut for s in samples[: summary["train_samples"]])
    short = litgpt_mm.data.prepare_llava_instruct.prepare(
        tokenizer_dir=prepared_gutenberg / "tokenizer",
        data_path=world / "llava_train.json",
        images_dir=world / "train2017",
        subset_images=None,
        max_tokens=cut,
        out_dir=tmp_path / "llava_short",
    )
    assert short["skipped"] == [] and short["train_truncated_samples"] > 0
    assert short["train_answer_tokens"] + short["train_answer_tokens_cut"] == summary["train_answer_tokens"]


def _first_answer_end(labels: list[int]) -> int:
    """The length of a sample up to the end of its first answer."""
    start = next(i for i, label in enumerate(labels) if label != -100)
    return next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))


def test_where_a_question_is_asked_tells_nothing_of_its_answer():
    first, index, n = Counter(), Counter(), Counter()
    for image_id in range(1, 3001):
        for turns in shapes.make_example(42, image_id).conversations:
            for i, q in enumerate(turns):
                if q.type == "yesno":
                    n[q.answer] += 1
                    first[q.answer] += i == 0
                    index[q.answer] += i
    # per image one "yes" and one "no" question, and one POPE-style question, "yes" or "no" at random
    assert n.total() == 3 * 3000 and abs(n["yes"] - n["no"]) / n.total() < 0.05, n
    assert abs(first["yes"] / n["yes"] - first["no"] / n["no"]) < 0.04, (first, n)
    assert abs(index["yes"] / n["yes"] - index["no"] / n["no"]) < 0.06, (index, n)


def test_each_training_image_asks_one_pope_style_question():
    labels = Counter()
    for image_id in range(1, 501):
        example = shapes.make_example(42, image_id)
        asked = [q for turns in example.conversations for q in turns if q not in example.questions]
        assert len(asked) == 1 and (asked[0].text, asked[0].answer) in example.pope, asked
        kind = next(k for k in shapes.KINDS if k in asked[0].text)
        assert asked[0].referents == {i for i, s in enumerate(example.scene.shapes) if s.kind == kind}
        labels[asked[0].answer] += 1
    assert abs(labels["yes"] - labels["no"]) < 60, labels


def test_the_conversations_leave_the_evaluation_questions_as_they_were():
    pope = [shapes.make_example(42, image_id).pope for image_id in range(1, 101)]
    assert hashlib.sha256(json.dumps(pope).encode()).hexdigest() == POPE_SHA256


def test_rerun_replaces_the_world_and_failures_keep_it(script, tmp_path, monkeypatch):
    out = tmp_path / "world"
    script.prepare(out_dir=out, n_train=5, n_val=2, n_test=2)
    script.prepare(out_dir=out, n_train=3, n_val=1, n_test=1, image_format="jpg")
    assert sorted(p.name for p in (out / "train2017").iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temporary directories left
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    calls, draw = [], shapes.draw

    def broken_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return draw(*args, **kwargs)

    monkeypatch.setattr(script.shapes, "draw", broken_draw)
    with pytest.raises(RuntimeError, match="disk full"):
        script.prepare(out_dir=out, n_train=5, n_val=2, n_test=2)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]

    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="not a shapes world"):
        script.prepare(out_dir=other, n_train=2, n_val=1, n_test=1)
    assert (other / "keep.txt").read_text() == "precious"
