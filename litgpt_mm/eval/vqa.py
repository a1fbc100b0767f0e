"""VQA-style scoring: the official VQA v2 answer normalisation and accuracy, exact match, multiple-choice parsing,
and a reader for generic, LLaVA-eval and ScienceQA question files.

`normalize_vqa_answer` reproduces `processPunctuation` and `processDigitArticle` of the official evaluation
(github.com/GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), tables included.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Copied from vqaEval.py. Keys with capitals ("Im", "Ive") can never match because the text is lowercased first;
# they are kept so the table stays the official one.
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# As in vqaEval.py: "(?!<=\d)" is a lookahead that always holds (a lookbehind was meant), so every '.' not followed
# by a digit is removed ("2.5" keeps its point, "dog." and "u.s.a" lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval.py passes re.UNICODE (= 32) as `count`, so at most 32 periods go; kept for identical output.
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _process_digit_article(text: str) -> str:
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA v2 answer normalisation.

    Newlines and tabs become spaces and the ends are stripped; punctuation is deleted when it touches a space (or the
    text has a comma between digits) and replaced by a space otherwise; periods not followed by a digit are removed;
    then lowercase, number words to digits ("two" -> "2", "none" -> "0"), articles dropped, contractions restored
    ("dont" -> "don't"). Example: "Two dogs." -> "2 dogs".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _as_list(answers: str | list[str]) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("no ground-truth answers given")
    return answers


def vqa_accuracy(prediction: str, answers: str | list[str]) -> float:
    """VQA accuracy of one prediction against the human answers, both normalised.

    With two or more answers this is the official metric: for each answer left out, min(#matches among the others
    / 3, 1), averaged (10 answers of which 2 match -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6). With a single answer, as in
    GQA or generated data, it is exact match (1.0 or 0.0): the official formula would always give 0 there.

    The official script normalises only when the human answers disagree; this always normalises both sides, which
    gives the same score whenever the prediction is already normalised (as LLaVA does before submission).
    """
    gts = [normalize_vqa_answer(a) for a in _as_list(answers)]
    pred = normalize_vqa_answer(prediction)
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # Leaving out a matching answer leaves matches - 1 matches among the others, else `matches`.
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def exact_match(prediction: str, answers: str | list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in _as_list(answers)))


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])(?:\)|[.:]\s|[.:]?$)")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b")


def parse_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None.

    In order: the letter alone or leading ("A", "A.", "A)", "(A) ...", "A. ...", "A: ..."); "The answer is A" (as
    LLaVA's ScienceQA scorer, which also requires exactly one such phrase); the text of one choice after
    `normalize_vqa_answer`. Letters are upper-case only, so an answer starting with the article "a" is not "A".
    A letter beyond the number of choices gives None.
    """
    options = LETTERS[: len(choices)] if choices else LETTERS
    text = text.strip()
    m = _LETTER_PREFIX.match(text)
    letter = m.group(1) if m else None
    if letter is None:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    if letter is None and choices:
        norm = normalize_vqa_answer(text)
        hits = [LETTERS[i] for i, c in enumerate(choices) if normalize_vqa_answer(c) == norm]
        letter = hits[0] if len(hits) == 1 else None
    return letter if letter is not None and letter in options else None


def multiple_choice_match(prediction: str, choices: list[str] | None, answer: str | int) -> float:
    """1.0 if the option picked by `prediction` (see `parse_choice`) is the answer, else 0.0.

    Args:
        prediction: The model's answer, e.g. "B", "B. 12 cm" or "The answer is B."
        choices: The option texts in letter order (None: any letter is accepted).
        answer: A letter ("B"), a 0-based index, or a text `parse_choice` resolves.
    """
    if isinstance(answer, int):
        if not 0 <= answer < (len(choices) if choices else len(LETTERS)):
            raise ValueError(f"answer index {answer} is out of range for {len(choices or LETTERS)} choices")
        gold = LETTERS[answer]
    else:
        gold = parse_choice(answer, choices)
        if gold is None:
            raise ValueError(f"answer {answer!r} names none of the options {list(choices or [])}")
    return float(parse_choice(prediction, choices) == gold)


