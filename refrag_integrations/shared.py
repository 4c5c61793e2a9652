"""The process-wide engines the framework adapters share.

Sharing matters for more than memory: an adapter's retrieval side registers passages in the
engine's process-local cache and its LLM side looks them up there, so both must use one engine.
LangChain and LlamaIndex adapters built without an explicit ``engine`` both come here, with the
same key, so using both frameworks in one process loads the models once.
"""

from __future__ import annotations

import threading
from typing import Any

from .engine import RefragEngine

_ENGINES: dict[tuple[Any, ...], RefragEngine] = {}
_ENGINES_LOCK = threading.Lock()


def _key(checkpoint: str | None, decoder: str | None, encoder: str | None, chunk_size: int | None,
         device: str | None) -> tuple[Any, ...]:
    return (None if checkpoint is None else str(checkpoint), decoder, encoder, chunk_size, device)


def shared_engine(
    checkpoint: str | None = None,
    *,
    decoder: str | None = None,
    encoder: str | None = None,
    chunk_size: int | None = None,
    device: str | None = None,
) -> RefragEngine:
    """The process-wide engine for these settings, loaded on first use and reused afterwards.

    Arguments are those of :meth:`RefragEngine.from_pretrained`; with none, the offline default
    models (and the packaged trained checkpoint, when there is one).

    Example:
        >>> from refrag_integrations.shared import shared_engine
        >>> engine = shared_engine()                                    # doctest: +SKIP
        >>> engine is shared_engine()                                   # doctest: +SKIP
        True
    """
    key = _key(checkpoint, decoder, encoder, chunk_size, device)
    with _ENGINES_LOCK:  # held while loading, so two threads never load the same models twice
        engine = _ENGINES.get(key)
        if engine is None:
            engine = RefragEngine.from_pretrained(
                checkpoint, decoder=decoder, encoder=encoder, chunk_size=chunk_size, device=device
            )
            _ENGINES[key] = engine
        return engine


def loaded_shared_engine(
    checkpoint: str | None = None,
    *,
    decoder: str | None = None,
    encoder: str | None = None,
    chunk_size: int | None = None,
    device: str | None = None,
) -> RefragEngine | None:
    """The shared engine for these settings if it is loaded already, else None (loads nothing)."""
    with _ENGINES_LOCK:
        return _ENGINES.get(_key(checkpoint, decoder, encoder, chunk_size, device))


def loaded_shared_engines() -> int:
    """How many shared engines this process holds (each one a set of loaded models)."""
    with _ENGINES_LOCK:
        return len(_ENGINES)
