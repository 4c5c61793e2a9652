"""Where the LangChain adapters get their :class:`RefragEngine`: one given by the user, or one
loaded lazily and shared (:func:`refrag_integrations.shared.shared_engine`) by every adapter,
LangChain or LlamaIndex, that names the same settings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from ..adapter_arguments import LANGCHAIN_HINTS, refuse_unknown_arguments, renamed_settings
from ..engine import RefragEngine
from ..shared import loaded_shared_engine, shared_engine

SETTINGS = ("checkpoint", "decoder", "encoder", "chunk_size", "device")
# Accepted although not fields: LangChain's own deprecated name, moved by its validators.
_ACCEPTED = {"callback_manager"}


def refuse_unknown(cls: type[BaseModel], values: dict[str, Any]) -> None:
    """Raise a TypeError naming every keyword ``cls`` has no field (or alias) for."""
    known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias} | _ACCEPTED
    refuse_unknown_arguments(cls.__name__, values, known, LANGCHAIN_HINTS)


class RefragEngineFields(BaseModel):
    """The fields every adapter uses to find its engine (mixed into the LangChain classes)."""

    engine: Any = Field(
        default=None,
        exclude=True,
        repr=False,
        description="A loaded RefragEngine. If None, one is loaded on first use from the settings "
        "below and shared with every adapter that names the same settings.",
    )
    checkpoint: str | None = Field(
        default=None, description="REFRAG checkpoint directory (None: the packaged default, if any)."
    )
    decoder: str | None = Field(
        default=None,
        description="Decoder: HF id, local path or default name (``model=`` is the same setting). With "
        "engine=, only the engine's own decoder is accepted.",
    )
    encoder: str | None = Field(default=None, description="Chunk encoder: HF id, local path or default name.")
    chunk_size: int | None = Field(default=None, description="k, decoder tokens per chunk (None: the default).")
    device: str | None = Field(default=None, description="Device for the models (None: cuda if available).")

    @model_validator(mode="before")
    @classmethod
    def _arguments(cls, values: Any) -> Any:
        """Deprecated names (with a warning), ``model`` as the decoder, unknown names refused."""
        if not isinstance(values, dict):
            return values
        values = renamed_settings(values) if "policy" in cls.model_fields else dict(values)
        if "model" in values:
            model = values.pop("model")
            if values.get("decoder") is not None and model is not None and values["decoder"] != model:
                raise ValueError(f"model={model!r} and decoder={values['decoder']!r} disagree; give one of them.")
            values["decoder"] = values.get("decoder") or model
        refuse_unknown(cls, values)
        return values

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, RefragEngine):
            raise TypeError(f"engine must be a RefragEngine or None, got {type(value).__name__}.")
        return value

    @model_validator(mode="after")
    def _engine_or_settings(self) -> "RefragEngineFields":
        if self.engine is not None and self.decoder is not None:
            own = str(self.engine.config.decoder)
            if self.decoder != own:
                raise ValueError(
                    f"decoder/model={self.decoder!r} names another decoder than the engine's ({own!r}). Give "
                    "either engine= or the settings to load one (decoder=...), not both."
                )
            self.decoder = None  # the engine's own decoder: nothing to load
        named = self.named_settings()
        if self.engine is not None and named:
            raise ValueError(
                f"Give either engine= or the settings to load one ({', '.join(named)}), not both."
            )
        return self

    def named_settings(self) -> list[str]:
        """The engine settings given (besides engine=)."""
        return [n for n in SETTINGS if getattr(self, n) is not None]

    def loaded_engine(self) -> RefragEngine | None:
        """The engine if it is at hand without loading: the one given, or the shared one for
        these settings once loaded."""
        if self.engine is not None:
            return self.engine
        return loaded_shared_engine(
            self.checkpoint, decoder=self.decoder, encoder=self.encoder, chunk_size=self.chunk_size, device=self.device
        )

    def get_engine(self) -> RefragEngine:
        """The engine: the one given, else the shared one for these settings (loaded now if needed)."""
        if self.engine is not None:
            return self.engine
        return shared_engine(
            self.checkpoint, decoder=self.decoder, encoder=self.encoder,
            chunk_size=self.chunk_size, device=self.device,
        )

    def _decoder_name(self) -> str:
        """The decoder's name without loading anything (for tracing and response metadata)."""
        from ..config import DEFAULT_DECODER

        if self.engine is not None:
            return str(self.engine.config.decoder)
        if self.decoder is not None:
            return self.decoder
        loaded = self.loaded_engine()
        if loaded is not None:
            return str(loaded.config.decoder)
        if self.checkpoint is not None:  # the checkpoint names its decoder in its small json file
            import json
            from pathlib import Path

            from ..checkpoint import CONFIG_FILE

            try:
                return str(json.loads((Path(self.checkpoint) / CONFIG_FILE).read_text())["config"]["decoder"])
            except (OSError, ValueError, KeyError, TypeError):
                return str(self.checkpoint)
        return DEFAULT_DECODER
