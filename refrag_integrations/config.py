"""RefragConfig: the one place for defaults.

Every default the package uses (model names, the compression rate k, pooling, generation
lengths, cache sizes) lives here, so the library, the CLI and YAML configs agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Names of the offline default models, resolved by `refrag_integrations.models`.
DEFAULT_DECODER = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
DEFAULT_EMBEDDER = DEFAULT_ENCODER  # retrieval embedder (sentence-transformers)

DEFAULT_CHUNK_SIZE = 16  # k, decoder tokens per chunk
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_EXPAND_FRACTION = 0.25  # p used by `refrag ask` with a selective policy
DEFAULT_PASSAGE_CACHE_SIZE = 4096  # passages kept in the engine's process-local cache
# Tokens that stay uncompressed in any prompt (template, question, chat markup; the answer is
# counted separately) when a framework adapter reports the decoder's context window scaled by the
# compression rate (LlamaIndex's PromptHelper packs retrieved passages into what is left).
PROMPT_RESERVE_TOKENS = 256

POOLINGS = ("mean", "cls")

# The instruction that frames retrieved passages. Training (sft) and inference share it.
RAG_SYSTEM_PROMPT = "Answer the question using the passages. Reply with a short answer."


def cache_dir() -> Path:
    """Where converted default models and other derived files are kept.

    ``$REFRAG_CACHE`` overrides the default ``~/.cache/refrag-integrations``.
    """
    root = os.environ.get("REFRAG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refrag-integrations"
    )
    return Path(root)


@dataclass
class RefragConfig:
    """Configuration of a REFRAG model: which base models, how chunks are made and projected.

    Example:
        >>> cfg = RefragConfig(chunk_size=16)
        >>> cfg.chunk_size
        16
    """

    decoder: str = field(
        default=DEFAULT_DECODER,
        metadata={"help": "Decoder: HF id, local path, or the packaged default name."},
    )
    encoder: str = field(
        default=DEFAULT_ENCODER,
        metadata={"help": "Chunk encoder: HF id, local path, or the packaged default name."},
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "k: decoder tokens per chunk (8, 16, 32)."}
    )
    pooling: str = field(
        default="mean", metadata={"help": "How encoder token states become one chunk vector."}
    )
    projector_hidden: int | None = field(
        default=None,
        metadata={"help": "Hidden width of the 2-layer MLP projector; None = decoder hidden size."},
    )
    encoder_dim: int | None = field(
        default=None, metadata={"help": "Encoder hidden size (filled in when models load)."}
    )
    decoder_dim: int | None = field(
        default=None, metadata={"help": "Decoder hidden size (filled in when models load)."}
    )
    decoder_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the decoder weights a checkpoint was built on."}
    )
    encoder_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the encoder weights a checkpoint was built on."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(
                f"chunk_size (k) must be a positive integer, got {self.chunk_size!r}; "
                "the paper uses 8, 16 or 32."
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.projector_hidden is not None and self.projector_hidden < 1:
            raise ValueError(f"projector_hidden must be positive or None, got {self.projector_hidden!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefragConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown RefragConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
