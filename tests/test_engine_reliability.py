"""Hostile inputs the engine refuses (issue 18): explicit decisions, non-finite chunk vectors,
corrupted checkpoints, prompts longer than the decoder's context window."""

from __future__ import annotations

import pytest
import torch

from refrag_integrations import RefragEngine

TEXT = (
    "Gustave Eiffel designed the tower in Paris, France. Robert Boulter is an English film, "
    "television and theatre actor. He had a guest starring role on the television series The Bill."
)
OTHER = "Robert Boulter landed a role as Craig in the episode Teddy's Story of the television series."


# ------------------------------------------------------------------ explicit decisions


def test_explicit_decisions_accept_bools_and_0_1(tiny_engine):
    n, m = len(tiny_engine.chunk(TEXT)), len(tiny_engine.chunk(OTHER))
    p = tiny_engine.prepare_rag("q?", [TEXT, OTHER], [[1] + [0] * (n - 1), [True] * m])
    assert p.stats.chunks == n + m and p.stats.chunks_expanded == 1 + m
    assert p.stats.expanded[0] == [0]


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda n, m: [[2] * n, [0] * m], ValueError, r"policy\[0\]\[0\] is 2"),
        (lambda n, m: [[True] * n, [0] * (m - 1) + [-1]], ValueError, rf"policy\[1\]\[{{m1}}\] is -1"),
        (lambda n, m: [True] * n, TypeError, r"policy\[0\] is True .*not a list"),
        (lambda n, m: [[True] * n, "0" * m], TypeError, r"policy\[1\] is '0+' \(str\)"),
        (lambda n, m: [["yes"] * n, [0] * m], TypeError, r"policy\[0\]\[0\] is 'yes'"),
        (lambda n, m: [[0.5] * n, [0] * m], TypeError, r"policy\[0\]\[0\] is 0.5"),
        (lambda n, m: [[True] * n], ValueError, "decisions for 1 passages but 2"),
    ],
)
def test_bad_explicit_decisions_name_the_entry(tiny_engine, bad, error, match):
    n, m = len(tiny_engine.chunk(TEXT)), len(tiny_engine.chunk(OTHER))
    with pytest.raises(error, match=match.replace("{m1}", str(m - 1))):
        tiny_engine.prepare_rag("q?", [TEXT, OTHER], bad(n, m))
    with pytest.raises(error, match=match.replace("{m1}", str(m - 1))):
        tiny_engine.generate("q?", [TEXT, OTHER], policy=bad(n, m), max_new_tokens=1)


def test_registered_decisions_are_checked(tiny_engine):
    n = len(tiny_engine.chunk(TEXT))
    with pytest.raises(ValueError, match=r"expand\[1\] is 2"):
        tiny_engine.register_passage(TEXT, expand=[0, 2] + [0] * (n - 2))
    with pytest.raises(TypeError, match="expand is True"):
        tiny_engine.register_passage(TEXT, expand=True)
    with pytest.raises(ValueError, match=f"the passage has {n} chunks"):
        tiny_engine.register_passage(TEXT, expand=[1] * (n + 1))
