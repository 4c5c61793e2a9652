"""Per-request state shared by the postprocessor and the LLM, without touching prompts.

The engine's passage cache keys expansion decisions by passage text only, so two concurrent
queries that retrieve the same passage with a query-aware policy would overwrite each other's
decision. The postprocessor therefore also puts its decisions in a :mod:`contextvars` variable:
LlamaIndex runs retrieval, postprocessing and synthesis of one query in one context (one thread
for ``query``, one task for ``aquery``), so the LLM call of that query sees exactly its own
decisions; the registered decision is the fallback. The same mechanism carries a sink for
generation stats (:func:`collect_generation_stats`).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import GenerationStats

# passage id -> per-chunk decisions (True = expand), from the latest postprocessing in this context
_DECISIONS: ContextVar[Mapping[str, tuple[bool, ...]] | None] = ContextVar("refrag_decisions", default=None)
# where RefragLLM appends the stats of every generation made in this context
_STATS_SINK: ContextVar[list | None] = ContextVar("refrag_stats_sink", default=None)

def set_decisions(decisions: Mapping[str, tuple[bool, ...]]) -> None:
    """Make ``decisions`` (passage id -> per-chunk expand flags) the current request's."""
    _DECISIONS.set(dict(decisions))


def current_decisions() -> Mapping[str, tuple[bool, ...]]:
    return _DECISIONS.get() or {}


def stats_sink() -> list | None:
    return _STATS_SINK.get()


@contextlib.contextmanager
def collect_generation_stats() -> Iterator[list["GenerationStats"]]:
    """Collect the :class:`~refrag_integrations.GenerationStats` of every :class:`RefragLLM` call
    made inside the block (in this thread or task, and in threads/tasks it starts).

    Works with any query engine, including the stock ``RetrieverQueryEngine``. For a streaming
    response, the stats arrive once the stream has been consumed.

    Example:
        >>> with collect_generation_stats() as stats:       # doctest: +SKIP
        ...     response = query_engine.query("Who wrote Hamlet?")
        >>> len(stats), stats[0].positions, stats[0].prompt_tokens   # doctest: +SKIP
        (1, 212, 611)
    """
    sink: list = []
    token = _STATS_SINK.set(sink)
    try:
        yield sink
    finally:
        _STATS_SINK.reset(token)