@dataclass
class VQAItem:
    """One question. `image` is None for a text-only row; `type` is a category or question type when the file has one;
    `choices` are the option texts of a multiple-choice question."""

    id: str | int
    image: str | None
    question: str
    answers: list[str]
    type: str | None = None
    choices: list[str] | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


def _load(path: Path, what: str) -> tuple[bool, object]:
    """`(True, value)` for a file holding one JSON value, `(False, [(location, row), ...])` for JSON lines.

    A file is read as JSON lines when its first non-blank line is a complete JSON value and more follows (POPE's and
    LLaVA's `.json` files are JSON lines too); blank lines are skipped.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise ValueError(f"{path}: the {what} is empty")
    try:
        json.loads(first)
        jsonl = first.strip() != text.strip()
    except json.JSONDecodeError:
        jsonl = False
    if not jsonl:
        try:
            return True, json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected a JSON object per line") from None
    return False, rows


def _rows(path: Path, loaded: tuple[bool, object]) -> list[tuple[str, object]]:
    whole, data = loaded
    if not whole:
        return data
    if isinstance(data, list):
        return [(f"{path}: row {i}", row) for i, row in enumerate(data)]
    if isinstance(data, dict):  # a single JSON-lines row
        return [(f"{path}:1", data)]
    raise ValueError(f"{path}: expected JSON lines or a JSON list of objects, got {type(data).__name__}")


def _answer_list(value: object, where: str) -> list[str]:
    """Answers from a string, a number, a list of strings, a list of `{"answer": ...}` (VQA v2 annotations) or a
    record with "answer"/"answers" (GQA's questions file)."""
    if isinstance(value, dict):
        key = "answers" if "answers" in value else "answer" if "answer" in value else None
        if key is None:
            raise ValueError(f"{where}: answer record has no 'answer' or 'answers' field")
        return _answer_list(value[key], where)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and value:
        out = []
        for a in value:
            if isinstance(a, dict) and "answer" in a:
                a = a["answer"]
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                raise ValueError(f"{where}: answers must be strings (or {{'answer': ...}} records), got {a!r}")
            out.append(str(a))
        return out
    raise ValueError(f"{where}: expected an answer string or a non-empty list of answers, got {value!r}")


def read_answers(path: str | Path) -> dict[str, list[str]]:
    """Answers keyed by `str(question_id)`, from a JSON object mapping ids to answers (a string, a list, or a record
    with "answer" as in GQA's `*_questions.json`), or from JSON lines / a JSON list of rows with
    "question_id" (or "questionId", "id") and "answers" (or "answer")."""
    path = Path(path)
    loaded = _load(path, "answers file")
    whole, data = loaded
    id_keys = ("question_id", "questionId", "id")
    if whole and isinstance(data, dict) and not any(k in data for k in id_keys):
        return {str(qid): _answer_list(value, f"{path}: question {qid!r}") for qid, value in data.items()}
    answers: dict[str, list[str]] = {}
    for where, row in _rows(path, loaded):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        key = next((k for k in id_keys if k in row), None)
        if key is None:
            raise ValueError(f"{where}: missing field 'question_id' (or 'questionId', 'id')")
        if "answers" not in row and "answer" not in row:
            raise ValueError(f"{where}: missing field 'answers' (or 'answer') for question {row[key]!r}")
        answers[str(row[key])] = _answer_list(row.get("answers", row.get("answer")), where)
    return answers


_CHOICE_LINE = re.compile(r"^([A-Z])\.\s+(.+)$")
_CHOICE_INLINE = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|$)")


def parse_choices(question: str) -> list[str] | None:
    """Option texts from a question with lines "A. ...", "B. ..." (LLaVA's ScienceQA files) or an inline
    "(A) ... (B) ..." list; None when there are none. Letters must run A, B, C... without gaps."""
    for candidates in (
        [m.groups() for m in map(_CHOICE_LINE.match, question.splitlines()) if m],
        [m for line in question.splitlines() if line.startswith("Options:") for m in _CHOICE_INLINE.findall(line)],
    ):
        if candidates and [c[0] for c in candidates] == list(LETTERS[: len(candidates)]):
            return [text.strip() for _, text in candidates]
    return None


