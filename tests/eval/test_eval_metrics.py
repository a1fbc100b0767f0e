import json
import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from litgpt_mm.eval.captions import caption_scores, read_coco_references, tokenize
from litgpt_mm.eval.metrics import (
    Result,
    bootstrap_ci,
    corpus_wer,
    format_results,
    mean_ci,
    normalize_text,
    word_error_rate,
)
from litgpt_mm.eval.pope import (
    build_pope,
    normalize_answer,
    normalize_answers,
    pope_f1,
    pope_metrics,
    read_pope,
)
from litgpt_mm.eval.vqa import (
    CONTRACTIONS,
    exact_match,
    multiple_choice_match,
    normalize_vqa_answer,
    parse_choice,
    parse_choices,
    read_answers,
    read_vqa,
    vqa_accuracy,
)

INSTANCES = DATA / "coco" / "annotations" / "instances_val2017_sample.json"
CAPTIONS = DATA / "coco" / "annotations" / "captions_val2017_sample.json"
POPE_FILES = sorted((DATA / "pope").glob("coco_pope_*_first30.jsonl"))
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# --- POPE -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("", "yes"),  # empty counts as yes, as in the reference
        ("Yes, there is a dog in the image.", "yes"),
        ("no", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("NO", "yes"),  # the reference rule is case-sensitive
        ("Not really", "yes"),
    ],
)
def test_normalize_answer_reference_rule(answer, expected):
    assert normalize_answer(answer) == expected


def test_normalize_answers_flags_empty_and_unclear():
    labels, flags = normalize_answers(["Yes", "  ", "There is a cat.", "no.", "No, there is not."])
    assert labels == ["yes", "yes", "yes", "no", "no"]
    assert flags == {"empty": [1], "not_yes_no": [2]}


def test_pope_metrics_hand_computed():
    # tp=4, fp=1, tn=3, fn=2
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes"] * 4 + ["no"] * 2 + ["yes"] + ["no"] * 3
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (4, 1, 3, 2, 10)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_always_yes_and_never_yes():
    labels = ["yes", "no"] * 50
    m = pope_metrics(["yes"] * 100, labels)
    assert m["f1"] == 2 / 3 and m["precision"] == 0.5 and m["recall"] == 1.0 and m["yes_ratio"] == 1.0
    m = pope_metrics(["no"] * 100, labels)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


