"""GRPO / PPO maths of the expansion-policy stage, on plain tensors: sequential sampling of
distinct chunks, the log-probabilities of such sequences, group-relative advantages, the PPO
clipped-ratio objective and the KL anchor to a reference policy. The trainer that uses them is
:mod:`.policy_rl`; the derivations are in docs/training.md, "How the trainer is organised".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import GRPO_STD_EPS


def sample_sequences(logits: torch.Tensor, n: int, group: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``group`` action sequences of ``n`` distinct chunks each: at every step, one chunk
    from the softmax over ``logits`` with the chunks picked earlier in that sequence masked out.

    Args:
        logits: ``(L,)`` one logit per chunk, computed once.
        n: picks per sequence (T'), ``0 <= n <= L``.
        group: number of sequences (G).
        generator: a CPU ``torch.Generator`` for reproducible draws.

    Returns:
        ``(G, n)`` chunk indices in pick order.

    Example:
        >>> a = sample_sequences(torch.zeros(5), 3, group=2, generator=torch.Generator().manual_seed(0))
        >>> a.shape, all(len(set(row.tolist())) == 3 for row in a)
        (torch.Size([2, 3]), True)
    """
    L = logits.shape[0]
    if not 0 <= n <= L:
        raise ValueError(f"cannot pick n={n} distinct chunks out of L={L}.")
    logits = logits.detach().float().cpu()
    picked = torch.zeros(group, L, dtype=torch.bool)
    out = torch.empty(group, n, dtype=torch.long)
    rows = torch.arange(group)
    for t in range(n):
        probs = torch.softmax(logits.expand(group, L).masked_fill(picked, float("-inf")), -1)  # (G, L)
        a = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (G,)
        out[:, t] = a
        picked[rows, a] = True
    return out


def sequence_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Per-step log-probabilities of action sequences under sequential masked sampling.

    Step t of a sequence has probability softmax(logits with the sequence's first t picks masked)
    at its pick. Differentiable in ``logits``.

    Args:
        logits: ``(L,)`` one logit per chunk.
        actions: ``(G, n)`` chunk indices in pick order (distinct within a row).

    Returns:
        ``(G, n)`` log-probabilities.
    """
    G, n = actions.shape
    L = logits.shape[0]
    actions = actions.to(logits.device)
    onehot = F.one_hot(actions, L)  # (G, n, L)
    before = (onehot.cumsum(1) - onehot) > 0  # picked at an earlier step of the same sequence
    masked = logits.float().expand(G, n, L).masked_fill(before, float("-inf"))  # (G, n, L)
    return masked.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (G, n)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO advantages: ``(r - mean) / std`` within one group of rewards ``(G,)``."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + GRPO_STD_EPS)


def ppo_clipped_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO clipped-ratio objective, averaged over the T' steps and the group, negated.

    Args:
        log_probs: ``(G, n)`` per-step log-probabilities under the current policy.
        old_log_probs: ``(G, n)`` the same under the policy that sampled the actions.
        advantages: ``(G,)`` one advantage per sequence, shared by its steps.
        clip: epsilon; the ratio is clipped to ``[1 - clip, 1 + clip]``.

    Returns:
        (loss to minimise, stats: clipped fraction and approximate KL).
    """
    ratio = torch.exp(log_probs - old_log_probs)  # (G, n)
    adv = advantages.unsqueeze(1).to(ratio.dtype)  # (G, 1)
    objective = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)  # (G, n)
    with torch.no_grad():
        stats = {
            "clip_frac": float(((ratio - 1.0).abs() > clip).float().mean()),
            "kl": float((old_log_probs - log_probs).mean()),
        }
    return -objective.mean(), stats


def reference_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-step KL of the current policy from a reference policy, estimated on actions sampled
    from the (old) current policy: ``exp(ref - cur) - (ref - cur) - 1`` (the non-negative,
    unbiased "k3" estimator GRPO uses), averaged over the ``(G, n)`` steps. Zero where the two
    policies agree."""
    diff = ref_log_probs.to(log_probs.dtype) - log_probs  # (G, n)
    return (torch.exp(diff) - diff - 1.0).mean()


def anchored_ppo_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip: float,
    ref_log_probs: torch.Tensor | None = None, kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`ppo_clipped_loss` plus ``kl_coef`` times :func:`reference_kl` from a reference
    policy's ``ref_log_probs`` (no anchor when they are None): the loss one rollout contributes.

    Returns:
        (loss to minimise, stats of :func:`ppo_clipped_loss`).

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))  # (G=1, n=2), unchanged since sampling: ratio 1
        >>> ref = torch.log(torch.tensor([[0.25, 1.0]]))
        >>> loss, st = anchored_ppo_loss(lp, lp, torch.tensor([1.0]), 0.2, ref, kl_coef=1.0)
        >>> round(float(loss), 4)  # -(ratio * advantage) + KL = -1 + 0.25
        -0.75
    """
    loss, stats = ppo_clipped_loss(log_probs, old_log_probs, advantages, clip)
    if ref_log_probs is not None:
        loss = loss + kl_coef * reference_kl(log_probs, ref_log_probs)
    return loss, stats


__all__ = [
    "anchored_ppo_loss",
    "group_advantages",
    "ppo_clipped_loss",
    "reference_kl",
    "sample_sequences",
    "sequence_log_probs",
]