def _field(row: dict, keys: tuple[str, ...], where: str, hint: str) -> object:
    for key in keys:
        if key in row:
            return row[key]
    raise ValueError(f"{where}: missing field {keys[0]!r} (or {', '.join(repr(k) for k in keys[1:])}); {hint}")


def read_vqa(
    path: str | Path, images_root: str | Path | None = None, answers_path: str | Path | None = None
) -> list[VQAItem]:
    """Read VQA-style questions with their ground-truth answers.

    Layouts, detected per row:

    - generic JSON lines (or a JSON list): `{"id", "image", "question", "answers": [...]}`; `question_id` for `id`,
      `text` for `question`, `answer` (a string) for `answers`, `type`/`category` and `choices` optional.
    - LLaVA eval question files (`{"question_id", "image", "text", "category"}`, GQA/MME-style) with the answers in
      `answers_path` (see `read_answers`); answers there take precedence over answers in the rows.
    - ScienceQA in LLaVA's `llava_test_CQM-I.json` layout: a JSON list of `{"id", "image"?, "conversations":
      [{"from": "human", "value"}, {"from": "gpt", "value"}]}`; the question is the human value without "<image>",
      the answer the gpt value (e.g. "A"), and the choices are parsed from its "A. ..." lines.

    Rows without an image (ScienceQA's text-only questions) are kept with `image=None` and counted in a logged
    warning; filter them with `VQAItem.has_image`. A relative image path is joined to `images_root` when given.

    Raises:
        FileNotFoundError: `path` or `answers_path` does not exist.
        ValueError: a malformed row, a missing field, a duplicate id, or a question without answers; the message
            names the file, the line (JSON lines) or row index (JSON list) and the field.
    """
    path = Path(path)
    answers = read_answers(answers_path) if answers_path is not None else None
    items: list[VQAItem] = []
    seen: dict[str, str] = {}
    for where, row in _rows(path, _load(path, "question file")):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        qid = _field(row, ("id", "question_id"), where, "every question needs an id")
        where = f"{where} (id {qid!r})"
        if "conversations" in row:
            conv = row["conversations"]
            turns_ok = isinstance(conv, list) and len(conv) >= 2
            if not (turns_ok and all(isinstance(t, dict) and "value" in t for t in conv)):
                raise ValueError(
                    f"{where}: field 'conversations' must be a list of a human turn and a gpt turn, each with 'value'"
                )
            question = str(conv[0]["value"]).replace("<image>", "").strip()
            inline = str(conv[1]["value"]).strip()
            choices = parse_choices(question)
        else:
            question = str(_field(row, ("question", "text"), where, "the question text is required"))
            inline = row.get("answers", row.get("answer"))
            choices = row.get("choices")
            if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
                raise ValueError(f"{where}: field 'choices' must be a list of strings, got {choices!r}")
        qtype = row.get("type", row.get("category"))
        if answers is not None:
            if str(qid) not in answers:
                raise ValueError(f"{where}: question {qid!r} is not in the answers file {answers_path}")
            gts = answers[str(qid)]
        elif inline is None:
            raise ValueError(
                f"{where}: missing field 'answers' (or 'answer'); add the answers to the row or pass answers_path "
                "(LLaVA's question files keep the answers in a separate file)"
            )
        else:
            gts = _answer_list(inline, where)
        if str(qid) in seen:
            raise ValueError(f"{where}: id {qid!r} already used at {seen[str(qid)]}; ids must be unique")
        seen[str(qid)] = where
        image = row.get("image") or None
        if image is not None:
            if not isinstance(image, str):
                raise ValueError(f"{where}: field 'image' must be a file name, got {image!r}")
            if images_root is not None:
                image = str(Path(images_root) / image)
        items.append(VQAItem(qid, image, question, gts, None if qtype is None else str(qtype), choices))
    if not items:
        raise ValueError(f"{path}: no questions")
    without = sum(not item.has_image for item in items)
    if without:
        log.warning(f"read_vqa: {without} of {len(items)} questions in {path} have no image (kept with image=None)")
    return items
