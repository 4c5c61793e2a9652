"""Finding registered passages in prompts (refrag_integrations.registrations): whitespace
normalisation, passages glued to template text, which registrations are the request's."""

from __future__ import annotations

from refrag_integrations.engine import RegisteredPassage
from refrag_integrations.registrations import Registration, cut_passages, find_spans, match_prompt

TEXT = "Gustave Eiffel designed\nthe tower in  Paris, France, for the 1889 fair."


def passage(text: str, expand: list[bool]) -> RegisteredPassage:
    return RegisteredPassage(passage_id=text[:8], text=text, expand=expand, tokens=len(expand) * 4, positions=len(expand))


def test_find_spans_verbatim_then_with_any_whitespace():
    flat = " ".join(TEXT.split())
    assert find_spans(f"a {TEXT} b {TEXT}", TEXT) == [(2, 2 + len(TEXT)), (5 + len(TEXT), 5 + 2 * len(TEXT))]
    prompt = f"Context:{flat}\nQuestion: who?"  # glued to the template's colon, whitespace collapsed
    assert [prompt[a:b] for a, b in find_spans(prompt, TEXT)] == [flat]
    assert find_spans(prompt, TEXT.upper()) == [] and find_spans(prompt, "   ") == []


def test_match_prompt_picks_the_request_by_its_query(tiny_chat_engine):
    n = len(tiny_chat_engine.chunk(TEXT))
    mine = Registration("Who designed the tower?", (passage(TEXT, [True] + [False] * (n - 1)),), serial=1)
    theirs = Registration("What fair was it for?", (passage(TEXT, [False] * n),), serial=2)
    prompt = f"Context: {TEXT}\n\nQuestion: Who designed the tower?"
    for only in ([mine, theirs], [theirs, mine]):  # the newer registration is for another question
        m = match_prompt(tiny_chat_engine, prompt, prompt, only=only)
        assert m.found == 1 and m.decisions(tiny_chat_engine, prompt) == [[True] + [False] * (n - 1)]
    assert cut_passages(prompt, m) == "Context: Question: Who designed the tower?"


def test_decisions_follow_a_rewrapped_passage(tiny_chat_engine):
    n = len(tiny_chat_engine.chunk(TEXT))
    reg = Registration("q", (passage(TEXT, [True] * n),), serial=3)
    flat = " ".join(TEXT.split())
    m = match_prompt(tiny_chat_engine, f"[{flat}]", "q", only=[reg])
    assert m.summary([[]], [1]) == {"registered": 1, "found": 1, "compressed": 1}
    assert m.decisions(tiny_chat_engine, f"[{flat}]") == [[True] * len(tiny_chat_engine.chunk(flat))]