def test_pope_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match=r"predictions\[1\] is 'Yes'.*normalize_answer"):
        pope_metrics(["yes", "Yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])


@pytest.mark.parametrize("path", POPE_FILES, ids=lambda p: p.name)
def test_read_pope_official_files(path):
    questions = read_pope(path)
    assert len(questions) == 30
    assert sum(q.label == "yes" for q in questions) == 15
    assert [q.question_id for q in questions] == list(range(1, 31))
    assert len({q.image for q in questions}) == 5
    assert all(q.image.startswith("COCO_val2014_") and q.text.startswith("Is there a") for q in questions)
    assert questions[0].image == "COCO_val2014_000000310196.jpg" and questions[0].label == "yes"


def test_read_pope_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_pope(tmp_path / "missing.jsonl")
    good = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}
    path = write_lines(tmp_path / "bad.jsonl", [good, "", "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_pope(path)
    path = write_lines(tmp_path / "nolabel.jsonl", [good, {k: v for k, v in good.items() if k != "label"}])
    with pytest.raises(ValueError, match=r"nolabel\.jsonl:2: missing field 'label'"):
        read_pope(path)
    path = write_lines(tmp_path / "maybe.jsonl", [{**good, "label": "maybe"}])
    with pytest.raises(ValueError, match=r"maybe\.jsonl:1: field 'label' is 'maybe'"):
        read_pope(path)
    path = write_lines(tmp_path / "dup.jsonl", [good, good])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: question_id 1 already used on line 1"):
        read_pope(path)


def coco_objects(path: Path) -> tuple[dict[str, set[str]], Counter, dict[str, Counter]]:
    """Objects per image file, image frequency and co-occurrence of category names, computed independently."""
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {img["id"]: img["file_name"] for img in data["images"]}
    objects = defaultdict(set)
    for ann in data["annotations"]:
        objects[files[ann["image_id"]]].add(names[ann["category_id"]])
    frequency = Counter(o for objs in objects.values() for o in objs)
    co = defaultdict(Counter)
    for objs in objects.values():
        for a in objs:
            co[a].update(objs - {a})
    return objects, frequency, co


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_build_pope_strategies(strategy):
    objects, frequency, co = coco_objects(INSTANCES)
    questions = build_pope(INSTANCES, strategy, n_per_image=3, seed=0)
    assert questions == build_pope(INSTANCES, strategy, n_per_image=3, seed=0)
    assert [q.question_id for q in questions] == list(range(1, len(questions) + 1))
    assert [q.label for q in questions] == ["yes", "no"] * (len(questions) // 2)
    assert len(questions) == 2 * sum(min(3, len(o)) for o in objects.values())
    assert all(q.category == strategy for q in questions)
    by_image = defaultdict(list)
    for q in questions:
        by_image[q.image].append(q)
        article = "an" if q.object_name[0] in "aeiou" else "a"
        assert q.text == f"Is there {article} {q.object_name} in the image?"
    assert set(by_image) == set(objects)
    for image, qs in by_image.items():
        present = objects[image]
        positives = [q.object_name for q in qs if q.label == "yes"]
        negatives = [q.object_name for q in qs if q.label == "no"]
        assert set(positives) <= present and len(set(positives)) == len(positives) == min(3, len(present))
        assert not set(negatives) & present and len(set(negatives)) == len(negatives) == len(positives)
        if strategy == "popular":
            absent = sorted((o for o in frequency if o not in present), key=lambda o: -frequency[o])
            # the negatives are the most frequent absent categories (ties may be broken either way)
            assert sorted(frequency[o] for o in negatives) == sorted(frequency[o] for o in absent[: len(negatives)])
        if strategy == "adversarial":
            asked = set(present)
            for pos, neg in zip(positives, negatives, strict=True):
                candidates = {o: n for o, n in co[pos].items() if o not in asked}
                if candidates:  # the negative co-occurs with its positive as often as any absent candidate
                    assert co[pos][neg] == max(candidates.values()) > 0
                asked.add(neg)


def test_build_pope_seed_prefix_and_subset():
    a = build_pope(INSTANCES, "random", seed=0)
    b = build_pope(INSTANCES, "random", seed=1)
    assert [q.object_name for q in a] != [q.object_name for q in b]
    sub = build_pope(INSTANCES, "popular", image_ids=[377575, 397133], image_prefix="val2017/")
    assert [q.image for q in sub] == ["val2017/000000377575.jpg"] * 4 + ["val2017/000000397133.jpg"] * 6
    # frequencies over the two selected images are all 1, so ties go to the lowest category ids: person, bottle
    assert [q.object_name for q in sub[1:4:2]] == ["person", "bottle"]
    with pytest.raises(ValueError, match=r"image ids \[42\] are not in the file"):
        build_pope(INSTANCES, "random", image_ids=[42])
    with pytest.raises(ValueError, match="strategy must be one of"):
        build_pope(INSTANCES, "hard")


def test_build_pope_skips_images_without_objects_and_bad_files(tmp_path, caplog):
    data = json.loads(INSTANCES.read_text())
    data["images"].append({"id": 1, "file_name": "empty.jpg"})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="litgpt_mm.eval.pope"):
        questions = build_pope(path, "random")
    assert "skipped 1 of 9 images with no object" in caplog.text
    assert "empty.jpg" not in {q.image for q in questions}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_pope(tmp_path / "nope.json", "random")
    del data["annotations"][5]["category_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances\.json: annotations\[5\] \(id \d+\) lacks 'image_id' or 'cat"):
        build_pope(path, "random")
    del data["categories"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances\.json: not a COCO instances file"):
        build_pope(path, "random")


# --- VQA ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("dont", "don't"),
        ("yes.", "yes"),
        ("Two dogs.", "2 dogs"),
        ("The man's hat", "man's hat"),
        ("3.5", "3.5"),
        ("10,000", "10000"),
        ("T-shirt", "t shirt"),
        ("red, white", "red white"),
        ("none", "0"),
        ("  an apple\n", "apple"),
        ("isnt it", "isn't it"),
    ],
)
def test_normalize_vqa_answer_official_examples(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_contractions_table_is_complete():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["somebody'd"] == "somebodyd"


def test_vqa_accuracy_official_formula():
    ten = lambda k: ["two"] * k + ["three"] * (10 - k)
    # leave-one-out mean of min(matches / 3, 1)
    assert vqa_accuracy("2", ten(0)) == 0.0
    assert vqa_accuracy("2", ten(1)) == pytest.approx(0.3)
    assert vqa_accuracy("2", ten(2)) == pytest.approx(0.6)
    assert vqa_accuracy("2", ten(3)) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", ten(4)) == 1.0
    assert vqa_accuracy("a Dog", ["dog"]) == 1.0 and vqa_accuracy("cat", ["dog"]) == 0.0
    assert exact_match("The dog.", ["cat", "dog"]) == 1.0 and exact_match("dogs", "dog") == 0.0
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_accuracy("dog", [])


def test_multiple_choice():
    choices = ["West Virginia", "Louisiana", "Arizona", "Oklahoma"]
    assert parse_choice("B", choices) == "B"
    assert parse_choice("B. Louisiana", choices) == "B"
    assert parse_choice("(C) Arizona", choices) == "C"
    assert parse_choice("The answer is D.", choices) == "D"
    assert parse_choice("louisiana", choices) == "B"
    assert parse_choice("A dog", choices) is None
    assert parse_choice("E", choices) is None
    assert multiple_choice_match("B.", choices, "B") == 1.0
    assert multiple_choice_match("A", choices, 1) == 0.0
    assert multiple_choice_match("Arizona", choices, "The answer is C.") == 1.0
    with pytest.raises(ValueError, match="names none of the options"):
        multiple_choice_match("A", choices, "Texas")


def test_read_vqa_generic_and_spellings(tmp_path):
    rows = [
        {"id": 1, "image": "a.jpg", "question": "What is it?", "answers": ["dog", "dog", "puppy"]},
        {"question_id": "q2", "image": "b.jpg", "text": "How many?", "answer": "2", "type": "count"},
    ]
    items = read_vqa(write_lines(tmp_path / "vqa.jsonl", rows), images_root="/imgs")
    assert items[0].answers == ["dog", "dog", "puppy"] and items[0].image == "/imgs/a.jpg"
    assert (items[1].id, items[1].question, items[1].answers, items[1].type) == ("q2", "How many?", ["2"], "count")


def test_read_vqa_llava_questions_with_answers_file(tmp_path):
    questions = [
        {"question_id": "201307251", "image": "n435808.jpg", "text": "Is it overcast?", "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing a dress?", "category": "default"},
    ]
    qpath = write_lines(tmp_path / "llava_gqa.jsonl", questions)
    gqa = {"201307251": {"answer": "no", "fullAnswer": "No, it is clear."}, "201640614": {"answer": "woman"}}
    apath = tmp_path / "testdev_questions.json"
    apath.write_text(json.dumps(gqa, indent=2))
    items = read_vqa(qpath, answers_path=apath)
    assert [(i.id, i.answers, i.type) for i in items] == [
        ("201307251", ["no"], "default"),
        ("201640614", ["woman"], "default"),
    ]
    jl = write_lines(tmp_path / "answers.jsonl", [{"question_id": 201307251, "answer": "no"}])
    assert read_answers(jl) == {"201307251": ["no"]}
    with pytest.raises(ValueError, match=r"llava_gqa\.jsonl:2 \(id '201640614'\): question '201640614' is not in"):
        read_vqa(qpath, answers_path=jl)
    with pytest.raises(ValueError, match=r"llava_gqa\.jsonl:1 \(id '201307251'\): missing field 'answers'.*answers_p"):
        read_vqa(qpath)


def test_read_vqa_scienceqa_layout(tmp_path, caplog):
    rows = [
        {
            "id": "4",
            "image": "4/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nContext: N/A\nWhich is north?\nA. West Virginia\nB. Louisiana"},
                {"from": "gpt", "value": "A"},
            ],
        },
        {
            "id": "5",
            "conversations": [
                {"from": "human", "value": "Which word comes first?\nA. hid\nB. bat\nC. cup"},
                {"from": "gpt", "value": "B"},
            ],
        },
    ]
    path = tmp_path / "llava_test_CQM-I.json"
    path.write_text(json.dumps(rows, indent=2))
    with caplog.at_level(logging.WARNING, logger="litgpt_mm.eval.vqa"):
        items = read_vqa(path)
    assert "1 of 2 questions" in caplog.text
    assert items[0].question.startswith("Context: N/A") and items[0].choices == ["West Virginia", "Louisiana"]
    assert items[0].answers == ["A"] and items[0].has_image and not items[1].has_image
    assert multiple_choice_match("bat", items[1].choices, items[1].answers[0]) == 1.0
    assert parse_choices("Question: Which?\nOptions: (A) red (B) blue\n") == ["red", "blue"]
    rows[1]["conversations"] = [{"from": "human", "value": "Q"}]
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"CQM-I\.json: row 1 \(id '5'\): field 'conversations' must be"):
        read_vqa(path)


