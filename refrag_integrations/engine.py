"""RefragEngine: assemble REFRAG's mixed decoder input, prefill, and decode with the KV cache.

This is the one place that builds ``inputs_embeds``. The prompt is cut into segments: ordinary
text (instruction, question, chat-template markup) stays tokens; each passage is cut into chunks
of k decoder tokens, and each chunk enters the decoder either as its k token embeddings
(expanded) or as one projected chunk vector (compressed), in the original order, at contiguous
positions, under the normal causal mask. The first new token comes from the prefill logits; the
rest are decoded with the KV cache.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Sequence, Union

import torch

from .batching import MicroBatcher
from .chunking import Chunk, chunk_passage, passage_id, special_prefix_ids
from .checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    apply_delta,
    default_checkpoint,
    is_base_model,
    load_checkpoint,
)
from .config import (
    DEFAULT_BATCH_WINDOW_S,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PASSAGE_CACHE_SIZE,
    RAG_SYSTEM_PROMPT,
    SCORE_BATCH_ROWS,
    SCORE_PAD_TOLERANCE,
    RefragConfig,
)
from .encoder import ChunkEncoder, compute_chunk_vector_fingerprint
from .lora import merge_lora
from .policy import (
    ExpandAll,
    ExpansionBudget,
    ExpansionPolicy,
    ExpandNone,
    QueryRelevancePolicy,
    as_budget,
    load_policy,
    resolve_policy,
)
from .prompt_text import check_prompt, check_text, render_chat, tokenize_prompt

if TYPE_CHECKING:  # pragma: no cover
    from .backends import DecoderBackend

logger = logging.getLogger(__name__)


class UntrainedProjectorWarning(UserWarning):
    """An engine was created with an untrained chunk projector: compressed chunks carry no usable
    information. Such an engine's default policy is ordinary RAG (every chunk expanded); REFRAG
    compression is opt-in (``policy=`` or ``expand_fraction=``)."""

# What decides which chunks stay tokens: a policy (object or name), explicit per-passage
# decisions (one bool per chunk, True = expand), or None (registered decisions, else the default).
Expand = Union[str, ExpansionPolicy, Sequence[Sequence[bool]], None]
# How many chunks a policy may expand: fraction p (float), max count (int), or both.
Budget = Union[ExpansionBudget, float, int, None]


def _locked(method: Callable) -> Callable:
    """Run an engine method under the engine's RLock: fast tokenizers carry mutable state
    (``split_special_tokens`` toggles the backend), so tokenising and encoding from several
    threads at once (LangChain ``batch``/``abatch``) must be serialised. Decoding takes this lock
    only to turn token ids into text, so requests are prepared while a batch decodes."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- outputs


