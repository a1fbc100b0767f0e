"""Percentile-bootstrap confidence intervals, a small results table, and word error rate."""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Indices drawn per chunk of resamples; bounds the memory of the index matrix for large item counts.
_MAX_CELLS = 1 << 22


def _check_bootstrap(n: int, n_resamples: int, alpha: float) -> None:
    if n == 0:
        raise ValueError("bootstrap needs at least one item; got an empty sequence")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha} (0.05 gives a 95% interval)")


def _resample_indices(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield `(rows, n)` blocks of indices drawn with replacement; `n_resamples` rows in all."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // n)
    done = 0
    while done < n_resamples:
        k = min(rows, n_resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_ci(
    values: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean, vectorised with numpy.

    Draws the same resamples as `bootstrap_ci` with the same seed, so both give the same interval for a mean.

    Returns:
        `(low, high)`, the `alpha / 2` and `1 - alpha / 2` quantiles of the resampled means.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"mean_ci expects a flat sequence of numbers, got an array of shape {x.shape}")
    _check_bootstrap(len(x), n_resamples, alpha)
    means = np.concatenate([x[idx].mean(axis=1) for idx in _resample_indices(len(x), n_resamples, seed)])
    return _interval(means, alpha)


_MEANS = (statistics.mean, statistics.fmean, np.mean, np.average)


def bootstrap_ci(
    items: Sequence,
    statistic: Callable[[Sequence], float],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of `statistic(items)`.

    Items are resampled with replacement `n_resamples` times and the statistic is recomputed on each resample.
    Items can be anything the statistic accepts, e.g. `(prediction, label)` pairs for an F1 or
    `(errors, words)` pairs for a corpus WER (`corpus_wer`). When `statistic` is `statistics.mean`,
    `statistics.fmean`, `np.mean` or `np.average`, the numpy path `mean_ci` is used.

    Args:
        items: The evaluated units (questions, images, utterances).
        statistic: Maps a list of items to a number; it must be defined on every resample (no NaN).
        n_resamples: Number of bootstrap resamples.
        alpha: 0.05 gives a 95% interval.
        seed: Seed of numpy's default generator; same seed, same interval.

    Returns:
        `(low, high)`.
    """
    if statistic in _MEANS:
        return mean_ci(items, n_resamples, alpha, seed)
    items = list(items)
    _check_bootstrap(len(items), n_resamples, alpha)
    stats = [
        statistic([items[i] for i in row])
        for block in _resample_indices(len(items), n_resamples, seed)
        for row in block
    ]
    return _interval(np.asarray(stats, dtype=np.float64), alpha)


@dataclass
class Result:
    """One row of a results table: a metric, its value, a confidence interval and the number of evaluated items."""

    metric: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def format_results(results: Sequence[Result], markdown: bool = True, digits: int = 4, level: int = 95) -> str:
    """Format results as a Markdown table, or as aligned plain text when `markdown` is False.

    `level` only labels the interval columns ("95% CI low"); rows without an interval or `n` show "-".
    """

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    header = ["metric", "value", f"{level}% CI low", f"{level}% CI high", "n"]
    rows = [[r.metric, num(r.value), num(r.low), num(r.high), "-" if r.n is None else str(r.n)] for r in results]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 4) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


_APOSTROPHE_IN_WORD = re.compile(r"(?<=\w)['\u2019](?=\w)")


def normalize_text(text: str) -> str:
    """WER normalisation: lowercase, punctuation (Unicode category P*) to spaces, whitespace collapsed.

    Apostrophes inside words are kept ("don't", "o'clock"; a curly one becomes '), so contractions count as one word;
    hyphens separate words ("well-known" -> "well known"). Digits and symbols such as "$" or "%" are left alone.
    """
    text = _APOSTROPHE_IN_WORD.sub("\0", text.lower())
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.replace("\0", "'").split())


def corpus_wer(pairs: Sequence[tuple[int, int]]) -> float:
    """Corpus WER from `(errors, reference_words)` pairs: total errors over total words (for `bootstrap_ci`)."""
    words = sum(w for _, w in pairs)
    return sum(e for e, _ in pairs) / words if words else 0.0


def word_error_rate(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus word error rate with jiwer after `normalize_text` on both sides.

    Returns:
        `wer` (total errors / total reference words), `substitutions`, `deletions`, `insertions`, `hits`,
        `n_words` (reference words), `n_utterances`, and per utterance `utterance_wer`, `utterance_errors`,
        `utterance_words`. Bootstrap the corpus WER over utterances with
        `bootstrap_ci(list(zip(errors, words)), corpus_wer)`; the mean of `utterance_wer` weighs short utterances
        as much as long ones and is not the corpus WER.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"word_error_rate: {len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("word_error_rate: no utterances")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(
            f"word_error_rate: references at positions {empty[:10]} have no words after normalisation; "
            "WER is undefined for them, so leave those utterances out"
        )
    errors, words = [], []
    totals = dict.fromkeys(("substitutions", "deletions", "insertions", "hits"), 0)
    for ref, hyp in zip(refs, hyps, strict=True):
        # One call per utterance: the per-utterance counts come straight from jiwer, and an empty hypothesis works.
        out = jiwer.process_words(ref, hyp)
        for key in totals:
            totals[key] += getattr(out, key)
        errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(len(ref.split()))
    n_words = sum(words)
    return {
        "wer": sum(errors) / n_words,
        **totals,
        "n_words": n_words,
        "n_utterances": len(refs),
        "utterance_wer": [e / w for e, w in zip(errors, words, strict=True)],
        "utterance_errors": errors,
        "utterance_words": words,
    }
