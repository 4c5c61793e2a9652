"""Decoder backends: where the engine's prepared mixed inputs are decoded.

The engine keeps everything that is REFRAG (chunking, chunk vectors, expansion policy, projector,
mixed-input assembly, chat template, stop strings, stats) and produces
:class:`~refrag_integrations.engine.PreparedInput` rows: float32 ``(positions, hidden)`` input
embeddings. A decoder backend turns those into text:

- ``"transformers"`` (the default): the engine's own in-process decoder, prefill from
  ``inputs_embeds`` and KV-cache decode (:meth:`RefragEngine.generate_prepared` with no backend).
- ``"vllm"``: a vLLM server started with ``--enable-prompt-embeds`` on the decoder written by
  ``refrag export decoder``; see :class:`~refrag_integrations.backends.vllm_server.VllmBackend`.

Example:
    >>> from refrag_integrations.backends import resolve_backend
    >>> resolve_backend("transformers") is None     # the in-process decoder
    True
    >>> resolve_backend("vllm", "http://localhost:8000/v1")                  # doctest: +SKIP
    VllmBackend(base_url='http://localhost:8000/v1')
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

from ..config import DECODER_BACKENDS

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import GenerationResult, PreparedInput, RefragEngine


@runtime_checkable
class DecoderBackend(Protocol):
    """What decodes prepared mixed inputs for :class:`~refrag_integrations.engine.RefragEngine`.

    ``generate`` gets the same settings as the in-process decode loop and returns one
    :class:`~refrag_integrations.engine.GenerationResult` per prepared input, with the input's
    stats completed (``ttft_s``, ``total_s``, ``new_tokens``); ``on_text(row, piece)`` receives
    the text as it is decoded (what streaming is built on). When ``cancel(row)`` turns true (the
    row's consumer went away, e.g. closed its stream), the backend stops that row as soon as it
    can, releasing what it holds on the server, and returns it with ``finish_reason ==
    "cancelled"``. ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens (benchmarks).
    """

    name: str

    def generate(
        self,
        engine: "RefragEngine",
        prepared: Sequence["PreparedInput"],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        stop: Sequence[str] | None,
        seed: int | None,
        t_start: float,
        on_text: Callable[[int, str], None] | None = None,
        cancel: Callable[[int], bool] | None = None,
        ignore_eos: bool = False,
    ) -> list["GenerationResult"]: ...

    def stream_steps(
        self, engine: "RefragEngine", prepared: "PreparedInput", *, t_start: float, ignore_eos: bool = False,
        **gen: Any,
    ) -> Iterator[dict[str, Any]]:
        """Decode one prepared input, yielding ``{"text", "token_ids", "finish_reason", "usage",
        "ttft"}`` as pieces arrive (``ttft`` on the first only); ``ignore_eos`` decodes exactly
        ``max_new_tokens`` tokens (what ``refrag bench`` times)."""
        ...


def resolve_backend(backend: Any = "transformers", base_url: str | None = None, **options: Any) -> DecoderBackend | None:
    """The decoder backend for a name (what the CLI and the adapters take), or a backend object.

    Args:
        backend: ``"transformers"`` or None (the engine's in-process decoder: returns None),
            ``"vllm"`` (needs ``base_url``), or a :class:`DecoderBackend` object (returned as is).
        base_url: the vLLM server's OpenAI-compatible API root, e.g. ``http://HOST:8000/v1``.
        options: passed to :class:`~refrag_integrations.backends.vllm_server.VllmBackend`
            (``model``, ``api_key``, ``verify_model``, timeouts).

    Raises:
        ValueError: an unknown backend name, ``"vllm"`` without ``base_url``, or ``base_url``
            given for the in-process decoder (it would be ignored).
        TypeError: ``backend`` is neither a name nor a backend object.
    """
    if isinstance(backend, DecoderBackend) and not isinstance(backend, str):
        if base_url is not None or options:
            raise ValueError("Give base_url / backend options only with a backend name, not with a backend object.")
        return backend
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"backend must be one of {DECODER_BACKENDS} or a DecoderBackend object, got {type(backend).__name__}."
        )
    name = "transformers" if backend is None else backend
    if name not in DECODER_BACKENDS:
        raise ValueError(f"Unknown decoder backend {name!r}; choose one of {DECODER_BACKENDS}.")
    if name == "transformers":
        if base_url is not None or options:
            raise ValueError(
                "base_url and backend options are for backend='vllm'; the 'transformers' backend decodes "
                "in-process. Add backend='vllm' (CLI: --backend vllm) or drop base_url."
            )
        return None
    if not base_url:
        raise ValueError(
            "backend='vllm' needs base_url (CLI: --base-url), the vLLM server's API root, e.g. 'http://localhost:8000/v1'."
        )
    from .vllm_server import VllmBackend

    return VllmBackend(base_url, **options)


_SHARED: dict[tuple[str, str | None], "DecoderBackend | None"] = {}
_SHARED_LOCK = threading.Lock()


def shared_backend(backend: str | None = "transformers", base_url: str | None = None) -> DecoderBackend | None:
    """The process-wide backend for a name and URL (what the adapters use: one HTTP connection
    pool, and one served-model check, per server). Arguments as in :func:`resolve_backend`."""
    key = ("transformers" if backend is None else backend, base_url)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = resolve_backend(backend, base_url)
        return _SHARED[key]


__all__ = ["DecoderBackend", "resolve_backend", "shared_backend"]
