"""QA metrics against hand-worked cases (SQuAD normalisation, Match, EM, F1) and the bootstrap."""

from __future__ import annotations

import math

import pytest

from refrag_integrations.evaluation.metrics import (
    bootstrap_ci,
    exact_match,
    f1_score,
    match,
    median,
    normalize_answer,
    qa_scores,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Quick, Brown Fox!", "quick brown fox"),  # lower, punctuation, article
        ("  An  apple a day  ", "apple day"),  # articles anywhere, spaces squeezed
        ("theater anatomy", "theater anatomy"),  # articles only as whole words
        ("U.S.A.", "usa"),  # punctuation removed before article removal
        ("Rock-'n'-roll", "rocknroll"),
        ("the-the", "thethe"),  # punctuation goes first: one word "thethe", not two articles
        ("Café  Müller", "café müller"),  # non-ASCII letters stay
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_hand_worked():
    assert exact_match("the Beatles", ["Beatles"]) == 1.0
    assert exact_match("The Beatles.", ["the fab four", "beatles"]) == 1.0  # any gold counts
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("1889", ["1,889"]) == 1.0  # the comma is punctuation


def test_match_is_containment_after_normalisation():
    assert match("It was designed by Gustave Eiffel in 1889.", ["gustave eiffel"]) == 1.0
    assert match("Eiffel", ["Gustave Eiffel"]) == 0.0  # the gold must be inside the prediction
    assert match("In the U.S.A.", ["USA"]) == 1.0
    assert match("The answer", ["The"]) == 0.0  # a gold answer that normalises to "" never matches
    assert match("Paris", ["London", "Paris, France", "paris"]) == 1.0


def test_f1_hand_worked():
    # pred tokens [cat, sat, on, mat] (articles dropped), gold [cat, on, mat]: 3 common,
    # precision 3/4, recall 1 -> F1 = 2 * 0.75 / 1.75 = 6/7.
    assert f1_score("The cat sat on the mat", ["cat on mat"]) == pytest.approx(6 / 7)
    # bags of words: pred [x, x, y], gold [x, y, y]: common x1 + y1 = 2 -> P = R = 2/3.
    assert f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert f1_score("nothing shared", ["other words"]) == 0.0
    # best over golds
    assert f1_score("Gustave Eiffel", ["Eiffel", "Gustave Eiffel"]) == pytest.approx(1.0)
    # SQuAD convention for empty token lists: both empty -> 1, one empty -> 0
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("the", ["Paris"]) == 0.0


def test_qa_scores_bundle():
    s = qa_scores("It was the Beatles", ["The Beatles"])
    assert s == {"match": 1.0, "em": 0.0, "f1": pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="list of gold"):
        match("x", "x")
    with pytest.raises(ValueError, match="at least one gold"):
        f1_score("x", [])
    with pytest.raises(TypeError):
        normalize_answer(None)  # type: ignore[arg-type]


def test_bootstrap_is_deterministic_and_sensible():
    values = [0.0, 1.0] * 50
    a = bootstrap_ci(values, resamples=500, seed=3)
    b = bootstrap_ci(values, resamples=500, seed=3)
    c = bootstrap_ci(values, resamples=500, seed=4)
    assert a == b  # same seed, same interval
    assert (a.low, a.high) != (c.low, c.high)  # another seed resamples differently
    assert a.mean == 0.5 and a.n == 100 and a.confidence == 0.95
    # normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 100) = 0.5 +- 0.098
    assert 0.38 < a.low < 0.45 and 0.55 < a.high < 0.62
    wide = bootstrap_ci(values[:10], resamples=500, seed=3)
    assert wide.high - wide.low > a.high - a.low  # fewer examples, wider interval
    const = bootstrap_ci([1.0, 1.0, 1.0])
    assert (const.mean, const.low, const.high) == (1.0, 1.0, 1.0)
    assert str(const) == "1.000 [1.000, 1.000]"


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=95)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, math.nan])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0], resamples=0)


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