@dataclass
class GenerationStats:
    """What one request cost.

    Attributes:
        context_tokens: decoder tokens of the passages (what ordinary RAG would feed).
        prompt_tokens: decoder tokens of the whole prompt if nothing were compressed.
        positions: decoder positions the prompt actually used (= KV-cache entries after prefill).
        chunks / chunks_compressed / chunks_expanded: chunk counts over all passages.
        expanded: per passage, the indices of the expanded chunks.
        cached_chunks: chunk vectors that were precomputed (store or cache), not encoded now.
        encode_s: seconds spent encoding chunks at query time ("not cached" cost).
        ttft_s: seconds from the request to the first generated token (assembly, any query-time
            encoding, waiting for the batch (the batching window, or a batch decoding before it),
            prefill, first-token selection; never model loading).
        total_s: seconds for the whole request (in a batch: until the batch ends).
        new_tokens: generated tokens.
        trained: whether the chunk projector was trained (False = compressed chunks are noise).
    """

    context_tokens: int = 0
    prompt_tokens: int = 0
    positions: int = 0
    chunks: int = 0
    chunks_compressed: int = 0
    chunks_expanded: int = 0
    expanded: list[list[int]] = field(default_factory=list)
    cached_chunks: int = 0
    encode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    new_tokens: int = 0
    trained: bool = False

    @property
    def positions_saved(self) -> int:
        return self.prompt_tokens - self.positions

    @property
    def compression_rate(self) -> float:
        """Prompt tokens per decoder position used (1.0 = no compression)."""
        return self.prompt_tokens / max(self.positions, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["positions_saved"] = self.positions_saved
        d["compression_rate"] = round(self.compression_rate, 4)
        return d


@dataclass
class GenerationResult:
    """The generated text, its token ids, why it stopped and stats.

    ``finish_reason`` is ``"stop"`` (EOS or a stop string), ``"length"`` (``max_new_tokens``) or
    ``"cancelled"`` (the consumer closed the stream). The text never ends in half a character:
    an incomplete UTF-8 sequence at the end (cut by ``max_new_tokens``) is left out of ``text``
    (its ids stay in ``token_ids``), so a stream's pieces always join to ``text``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


@dataclass
class PreparedInput:
    """A mixed decoder input ready for prefill.

    Attributes:
        embeds: ``(T, d)`` input embeddings, one row per decoder position.
        token_ids: the full token sequence as if every chunk were expanded (for reference/tests).
        stats: the counts (timings are filled in by generation).
    """

    embeds: torch.Tensor
    token_ids: list[int]
    stats: GenerationStats


@dataclass
class CachedPassage:
    """A passage in the engine's process-local cache (see :meth:`RefragEngine.lookup_passage`);
    read it, never change it (use the engine's methods).

    Attributes:
        text: the passage text.
        chunks: its chunks.
        vectors: pre-projection chunk vectors ``(L, d_enc)``, once known.
        expand: the decision a retriever adapter registered, if any.
        registered: put there by :meth:`RefragEngine.register_passage` (compressed in prompts).
    """

    text: str
    chunks: list[Chunk]
    vectors: torch.Tensor | None = None  # (L, d_enc) pre-projection, float32, cpu
    expand: list[bool] | None = None  # a decision registered by a retriever adapter
    registered: bool = False  # put here by register_passage: found and compressed in prompts


@dataclass
class ChunkVectors:
    """Pre-projection chunk vectors of some passages (:meth:`RefragEngine.chunk_vectors`).

    Attributes:
        vectors: per passage, ``(L_j, d_enc)`` float32 on CPU.
        cached_chunks: chunks whose vectors were precomputed (cache or store), not encoded now.
        encode_s: seconds spent encoding the others.
    """

    vectors: list[torch.Tensor]
    cached_chunks: int
    encode_s: float


@dataclass
class RagPrompt:
    """The RAG prompt of :meth:`RefragEngine.build_prompt`.

    Attributes:
        text: the prompt (chat template applied when the decoder has one).
        spans: the character span of each passage inside it.
        add_special_tokens: whether the tokenizer's special tokens (BOS) must still be added.
        markup_spans: the character spans of chat-template markup (control tokens stay control
            tokens there; everywhere else, the question included, they are text).
    """

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool
    markup_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class RegisteredPassage:
    """A retrieved passage registered by :meth:`RefragEngine.register_retrieved`.

    Attributes:
        passage_id: its id (content hash) in the engine's cache.
        text: the passage text.
        expand: one decision per chunk (True = kept as tokens).
        tokens: its decoder tokens.
        positions: decoder positions it takes under ``expand``.
    """

    passage_id: str
    text: str
    expand: list[bool]
    tokens: int
    positions: int

    @property
    def expanded(self) -> list[int]:
        """Indices of the chunks kept as tokens."""
        return [i for i, keep in enumerate(self.expand) if keep]

    @property
    def compression_rate(self) -> float:
        """Passage tokens per decoder position (1.0 = nothing compressed)."""
        return self.tokens / max(self.positions, 1)


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack sequences of embeddings ``(T_i, d)`` into one left-padded batch.

    Returns:
        ``(x, mask, positions)``: embeddings ``(B, T, d)`` (zeros as padding), the attention mask
        ``(B, T)`` and position ids ``(B, T)`` that are contiguous from 0 in every row.

    Example:
        >>> x, mask, pos = left_pad([torch.ones(2, 4), torch.ones(3, 4)])
        >>> mask.tolist(), pos.tolist()
        ([[0, 1, 1], [1, 1, 1]], [[0, 0, 1], [0, 1, 2]])
    """
    lengths = [r.shape[0] for r in rows]
    T, B, d = max(lengths), len(rows), rows[0].shape[1]
    x = rows[0].new_zeros(B, T, d)  # (B, T, d)
    mask = torch.zeros(B, T, dtype=torch.long, device=x.device)  # (B, T)
    for b, r in enumerate(rows):
        x[b, T - lengths[b] :] = r
        mask[b, T - lengths[b] :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return x, mask, pos


def length_batches(lengths: Sequence[int], max_rows: int, tolerance: float) -> list[list[int]]:
    """Split positions of ascending ``lengths`` into batches of at most ``max_rows`` rows whose
    longest row is at most ``tolerance`` times the first (little padding)."""
    batches: list[list[int]] = []
    for j, n in enumerate(lengths):
        if batches and len(batches[-1]) < max_rows and n <= lengths[batches[-1][0]] * tolerance:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


def expansion_settings(
    policy: Expand = None,
    expand_fraction: float | None = None,
    max_expanded: int | None = None,
    *,
    expand: Expand = None,
    budget: Budget = None,
) -> tuple[Expand, ExpansionBudget | None]:
    """The expansion policy and budget from the public arguments, where ``expand`` and ``budget``
    are the deprecated names of ``policy`` and ``expand_fraction`` / ``max_expanded`` (they warn).

    Returns:
        ``(policy, budget)``; ``None`` for either means the engine's default.

    Example:
        >>> expansion_settings("relevance", 0.25)
        ('relevance', ExpansionBudget(fraction=0.25, max_count=None))
    """
    if expand is not None:
        warnings.warn("expand= is deprecated; pass the expansion policy as policy=.", DeprecationWarning, stacklevel=3)
        if policy is not None:
            raise ValueError("Give policy= only; expand= is its deprecated name.")
        policy = expand
    if budget is not None:
        warnings.warn(
            "budget= is deprecated; use expand_fraction= (p) and/or max_expanded=.", DeprecationWarning, stacklevel=3
        )
        if expand_fraction is not None or max_expanded is not None:
            raise ValueError("Give expand_fraction= / max_expanded= only; budget= is their deprecated name.")
        return policy, as_budget(budget)
    if expand_fraction is None and max_expanded is None:
        return policy, None
    if isinstance(expand_fraction, bool) or not isinstance(expand_fraction, (int, float, type(None))):
        raise TypeError(f"expand_fraction must be a number in [0, 1] or None, got {type(expand_fraction).__name__}.")
    fraction = None if expand_fraction is None else float(expand_fraction)
    return policy, ExpansionBudget(fraction=fraction, max_count=max_expanded)


def default_policy(trained: bool, has_budget: bool, chunk_encoder: ChunkEncoder) -> ExpansionPolicy:
    """The default expansion policy of an engine created without one.

    A trained projector compresses every chunk (p = 0) unless told otherwise. An untrained one
    must not compress by default (its chunk vectors carry no usable information): it does ordinary
    RAG (every chunk expanded), unless a default ``expand_fraction`` / ``max_expanded`` opts into
    REFRAG, which then keeps the chunks most relevant to the question (``"relevance"``).

    Example:
        >>> default_policy(False, False, encoder)                       # doctest: +SKIP
        ExpandAll()
    """
    if trained:
        return ExpandNone()
    return QueryRelevancePolicy(chunk_encoder) if has_budget else ExpandAll()


def ignores_budget(policy: ExpansionPolicy, budget: ExpansionBudget) -> bool:
    """Whether a non-selective ``policy`` (expand all / none) would silently ignore ``budget``:
    expand-all under a budget below every chunk, or expand-none under a budget above zero."""
    if isinstance(policy, ExpandAll):
        return (budget.fraction is not None and budget.fraction < 1.0) or budget.max_count is not None
    if isinstance(policy, ExpandNone):
        return bool(budget.fraction) or bool(budget.max_count)
    return False


def check_temperature(temperature: Any) -> float:
    """Return ``temperature`` if it is a finite number >= 0 (0 with sampling = nearly greedy).

    Raises:
        TypeError: it is not a number.
        ValueError: it is NaN, infinite or negative.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number >= 0, got {type(temperature).__name__} {temperature!r}.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0, got {temperature!r}; use 0 (or do_sample=False) for "
            "greedy decoding, about 0.7 for sampling."
        )
    return float(temperature)


def check_top_p(top_p: Any) -> float:
    """Return ``top_p`` if it is a number in (0, 1] (1 = sample from the whole distribution).

    Raises:
        TypeError: it is not a number.
        ValueError: it is NaN or outside (0, 1].
    """
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a number in (0, 1], got {type(top_p).__name__} {top_p!r}.")
    if not 0.0 < top_p <= 1.0:  # NaN fails this too
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}; use 1.0 to keep the whole distribution.")
    return float(top_p)


def check_sampling(temperature: Any, top_p: Any) -> None:
    """Refuse sampling settings that would turn the next-token distribution into NaN or nothing
    (checked by every generating entry point before any work; see :func:`check_temperature`,
    :func:`check_top_p`)."""
    check_temperature(temperature)
    check_top_p(top_p)


def normalise_decisions(decisions: Any, counts: Sequence[int], k: int, what: str = "policy") -> list[list[bool]]:
    """Check explicit per-chunk expansion decisions and return them as lists of bools.

    Args:
        decisions: one list per passage, one entry per chunk: a bool, or the int 0 / 1
            (True / 1 = keep the chunk as tokens).
        counts: the number of chunks of each passage.
        k: the chunk size (named in errors).
        what: the argument's name in errors.

    Raises:
        TypeError: ``decisions`` is not a list of lists (e.g. a flat list or a string), or an
            entry is not a bool / 0 / 1.
        ValueError: the number of passages or of a passage's chunks differs, or an int entry is
            not 0 or 1.

    Example:
        >>> normalise_decisions([[1, 0], [True]], [2, 1], 16)
        [[True, False], [True]]
    """
    hint = f"give one list per passage with one bool per chunk, e.g. {what}=[[True, False], [False]]"
    if isinstance(decisions, (str, bytes, dict)) or not hasattr(decisions, "__iter__"):
        raise TypeError(f"{what} as explicit decisions must be a list of lists of bools, got {decisions!r}; {hint}.")
    rows = list(decisions)
    for j, row in enumerate(rows):  # a flat list of bools is the common mistake: say so before counting
        if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__iter__"):
            raise TypeError(
                f"{what}[{j}] is {row!r} ({type(row).__name__}), not a list of decisions for passage {j}; {hint}."
            )
    if len(rows) != len(counts):
        raise ValueError(
            f"{what} has decisions for {len(rows)} passages but {len(counts)} passages were given; {hint}."
        )
    return [decision_row(row, n, k, f"{what}[{j}]", hint) for j, (row, n) in enumerate(zip(rows, counts))]


def decision_row(row: Any, n: int, k: int, label: str, hint: str = "") -> list[bool]:
    """Check one passage's explicit decisions (``n`` chunks) and return them as bools; ``label``
    names the value in errors (e.g. ``policy[1]``). See :func:`normalise_decisions`."""
    hint = f"; {hint}" if hint else ""
    if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__iter__"):
        raise TypeError(f"{label} is {row!r} ({type(row).__name__}), not a list of per-chunk decisions{hint}.")
    row = list(row)
    if len(row) != n:
        raise ValueError(f"{label} has {len(row)} decisions but the passage has {n} chunks of k={k} tokens.")
    keep = []
    for i, x in enumerate(row):
        if getattr(x, "shape", None) == () and hasattr(x, "item"):
            x = x.item()  # a 0-d tensor or numpy scalar
        if isinstance(x, bool):
            keep.append(x)
        elif isinstance(x, int) and x in (0, 1):
            keep.append(bool(x))
        elif isinstance(x, int):
            raise ValueError(f"{label}[{i}] is {x}; a decision is True/False or 1/0 (1 = keep chunk {i} as tokens).")
        else:
            raise TypeError(f"{label}[{i}] is {x!r} ({type(x).__name__}); a decision is True/False or 1/0.")
    return keep


def check_finite(vectors: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``vectors`` if every value is finite, else raise naming ``what`` (where they came from).

    Raises:
        ValueError: a NaN or infinite value (it would silently empty the answer).
    """
    if vectors.numel() and not bool(torch.isfinite(vectors.detach()).all()):
        bad = int((~torch.isfinite(vectors.detach())).sum())
        raise ValueError(f"{what} contain {bad} NaN or infinite value(s) of {vectors.numel()}; refusing them.")
    return vectors


class TokenStream:
    """Iterator over generated text pieces; ``result`` holds the full result once exhausted.

    Pieces never split a character (an incomplete UTF-8 sequence is held back until it is
    complete), so they join to ``result.text``. Closing the stream early (``close()``, leaving a
    ``with`` block, ``break`` in a ``yield from``, or dropping the last reference) stops the
    decoding within one decoder step, so an abandoned stream does not hold the engine.

    Example:
        >>> with engine.stream("Who wrote Hamlet?", passages) as stream:      # doctest: +SKIP
        ...     first = next(stream)                                        # decoding stops here
    """

    def __init__(self, pieces: Generator[str, None, "GenerationResult"]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as end:
            if end.value is not None:
                self.result = end.value
            raise

    def close(self) -> None:
        """Stop decoding (if it has not finished) and release the engine."""
        self._pieces.close()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- engine


class RefragEngine:
    """REFRAG decoding over any Hugging Face causal LM.

    Args:
        decoder: a causal LM (``AutoModelForCausalLM``), unmodified.
        tokenizer: its tokenizer.
        chunk_encoder: the :class:`ChunkEncoder` (encoder + projector).
        config: the :class:`RefragConfig` (k, pooling, model names).
        policy: the default expansion policy (default: see :func:`default_policy`; a trained
            projector compresses everything, p = 0; an untrained one expands everything).
        budget: deprecated: use ``expand_fraction`` / ``max_expanded``.
        trained: whether the projector was trained; reported in every result's stats. An
            untrained engine warns (:class:`UntrainedProjectorWarning`) when it is created.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the decoder under autocast.
        cache_size: passages kept in the process-local chunk-vector cache.
        expand_fraction: the default expand fraction p for a selective policy.
        max_expanded: the default cap on expanded chunks per request.
        batch_window_s: the longest a request waits for concurrent ones still being prepared,
            to share its batch (0.25 s; a lone request never waits; see
            :mod:`refrag_integrations.batching`; also ``engine.batcher.window_s``).
        max_batch_size: at most this many concurrent requests in one batch (1 = one at a time).

    Attributes:
        backend: where prepared inputs are decoded: None (default) = this process's decoder; a
            :class:`~refrag_integrations.backends.DecoderBackend` (e.g. a vLLM server, see
            :func:`~refrag_integrations.backends.resolve_backend`) takes over :meth:`generate`,
            :meth:`stream`, :meth:`generate_batch` and the ``*_prepared`` methods. Assembly,
            policy, chunk vectors and scoring stay in this process.

    Example:
        >>> engine = RefragEngine.from_pretrained()                     # doctest: +SKIP
        >>> out = engine.generate("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."],
        ...                       policy="none")                         # doctest: +SKIP
        >>> out.text, out.stats.positions                              # doctest: +SKIP
    """

    def __init__(
        self,
        decoder: torch.nn.Module,
        tokenizer: Any,
        chunk_encoder: ChunkEncoder,
        config: RefragConfig,
        policy: ExpansionPolicy | None = None,
        budget: Budget = None,
        trained: bool = False,
        autocast_dtype: torch.dtype | None = None,
        cache_size: int = DEFAULT_PASSAGE_CACHE_SIZE,
        *,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.chunk_encoder = chunk_encoder
        self.config = config
        _, default_budget = expansion_settings(None, expand_fraction, max_expanded, budget=budget)
        self.policy = policy or default_policy(trained, default_budget is not None, chunk_encoder)
        self.budget = default_budget or ExpansionBudget()  # the default budget; ExpansionBudget() = none
        self.trained = trained
        if not trained:
            warnings.warn(
                f"This RefragEngine's chunk projector is UNTRAINED (no trained REFRAG checkpoint loaded for decoder "
                f"{config.decoder!r}): compressed chunks carry no usable information. Default policy: "
                f"{getattr(self.policy, 'name', type(self.policy).__name__)!r}"
                + (" (ordinary RAG, nothing compressed)" if isinstance(self.policy, ExpandAll) else "")
                + ". Train a checkpoint for this decoder (`refrag train recipe`, docs/train-your-own.md).",
                UntrainedProjectorWarning,
                stacklevel=2,
            )
        self.autocast_dtype = autocast_dtype
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, CachedPassage] = OrderedDict()
        self._lock = threading.RLock()  # the cache and the tokenizer are shared across threads
        self._decode_lock = threading.Lock()  # one batch decodes at a time
        # Concurrent single requests (generate, stream, the adapters) are decoded together.
        self.batcher = MicroBatcher(self._run, window_s=batch_window_s, max_batch_size=max_batch_size)
        # Optional source of precomputed chunk vectors (e.g. the Chroma ChunkStore):
        # called with a list of passage ids, returns {passage_id: Tensor(L, d_enc)} for the hits.
        self.vector_source: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
        # Optional sink for chunk vectors encoded at query time (e.g. the ChunkStore's write-back):
        # called with {passage_id: Tensor(L, d_enc)} for the passages that had to be encoded.
        self.vector_sink: Callable[[dict[str, torch.Tensor]], None] | None = None
        self._chunk_vector_fingerprint: str | None = None
        # Where prepared inputs are decoded: None = this process's decoder (below); a
        # DecoderBackend (e.g. backends.vllm_server.VllmBackend) sends them to a server.
        self.backend: DecoderBackend | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # transformers 5 renamed forward(past_key_values=...) to forward(cache=...).
        params = inspect.signature(decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path | None = None,
        *,
        decoder: str | None = None,
        encoder: str | None = None,
        chunk_size: int | None = None,
        pooling: str | None = None,
        chunk_context: str | None = None,
        policy: ExpansionPolicy | str | None = None,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        decoder_dtype: torch.dtype | str | None = None,
        budget: Budget = None,
    ) -> "RefragEngine":
        """Build an engine from a trained checkpoint directory, or from base models.

        With ``checkpoint=None`` the packaged default checkpoint is used when it exists and fits
        the requested base models and k (a decoder or encoder given by another name, such as a
        local copy of the default decoder, fits when its weight fingerprint equals the one the
        checkpoint was trained on); otherwise the projector is freshly initialised, the engine
        reports ``trained=False``, warns (:class:`UntrainedProjectorWarning`), and its default
        policy is ordinary RAG unless ``policy`` or ``expand_fraction`` / ``max_expanded`` is given.

        Args:
            checkpoint: a checkpoint directory (see :mod:`refrag_integrations.checkpoint`);
                ``None`` loads the packaged default checkpoint when it fits the named base models
                (else fresh, *untrained* projector weights); ``"default"`` requires it; ``"none"``
                never loads one (the unmodified base decoder with an untrained projector).
            decoder, encoder, chunk_size, pooling, chunk_context: base models and settings when
                ``checkpoint`` is None (defaults from :class:`RefragConfig`; ``encoder="decoder:N"``
                uses the decoder's own first N layers). With a checkpoint, ``decoder``
                may name a local copy of the same decoder; a different decoder is refused.
            policy: default expansion policy (an object or a name, see
                :data:`~refrag_integrations.policy.POLICY_NAMES`; default: the checkpoint's
                learned policy, else compress everything; with an untrained projector, ordinary
                RAG: see :func:`default_policy`).
            expand_fraction: default expand fraction p for a selective policy (with an untrained
                projector and no ``policy``, giving it opts into REFRAG with ``"relevance"``).
            max_expanded: default cap on expanded chunks per request.
            autocast_dtype: run the decoder under autocast in this dtype (e.g. torch.bfloat16).
            device: where to put the models (default: cuda if available, else cpu).
            decoder_dtype: the decoder's parameter dtype: float32 (default), bfloat16 or float16
                (or ``"bf16"`` / ``"fp16"``). Half precision halves the decoder's memory (a 7B
                decoder: 14 GB instead of 28 GB); the chunk encoder and projector stay float32.
                The checkpoint's LoRA and deltas are merged into the half-precision weights.
            budget: deprecated: use ``expand_fraction`` / ``max_expanded``.
        """
        _, default_budget = expansion_settings(None, expand_fraction, max_expanded, budget=budget)
        from .models import decoder_encoder_layers, load_decoder, load_encoder, model_fingerprint, resolve_dtype

        decoder_dtype = resolve_dtype(decoder_dtype)  # fail before loading anything
        ckpt: Checkpoint | None = None
        packaged: Checkpoint | None = None  # the packaged default, while it may still fit
        if checkpoint is None:
            default = default_checkpoint()
            if default is not None:
                cand = load_checkpoint(default)
                if (chunk_size in (None, cand.config.chunk_size) and pooling in (None, cand.config.pooling)
                        and chunk_context in (None, cand.config.chunk_context)):
                    packaged = cand
        elif str(checkpoint) == "none":
            pass  # the base models with a fresh, untrained projector (e.g. to evaluate the base decoder)
        elif str(checkpoint) == "default":
            if default_checkpoint() is None:
                raise ValueError("This build of refrag-integrations ships no trained default checkpoint.")
            ckpt = load_checkpoint(default_checkpoint())
        else:
            ckpt = load_checkpoint(checkpoint)

        if ckpt is not None:
            cfg = ckpt.config
            if chunk_size is not None and chunk_size != cfg.chunk_size:
                raise CheckpointMismatchError(f"The checkpoint was trained with k={cfg.chunk_size}, not k={chunk_size}.")
            if chunk_context is not None and chunk_context != cfg.chunk_context:
                raise CheckpointMismatchError(
                    f"The checkpoint was trained with chunk_context={cfg.chunk_context!r}, not {chunk_context!r}."
                )
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

        dec_name = decoder or (ckpt.config.decoder if ckpt is not None else
                               packaged.config.decoder if packaged is not None else DEFAULT_DECODER)
        dec_model, dec_tok = load_decoder(dec_name, dtype=decoder_dtype)
        dec_fp = model_fingerprint(dec_model)
        # The packaged checkpoint fits a decoder by name or, for a local copy at another path, by
        # weight fingerprint (model_fingerprint: names, shapes and leading values of every tensor).
        if packaged is not None and not is_base_model(packaged.config, "decoder", decoder, dec_fp):
            packaged = None
        enc_name = encoder or (packaged.config.encoder if packaged is not None else
                               ckpt.config.encoder if ckpt is not None else DEFAULT_ENCODER)
        enc_model, enc_tok = load_encoder(enc_name, decoder=dec_model, decoder_tokenizer=dec_tok)
        enc_fp = model_fingerprint(enc_model)
        if packaged is not None and is_base_model(packaged.config, "encoder", encoder, enc_fp):
            ckpt, cfg = packaged, packaged.config
        elif ckpt is None:
            cfg = RefragConfig(
                decoder=dec_name,
                encoder=enc_name,
                chunk_size=chunk_size if chunk_size is not None else DEFAULT_CHUNK_SIZE,
                pooling=pooling or "mean",
                chunk_context=chunk_context or "chunk",
            )
        if ckpt is not None:
            for what, want, got, name in (
                ("decoder", cfg.decoder_fingerprint, dec_fp, dec_name),
                ("encoder", cfg.encoder_fingerprint, enc_fp, enc_name),
            ):
                if want and want != got:
                    raise CheckpointMismatchError(
                        f"This checkpoint was trained for {what} {getattr(cfg, what)!r} (weights fingerprint {want}), "
                        f"but {name!r} has fingerprint {got}. Load it with the {what} it was trained on."
                    )
        cfg.decoder_fingerprint, cfg.encoder_fingerprint = dec_fp, enc_fp
        cfg.encoder_dim = int(enc_model.config.hidden_size)
        cfg.decoder_dim = int(dec_model.config.hidden_size)

        target_norm = None
        if ckpt is None:
            target_norm = float(dec_model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())
        chunk_encoder = ChunkEncoder(
            enc_model, enc_tok, decoder_dim=cfg.decoder_dim, pooling=cfg.pooling,
            projector_hidden=cfg.projector_hidden, target_norm=target_norm, chunk_context=cfg.chunk_context,
            reads_decoder_tokens=decoder_encoder_layers(enc_name) is not None,
        )
        trained = False
        learned_policy = None
        if ckpt is not None:
            chunk_encoder.projector.load_state_dict(ckpt.projector)
            apply_delta(enc_model, ckpt.encoder_delta, "encoder")
            apply_delta(dec_model, ckpt.decoder_delta, "decoder")
            for adapter in ckpt.decoder_lora:
                merge_lora(dec_model, adapter)
            trained = bool(ckpt.trained_stages)
            if ckpt.policy is not None:
                learned_policy = load_policy(ckpt.policy, ckpt.policy_config or {})
        dec_model.to(dev)
        chunk_encoder.to(dev)
        chunk_encoder.eval()
        if learned_policy is not None and hasattr(learned_policy, "attach_encoder"):
            learned_policy.attach_encoder(chunk_encoder)  # a query-conditioned policy embeds the query with it
        if isinstance(policy, str):
            policy = resolve_policy(policy, encoder=chunk_encoder)
        return cls(
            dec_model, dec_tok, chunk_encoder, cfg, policy=policy or learned_policy,
            trained=trained, autocast_dtype=autocast_dtype,
            expand_fraction=default_budget.fraction if default_budget is not None else None,
            max_expanded=default_budget.max_count if default_budget is not None else None,
        )

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def k(self) -> int:
        return self.config.chunk_size

    # ------------------------------------------------------------------ passage cache

    def _entry(self, text: str) -> CachedPassage:
        pid = passage_id(text)
        with self._lock:
            entry = self._cache.get(pid)
            if entry is None:
                entry = CachedPassage(text=text, chunks=chunk_passage(text, self.tokenizer, self.k))
                self._cache[pid] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(pid)
            return entry

    def chunk(self, text: str) -> list[Chunk]:
        """The chunks of a passage (k decoder tokens each, with text spans)."""
        return self._entry(text).chunks

    def register_passage(
        self,
        text: str,
        vectors: torch.Tensor | None = None,
        expand: Sequence[bool] | None = None,
    ) -> str:
        """Put a passage into the bounded process-local cache and return its id.

        Args:
            text: the passage text exactly as it will appear in prompts.
            vectors: its precomputed pre-projection chunk vectors ``(L, d_enc)``, if known.
            expand: a per-chunk expansion decision to use whenever this passage is compressed
                without an explicit decision (set by retriever adapters).
        """
        entry = self._entry(text)
        n = len(entry.chunks)
        if vectors is not None:  # checked before anything is registered
            vectors = torch.as_tensor(vectors, dtype=torch.float32).cpu()
            if vectors.shape != (n, self.chunk_encoder.encoder_dim):
                raise ValueError(
                    f"vectors for this passage must have shape ({n}, {self.chunk_encoder.encoder_dim}) "
                    f"(chunks, encoder dim), got {tuple(vectors.shape)}."
                )
            check_finite(vectors, f"The chunk vectors given for passage {passage_id(text)}")
        if expand is not None:
            expand = decision_row(expand, n, self.k, "expand", "give one bool per chunk, e.g. [True, False]")
        entry.registered = True
        if vectors is not None:
            entry.vectors = vectors
        if expand is not None:
            entry.expand = expand
        return passage_id(text)

    def lookup_passage(self, pid: str) -> CachedPassage | None:
        """The cached passage with id ``pid`` (see :func:`~refrag_integrations.chunking.passage_id`), if any."""
        with self._lock:
            return self._cache.get(pid)

    def forget_vectors(self, texts: Sequence[str] | None = None) -> None:
        """Drop the chunk vectors (not the chunking) of ``texts`` from the passage cache, so the
        next request encodes them at query time (how benchmarks measure the "not cached" cost).

        Args:
            texts: the passages; ``None`` forgets every cached vector (needed after the chunk
                encoder's weights change, e.g. before an evaluation during training).
        """
        with self._lock:
            entries = self._cache.values() if texts is None else [self._cache.get(passage_id(t)) for t in texts]
            for entry in entries:
                if entry is not None:
                    entry.vectors = None

    @_locked
    def register_retrieved(
        self,
        query: str,
        texts: Sequence[str],
        policy: Expand = None,
        *,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
    ) -> list[RegisteredPassage]:
        """Decide, fetch chunk vectors for, and register retrieved passages: what a retriever
        adapter does before the LLM side sees the prompt. One joint policy call over all chunks;
        a text given twice is decided and registered once.

        Args:
            query: the question (query-aware policies read it).
            texts: the passage texts exactly as they will appear in prompts.
            policy: the expansion policy (object or name) or explicit decisions; None = the
                engine's default policy.
            expand_fraction, max_expanded: the expansion budget; None = the engine's default.

        Returns:
            One :class:`RegisteredPassage` per unique text, in first-seen order.

        Example:
            >>> [p.expand for p in engine.register_retrieved("Who wrote Hamlet?", ["Hamlet is ..."], "none")]  # doctest: +SKIP
            [[False, False]]
        """
        check_text(query, "query")
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        decisions = self.decide(query, unique, policy, expand_fraction=expand_fraction, max_expanded=max_expanded)
        vectors: list[torch.Tensor | None] = [None] * len(unique)
        if any(not all(d) for d in decisions):
            # Fetched (or encoded) now, at retrieval time, so the LLM side's prefill needs none.
            vectors = list(self.chunk_vectors(unique).vectors)
        out = []
        for text, decision, vecs in zip(unique, decisions, vectors):
            pid = self.register_passage(text, vecs, decision)
            chunks = self.chunk(text)
            out.append(RegisteredPassage(
                passage_id=pid, text=text, expand=list(decision),
                tokens=sum(len(c.token_ids) for c in chunks),
                positions=sum(len(c.token_ids) if keep else 1 for c, keep in zip(chunks, decision)),
            ))
        return out

    @_locked
    def tokenize(
        self, text: str, add_special_tokens: bool = False, *, markup_spans: Sequence[tuple[int, int]] = ()
    ) -> list[int]:
        """Decoder token ids of ``text``, under the engine's lock (fast tokenizers carry mutable
        state shared with chunking, so adapters count tokens through here). Control-token strings
        (``<|im_end|>``) are text, except inside ``markup_spans`` (see :meth:`prepare_prompt`)."""
        check_text(text, "text")
        prefix = self.special_prefix() if add_special_tokens else []
        return prefix + tokenize_prompt(self.tokenizer, text, markup_spans)

    @_locked
    def copy_tokenizer(self) -> Any:
        """A private deep copy of the decoder's tokenizer, taken while no engine thread uses it
        (for callers that tokenise on another thread without waiting for the engine)."""
        import copy

        return copy.deepcopy(self.tokenizer)

    def registered_passages(self) -> list[str]:
        """Texts of the registered passages still in the cache, most recently used last."""
        with self._lock:
            return [e.text for e in self._cache.values() if e.registered]

    @_locked
    def chunk_vectors(self, texts: Sequence[str]) -> ChunkVectors:
        """Pre-projection chunk vectors for each passage, from the cache, the vector source, or
        the encoder (all missing passages in one batch).

        Returns:
            The vectors per passage, the number of chunks that were precomputed and the seconds
            spent encoding (a :class:`ChunkVectors`).
        """
        entries = [self._entry(t) for t in texts]
        missing = [e for e in entries if e.vectors is None]
        cached = sum(len(e.chunks) for e in entries if e.vectors is not None)
        if missing and self.vector_source is not None:
            found = self.vector_source([passage_id(e.text) for e in missing])
            for e in missing:
                v = found.get(passage_id(e.text))
                if v is not None and tuple(v.shape) == (len(e.chunks), self.chunk_encoder.encoder_dim):
                    v = torch.as_tensor(v, dtype=torch.float32).cpu()
                    source = getattr(self.vector_source, "__qualname__", repr(self.vector_source))
                    check_finite(v, f"The chunk vectors of passage {passage_id(e.text)} from the vector source "
                                    f"{source} (re-index that passage; `refrag index --verify` checks a store)")
                    e.vectors = v
                    cached += len(e.chunks)
            missing = [e for e in missing if e.vectors is None]
        encode_s = 0.0
        if missing:
            t0 = time.perf_counter()
            with torch.no_grad():
                encoded = self.chunk_encoder.encode_passages([e.chunks for e in missing])  # [(L_i, d_enc)]
            for e, v in zip(missing, encoded):
                e.vectors = check_finite(
                    v.float().cpu(), f"The chunk vectors the chunk encoder produced for passage {passage_id(e.text)} "
                    "(its weights are damaged: check the checkpoint's encoder_delta)"
                )
            encode_s = time.perf_counter() - t0
            if self.vector_sink is not None:
                self.vector_sink({passage_id(e.text): e.vectors for e in missing})
        return ChunkVectors([e.vectors for e in entries], cached, encode_s)

    def chunk_vector_fingerprint(self, refresh: bool = False) -> str:
        """Fingerprint of everything the pre-projection chunk vectors depend on: the encoder's
        weights (after any trained encoder delta), its tokenizer, pooling and length limit, k, and
        the decoder's tokenizer (chunks are cut on decoder tokens). The projector is not part of
        it: c_i is stored before projection. Computed once and cached; pass ``refresh=True`` after
        changing the encoder in place (e.g. during training).

        Example:
            >>> engine.chunk_vector_fingerprint()   # doctest: +SKIP
            '3f2a9c0d1e7b4a65'
        """
        if self._chunk_vector_fingerprint is None or refresh:
            self._chunk_vector_fingerprint = compute_chunk_vector_fingerprint(
                self.chunk_encoder, self.tokenizer, self.k
            )
        return self._chunk_vector_fingerprint

    # ------------------------------------------------------------------ prompts

    def build_prompt(
        self, question: str, passages: Sequence[str], system_prompt: str | None = None
    ) -> RagPrompt:
        """Render the RAG prompt: instruction, numbered passages, question.

        Uses the decoder's chat template when it has one. Returns the prompt, the character span
        of each passage inside it, and whether special tokens (BOS) must still be added (a
        :class:`RagPrompt`).
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}: give the question text.")
        check_text(question, "question")
        system = RAG_SYSTEM_PROMPT if system_prompt is None else check_text(system_prompt, "system_prompt")
        labelled = [f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages)]
        body = "".join(f"{x}\n\n" for x in labelled)
        user = f"{body}Question: {question.strip()}"
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            rendered = render_chat(self.tokenizer, messages)
            prompt, add_special, markup = rendered.text, False, rendered.markup_spans
        else:
            prompt, add_special, markup = f"{system}\n\n{user}\nAnswer:", True, []
        # Searched with their labels: a short passage (e.g. a few words) may also occur in the instruction.
        spans = [(b - len(p), b) for (_, b), p in zip(self.locate_passages(prompt, labelled), passages)]
        return RagPrompt(prompt, spans, add_special, markup)

    @staticmethod
    def locate_passages(prompt: str, passages: Sequence[str]) -> list[tuple[int, int]]:
        """Character spans of ``passages`` inside ``prompt``, searched in order, non-overlapping.

        Raises:
            ValueError: a passage does not occur (after the previous one) in the prompt.
        """
        spans, cursor = [], 0
        for i, p in enumerate(passages):
            at = prompt.find(p, cursor)
            if at < 0:
                raise ValueError(f"passage {i} does not occur in the prompt (in order); cannot compress it.")
            spans.append((at, at + len(p)))
            cursor = at + len(p)
        return spans

    def locate_registered(self, prompt: str) -> list[tuple[int, int]]:
        """Spans of every occurrence of a registered passage inside ``prompt``, in prompt order.

        A passage that occurs twice is found twice; where two registered passages overlap in the
        prompt, the one that starts first (then the longer) wins, and the other stays tokens.
        """
        texts = self.registered_passages()
        hits: list[tuple[int, int]] = []
        for text in texts:
            start = prompt.find(text)
            while start >= 0:
                hits.append((start, start + len(text)))
                start = prompt.find(text, start + len(text))
        hits.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        spans: list[tuple[int, int]] = []
        for a, b in hits:
            if not spans or a >= spans[-1][1]:
                spans.append((a, b))
        return spans

    @_locked
    def prepare_prompt(
        self,
        prompt: str,
        *,
        query: str = "",
        policy: Expand = None,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        add_special_tokens: bool = False,
        markup_spans: Sequence[tuple[int, int]] = (),
        expand: Expand = None,
        budget: Budget = None,
    ) -> PreparedInput:
        """Mixed input for an arbitrary prompt: every registered passage found inside it is
        compressed (per its registered decision, else per ``policy`` / the default policy);
        every other character stays ordinary tokens. A prompt without registered passages is
        ordinary generation. Used by the LangChain and LlamaIndex adapters.

        The prompt is user text: a control-token string in it (``<|im_end|>``) is tokenised as
        text, except inside ``markup_spans``, the chat-template markup of a prompt rendered with
        :func:`~refrag_integrations.prompt_text.render_chat` (its ``markup_spans``). ``expand`` and
        ``budget`` are deprecated names of ``policy`` and ``expand_fraction`` / ``max_expanded``.

        Raises:
            ValueError: the prompt is empty or holds a lone surrogate.
        """
        expand, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        check_prompt(prompt)
        spans = self.locate_registered(prompt)
        if expand is None and spans:
            entries = [self._entry(prompt[a:b]) for a, b in spans]
            if any(e.expand is None for e in entries):
                # Registered decisions apply per passage; the others follow the default policy.
                texts = [e.text for e in entries]
                by_policy = self._resolve_decisions(query, texts, self.policy, budget)[0]
                expand = [e.expand if e.expand is not None else d for e, d in zip(entries, by_policy)]
        return self._prepare(
            prompt, spans, expand, query=query, budget=budget, add_special_tokens=add_special_tokens,
            markup_spans=markup_spans,
        )

    @_locked
    def decide(
        self,
        query: str,
        texts: Sequence[str],
        policy: Expand = None,
        *,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        expand: Expand = None,
        budget: Budget = None,
    ) -> list[list[bool]]:
        """Per-chunk expansion decisions for passages: one joint call of the policy over all
        their chunks, exactly as :meth:`prepare` would make them (used by retriever adapters,
        which then :meth:`register_passage` each passage with its decision).

        Args:
            query: the question (used by query-aware policies).
            texts: passage texts.
            policy: a policy (object or name) or explicit decisions; None = the engine's
                default policy (decisions registered earlier are ignored here).
            expand_fraction, max_expanded: override the engine's default budget for a policy.
            expand, budget: deprecated names of ``policy`` and ``expand_fraction`` / ``max_expanded``.

        Example:
            >>> engine.decide("Who wrote Hamlet?", ["Hamlet is a tragedy by Shakespeare."], "none")  # doctest: +SKIP
            [[False, False]]
        """
        policy, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        check_text(query, "query")
        return self._resolve_decisions(query, texts, self.policy if policy is None else policy, budget)[0]

    @_locked
    def special_prefix(self) -> list[int]:
        """Tokens the decoder's tokenizer adds in front of plain text (e.g. BOS), if any."""
        return special_prefix_ids(self.tokenizer)

    # ------------------------------------------------------------------ assembly

    def _resolve_decisions(
        self,
        query: str,
        texts: Sequence[str],
        expand: Any,
        budget: ExpansionBudget | float | int | None,
        vectors: list[torch.Tensor] | None = None,
    ) -> tuple[list[list[bool]], list[torch.Tensor] | None, int, float]:
        entries = [self._entry(t) for t in texts]
        counts = [len(e.chunks) for e in entries]
        cached, encode_s = 0, 0.0

        def need_vectors() -> None:
            nonlocal vectors, cached, encode_s
            if vectors is None:
                found = self.chunk_vectors(texts)
                vectors, cached, encode_s = found.vectors, found.cached_chunks, found.encode_s

        if expand is None:
            if all(e.expand is not None for e in entries) and entries:
                decisions = [list(e.expand) for e in entries]
            else:
                expand = self.policy
        if expand is self.policy and budget is not None and ignores_budget(expand, as_budget(budget)):
            # The engine's default policy is not selective (ordinary RAG on an untrained engine, p = 0
            # on a trained one without a learned policy): a request budget opts into REFRAG's
            # selective path, as a default expand_fraction does at construction (default_policy).
            # A policy named explicitly ("all", "none") means what it says and takes no budget.
            expand = QueryRelevancePolicy(self.chunk_encoder)
        if isinstance(expand, str):
            expand = resolve_policy(expand, encoder=self.chunk_encoder, engine=self)
        if isinstance(expand, ExpansionPolicy):
            if not isinstance(expand, ExpandAll):
                need_vectors()
            flat_chunks = [c for e in entries for c in e.chunks]
            flat_vecs = torch.cat(vectors, 0) if vectors else None
            flat = expand.select(query, flat_chunks, flat_vecs, as_budget(budget) if budget is not None else self.budget)
            if len(flat) != len(flat_chunks):
                raise ValueError(f"policy {expand!r} returned {len(flat)} decisions for {len(flat_chunks)} chunks.")
            decisions, i = [], 0
            for n in counts:
                decisions.append([bool(x) for x in flat[i : i + n]])
                i += n
        elif expand is not None:
            decisions = normalise_decisions(expand, counts, self.k)
        if any(not all(d) for d in decisions):
            need_vectors()
        return decisions, vectors, cached, encode_s

    @_locked
    def prepare(
        self,
        prompt: str,
        spans: Sequence[tuple[int, int]],
        policy: Expand = None,
        *,
        query: str = "",
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        add_special_tokens: bool = False,
        vectors: Sequence[torch.Tensor] | None = None,
        markup_spans: Sequence[tuple[int, int]] = (),
        expand: Expand = None,
        budget: Budget = None,
    ) -> PreparedInput:
        """Build the mixed input for a prompt whose passages sit at ``spans``.

        Args:
            prompt: the full prompt text (chat template already applied, if any).
            spans: character spans of the passages to compress, in order, non-overlapping.
            policy: per-passage chunk decisions (list of lists of bool), a policy or its name,
                or None (registered decisions, else the engine's default policy).
            query: the question (used by query-aware policies).
            expand_fraction, max_expanded: override the engine's default budget for a policy.
            add_special_tokens: prepend the tokenizer's BOS (for prompts without a chat template).
            vectors: per-passage pre-projection chunk vectors to use instead of the cache (e.g.
                computed with gradients during training); not stored.
            markup_spans: character spans of chat-template markup, where control-token strings
                become control tokens; everywhere else they are text (see :meth:`prepare_prompt`).
            expand, budget: deprecated names of ``policy`` and ``expand_fraction`` / ``max_expanded``.

        Raises:
            ValueError: the prompt is empty or holds a lone surrogate, or a span is out of order.
        """
        policy, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        check_prompt(prompt)
        return self._prepare(
            prompt, spans, policy, query=query, budget=budget, add_special_tokens=add_special_tokens, vectors=vectors,
            markup_spans=markup_spans,
        )

    @_locked
    def _prepare(
        self,
        prompt: str,
        spans: Sequence[tuple[int, int]],
        expand: Expand,
        *,
        query: str,
        budget: ExpansionBudget | None,
        add_special_tokens: bool,
        vectors: Sequence[torch.Tensor] | None = None,
        markup_spans: Sequence[tuple[int, int]] = (),
    ) -> PreparedInput:
        texts = [prompt[a:b] for a, b in spans]
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"passage {i} is empty; remove it or give it some text.")
        if vectors is not None:
            vectors = list(vectors)
            if len(vectors) != len(texts):
                raise ValueError(f"vectors has {len(vectors)} entries for {len(texts)} passages.")
        self.check_chunk_count(texts)
        decisions, vectors, cached, encode_s = self._resolve_decisions(query, texts, expand, budget, vectors)

        embed = self.decoder.get_input_embeddings()
        dev, dtype = embed.weight.device, embed.weight.dtype
        pieces: list[torch.Tensor] = []
        all_ids: list[int] = self.special_prefix() if add_special_tokens else []
        pending: list[int] = list(all_ids)  # token ids not yet embedded

        def flush() -> None:
            if pending:
                pieces.append(embed(torch.tensor(pending, device=dev)))  # (n, d)
                pending.clear()

        stats = GenerationStats(trained=self.trained, cached_chunks=cached, encode_s=encode_s)
        projected = self._project_compressed(texts, vectors, decisions, device=dev, dtype=dtype)
        cursor = 0
        for j, (a, b) in enumerate(spans):
            if a < cursor:
                raise ValueError("passage spans must be in order and must not overlap.")
            seg = tokenize_prompt(self.tokenizer, prompt, markup_spans, cursor, a)
            pending.extend(seg)
            all_ids.extend(seg)
            entry = self._entry(texts[j])
            proj = projected[j]
            run = None  # index of the first chunk of the run of compressed chunks being collected
            for chunk, keep in zip(entry.chunks, decisions[j]):
                all_ids.extend(chunk.token_ids)
                stats.context_tokens += len(chunk.token_ids)
                if keep:
                    if run is not None:
                        pieces.append(proj[run : chunk.index])  # (run length, d): one slice per run
                        run = None
                    pending.extend(chunk.token_ids)
                elif run is None:
                    flush()
                    run = chunk.index
            if run is not None:
                pieces.append(proj[run:])
            stats.chunks += len(entry.chunks)
            stats.chunks_expanded += sum(decisions[j])
            stats.expanded.append([i for i, keep in enumerate(decisions[j]) if keep])
            cursor = b
        tail = tokenize_prompt(self.tokenizer, prompt, markup_spans, cursor)
        pending.extend(tail)
        all_ids.extend(tail)
        flush()
        if not pieces:
            raise ValueError("The prompt is empty.")
        embeds = torch.cat(pieces, 0)  # (T, d)
        stats.chunks_compressed = stats.chunks - stats.chunks_expanded
        stats.prompt_tokens = len(all_ids)
        stats.positions = embeds.shape[0]
        return PreparedInput(embeds=embeds, token_ids=all_ids, stats=stats)

    def _project_compressed(
        self, texts: Sequence[str], vectors: Sequence[torch.Tensor], decisions: Sequence[Sequence[bool]], *,
        device: torch.device, dtype: torch.dtype,
    ) -> list[torch.Tensor | None]:
        """The projected chunk embeddings ``(L_j, d)`` of every passage with a compressed chunk
        (None for passages kept whole as tokens), in one projector call: one pass over the
        projector's weights instead of one per passage (at 4k context tokens, 30+ passages).

        Raises:
            ValueError: a projected embedding is NaN or infinite (naming the passage).
        """
        needed = [j for j, keep in enumerate(decisions) if not all(keep)]
        out: list[torch.Tensor | None] = [None] * len(texts)
        if not needed:
            return out
        joint = self.chunk_encoder.project(torch.cat([vectors[j] for j in needed], 0)).to(device=device, dtype=dtype)
        finite = bool(torch.isfinite(joint.detach()).all())  # one check; the passage is named only on failure
        for j, proj in zip(needed, joint.split([len(vectors[j]) for j in needed], 0)):
            if not finite:
                check_finite(proj, f"The projected chunk embeddings of passage {j} ({passage_id(texts[j])}) "
                                   f"(from the projector, in {dtype})")
            out[j] = proj
        return out

    def prepare_rag(
        self,
        question: str,
        passages: Sequence[str],
        policy: Expand = None,
        *,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        system_prompt: str | None = None,
        vectors: Sequence[torch.Tensor] | None = None,
        expand: Expand = None,
        budget: Budget = None,
    ) -> PreparedInput:
        """Build the mixed input for a question over passages (see :meth:`build_prompt` and
        :meth:`prepare` for the arguments)."""
        policy, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        return self._prepare_rag(question, passages, policy, budget, system_prompt=system_prompt, vectors=vectors)

    def _prepare_rag(
        self,
        question: str,
        passages: Sequence[str],
        policy: Expand,
        budget: ExpansionBudget | None,
        *,
        system_prompt: str | None = None,
        vectors: Sequence[torch.Tensor] | None = None,
    ) -> PreparedInput:
        if isinstance(passages, str):
            raise TypeError("passages must be a list of strings, not a single str.")
        for i, p in enumerate(passages):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"passage {i} is empty or not a string; give non-empty passage texts.")
            check_text(p, f"passage {i}")
        rag = self.build_prompt(question, passages, system_prompt)
        return self._prepare(
            rag.text, rag.spans, policy, query=question, budget=budget, add_special_tokens=rag.add_special_tokens,
            vectors=vectors, markup_spans=rag.markup_spans,
        )

    # ------------------------------------------------------------------ decoding

    def autocast(self) -> torch.autocast:
        """The context the decoder runs under: autocast to ``autocast_dtype`` when set, else a
        no-op. Every decoder forward (generation, scoring, training objectives) uses it."""
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eos_ids(self) -> set[int]:
        """Token ids that end an answer (the generation config's EOS ids and the tokenizer's)."""
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.decoder, "generation_config", None), "eos_token_id", None)
        for x in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, (list, tuple)):
                ids.update(int(i) for i in x)
        return ids

    @torch.no_grad()
    def forward_logits(self, prepared: PreparedInput) -> torch.Tensor:
        """Logits at every position of a prepared input, ``(T, vocab)`` (for tests and eval)."""
        emb = prepared.embeds.unsqueeze(0)  # (1, T, d)
        pos = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0)
        with self.autocast():
            out = self.decoder(inputs_embeds=emb, position_ids=pos, use_cache=False)
        return out.logits[0].float()

    def _pick(self, logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
        logits = logits.float()  # (B, V)
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / max(temperature, 1e-5)
        probs = torch.softmax(logits, -1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            cut = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def decoder_forward(self, cache: Any = None, **inputs: Any) -> Any:
        """One forward of the decoder under :meth:`autocast`; with a transformers ``Cache`` in
        ``cache`` it reads and extends that KV cache (the keyword differs between transformers
        versions; this hides it). ``inputs`` go to the decoder (``inputs_embeds``, ``input_ids``,
        ``attention_mask``, ``position_ids``, ``logits_to_keep``, ...)."""
        extra = {} if cache is None else {self._cache_kw: cache, "use_cache": True}
        with self.autocast():
            return self.decoder(**inputs, **extra)

    def context_window(self) -> int | None:
        """The decoder's context window in positions (``config.max_position_embeddings``), if it says."""
        config = self.decoder.config
        window = getattr(config, "max_position_embeddings", None)
        if window is None and hasattr(config, "get_text_config"):
            window = getattr(config.get_text_config(), "max_position_embeddings", None)
        return int(window) if isinstance(window, int) and window > 0 else None

    def check_chunk_count(self, passages: Sequence[str]) -> None:
        """Refuse passages that cannot fit the decoder's context window even fully compressed
        (one position per chunk), right after chunking and before any chunk is encoded: a huge
        passage would otherwise be encoded in full (minutes on a CPU) only to be refused by
        :meth:`check_context_window` before prefill.

        Raises:
            ValueError: the passages hold more chunks than the window has positions.
        """
        window = self.context_window()
        if window is None:
            return
        counts = [len(self._entry(t).chunks) for t in passages]
        if sum(counts) > window:
            longest = max(range(len(counts)), key=counts.__getitem__)
            raise ValueError(
                f"the passages hold {sum(counts)} chunks of k={self.k} tokens (the longest, passage {longest}, "
                f"{counts[longest]}); even with every chunk compressed to one position they need more than the "
                f"decoder's context window of {window} positions (config.max_position_embeddings). Give fewer or "
                "shorter passages (split a long document into passages, e.g. with `refrag index`), or a checkpoint "
                "with a larger chunk size k."
            )

    def check_context_window(self, prepared: Sequence[PreparedInput], max_new_tokens: int) -> None:
        """Refuse inputs that, with ``max_new_tokens`` generated tokens, need more decoder
        positions than the decoder's context window (checked before every prefill that
        generates: :meth:`decode_steps`, so :meth:`generate`, :meth:`stream` and
        :meth:`generate_batch`).

        Raises:
            ValueError: ``max_new_tokens`` < 1, or a prepared input does not fit; the message names
                the window, the positions and what to do.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
        window = self.context_window()
        if window is None:
            return
        for b, p in enumerate(prepared):
            positions = int(p.embeds.shape[0])
            if positions + max_new_tokens > window:
                which = f"request {b}" if len(prepared) > 1 else "the request"
                raise ValueError(
                    f"{which} needs {positions} decoder positions for its input plus max_new_tokens="
                    f"{max_new_tokens} = {positions + max_new_tokens}, more than the decoder's context window "
                    f"of {window} positions (config.max_position_embeddings). Give fewer or shorter passages, "
                    f"a smaller expand fraction (expand_fraction= / --expand-fraction; now "
                    f"{p.stats.chunks_expanded} of {p.stats.chunks} chunks expanded), a checkpoint with a larger "
                    f"chunk size k (now {self.k}), or a smaller max_new_tokens."
                )

    def decode_steps(
        self,
        prepared: Sequence[PreparedInput],
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        t_start: float | None = None,
    ) -> Iterator[tuple[torch.Tensor, float | None]]:
        """Left-pad, prefill, then decode with the KV cache for exactly ``max_new_tokens`` steps
        (EOS does not stop it: the fixed-length decode benchmarks time; :meth:`generate` stops).
        Yields ``(next_tokens (B,), ttft)`` per step; ttft (seconds since ``t_start``) is set on
        the first step only. Call it under ``torch.no_grad()``.

        Example:
            >>> with torch.no_grad():                                                  # doctest: +SKIP
            ...     steps = [t for t, _ in engine.decode_steps([engine.prepare_rag(q, passages)], 8)]
        """
        from transformers import DynamicCache

        self.check_context_window(prepared, max_new_tokens)
        t_start = time.perf_counter() if t_start is None else t_start
        B = len(prepared)
        emb, mask, pos = left_pad([p.embeds for p in prepared])  # (B, T, d), (B, T), (B, T)
        gen = None
        if do_sample:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(0 if seed is None else seed)
        cache = DynamicCache()
        out = self.decoder_forward(cache, inputs_embeds=emb, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        nxt = self._pick(out.logits[:, -1].cpu(), do_sample, temperature, top_p, gen).to(emb.device)  # (B,)
        self._sync()
        yield nxt, time.perf_counter() - t_start
        last = pos[:, -1]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            last = last + 1
            out = self.decoder_forward(
                cache, input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=last.unsqueeze(1)
            )
            nxt = self._pick(out.logits[:, -1].cpu(), do_sample, temperature, top_p, gen).to(emb.device)
            yield nxt, None

    @torch.no_grad()
    def score(
        self,
        prefixes: Sequence[torch.Tensor],
        target: Sequence[int],
        *,
        max_rows: int = SCORE_BATCH_ROWS,
        pad_tolerance: float = SCORE_PAD_TOLERANCE,
    ) -> torch.Tensor:
        """Mean per-token NLL of ``target`` token ids after each prefix, teacher-forced.

        Prefixes of similar length run as one left-padded batch (attention mask, contiguous
        positions per row), under :meth:`autocast`.

        Args:
            prefixes: mixed inputs ``(P_i, d)`` (e.g. ``PreparedInput.embeds``).
            target: the token ids to score (e.g. an answer's ids + EOS).
            max_rows: at most this many prefixes in one forward.
            pad_tolerance: a batch's longest prefix is at most this times its shortest.

        Returns:
            ``(len(prefixes),)`` float32 on CPU.

        Example:
            >>> p = engine.prepare_rag("Who wrote Hamlet?", passages, "none")          # doctest: +SKIP
            >>> engine.score([p.embeds], engine.tokenize(" Shakespeare"))            # doctest: +SKIP
            tensor([2.3125])
        """
        if len(target) == 0:
            raise ValueError("target is empty: score at least one token.")
        embed = self.decoder.get_input_embeddings()
        tgt = torch.tensor(list(target), device=self.device)  # (T,)
        T = tgt.shape[0]
        tgt_emb = embed(tgt[:-1])  # (T-1, d)
        order = sorted(range(len(prefixes)), key=lambda i: prefixes[i].shape[0])
        out = torch.empty(len(prefixes))
        for batch in length_batches([prefixes[i].shape[0] for i in order], max_rows, pad_tolerance):
            rows = [order[j] for j in batch]
            x, mask, pos = left_pad(
                [torch.cat([prefixes[r].to(tgt_emb.device, tgt_emb.dtype), tgt_emb], 0) for r in rows]
            )  # (B, S, d), (B, S), (B, S)
            B = x.shape[0]
            logits = self.decoder_forward(
                inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=T
            ).logits.float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.expand(B, T), reduction="none")  # (B, T)
            out[rows] = nll.mean(1).cpu()
        return out

    @staticmethod
    def _hold_back(text: str, stop: Sequence[str]) -> int:
        """Length of ``text`` that can be emitted without risking a partial stop sequence."""
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(text) - 1
        for s in stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return safe

    def _run(
        self,
        prepared: Sequence[PreparedInput],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        stop: Sequence[str] | None,
        seed: int | None,
        t_start: float | Sequence[float],
        on_text: Callable[[int, str], None] | None = None,
        cancel: Callable[[int], bool] | None = None,
        backend: DecoderBackend | None = None,
        ignore_eos: bool = False,
    ) -> list[GenerationResult]:
        """Decode a batch; ``t_start`` per row (or one for all), ``cancel(row)`` stops a row,
        ``backend`` (default :attr:`backend`) decodes elsewhere, e.g. on vLLM; ``ignore_eos``
        decodes ``max_new_tokens`` tokens whatever they are (fixed-length benchmarks)."""
        backend = self.backend if backend is None else backend
        if backend is not None:  # e.g. a vLLM server: decoding leaves this process (and its lock)
            if not callable(getattr(backend, "generate", None)):
                raise TypeError(
                    f"backend must be a DecoderBackend, got {backend!r}; build one with "
                    "refrag_integrations.backends.resolve_backend('vllm', base_url)."
                )
            return backend.generate(
                self, prepared, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_p=top_p, stop=stop, seed=seed, t_start=t_start, on_text=on_text, cancel=cancel,
                ignore_eos=ignore_eos,
            )
        stop = [s for s in (stop or []) if s]
        eos = self.eos_ids()
        B = len(prepared)
        starts = [float(t_start)] * B if isinstance(t_start, (int, float)) else [float(t) for t in t_start]
        ids: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        emitted = [0] * B
        done = [False] * B
        cut = [False] * B  # ended by a stop string
        reasons = ["length"] * B
        ttft = 0.0  # since min(starts)
        with self._decode_lock, torch.no_grad():
            for step, (nxt, t) in enumerate(
                self.decode_steps(
                    prepared, max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    seed=seed, t_start=min(starts),
                )
            ):
                if t is not None:
                    ttft = t
                for b, tok in enumerate(nxt.tolist()):
                    if done[b]:
                        continue
                    if tok in eos and not ignore_eos:
                        done[b], reasons[b] = True, "stop"
                        continue
                    ids[b].append(tok)
                    with self._lock:  # the tokenizer is shared with requests being prepared meanwhile
                        texts[b] = self.tokenizer.decode(ids[b], skip_special_tokens=True)
                    hit = min((texts[b].find(s) for s in stop if s in texts[b]), default=-1)
                    if hit >= 0:
                        texts[b] = texts[b][:hit]
                        done[b], reasons[b], cut[b] = True, "stop", True
                    safe = len(texts[b]) if done[b] else self._hold_back(texts[b], stop)
                    if on_text is not None and safe > emitted[b]:
                        on_text(b, texts[b][emitted[b] : safe])
                        emitted[b] = safe
                if cancel is not None:  # checked before the next step: a closed stream costs no more forwards
                    for b in range(B):
                        if not done[b] and cancel(b):
                            done[b], reasons[b] = True, "cancelled"
                if all(done):
                    break
        end = time.perf_counter()
        results = []
        for b, p in enumerate(prepared):
            if not cut[b] and texts[b].endswith("\ufffd"):
                texts[b] = texts[b][:-1]  # half a character at the end (cut by max_new_tokens): never shown
            stats = p.stats
            stats.ttft_s = ttft + min(starts) - starts[b]
            stats.total_s, stats.new_tokens = end - starts[b], len(ids[b])
            if on_text is not None and reasons[b] != "cancelled" and len(texts[b]) > emitted[b]:
                on_text(b, texts[b][emitted[b] :])
            results.append(GenerationResult(texts[b], ids[b], reasons[b], stats))
        return results

    def generate(
        self,
        question: str,
        passages: Sequence[str] = (),
        *,
        policy: Expand = None,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        system_prompt: str | None = None,
        expand: Expand = None,
        budget: Budget = None,
    ) -> GenerationResult:
        """Answer ``question`` from ``passages`` with REFRAG decoding.

        Args:
            question: the user's question (always kept as tokens).
            passages: retrieved passage texts, in the order they appear in the prompt.
            policy: the expansion policy, which decides the chunks that stay tokens: an
                :class:`ExpansionPolicy` or its name (``"all"`` = ordinary RAG, ``"none"``,
                ``"random"``, ``"relevance"``, ``"perplexity-desc"``), explicit per-passage lists
                of bools, or None (decisions registered by an adapter, else the engine's default).
            expand_fraction: the expand fraction p of a selective policy; default: the engine's.
            max_expanded: at most this many chunks expanded; default: the engine's.
            max_new_tokens: generation limit.
            do_sample, temperature, top_p, seed: sampling (greedy by default).
            stop: strings that end generation (not included in the output).
            system_prompt: replaces the default RAG instruction.
            expand, budget: deprecated names of ``policy`` and ``expand_fraction`` / ``max_expanded``.

        Raises:
            ValueError: an empty question or passage, a lone surrogate in one, a NaN / infinite /
                negative temperature, a top_p outside (0, 1], or an input too long for the decoder.
        """
        t0 = time.perf_counter()
        check_sampling(temperature, top_p)
        policy, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        with self.batcher.preparing():  # a batch starting meanwhile waits its window for this request
            prepared = self._prepare_rag(question, passages, policy, budget, system_prompt=system_prompt)
            return self.generate_prepared(
                [prepared], t_start=t0, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_p=top_p, stop=stop, seed=seed,
            )[0]

    def generate_prepared(
        self,
        prepared: Sequence[PreparedInput],
        *,
        t_start: float | None = None,
        on_text: Callable[[int, str], None] | None = None,
        cancel: threading.Event | None = None,
        **gen: Any,
    ) -> list[GenerationResult]:
        """Generate for already prepared inputs as one left-padded batch.

        A single input goes through :attr:`batcher`, so concurrent callers (threads) share one
        batched prefill and decode (see :mod:`refrag_integrations.batching`); several inputs run
        as their own batch, as given.

        Args:
            prepared: the prepared inputs (:meth:`prepare_rag`, :meth:`prepare_prompt`).
            t_start: when the request started (``time.perf_counter()``), for TTFT; default: now.
            on_text: called as ``on_text(row, piece)`` with each new piece of text, possibly
                from another thread; keep it quick and never generate from inside it.
            cancel: set it (from any thread) to stop decoding within one decoder step; the
                result then has ``finish_reason == "cancelled"``.
            **gen: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``stop``, ``seed``,
                ``ignore_eos`` (decode exactly ``max_new_tokens`` tokens, EOS included: what the
                throughput benchmark times), and ``backend``: a :class:`~refrag_integrations.backends.DecoderBackend` for this
                call (default :attr:`backend`; ``None`` = the in-process decoder). A remote backend
                batches on its server, so requests go to it as given, not through the batcher.
        """
        prepared = list(prepared)
        if not prepared:
            raise ValueError("prepared is empty: give at least one prepared input.")
        gen.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        for key, default in (
            ("do_sample", False), ("temperature", 1.0), ("top_p", 1.0), ("stop", None), ("seed", None),
            ("ignore_eos", False),
        ):
            gen.setdefault(key, default)
        check_sampling(gen["temperature"], gen["top_p"])
        t0 = t_start or time.perf_counter()
        stopped = None if cancel is None else (lambda row: cancel.is_set())
        if gen.get("backend") is not None or self.backend is not None:
            self.check_context_window(prepared, gen["max_new_tokens"])
            return self._run(prepared, t_start=t0, on_text=on_text, cancel=stopped, **gen)
        gen.pop("backend", None)
        if len(prepared) == 1:
            self.check_context_window(prepared, gen["max_new_tokens"])  # refused alone, never fails a batch
            piece = None if on_text is None else (lambda text: on_text(0, text))
            return [self.batcher.submit(prepared[0], t_start=t0, on_text=piece, cancel=cancel, **gen)]
        return self._run(prepared, t_start=t0, on_text=on_text, cancel=stopped, **gen)

    def generate_batch(self, requests: Sequence[dict[str, Any]], **gen: Any) -> list[GenerationResult]:
        """Several requests as one left-padded batch. Each request is a dict with ``question``,
        ``passages`` and optionally ``policy`` / ``expand_fraction`` / ``max_expanded`` (as in
        :meth:`generate`; ``expand`` / ``budget`` are their deprecated names); generation settings
        are shared.

        Example:
            >>> engine.generate_batch([{"question": "q1", "passages": ["..."]},
            ...                        {"question": "q2", "passages": ["..."], "policy": "all"}])  # doctest: +SKIP
        """
        if not requests:
            return []
        t0 = time.perf_counter()
        keys = ("policy", "expand_fraction", "max_expanded", "expand", "budget")
        check_sampling(gen.get("temperature", 1.0), gen.get("top_p", 1.0))
        prepared = []
        for i, r in enumerate(requests):
            if not isinstance(r, dict):
                raise TypeError(
                    f"request {i} must be a dict like {{'question': ..., 'passages': [...]}}, got {type(r).__name__}."
                )
            unknown = sorted(set(r) - {"question", "passages", *keys})
            if unknown:
                raise ValueError(f"Unknown request keys {unknown}; a request has question, passages and {keys}.")
            if "question" not in r:
                raise ValueError(
                    f"request {i} has no \"question\" (its keys: {sorted(r)}); give each request "
                    "{'question': ..., 'passages': [...]}."
                )
            policy, budget = expansion_settings(
                r.get("policy"), r.get("expand_fraction"), r.get("max_expanded"), expand=r.get("expand"),
                budget=r.get("budget"),
            )
            prepared.append(self._prepare_rag(r["question"], r.get("passages", ()), policy, budget))
        return self.generate_prepared(prepared, t_start=t0, **gen)

    def stream(
        self,
        question: str,
        passages: Sequence[str] = (),
        *,
        policy: Expand = None,
        expand_fraction: float | None = None,
        max_expanded: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        system_prompt: str | None = None,
        expand: Expand = None,
        budget: Budget = None,
    ) -> TokenStream:
        """Like :meth:`generate`, but returns a :class:`TokenStream` that yields text pieces as
        they are decoded; its ``result`` has the stats once the stream is exhausted. Bad input
        raises at the call, before iterating (as :meth:`generate`)."""
        t0 = time.perf_counter()
        check_sampling(temperature, top_p)
        policy, budget = expansion_settings(policy, expand_fraction, max_expanded, expand=expand, budget=budget)
        prepared = self._prepare_rag(question, passages, policy, budget, system_prompt=system_prompt)
        return self.stream_prepared(
            prepared, t_start=t0, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, stop=stop, seed=seed,
        )

    def stream_prepared(
        self,
        prepared: PreparedInput,
        *,
        t_start: float | None = None,
        cancel: threading.Event | None = None,
        **gen: Any,
    ) -> TokenStream:
        """Stream the generation of one prepared input (see :meth:`stream`). Closing the stream
        stops the decoding; so does setting ``cancel``, which any thread may do (e.g. an event
        loop whose task was cancelled while a worker thread waits for the next piece)."""
        import queue

        q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        t0 = t_start or time.perf_counter()
        check_sampling(gen.get("temperature", 1.0), gen.get("top_p", 1.0))
        self.check_context_window([prepared], gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))  # fail now, not mid-iteration
        cancel = threading.Event() if cancel is None else cancel

        def work() -> None:
            try:
                res = self.generate_prepared(
                    [prepared], t_start=t0, on_text=lambda b, s: q.put(("text", s)), cancel=cancel, **gen
                )
                q.put(("done", res[0]))
            except BaseException as err:  # handed to the consumer, never lost
                q.put(("error", err))

        def pieces() -> Generator[str, None, GenerationResult]:
            threading.Thread(target=work, daemon=True).start()
            try:
                while True:
                    kind, value = q.get()
                    if kind == "text":
                        yield value
                    elif kind == "done":
                        return value
                    else:
                        raise value
            finally:  # the consumer closed or dropped the stream (or it ended): stop decoding
                cancel.set()

        # pieces() runs only when iterated; it holds no reference to the stream, so dropping the
        # stream finalises it at once (reference counting) and its finally block cancels.
        return TokenStream(pieces())
