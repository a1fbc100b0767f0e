"""COCO caption metrics: BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap (plus METEOR when Java is available), a
Python stand-in for the PTB tokenizer the COCO toolkit runs in Java, and a reader for `captions_*.json`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from litgpt_mm.data.coco import load_coco_json

# Tokens pycocoevalcap's PTBTokenizer drops after tokenising. It runs the tokenizer with -lowerCase, so the bracket
# tokens come out as "-lrb-" etc. and are not dropped; `tokenize` keeps them too.
PTB_PUNCTUATION = frozenset("'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;".split())
_DROP = frozenset("'`\".?!,:-;")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# A word: word characters joined by inner hyphens, apostrophes, slashes or periods ("black-and-white", "u.s.a"), or
# by ',' or ':' between digits ("1,000", "10:30"); "'90s" keeps its apostrophe. A trailing '.' or "'" is captured to
# be kept (abbreviations) or dropped. SGML-like tags ("<image>") are one token. Anything else is one character.
_TOKEN = re.compile(
    r"<[a-z/][^<>\s]*>|(?P<word>(?:'(?=\d))?\w+(?:(?:[-'/.]|(?<=\d)[,:](?=\d))\w+)*)(?P<tail>[.'])?|(?P<other>\S)"
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_LETTERS_WITH_PERIODS = re.compile(r"[^\W\d_](?:\.[^\W\d_])*")
_SPLIT = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na")}
# Abbreviations the PTB tokenizer keeps with their period (a subset of its list: those seen in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr co inc ltd corp etc vs mt ave ft prof "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_DIGIT_AHEAD = re.compile(r"\s*\d")

NOTE = (
    "Computed on {n} images. CIDEr's IDF weights come from the evaluated images and BLEU is a corpus statistic, so "
    "scores on a subset are not comparable to published numbers on the 5,000-image Karpathy test split."
)


def tokenize(text: str) -> str:
    """Lowercase and tokenise a caption like the Stanford PTB tokenizer, then drop the tokens pycocoevalcap removes.

    Agrees with pycocoevalcap's `PTBTokenizer` on ordinary captions (checked on the bundled COCO captions when Java is
    available): words keep inner hyphens, periods and slashes ("black-and-white", "3.5", "and/or"); clitics split off
    ("don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can not"); quotes and `. ? ! , : ; -` are removed;
    brackets become "-lrb-", "-rrb-", "-lsb-"... and stay, as they do in the COCO toolkit; abbreviations keep their
    period ("mr.", "u.s.", "a.m.", single letters); other symbols ("$", "%", "&", "+", "@") become tokens of their
    own. Rare differences remain ("3+4" and "@home" stay joined in the PTB, "3.5m" is split there).

    Returns:
        The tokens joined by single spaces.
    """
    text = text.lower()
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        word, tail, other = m.group("word", "tail", "other")
        if word is None and other is None:
            tokens.append(m.group())
            continue
        if other is not None:
            if other not in _DROP:
                tokens.append(_BRACKETS.get(other, other))
            continue
        if tail == "." and (
            word in _ABBREVIATIONS
            or _LETTERS_WITH_PERIODS.fullmatch(word)
            or (word == "no" and _DIGIT_AHEAD.match(text, m.end()))
        ):
            word += "."
        clitic = _CLITIC.match(word)
        tokens.extend(_SPLIT.get(word) or (clitic.groups() if clitic else (word,)))
    return " ".join(tokens)


def _java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(
    predictions: dict[str | int, str], references: dict[str | int, list[str]], use_java: bool | None = None
) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr(-D) with pycocoevalcap's scorers, one predicted caption per image.

    With `java` on PATH (and `use_java` not False) the captions go through pycocoevalcap's `PTBTokenizer` and METEOR
    is added, as in the COCO caption evaluation; otherwise `tokenize` is used and there is no METEOR. SPICE is never
    computed. Keys of `predictions` and `references` are matched as strings, so 397133 and "397133" are the same image;
    references for images without a prediction are ignored.

    Returns:
        `Bleu_1` .. `Bleu_4`, `ROUGE_L`, `CIDEr` (and `METEOR`), `n_images`, `tokenizer` ("ptb" or "python"),
        `per_image` (`{"CIDEr": {key: score}, "ROUGE_L": {...}}` keyed like `predictions`, for bootstrapping over
        images; corpus CIDEr and ROUGE-L are their means, with CIDEr's IDF fixed to the full set), and `note`.

    Raises:
        ValueError: fewer than 2 images (CIDEr's IDF comes from the evaluated set and is degenerate for one), a
            prediction without references, or a caption that is not a string.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys, refs_by_key = _check_captions(predictions, references)
    if use_java and not _java_available():
        raise ValueError("caption_scores(use_java=True): no `java` on PATH; install a JRE or pass use_java=False")
    java = _java_available() if use_java is None else use_java
    gts, res = _tokenize_captions(keys, predictions, refs_by_key, java)

    scores: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)})
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    scores["ROUGE_L"] = float(rouge)
    cider, cider_per_image = Cider().compute_score(gts, res)
    scores["CIDEr"] = float(cider)
    if java:
        scores["METEOR"] = _meteor(gts, res)
    scores["n_images"] = len(keys)
    scores["tokenizer"] = "ptb" if java else "python"
    scores["per_image"] = {
        "CIDEr": {k: float(s) for k, s in zip(keys, cider_per_image, strict=True)},
        "ROUGE_L": {k: float(s) for k, s in zip(keys, rouge_per_image, strict=True)},
    }
    scores["note"] = NOTE.format(n=len(keys))
    return scores


def _check_captions(
    predictions: dict[str | int, str], references: dict[str | int, list[str]]
) -> tuple[list[str | int], dict[str, list[str]]]:
    """The images to score (the keys of `predictions`) and the references keyed by string, after checking that
    there are at least 2 images, each with a string prediction and a non-empty list of string references."""
    keys = list(predictions)
    if len(keys) < 2:
        raise ValueError(
            f"caption_scores needs at least 2 images, got {len(keys)}: CIDEr's IDF weights come from the evaluated "
            "set, so score all images together"
        )
    refs_by_key = {str(k): v for k, v in references.items()}
    missing = [k for k in keys if str(k) not in refs_by_key]
    if missing:
        raise ValueError(f"caption_scores: no references for images {missing[:10]} ({len(missing)} in all)")
    for k in keys:
        refs = refs_by_key[str(k)]
        if not isinstance(predictions[k], str):
            raise ValueError(f"caption_scores: the prediction for image {k!r} is {predictions[k]!r}, not a string")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"caption_scores: references for image {k!r} must be a non-empty list of strings")
    return keys, refs_by_key


def _tokenize_captions(
    keys: list[str | int], predictions: dict[str | int, str], refs_by_key: dict[str, list[str]], java: bool
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """References and predictions as pycocoevalcap's scorers take them, keyed by position (so that mixed key types
    never meet): through its Java `PTBTokenizer` when `java`, else through `tokenize`."""
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r} for r in refs_by_key[str(k)]] for i, k in enumerate(keys)})
        res = tokenizer.tokenize({i: [{"caption": predictions[k]}] for i, k in enumerate(keys)})
    else:
        gts = {i: [tokenize(r) for r in refs_by_key[str(k)]] for i, k in enumerate(keys)}
        res = {i: [tokenize(predictions[k])] for i, k in enumerate(keys)}
    return gts, res


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """METEOR with pycocoevalcap's meteor-1.5.jar, stopping its Java process whether or not scoring succeeds."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except Exception as err:
        raise RuntimeError(
            f"METEOR failed ({type(err).__name__}: {err}); it runs pycocoevalcap's meteor-1.5.jar with `java`. "
            "Pass use_java=False to score without Java and without METEOR"
        ) from err
    finally:
        if meteor.lock.locked():  # compute_score failed holding its lock; Meteor.__del__ would wait forever
            meteor.lock.release()
        del meteor  # Meteor.__del__ stops the Java process


def read_coco_references(captions_json: str | Path) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Reference captions and file names from a COCO `captions_*.json` file.

    Returns:
        `(references, file_names)`: image id -> captions (stripped, in file order), and image id -> `file_name`.
        Images without any caption are in neither.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not the captions schema, or an annotation without `image_id`/`caption` or with an unknown
            image id; the message names the file and the annotation.
    """
    path = Path(captions_json)
    data = load_coco_json(path, "captions", ("images", "annotations"))
    files = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        files[img["id"]] = img["file_name"]
    references: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else None})"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{where} lacks 'image_id' or a string 'caption'")
        if ann["image_id"] not in files:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        references.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return references, {image_id: files[image_id] for image_id in references}
