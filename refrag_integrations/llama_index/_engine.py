"""Where the LlamaIndex adapters get their :class:`RefragEngine`: the one given (``engine=``), or
the process-wide shared one for the settings named here (:func:`~refrag_integrations.shared.shared_engine`),
loaded on first use; and the check of their constructor arguments.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr

from ..adapter_arguments import LLAMA_INDEX_HINTS, refuse_unknown_arguments, renamed_settings
from ..engine import RefragEngine
from ..shared import shared_engine

SETTINGS = ("checkpoint", "decoder", "encoder", "chunk_size", "device")


class EngineSettings(BaseModel):
    """The engine fields shared by :class:`RefragLLM` and :class:`RefragNodePostprocessor`."""

    checkpoint: Optional[str] = Field(
        default=None,
        description="REFRAG checkpoint directory for the shared engine when no engine is given "
        "(None: the packaged default, if any).",
    )
    decoder: Optional[str] = Field(
        default=None,
        description="Decoder (HF id, local path or default name) of the shared engine when no engine "
        "is given; with an engine, only its own decoder is accepted.",
    )
    encoder: Optional[str] = Field(default=None, description="Chunk encoder of the shared engine (None: the default).")
    chunk_size: Optional[int] = Field(default=None, gt=0, description="k of the shared engine (None: the default).")
    device: Optional[str] = Field(default=None, description="Device of the shared engine (None: cuda if available).")

    _engine: Optional[RefragEngine] = PrivateAttr(default=None)
    _engine_lock: Any = PrivateAttr(default_factory=threading.Lock)

    @property
    def engine(self) -> RefragEngine:
        """The engine: the one given, else the shared one for these settings (loaded on first use)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = shared_engine(
                        self.checkpoint, decoder=self.decoder, encoder=self.encoder,
                        chunk_size=self.chunk_size, device=self.device,
                    )
        return self._engine


def checked_arguments(cls: type[BaseModel], engine: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of an adapter's constructor, checked: deprecated names mapped (with a
    DeprecationWarning), unknown names refused with a TypeError naming the right one, engine
    settings refused next to an engine (a ``decoder`` equal to the engine's own is dropped)."""
    if engine is not None and not isinstance(engine, RefragEngine):
        raise TypeError(f"engine must be a RefragEngine, got {type(engine).__name__}.")
    kwargs = renamed_settings(kwargs) if "policy" in cls.model_fields else dict(kwargs)
    known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
    refuse_unknown_arguments(cls.__name__, kwargs, known, LLAMA_INDEX_HINTS)
    if engine is not None:
        decoder = kwargs.get("decoder")
        if decoder is not None:
            own = str(engine.config.decoder)
            if decoder != own:
                raise ValueError(
                    f"decoder={decoder!r} names another decoder than the engine's ({own!r}). Give either "
                    "engine= or the settings to load one (decoder=...), not both."
                )
            kwargs.pop("decoder")
        named = [n for n in SETTINGS if kwargs.get(n) is not None]
        if named:
            raise ValueError(f"Give either engine= or the settings to load one ({', '.join(named)}), not both.")
    return kwargs
