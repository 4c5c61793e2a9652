"""QA metrics with the field's conventions (SQuAD normalisation; Match, EM, F1) and bootstrap
confidence intervals.

* ``normalize_answer``: lower-case, drop punctuation, drop the articles a/an/the, squeeze
  whitespace (the SQuAD v1.1 evaluation script, in that order).
* ``match``: some normalised gold answer occurs inside the normalised prediction (the
  "Lost in the Middle" / NQ-open accuracy; a long answer that contains the gold counts).
* ``exact_match``: the normalised prediction equals some normalised gold answer.
* ``f1_score``: token-level F1 between normalised prediction and gold, best over golds.

Pure Python + numpy; no torch.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .config import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation.

    Example:
        >>> normalize_answer("The  Eiffel-Tower!")
        'eiffeltower'
        >>> normalize_answer("An apple, a day")
        'apple day'
    """
    if not isinstance(text, str):
        raise TypeError(f"answers and predictions must be str, got {type(text).__name__}.")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        raise TypeError("answers must be a list of gold answer strings, not a single str.")
    golds = list(answers)
    if not golds:
        raise ValueError("answers is empty: every example needs at least one gold answer.")
    return golds


def match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction, else 0.0.

    A gold answer that normalises to the empty string never matches.

    Example:
        >>> match("It was built by Gustave Eiffel in 1889.", ["Gustave Eiffel"])
        1.0
        >>> match("Paris", ["Gustave Eiffel"])
        0.0
    """
    pred = normalize_answer(prediction)
    for gold in _golds(answers):
        g = normalize_answer(gold)
        if g and g in pred:
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0.

    Example:
        >>> exact_match("the Beatles", ["Beatles", "The Fab Four"])
        1.0
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD convention: both empty = 1, exactly one empty = 0.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token-level F1 of the prediction against the gold answers (normalised bags of words).

    Example:
        >>> round(f1_score("Gustave Eiffel designed it", ["Gustave Eiffel"]), 4)
        0.6667
    """
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _golds(answers))


def qa_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{"match": ..., "em": ..., "f1": ...}`` for one prediction."""
    return {
        "match": match(prediction, answers),
        "em": exact_match(prediction, answers),
        "f1": f1_score(prediction, answers),
    }


@dataclass(frozen=True)
class ConfidenceInterval:
    """A mean with a percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "confidence": self.confidence}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    values: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> ConfidenceInterval:
    """Mean of ``values`` with a percentile bootstrap confidence interval.

    Deterministic for a given ``seed`` (numpy's PCG64 generator).

    Args:
        values: per-example scores (e.g. 0/1 matches).
        resamples: bootstrap resamples (with replacement, same size as ``values``).
        confidence: e.g. 0.95 for a 95% interval.
        seed: random seed of the resampling.

    Example:
        >>> ci = bootstrap_ci([1, 0, 1, 1], resamples=200, seed=0)
        >>> ci.mean, ci.low <= ci.mean <= ci.high
        (0.75, True)
    """
    import numpy as np

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}.")
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of numbers.")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci got NaN or infinite values.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # (R, n)
    means = x[idx].mean(axis=1)  # (R,)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    mean = float(x.mean())
    # Guard against float noise putting the mean a hair outside a degenerate interval.
    return ConfidenceInterval(
        mean=mean, low=float(min(low, mean)), high=float(max(high, mean)), n=int(x.size), confidence=confidence
    )


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (used for latency repeats).

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("median of an empty sequence.")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2.0