def test_read_vqa_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_vqa(tmp_path / "nope.jsonl")
    ok = {"id": 1, "image": "a.jpg", "question": "Q?", "answers": ["a"]}
    path = write_lines(tmp_path / "bad.jsonl", [ok, {"id": 2, "image": "b.jpg", "answers": ["b"]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 \(id 2\): missing field 'question' \(or 'text'\)"):
        read_vqa(path)
    path = write_lines(tmp_path / "broken.jsonl", [ok, ok, "{oops"])
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        read_vqa(path)
    path = write_lines(tmp_path / "dup.jsonl", [ok, {**ok, "answers": []}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2 \(id 1\): expected an answer string or a non-empty list"):
        read_vqa(path)
    path = write_lines(tmp_path / "dup2.jsonl", [ok, ok])
    with pytest.raises(ValueError, match=r"dup2\.jsonl:2 \(id 1\): id 1 already used at .*dup2\.jsonl:1"):
        read_vqa(path)
    path = tmp_path / "list.json"
    path.write_text(json.dumps([ok, {"image": "x.jpg"}]))
    with pytest.raises(ValueError, match=r"list\.json: row 1: missing field 'id' \(or 'question_id'\)"):
        read_vqa(path)


# --- captions -------------------------------------------------------------------------------------------------------

TOY_REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean."],
    2: ["Two dogs playing with a frisbee in the park.", "A couple of dogs run across the grass."],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice and vegetables."],
}
TOY_PREDS = {1: "A man is surfing on a wave.", 2: "Two dogs play in the grass.", 3: "A plate with rice, broccoli."}


PTB_CASES = {
    # pycocoevalcap lowercases, so "-LRB-" comes out as "-lrb-" and is not in its removal list
    "A man's \"black-and-white\" dog (left), isn't it... 3.5 m?": (
        "a man 's black-and-white dog -lrb- left -rrb- is n't it 3.5 m"
    ),
    "Dogs' toys -- $5 & 50%!": "dogs toys $ 5 & 50 %",
    "Mr. Smith in the U.S. at 5 a.m., plan b. the end.": "mr. smith in the u.s. at 5 a.m. plan b. the end",
    "I cannot see the no. 5 bus; it's gone.": "i can not see the no. 5 bus it 's gone",
    "<image> 1,000 cats at 10:30 and/or '90s": "<image> 1,000 cats at 10:30 and/or '90s",
}


def test_tokenize_like_ptb():
    for text, expected in PTB_CASES.items():
        assert tokenize(text) == expected


def test_caption_scores_match_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores = caption_scores(TOY_PREDS, TOY_REFS, use_java=False)
    gts = {k: [tokenize(r) for r in v] for k, v in TOY_REFS.items()}
    res = {k: [tokenize(TOY_PREDS[k])] for k in TOY_REFS}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)
    for n in range(4):
        assert scores[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-9)
    assert scores["ROUGE_L"] == pytest.approx(rouge, abs=1e-9)
    assert scores["CIDEr"] == pytest.approx(cider, abs=1e-9)
    assert list(scores["per_image"]["CIDEr"].values()) == pytest.approx(list(cider_per_image), abs=1e-9)
    assert np.mean(list(scores["per_image"]["CIDEr"].values())) == pytest.approx(scores["CIDEr"])
    assert scores["n_images"] == 3 and scores["tokenizer"] == "python" and "Karpathy" in scores["note"]
    assert "METEOR" not in scores and 0 < scores["Bleu_4"] < scores["Bleu_1"] < 1


def test_caption_scores_identical_captions():
    refs = {k: [v[0]] for k, v in TOY_REFS.items()}
    scores = caption_scores({str(k): v[0] for k, v in refs.items()}, refs, use_java=False)
    # pycocoevalcap's BLEU smooths each precision as (matches + 1e-15) / (ngrams + 1e-9): just below 1
    assert 1 - 1e-9 < scores["Bleu_4"] < 1.0 and scores["Bleu_1"] < 1.0
    assert scores["ROUGE_L"] == 1.0
    # CIDEr-D is 10 x the mean cosine over n = 1..4; identical captions give cosine 1 for every n
    assert scores["CIDEr"] == pytest.approx(10.0)
    assert set(scores["per_image"]["CIDEr"]) == {"1", "2", "3"}


def test_caption_scores_refuses_one_image_and_missing_refs():
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        caption_scores({1: "a dog"}, {1: ["a dog"]}, use_java=False)
    with pytest.raises(ValueError, match=r"no references for images \[4\]"):
        caption_scores({1: "a", 4: "b"}, TOY_REFS, use_java=False)


@needs_java
def test_ptb_tokenizer_agrees_with_python_tokenize_on_coco_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, _ = read_coco_references(CAPTIONS)
    captions = [c for caps in refs.values() for c in caps] + list(PTB_CASES)
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


@pytest.mark.slow
@needs_java
def test_caption_scores_with_java_adds_meteor():
    scores = caption_scores(TOY_PREDS, TOY_REFS)
    assert scores["tokenizer"] == "ptb" and 0 < scores["METEOR"] < 1
    assert scores["CIDEr"] == pytest.approx(caption_scores(TOY_PREDS, TOY_REFS, use_java=False)["CIDEr"])


def test_read_coco_references(tmp_path):
    refs, files = read_coco_references(CAPTIONS)
    assert len(refs) == 8 and sum(map(len, refs.values())) == 40
    assert files[397133] == "000000397133.jpg"
    assert refs[205401][0] == "A plane floating on top of a lake surrounded by mountains."
    data = json.loads(CAPTIONS.read_text())
    data["annotations"][3].pop("caption")
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"captions\.json: annotations\[3\] \(id \d+\) lacks 'image_id' or a string"):
        read_coco_references(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_coco_references(tmp_path / "nope.json")


# --- bootstrap, tables, WER -----------------------------------------------------------------------------------------


def test_bootstrap_coverage_bernoulli():
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(200):
        sample = rng.random(200) < 0.7
        low, high = mean_ci(sample, n_resamples=1000, seed=rep)
        covered += low <= 0.7 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_generic_matches_mean_path_and_f1():
    values = np.random.default_rng(0).normal(size=50).tolist()
    generic = bootstrap_ci(values, lambda xs: sum(xs) / len(xs), n_resamples=300, seed=3)
    assert generic == pytest.approx(mean_ci(values, n_resamples=300, seed=3))
    assert bootstrap_ci(values, np.mean, n_resamples=300, seed=3) == mean_ci(values, n_resamples=300, seed=3)
    pairs = list(zip(["yes"] * 30 + ["no"] * 30, ["yes", "no"] * 30, strict=True))
    low, high = bootstrap_ci(pairs, pope_f1, n_resamples=300)
    assert low <= pope_f1(pairs) <= high and 0 < low < high < 1
    with pytest.raises(ValueError, match="at least one item"):
        mean_ci([])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1, 2], max, alpha=1.5)


def test_format_results():
    results = [Result("accuracy", 0.75, 0.7, 0.8, 200), Result("CIDEr", 1.2)]
    md = format_results(results)
    assert md.splitlines()[0] == "| metric | value | 95% CI low | 95% CI high | n |"
    assert "| accuracy | 0.7500 | 0.7000 | 0.8000 | 200 |" in md and "| CIDEr | 1.2000 | - | - | - |" in md
    plain = format_results(results, markdown=False).splitlines()
    assert plain[0].split() == ["metric", "value", "95%", "CI", "low", "95%", "CI", "high", "n"]
    assert plain[2].split() == ["accuracy", "0.7500", "0.7000", "0.8000", "200"]
    assert results[0].to_dict() == {"metric": "accuracy", "value": 0.75, "low": 0.7, "high": 0.8, "n": 200}


def test_word_error_rate_hand_computed():
    refs = ["The cat sat on the mat.", "Hello, world!", "good morning", "don't stop"]
    hyps = ["the cat sit on mat", "hello world", "good good morning", ""]
    # 1 substitution + 1 deletion; exact after normalisation; 1 insertion; 2 deletions
    out = word_error_rate(refs, hyps)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 3, 1)
    assert out["n_words"] == 12 and out["hits"] == 8 and out["wer"] == pytest.approx(5 / 12)
    assert out["utterance_errors"] == [2, 0, 1, 2] and out["utterance_words"] == [6, 2, 2, 2]
    assert out["utterance_wer"] == pytest.approx([2 / 6, 0, 0.5, 1.0])
    pairs = list(zip(out["utterance_errors"], out["utterance_words"], strict=True))
    assert corpus_wer(pairs) == pytest.approx(5 / 12)
    low, high = bootstrap_ci(pairs, corpus_wer, n_resamples=200)
    assert low <= 5 / 12 <= high
    assert normalize_text("  Well-known  CAFÉ’s menu!! ") == "well known café's menu"
    with pytest.raises(ValueError, match=r"positions \[1\] have no words"):
        word_error_rate(["a", "?!"], ["a", "b"])
