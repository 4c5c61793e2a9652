"""Registrations: which retrieved passages belong to which request.

A retrieval adapter (LangChain ``RefragRetriever`` / ``RefragCompressor`` /
``register_documents``, LlamaIndex ``RefragNodePostprocessor``) decides per request which chunks
of its passages stay tokens and records that here as one :class:`Registration` (the query, the
passages, their decisions). The LLM adapter only receives a prompt string; :func:`match_prompt`
finds in it the passages of the registrations that belong to *this* request, and only those are
compressed, with this request's decisions:

- A registration belongs to the request whose current turn contains its query (the retriever's
  query is the user's question, which the prompt template repeats). When no registration's
  query occurs there (a rewritten query, a hand-written prompt), the latest registration whose
  passages occur in the current turn is the request's (with any registration of the same
  query). The current turn is the text being answered now: for a chat, the system messages and
  the messages after the last assistant message, never the earlier history.
- So two concurrent requests that share a passage each get their own decision, and a passage
  registered for an earlier turn that reappears in the chat history of a later turn stays tokens.
- Passages are found after whitespace normalisation: a ``format_docs`` that collapses newlines
  or re-indents still matches; the text found is compressed under the registered decision.

Each engine keeps its latest :data:`~refrag_integrations.config.REGISTRATIONS_KEPT`
registrations (small: texts and booleans; the chunk vectors live in the engine's cache).
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from .config import REGISTRATIONS_KEPT
from .engine import RefragEngine, RegisteredPassage


@dataclass(frozen=True)
class Registration:
    """The passages one retrieval registered for one request.

    Attributes:
        query: the query they were retrieved (and their chunks decided) for.
        passages: the registered passages with their per-chunk decisions.
        serial: increases with every registration in the process (newer = larger).
    """

    query: str
    passages: tuple[RegisteredPassage, ...]
    serial: int


@dataclass
class PromptMatch:
    """The registered passages found in one prompt (see :func:`match_prompt`).

    Attributes:
        spans: character spans of the passage occurrences to compress, in prompt order.
        passages: the registered passage found at each span (its text may differ from the
            prompt's in whitespace only).
        registered: passages registered for this request (distinct texts).
        found: how many of them occur in the prompt.
        latest: the serial of the newest registration of this request with a passage found (0: none).
    """

    spans: list[tuple[int, int]] = field(default_factory=list)
    passages: list[RegisteredPassage] = field(default_factory=list)
    registered: int = 0
    found: int = 0
    latest: int = 0

    def decisions(self, engine: RefragEngine, prompt: str) -> list[list[bool]]:
        """The registered decision of each span, fitted to the text found there: a passage
        whose whitespace the prompt changed may chunk into a different number of chunks; each
        of its chunks then takes the decision of the registered chunk at the same relative place."""
        out = []
        for (a, b), passage in zip(self.spans, self.passages):
            decision = list(passage.expand)
            found = prompt[a:b]
            if found != passage.text:
                n, m = len(decision), len(engine.chunk(found))
                decision = [decision[min(n - 1, i * n // m)] for i in range(m)]
            out.append(decision)
        return out

    def summary(self, expanded: Sequence[Sequence[int]], chunks: Sequence[int]) -> dict[str, int]:
        """``{"registered", "found", "compressed"}`` for response metadata, given the expanded
        chunk indices and the chunk count of each span after preparation."""
        compressed = {p.passage_id for p, e, n in zip(self.passages, expanded, chunks) if len(e) < n}
        return {"registered": self.registered, "found": self.found, "compressed": len(compressed)}


_LOCK = threading.Lock()
_SERIALS = itertools.count(1)
_BOOKS: "weakref.WeakKeyDictionary[RefragEngine, deque[Registration]]" = weakref.WeakKeyDictionary()


def record_registration(engine: RefragEngine, query: str, passages: Sequence[RegisteredPassage]) -> Registration:
    """Record the passages a retrieval just registered on ``engine`` for ``query``.

    Example:
        >>> found = engine.register_retrieved("Who wrote Hamlet?", ["Hamlet is ..."], "none")  # doctest: +SKIP
        >>> record_registration(engine, "Who wrote Hamlet?", found).serial                   # doctest: +SKIP
        1
    """
    if not isinstance(engine, RefragEngine):
        raise TypeError(f"engine must be a RefragEngine, got {type(engine).__name__}.")
    with _LOCK:
        registration = Registration(query=str(query), passages=tuple(passages), serial=next(_SERIALS))
        book = _BOOKS.get(engine)
        if book is None:
            book = _BOOKS[engine] = deque(maxlen=REGISTRATIONS_KEPT)
        book.append(registration)
        return registration


def registrations(engine: RefragEngine) -> list[Registration]:
    """The registrations kept for ``engine``, oldest first."""
    with _LOCK:
        return list(_BOOKS.get(engine, ()))


def engines_with_registrations() -> list[RefragEngine]:
    """Every live engine that has registrations (to find the engine a retriever used)."""
    with _LOCK:
        return [engine for engine, book in _BOOKS.items() if book]


def normalise(text: str) -> str:
    """``text`` with every run of whitespace made one space and the ends trimmed."""
    return " ".join(text.split())


@functools.lru_cache(maxsize=4 * REGISTRATIONS_KEPT * 8)
def _flat(text: str) -> str:  # normalise() of a registered passage, computed once per text
    return normalise(text)


@functools.lru_cache(maxsize=4 * REGISTRATIONS_KEPT * 8)
def _anchors(text: str) -> tuple[tuple[str, str], ...]:
    """Two word pairs from inside ``text`` (not its first or last word, which a prompt may glue
    to its own characters); a prompt without both cannot contain the passage."""
    words = text.split()
    return ((words[1], words[2]), (words[-3], words[-2])) if len(words) >= 5 else ()


@functools.lru_cache(maxsize=4096)
def _loose_pattern(text: str) -> re.Pattern[str] | None:
    words = text.split()
    return re.compile(r"\s+".join(re.escape(w) for w in words)) if words else None


def find_spans(prompt: str, text: str, flat_prompt: str | None = None) -> list[tuple[int, int]]:
    """Every non-overlapping occurrence of ``text`` in ``prompt``: verbatim, else with any
    whitespace in place of the passage's whitespace (a newline for spaces, one space for many).
    ``flat_prompt``, ``normalise(prompt)`` if known, saves the search when the text is absent."""
    spans, start = [], prompt.find(text) if text else -1
    while start >= 0:
        spans.append((start, start + len(text)))
        start = prompt.find(text, start + len(text))
    if spans:
        return spans
    if _flat(text) not in (normalise(prompt) if flat_prompt is None else flat_prompt):
        return []
    pattern = _loose_pattern(text)
    return [m.span() for m in pattern.finditer(prompt)] if pattern is not None else []


def match_prompt(
    engine: RefragEngine, prompt: str, question: str, only: Sequence[Registration] | None = None
) -> PromptMatch:
    """Find the passages of this request's registrations inside ``prompt``.

    Args:
        engine: the engine the registrations were made on.
        prompt: the full prompt the LLM adapter will decode.
        question: the current turn (see the module docstring; the whole prompt for a text
            completion): a registration whose query occurs in it belongs to this request.
        only: the registrations known to be this request's (LlamaIndex passes its context's);
            None = recognise them among all of ``engine``'s (see the module docstring).

    Returns:
        A :class:`PromptMatch`; an empty one when no registered passage of this request occurs.
    """
    regs = list(only) if only is not None else registrations(engine)
    flat = normalise(prompt)
    words = flat.split(" ")
    pairs = set(zip(words, words[1:]))
    spans_of: dict[str, list[tuple[int, int]]] = {}
    for r in regs:
        for p in r.passages:
            if p.text not in spans_of:
                absent = any(a not in pairs for a in _anchors(p.text))  # most passages: no search at all
                spans_of[p.text] = [] if absent else find_spans(prompt, p.text, flat)
    candidates = [r for r in regs if any(spans_of[p.text] for p in r.passages)]
    asked = normalise(question)

    def query_length(r: Registration) -> int:  # > 0: the registration's query is in the question
        q = normalise(r.query)
        return len(q) if q and q in asked else 0

    if only is not None:  # given: stale only if neither its passages nor its query are in this prompt
        request = candidates or [r for r in regs if query_length(r)]
    elif any(query_length(r) for r in candidates):
        request = [r for r in candidates if query_length(r)]
    elif current := [r for r in candidates if any(_flat(p.text) in asked for p in r.passages)]:
        newest = max(current, key=lambda r: r.serial)
        request = [r for r in current if normalise(r.query) == normalise(newest.query)]
    else:  # nothing found: the latest registration for this question, if any, is what went missing
        asked_for = [r for r in regs if query_length(r)]
        request = [max(asked_for, key=lambda r: r.serial)] if asked_for else []

    best: dict[str, tuple[tuple[int, int], RegisteredPassage]] = {}
    for r in request:
        for p in r.passages:
            rank = (query_length(r), r.serial)
            if p.text not in best or rank > best[p.text][0]:
                best[p.text] = (rank, p)
    hits = sorted(
        ((a, b, best[text][1]) for text in best for a, b in spans_of[text]), key=lambda h: (h[0], -(h[1] - h[0]))
    )
    match = PromptMatch(
        registered=len(best),
        found=sum(1 for text in best if spans_of[text]),
        latest=max((r.serial for r in request if any(spans_of[p.text] for p in r.passages)), default=0),
    )
    for a, b, passage in hits:  # where occurrences overlap, the first (then the longer) wins
        if not match.spans or a >= match.spans[-1][1]:
            match.spans.append((a, b))
            match.passages.append(passage)
    return match


def cut_passages(text: str, match: PromptMatch) -> str:
    """``text`` with the matched passages cut out, whitespace normalised: the question a
    query-aware policy compares chunks with."""
    pieces, cursor = [], 0
    spans = sorted({s for p in {p.text: p for p in match.passages}.values() for s in find_spans(text, p.text)})
    for a, b in spans:
        if a >= cursor:
            pieces.append(text[cursor:a])
            cursor = b
    pieces.append(text[cursor:])
    return normalise(" ".join(pieces))
