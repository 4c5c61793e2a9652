"""Expansion policies: which chunks stay as raw tokens ("expanded"), which become one vector.

Every policy implements ``select(query, chunks, chunk_vectors, budget) -> list[bool]`` with one
decision per chunk (True = expand), over all chunks of all passages in prompt order: the fixed
ones (all, none), the paper's baselines (random, perplexity-desc), the training-free query
relevance heuristic, and the learned RL policy (trained by :mod:`refrag_integrations.training.policy_rl`,
loaded from a checkpoint here, so inference never imports training).

Policies are found by name in one table, :data:`POLICIES`: :func:`resolve_policy` builds one from
its name, :func:`load_policy` rebuilds a saved one from a checkpoint's ``policy_config.json``.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .chunking import Chunk
from .config import (
    DEFAULT_EXPAND_FRACTION,
    DEFAULT_PASSAGE_CACHE_SIZE,
    POLICY_HEADS,
    POLICY_LAYERS,
    POLICY_MAX_CHUNK_INDEX,
    POLICY_SIM_SCALE,
    POLICY_WIDTH,
)

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import ChunkEncoder
    from .engine import RefragEngine


@dataclass(frozen=True)
class ExpansionBudget:
    """How many chunks a policy may expand: a fraction ``p`` of all chunks, a maximum count, or
    both (the smaller wins). ``ExpansionBudget()`` means no limit.

    Example:
        >>> ExpansionBudget(fraction=0.25).count(10)
        2
    """

    fraction: float | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and not (0.0 <= float(self.fraction) <= 1.0):
            raise ValueError(f"expand fraction p must be in [0, 1], got {self.fraction!r}.")
        if self.max_count is not None and (not isinstance(self.max_count, int) or self.max_count < 0):
            raise ValueError(f"max_count must be a non-negative integer, got {self.max_count!r}.")

    def count(self, num_chunks: int) -> int:
        """Number of chunks to expand out of ``num_chunks`` (T' = floor(p L), capped)."""
        n = num_chunks
        if self.fraction is not None:
            n = min(n, math.floor(float(self.fraction) * num_chunks + 1e-9))
        if self.max_count is not None:
            n = min(n, self.max_count)
        return max(0, n)


def as_budget(budget: "ExpansionBudget | float | int | None") -> ExpansionBudget:
    """Accept a budget object, a float fraction p, an int max count, or None (no limit)."""
    if budget is None:
        return ExpansionBudget()
    if isinstance(budget, ExpansionBudget):
        return budget
    if isinstance(budget, bool):
        raise TypeError("budget must be an ExpansionBudget, a float fraction or an int count, not bool.")
    if isinstance(budget, int):
        return ExpansionBudget(max_count=budget)
    if isinstance(budget, float):
        return ExpansionBudget(fraction=budget)
    raise TypeError(f"budget must be an ExpansionBudget, float or int, got {type(budget).__name__}.")


def top_k_mask(scores: Sequence[float] | torch.Tensor, n: int) -> list[bool]:
    """Decisions that expand the ``n`` highest-scoring chunks (ties broken by position)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    mask = [False] * len(scores)
    if n <= 0 or len(scores) == 0:
        return mask
    order = torch.argsort(-scores, stable=True)[:n]
    for i in order.tolist():
        mask[i] = True
    return mask


class ExpansionPolicy:
    """Base class. Subclasses implement :meth:`select`; :meth:`from_name` builds them by name."""

    name = "base"

    @classmethod
    def from_name(
        cls, *, encoder: "ChunkEncoder | None" = None, engine: "RefragEngine | None" = None, seed: int | None = 0
    ) -> "ExpansionPolicy":
        """Build the policy for :func:`resolve_policy` (policies without settings take none)."""
        return cls()

    def select(
        self,
        query: str,
        chunks: Sequence[Chunk],
        chunk_vectors: torch.Tensor,
        budget: ExpansionBudget | float | int | None = None,
    ) -> list[bool]:
        """Return one decision per chunk: True = keep as tokens (expand), False = compress."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExpandAll(ExpansionPolicy):
    """Expand every chunk: ordinary full-context RAG through the same code path (the baseline).
    Ignores the budget."""

    name = "all"

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        return [True] * len(chunks)


class ExpandNone(ExpansionPolicy):
    """Compress every chunk (p = 0)."""

    name = "none"

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        return [False] * len(chunks)


class RandomPolicy(ExpansionPolicy):
    """Expand a uniformly random subset of the budgeted size (the paper's random baseline)."""

    name = "random"

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    @classmethod
    def from_name(cls, *, encoder=None, engine=None, seed: int | None = 0) -> "RandomPolicy":
        return cls(seed)

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        n = as_budget(budget).count(len(chunks))
        picked = set(self._rng.sample(range(len(chunks)), n))
        return [i in picked for i in range(len(chunks))]


class QueryRelevancePolicy(ExpansionPolicy):
    """Expand the chunks whose pre-projection vectors c_i are most similar (cosine) to the query's
    vector from the same encoder. A training-free heuristic: a sentence encoder such as MiniLM
    puts a question near the text that answers it.

    Args:
        encoder: the :class:`ChunkEncoder` that made the chunk vectors (used to embed the query),
            or any callable ``str -> Tensor(d_enc)``.
    """

    name = "relevance"

    def __init__(self, encoder: "ChunkEncoder | Callable[[str], torch.Tensor]") -> None:
        self._encoder = encoder

    @classmethod
    def from_name(cls, *, encoder=None, engine=None, seed: int | None = 0) -> "QueryRelevancePolicy":
        encoder = encoder if encoder is not None else getattr(engine, "chunk_encoder", None)
        if encoder is None:
            raise ValueError("The 'relevance' policy needs the chunk encoder to embed the query.")
        return cls(encoder)

    def _embed_query(self, query: str) -> torch.Tensor:
        if hasattr(self._encoder, "encode"):
            with torch.no_grad():
                return self._encoder.encode([query])[0]
        return torch.as_tensor(self._encoder(query))

    def scores(self, query: str, chunk_vectors: torch.Tensor) -> torch.Tensor:
        q = self._embed_query(query).float().cpu()  # (d_enc,)
        c = chunk_vectors.float().cpu()  # (L, d_enc)
        return torch.nn.functional.cosine_similarity(c, q.unsqueeze(0), dim=-1)  # (L,)

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        n = as_budget(budget).count(len(chunks))
        if n == 0 or len(chunks) == 0:
            return [False] * len(chunks)
        if not query:
            raise ValueError("QueryRelevancePolicy needs a non-empty query.")
        return top_k_mask(self.scores(query, chunk_vectors), n)


# --------------------------------------------------------------------------- the learned policy

# Format of a saved learned policy's policy_config.json.
POLICY_FORMAT = 1
LEARNED_POLICY_NAME = "learned"


class _Block(nn.Module):
    """Pre-norm bidirectional transformer block over one sequence of chunk tokens ``(N, w)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(N, 3, self.heads, w // self.heads).permute(1, 2, 0, 3)  # (H, N, dh) each
        att = F.scaled_dot_product_attention(q, k, v)  # (H, N, dh), every chunk sees every chunk
        x = x + self.proj(att.transpose(0, 1).reshape(N, w))  # (N, w)
        return x + self.mlp(self.ln2(x))


class PolicyNetwork(nn.Module):
    """c_i -> one logit per chunk: input projection, index-in-passage embedding, a small
    transformer, a linear head (zero-initialised, so an untrained policy is uniform).

    Args:
        encoder_dim: width of the chunk vectors c_i.
        width, heads, layers: transformer size (paper: 2 layers).
        max_chunk_index: learned index-in-passage embeddings; larger indices share the last one.
        query_conditioned: add the query token and the cosine term (the ``query`` variant).
        sim_scale: initial weight of cos(c_i, query) in the logits (query variant).
    """

    def __init__(
        self,
        encoder_dim: int,
        width: int = POLICY_WIDTH,
        heads: int = POLICY_HEADS,
        layers: int = POLICY_LAYERS,
        max_chunk_index: int = POLICY_MAX_CHUNK_INDEX,
        query_conditioned: bool = False,
        sim_scale: float = POLICY_SIM_SCALE,
    ) -> None:
        super().__init__()
        for name, value in (("encoder_dim", encoder_dim), ("width", width), ("heads", heads),
                            ("layers", layers), ("max_chunk_index", max_chunk_index)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}.")
        self.query_conditioned = bool(query_conditioned)
        self.max_chunk_index = max_chunk_index
        self.in_proj = nn.Linear(encoder_dim, width)
        self.chunk_index = nn.Embedding(max_chunk_index, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.query_conditioned:
            self.query_type = nn.Parameter(torch.zeros(width))
            self.sim_scale = nn.Parameter(torch.tensor(float(sim_scale)))

    def forward(self, vectors: torch.Tensor, index: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(L,)`` for chunk vectors ``(L, d_enc)`` with index-in-passage ``(L,)`` and,
        for the query variant, the query vector ``(d_enc,)``."""
        x = self.in_proj(vectors) + self.chunk_index(index.clamp(max=self.max_chunk_index - 1))  # (L, w)
        if self.query_conditioned:
            if query is None:
                raise ValueError("the query-conditioned policy needs the query vector.")
            x = torch.cat([(self.in_proj(query) + self.query_type).unsqueeze(0), x], 0)  # (1 + L, w)
        for block in self.blocks:
            x = block(x)
        if self.query_conditioned:
            x = x[1:]  # (L, w): no logit for the query token
        logits = self.head(self.norm(x)).squeeze(-1)  # (L,)
        if self.query_conditioned:
            logits = logits + self.sim_scale * F.cosine_similarity(vectors, query.unsqueeze(0), dim=-1)
        return logits


class LearnedPolicy(ExpansionPolicy):
    """The learned selective-expansion policy, usable wherever an :class:`ExpansionPolicy` is.

    :meth:`select` is greedy (the T' highest logits; deterministic); training samples with
    :func:`sample_sequences`. Without a budget (``None`` or an unlimited
    :class:`ExpansionBudget`), it expands the fraction p it was trained for; pass
    ``policy="all"`` to the engine to expand everything.

    Args:
        encoder_dim: width of the chunk vectors c_i (the chunk encoder's hidden size).
        query_conditioned: the query variant (needs the chunk encoder to embed the query).
        expand_fraction: the p this policy was trained for (its default budget).
        width, heads, layers, max_chunk_index: network size (see :class:`PolicyNetwork`).
        encoder: the :class:`ChunkEncoder` (or any ``str -> Tensor(d_enc)`` callable) that
            embeds the query; can be attached later with :meth:`attach_encoder`.

    Example:
        >>> policy = LearnedPolicy(384, query_conditioned=True, encoder=engine.chunk_encoder)  # doctest: +SKIP
        >>> engine.generate(question, passages, policy=policy, expand_fraction=0.25)           # doctest: +SKIP
        >>> save_checkpoint(path, ..., policy=policy.state_dict(), policy_config=policy.policy_config())  # doctest: +SKIP
    """

    def __init__(
        self,
        encoder_dim: int,
        *,
        query_conditioned: bool = False,
        expand_fraction: float = DEFAULT_EXPAND_FRACTION,
        width: int = POLICY_WIDTH,
        heads: int = POLICY_HEADS,
        layers: int = POLICY_LAYERS,
        max_chunk_index: int = POLICY_MAX_CHUNK_INDEX,
        encoder: "ChunkEncoder | Callable[[str], torch.Tensor] | None" = None,
    ) -> None:
        if not 0.0 <= float(expand_fraction) <= 1.0:
            raise ValueError(f"expand_fraction must be in [0, 1], got {expand_fraction!r}.")
        self.encoder_dim = int(encoder_dim)
        self.query_conditioned = bool(query_conditioned)
        self.expand_fraction = float(expand_fraction)
        self.net = PolicyNetwork(
            self.encoder_dim, width=width, heads=heads, layers=layers,
            max_chunk_index=max_chunk_index, query_conditioned=self.query_conditioned,
        )
        self._arch = {"width": width, "heads": heads, "layers": layers, "max_chunk_index": max_chunk_index}
        self._encoder = encoder
        self.name = "learned-query" if self.query_conditioned else "learned"

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_name(cls, *, encoder=None, engine=None, seed: int | None = 0) -> "LearnedPolicy":
        raise ValueError(
            "The learned policy has trained weights: load it with its checkpoint "
            "(RefragEngine.from_pretrained(checkpoint) makes it the default policy) or load_policy()."
        )

    def attach_encoder(self, encoder: "ChunkEncoder | Callable[[str], torch.Tensor]") -> None:
        """Give the policy the chunk encoder that embeds queries (``RefragEngine.from_pretrained`` calls this)."""
        self._encoder = encoder

    def parameters(self):
        return self.net.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights (what ``save_checkpoint(policy=...)`` stores)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"the policy weights do not fit this policy's configuration: {err}") from err

    def policy_config(self) -> dict[str, Any]:
        """The JSON config :func:`load_policy` rebuilds this policy from."""
        return {
            "policy": LEARNED_POLICY_NAME,
            "format": POLICY_FORMAT,
            "encoder_dim": self.encoder_dim,
            "query_conditioned": self.query_conditioned,
            "expand_fraction": self.expand_fraction,
            **self._arch,
        }

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> "LearnedPolicy":
        """Rebuild a policy from :meth:`policy_config` and :meth:`state_dict` output."""
        cfg = dict(config)
        cfg.pop("policy", None)
        cfg.pop("class", None)  # checkpoints written before the policy table named a module path
        fmt = cfg.pop("format", POLICY_FORMAT)
        if fmt != POLICY_FORMAT:
            raise ValueError(f"policy format {fmt!r} is not supported; this version reads {POLICY_FORMAT}.")
        known = {"encoder_dim", "query_conditioned", "expand_fraction", "width", "heads", "layers", "max_chunk_index"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"Unknown policy_config keys {unknown}; known keys are {sorted(known)}.")
        if "encoder_dim" not in cfg:
            raise ValueError("policy_config lacks 'encoder_dim'; it was not written by LearnedPolicy.policy_config().")
        policy = cls(cfg.pop("encoder_dim"), **cfg)
        policy.load_state_dict({k: v.float() for k, v in state.items()})
        return policy

    # ------------------------------------------------------------------ inference

    def resolve_budget(self, budget: ExpansionBudget | float | int | None) -> ExpansionBudget:
        """The budget to use: the given one, or the trained fraction p when it sets no limit."""
        b = as_budget(budget)
        if b.fraction is None and b.max_count is None:
            return ExpansionBudget(fraction=self.expand_fraction)
        return b

    def embed_query(self, query: str) -> torch.Tensor:
        """The query's vector ``(d_enc,)`` from the chunk encoder (query variant)."""
        if self._encoder is None:
            raise ValueError(
                "The query-conditioned policy needs the chunk encoder to embed the query: call "
                "policy.attach_encoder(engine.chunk_encoder) (engines loaded from a checkpoint do this)."
            )
        if not isinstance(query, str) or not query.strip():
            raise ValueError("The query-conditioned policy needs a non-empty query.")
        with torch.no_grad():
            if hasattr(self._encoder, "encode"):
                q = self._encoder.encode([query])[0]
            else:
                q = torch.as_tensor(self._encoder(query))
        return q.detach().float().cpu()

    @staticmethod
    def chunk_index(chunks: Sequence["Chunk"]) -> torch.Tensor:
        """``(L,)`` index of each chunk inside its passage."""
        try:
            return torch.tensor([int(c.index) for c in chunks], dtype=torch.long)
        except AttributeError as err:
            raise TypeError("LearnedPolicy needs Chunk objects (with .index), as the engine passes them.") from err

    def forward_logits(
        self, vectors: torch.Tensor, index: torch.Tensor, query_vector: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(L,)`` from chunk vectors ``(L, d_enc)``, indices ``(L,)`` and the query vector."""
        if vectors.dim() != 2 or vectors.shape[1] != self.encoder_dim:
            raise ValueError(
                f"chunk vectors must have shape (L, {self.encoder_dim}), got {tuple(vectors.shape)}; "
                "was this policy trained with another chunk encoder?"
            )
        if self.query_conditioned and query_vector is None:
            raise ValueError("the query-conditioned policy needs query_vector.")
        q = query_vector.float().cpu() if (self.query_conditioned and query_vector is not None) else None
        return self.net(vectors.float().cpu(), index.cpu(), q)

    def logits(self, query: str, chunks: Sequence["Chunk"], chunk_vectors: torch.Tensor) -> torch.Tensor:
        """One logit per chunk ``(L,)`` (with gradients when grad is enabled)."""
        if chunk_vectors is None:
            raise ValueError("LearnedPolicy needs the chunk vectors c_i.")
        if len(chunks) != chunk_vectors.shape[0]:
            raise ValueError(f"{len(chunks)} chunks but {chunk_vectors.shape[0]} chunk vectors.")
        q = self.embed_query(query) if self.query_conditioned else None
        return self.forward_logits(chunk_vectors, self.chunk_index(chunks), q)

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        L = len(chunks)
        n = self.resolve_budget(budget).count(L)
        if n == 0:
            return [False] * L
        if n >= L:
            return [True] * L
        with torch.no_grad():
            logits = self.logits(query, chunks, chunk_vectors)
        return top_k_mask(logits, n)  # = sequential greedy picks with masking

    def __repr__(self) -> str:
        return f"LearnedPolicy(query_conditioned={self.query_conditioned}, expand_fraction={self.expand_fraction})"


class PerplexityDescPolicy(ExpansionPolicy):
    """The perplexity-desc baseline: compress the low-perplexity chunks, i.e. expand the chunks
    whose tokens the decoder finds hardest to predict (mean token NLL of the chunk given the
    preceding text of its passage, scored after the tokenizer's BOS, else EOS, token).

    Needs the engine's decoder; it works on the chunks the engine passes to :meth:`select`
    (whole passages in prompt order). Scores are cached per passage.

    Args:
        engine: the :class:`RefragEngine` whose decoder scores the chunks.
        cache_size: passages whose scores are kept.

    Example:
        >>> engine.generate(question, passages, policy=PerplexityDescPolicy(engine), expand_fraction=0.25)  # doctest: +SKIP
    """

    name = "perplexity-desc"

    def __init__(self, engine: "RefragEngine", cache_size: int = DEFAULT_PASSAGE_CACHE_SIZE) -> None:
        tok = engine.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("PerplexityDescPolicy needs a tokenizer with a BOS or EOS token to score first tokens.")
        self.engine = engine
        self._start = int(start)
        self._cache: OrderedDict[tuple[int, ...], list[float]] = OrderedDict()
        self._cache_size = int(cache_size)

    @classmethod
    def from_name(cls, *, encoder=None, engine=None, seed: int | None = 0) -> "PerplexityDescPolicy":
        if engine is None:
            raise ValueError("The 'perplexity-desc' policy needs the engine whose decoder scores the chunks.")
        return cls(engine)

    @staticmethod
    def _passages(chunks: Sequence["Chunk"]) -> list[list["Chunk"]]:
        groups: list[list[Chunk]] = []
        for c in chunks:
            index = getattr(c, "index", None)
            if index is None or not hasattr(c, "token_ids"):
                raise TypeError("PerplexityDescPolicy needs Chunk objects (with .index and .token_ids).")
            if index == 0:
                groups.append([c])
            elif groups and index == groups[-1][-1].index + 1:
                groups[-1].append(c)
            else:
                raise ValueError("chunks must be whole passages in order (chunk indices 0, 1, 2, ... per passage).")
        return groups

    @torch.no_grad()
    def _passage_scores(self, chunks: list["Chunk"]) -> list[float]:
        ids = [t for c in chunks for t in c.token_ids]
        key = tuple(ids)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        eng = self.engine
        x = torch.tensor([[self._start] + ids], device=eng.device)  # (1, 1 + n)
        with eng.autocast():
            logits = eng.decoder(input_ids=x, use_cache=False).logits[0, :-1].float()  # (n, V)
        nll = F.cross_entropy(logits, x[0, 1:], reduction="none").cpu()  # (n,)
        scores, i = [], 0
        for c in chunks:
            scores.append(float(nll[i : i + len(c.token_ids)].mean()))
            i += len(c.token_ids)
        self._cache[key] = scores
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return scores

    def chunk_perplexities(self, chunks: Sequence["Chunk"]) -> torch.Tensor:
        """Mean token NLL (log-perplexity) of each chunk given its passage's preceding text ``(L,)``."""
        return torch.tensor([s for group in self._passages(chunks) for s in self._passage_scores(group)])

    def select(self, query, chunks, chunk_vectors, budget=None) -> list[bool]:
        n = as_budget(budget).count(len(chunks))
        if n == 0 or len(chunks) == 0:
            return [False] * len(chunks)
        return top_k_mask(self.chunk_perplexities(chunks), n)


# --------------------------------------------------------------------------- the name table

POLICIES: dict[str, type[ExpansionPolicy]] = {
    "all": ExpandAll,
    "none": ExpandNone,
    "random": RandomPolicy,
    "relevance": QueryRelevancePolicy,
    "perplexity-desc": PerplexityDescPolicy,
    LEARNED_POLICY_NAME: LearnedPolicy,
}
# Names :func:`resolve_policy` builds without saved weights.
POLICY_NAMES = ("all", "none", "random", "relevance", "perplexity-desc")
# What checkpoints written before this table stored as the policy's class.
_LEGACY_POLICY_CLASSES = {"refrag_integrations.training.policy_rl:LearnedPolicy": LEARNED_POLICY_NAME}


def resolve_policy(
    policy: "str | ExpansionPolicy",
    *,
    encoder: "ChunkEncoder | None" = None,
    engine: "RefragEngine | None" = None,
    seed: int | None = 0,
) -> ExpansionPolicy:
    """The expansion policy ``policy`` names (a policy object is returned as it is).

    Args:
        policy: a name from :data:`POLICY_NAMES` or an :class:`ExpansionPolicy`.
        encoder: the chunk encoder (``relevance`` embeds the query with it; default: the engine's).
        engine: the engine (``perplexity-desc`` scores chunks with its decoder).
        seed: the ``random`` policy's seed.

    Example:
        >>> resolve_policy("none")
        ExpandNone()
    """
    if isinstance(policy, ExpansionPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"an expansion policy must be a name or an ExpansionPolicy, got {type(policy).__name__}.")
    if policy not in POLICY_NAMES:
        raise ValueError(f"Unknown expansion policy {policy!r}; choose one of {POLICY_NAMES}.")
    return POLICIES[policy].from_name(encoder=encoder, engine=engine, seed=seed)


def make_policy(name: str, encoder: "ChunkEncoder | None" = None, seed: int | None = 0) -> ExpansionPolicy:
    """Deprecated: use :func:`resolve_policy`."""
    warnings.warn("make_policy is deprecated; use resolve_policy.", DeprecationWarning, stacklevel=2)
    return resolve_policy(name, encoder=encoder, seed=seed)


def load_policy(state: dict[str, torch.Tensor], policy_config: dict[str, Any]) -> ExpansionPolicy:
    """Rebuild a saved learned policy from its weights and ``policy_config.json``.

    The config names the policy (``{"policy": "learned", ...}``) in :data:`POLICIES`; configs
    written by earlier versions name a class path, which is mapped through the same table (no
    module named in a file is ever imported).

    Raises:
        ValueError: the config names no saved policy this version knows.
    """
    name = policy_config.get("policy")
    if name is None:
        old = policy_config.get("class", "")
        name = _LEGACY_POLICY_CLASSES.get(old)
        if name is None:
            raise ValueError(
                f"policy_config.json names policy class {old!r}, which this version does not know; "
                f"known: {sorted(_LEGACY_POLICY_CLASSES)} or a 'policy' name from {sorted(POLICIES)}."
            )
    cls = POLICIES.get(name)
    if cls is None or not hasattr(cls, "from_state"):
        saved = sorted(n for n, c in POLICIES.items() if hasattr(c, "from_state"))
        raise ValueError(f"policy_config.json names policy {name!r}; saved policies are {saved}.")
    return cls.from_state(policy_config, state)
