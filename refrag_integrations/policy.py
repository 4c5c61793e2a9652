"""Expansion policies: which chunks stay as raw tokens ("expanded"), which become one vector.

Every policy implements ``select(query, chunks, chunk_vectors, budget) -> list[bool]`` with one
decision per chunk (True = expand), over all chunks of all passages in prompt order. The learned
RL policy (training issue) plugs into the same interface.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .chunking import Chunk

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import ChunkEncoder


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
    """Base class. Subclasses implement :meth:`select`."""

    name = "base"

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


POLICY_NAMES = ("all", "none", "random", "relevance")


def make_policy(name: str, encoder: "ChunkEncoder | None" = None, seed: int | None = 0) -> ExpansionPolicy:
    """Build a policy by name: ``all``, ``none``, ``random``, ``relevance`` (needs ``encoder``)."""
    if name == "all":
        return ExpandAll()
    if name == "none":
        return ExpandNone()
    if name == "random":
        return RandomPolicy(seed)
    if name == "relevance":
        if encoder is None:
            raise ValueError("The 'relevance' policy needs the chunk encoder to embed the query.")
        return QueryRelevancePolicy(encoder)
    raise ValueError(f"Unknown expansion policy {name!r}; choose one of {POLICY_NAMES}.")
