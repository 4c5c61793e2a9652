"""The curriculum: a geometric mixture over chunk counts that moves from easy to hard.

The paper (Table 8) trains on a data mixture over chunk counts 1, 2, 4, ..., L_max in 9 stages:
in stage 1 about two thirds of the examples have 1 chunk; the share of the longest examples grows
stage by stage until, in stage 9, 1-chunk examples are gone and the longest are the largest share.
We use the same shape: at stage s the weight of size index j (0 = 1 chunk) is rho_s ** j, with
rho_s rising geometrically from ``RHO_FIRST`` to ``RHO_LAST``, and the 1-chunk share set to 0 in the
final stage.
"""

from __future__ import annotations

import random

RHO_FIRST = 0.35  # stage 1: P(1 chunk) ~ 0.65
RHO_LAST = 2.5  # last stage: the longest size has the largest share


def chunk_sizes(max_chunks: int) -> list[int]:
    """1, 2, 4, ... up to ``max_chunks`` (included even when it is not a power of two).

    Example:
        >>> chunk_sizes(16)
        [1, 2, 4, 8, 16]
    """
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}.")
    sizes, n = [], 1
    while n < max_chunks:
        sizes.append(n)
        n *= 2
    sizes.append(max_chunks)
    return sizes


def stage_mixture(stage: int, num_stages: int, max_chunks: int) -> dict[int, float]:
    """Mixture proportions ``{chunk count: share}`` for curriculum stage ``stage`` (1-based)."""
    if not 1 <= stage <= num_stages:
        raise ValueError(f"stage must be in 1..{num_stages}, got {stage}.")
    sizes = chunk_sizes(max_chunks)
    if len(sizes) == 1:
        return {sizes[0]: 1.0}
    t = 0.0 if num_stages == 1 else (stage - 1) / (num_stages - 1)
    rho = RHO_FIRST * (RHO_LAST / RHO_FIRST) ** t
    weights = [rho**j for j in range(len(sizes))]
    if stage == num_stages and num_stages > 1:
        weights[0] = 0.0
    total = sum(weights)
    return {n: w / total for n, w in zip(sizes, weights)}


def stage_at(step: int, total_steps: int, num_stages: int, start: int = 1) -> int:
    """Curriculum stage (1-based) for an optimizer step: stages ``start .. num_stages``, equal
    numbers of steps each (``start > 1`` skips the early stages, e.g. for a warm start)."""
    if not 1 <= start <= num_stages:
        raise ValueError(f"start must be in 1..{num_stages}, got {start}.")
    span = num_stages - start + 1
    return min(num_stages, start + (step * span) // max(total_steps, 1))


def sample_chunk_count(
    rng: random.Random, step: int, total_steps: int, num_stages: int, max_chunks: int, start: int = 1
) -> int:
    """Draw the chunk count for the batch at ``step`` from that stage's mixture."""
    mix = stage_mixture(stage_at(step, total_steps, num_stages, start), num_stages, max_chunks)
    return rng.choices(list(mix), weights=list(mix.values()))[0]
