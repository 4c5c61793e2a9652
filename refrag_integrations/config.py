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
DEFAULT_DATA_DIR = "../shared/data"  # the shared real data (training, evaluation), relative to the project root
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_EXPAND_FRACTION = 0.25  # p used by `refrag ask` with a selective policy
DEFAULT_PASSAGE_CACHE_SIZE = 4096  # passages kept in the engine's process-local cache
# Micro-batching of concurrent requests (batching.py): the first request of a batch waits at most
# this long for concurrent requests still being prepared (announced), then decodes with them as one
# left-padded batch of at most this many rows (1 = one request at a time). A lone request never
# waits; the wait ends as soon as no announced request is left in preparation; 0 never waits.
DEFAULT_BATCH_WINDOW_S = 0.25
DEFAULT_MAX_BATCH_SIZE = 16
REGISTRATIONS_KEPT = 256  # per engine, the latest retrievals whose passages an LLM adapter may compress
# Tokens that stay uncompressed in any prompt (template, question, chat markup; the answer is
# counted separately) when a framework adapter reports the decoder's context window scaled by the
# compression rate (LlamaIndex's PromptHelper packs retrieved passages into what is left).
PROMPT_RESERVE_TOKENS = 256

POOLINGS = ("mean", "cls")
# What a chunk vector sees: its own k tokens only (the paper: chunks encoded independently), or its
# whole passage, encoded once and pooled over the chunk's token span (a chunk knows its neighbours;
# still computed once per passage at index time and stored per chunk).
CHUNK_CONTEXTS = ("chunk", "passage")
# An encoder named "decoder:N" is the decoder's own first N layers (OSCAR, arXiv 2504.07109): its
# token states start in the decoder's space and it reads the decoder's tokens, so chunk spans are exact.
DECODER_ENCODER_PREFIX = "decoder:"
PASSAGE_ENCODER_MAX_TOKENS = 512  # chunk_context="passage": longer passages are encoded in windows of whole chunks

# The instruction that frames retrieved passages. Training (sft) and inference share it.
RAG_SYSTEM_PROMPT = "Answer the question using the passages. Reply with a short answer."

# Indexing and retrieval (store.py, index.py; `refrag index`, `refrag ask --index`, `refrag demo`).
DEFAULT_COLLECTION = "refrag"  # Chroma collections are named <collection>_passages, <collection>_chunks_<fp>
PASSAGE_MIN_WORDS = 100  # a passage ends at the first paragraph boundary once it has this many words
PASSAGE_MAX_WORDS = 200  # ... and never grows past this many (split on sentences, then on words)
MAX_PARAGRAPH_CHARS = 1 << 16  # a longer run of text without a blank line is cut (bounded memory)
MAX_JSONL_LINE_CHARS = 1 << 24  # a longer JSON line is reported and skipped, never loaded
READ_BLOCK_CHARS = 1 << 20  # files are streamed in blocks of this size
DEFAULT_INDEX_BATCH_SIZE = 64  # passages embedded and written per round trip
# Chunk vectors are fetched by passage id, never searched by similarity, so their collection gets
# the cheapest HNSW graph Chroma allows (writes ~3x faster); passages get cosine search.
CHUNK_COLLECTION_HNSW = {"space": "l2", "ef_construction": 16, "max_neighbors": 4}
PASSAGE_COLLECTION_HNSW = {"space": "cosine"}
INDEX_LOCK_TIMEOUT_S = 300.0  # a second writer of an embedded index waits this long for the first
CHROMA_SERVER_TIMEOUT_S = 30.0  # every call to a Chroma server fails after this long without an answer
DEFAULT_TOP_K = 8  # passages retrieved per question
MAX_TOP_K = 100  # `--top-k` limit: more passages than this cannot fit a decoder's context window, even compressed
# `refrag ask --passages FILE` counts characters before tokenising anything: a longer passage, or a
# file with more characters of passages in all, is refused (`refrag index` splits such files instead).
MAX_PASSAGE_CHARS = 1 << 15
MAX_CONTEXT_CHARS = 1 << 18

# Decoder backends (backends/; `--backend vllm --base-url ...`, adapters' backend= / base_url=).
DECODER_BACKENDS = ("transformers", "vllm")  # in-process decoder (default), or a vLLM server
VLLM_CONNECT_TIMEOUT_S = 10.0  # connecting to the vLLM server fails after this long
VLLM_READ_TIMEOUT_S = 600.0  # waiting for the next streamed piece of an answer fails after this long
DECODER_FINGERPRINT_FILE = "refrag_decoder.json"  # written by `refrag export decoder` next to the weights
SERVE_MAX_REQUEST_BYTES = 4 << 20  # `refrag serve` refuses larger request bodies (HTTP 413)
SERVE_PORT = 8080  # where `refrag serve` listens by default
DEMO_QUESTIONS = 5  # questions `refrag demo` asks
DEMO_MAX_NEW_TOKENS = 32  # answer length limit in `refrag demo` (short NQ answers)

# The learned expansion policy (training/policy_rl.py, `refrag train policy`): the paper's 2-layer
# transformer over the pre-projection chunk vectors c_i, one logit per chunk.
POLICY_WIDTH = 128  # transformer width; c_i is projected from the encoder width to this
POLICY_HEADS = 4  # attention heads (must divide POLICY_WIDTH)
POLICY_LAYERS = 2  # the paper's 2 layers
POLICY_MAX_CHUNK_INDEX = 64  # learned embeddings of a chunk's index inside its passage; later chunks share the last
POLICY_SIM_SCALE = 10.0  # query variant: initial weight of cos(c_i, query) in the logits (starts near "relevance")
SCORE_BATCH_ROWS = 16  # decoder rows per batched teacher-forced NLL forward (RefragEngine.score: rewards, evaluation)
SCORE_PAD_TOLERANCE = 1.25  # a row joins a batch only if it is at most this much longer than the batch's first
GRPO_STD_EPS = 1e-6  # advantage = (r - mean) / (std + eps) within a group
POLICY_EVAL_SEED = 10_000  # eval question i draws its distractors with seed + i (as the sft evaluation does)


def cache_dir() -> Path:
    """Where converted default models and other derived files are kept.

    ``$REFRAG_CACHE`` overrides the default ``~/.cache/refrag-integrations``.
    """
    root = os.environ.get("REFRAG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refrag-integrations"
    )
    return Path(root)


def default_index_dir() -> Path:
    """Where `refrag index` and `refrag ask` keep the embedded Chroma index by default."""
    return cache_dir() / "index"


def demo_index_dir() -> Path:
    """Where `refrag demo` keeps the index of the shipped demo corpus (reused on later runs)."""
    return cache_dir() / "demo-index"


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
        metadata={"help": "Chunk encoder: HF id, local path, the packaged default name, or 'decoder:N' (the "
                  "decoder's own first N layers)."},
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "k: decoder tokens per chunk (8, 16, 32)."}
    )
    pooling: str = field(
        default="mean", metadata={"help": "How encoder token states become one chunk vector."}
    )
    chunk_context: str = field(
        default="chunk",
        metadata={"help": "What a chunk vector sees: 'chunk' (its own k tokens, the paper) or 'passage' (the "
                  "whole passage encoded once, each chunk's span pooled)."},
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
        if self.chunk_context not in CHUNK_CONTEXTS:
            raise ValueError(f"chunk_context must be one of {CHUNK_CONTEXTS}, got {self.chunk_context!r}.")
        if self.chunk_context == "passage" and self.pooling != "mean":
            raise ValueError(
                f"chunk_context='passage' pools each chunk's token span, so pooling must be 'mean', got {self.pooling!r}."
            )
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
