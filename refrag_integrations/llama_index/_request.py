"""Per-request state shared by the postprocessor and the LLM, without touching prompts.

The postprocessor records each retrieval's passages and decisions as a
:class:`~refrag_integrations.registrations.Registration` and also puts it in a :mod:`contextvars`
variable: LlamaIndex runs retrieval, postprocessing and synthesis of one query in one context
(one thread for ``query``, one task for ``aquery``), so the LLM calls of that query compress
exactly that query's passages with its own decisions, even when concurrent queries share a
passage. Outside such a context the LLM recognises the request among the engine's registrations
(:func:`~refrag_integrations.registrations.match_prompt`). The same mechanism carries a sink for
generation stats (:func:`collect_generation_stats`).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import GenerationStats
    from ..registrations import Registration

# the registration of the latest postprocessing in this context
_REGISTRATION: ContextVar["Registration | None"] = ContextVar("refrag_registration", default=None)
# where RefragLLM appends the stats of every generation made in this context
_STATS_SINK: ContextVar[list | None] = ContextVar("refrag_stats_sink", default=None)


def set_registration(registration: "Registration | None") -> None:
    """Make ``registration`` the current request's (None: the request registered nothing)."""
    _REGISTRATION.set(registration)


def current_registration() -> "Registration | None":
    return _REGISTRATION.get()


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
