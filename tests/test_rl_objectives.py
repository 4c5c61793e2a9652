"""The GRPO / PPO maths of the policy stage (training/rl_objectives.py) on small hand-made tensors:
values checked against hand computation, and the statistical properties of the sampler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from refrag_integrations.training.rl_objectives import (
    anchored_ppo_loss,
    group_advantages,
    ppo_clipped_loss,
    reference_kl,
    sample_sequences,
    sequence_log_probs,
)

# --------------------------------------------------------------------------- by hand


def test_sequence_log_probs_by_hand():
    # weights 1, 2, 1 over three chunks (logits are their logs)
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0]))
    actions = torch.tensor([[1, 0], [2, 1]])
    got = sequence_log_probs(logits, actions)
    # [1, 0]: P(1) = 2/4, then chunk 1 masked: P(0) = 1/2.  [2, 1]: P(2) = 1/4, then P(1) = 2/3.
    want = torch.log(torch.tensor([[0.5, 0.5], [0.25, 2 / 3]]))
    torch.testing.assert_close(got, want)


def test_group_advantages_by_hand():
    # mean 3, deviations -2, -1, 0, 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    s = math.sqrt(3.5)
    torch.testing.assert_close(got, torch.tensor([-2 / s, -1 / s, 0.0, 3 / s]), atol=1e-5, rtol=0)
    assert torch.equal(group_advantages(torch.full((3,), 7.0)), torch.zeros(3))  # no signal, no update


def test_ppo_clipped_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]]))
    new = torch.log(torch.tensor([[0.6, 0.5], [0.2, 0.4]])).requires_grad_(True)  # ratios 1.2, 1.0 / 0.8, 0.8
    adv = torch.tensor([1.0, -2.0])
    loss, st = ppo_clipped_loss(new, old, adv, clip=0.1)
    # row 0 (A = 1): min(1.2, 1.1) = 1.1 and min(1.0, 1.0) = 1.0
    # row 1 (A = -2): min(0.8 * -2, 0.9 * -2) = -1.8 at both steps
    assert float(loss.detach()) == pytest.approx(-(1.1 + 1.0 - 1.8 - 1.8) / 4, abs=1e-6)  # 0.375
    assert st["clip_frac"] == pytest.approx(3 / 4)  # |ratio - 1| > 0.1 at 1.2, 0.8, 0.8
    kl = (math.log(0.5 / 0.6) + 0.0 + math.log(0.25 / 0.2) + math.log(0.5 / 0.4)) / 4
    assert st["kl"] == pytest.approx(kl, abs=1e-6)
    loss.backward()
    # Only the unclipped step moves: d(-ratio * A / 4) / d log p = -ratio * A / 4 = -0.25.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.25], [0.0, 0.0]]))


def test_reference_kl_by_hand():
    cur = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 1.0]]))
    # k3 = exp(d) - d - 1 with d = ref - cur: d = -ln 2 gives 0.5 + ln 2 - 1, d = ln 2 gives 2 - ln 2 - 1
    want = ((0.5 + math.log(2) - 1) + (2 - math.log(2) - 1)) / 2  # = 0.25
    assert float(reference_kl(cur, ref)) == pytest.approx(want, abs=1e-6) and want == pytest.approx(0.25)
    assert float(reference_kl(cur, cur)) == 0.0


def test_anchored_loss_adds_the_weighted_kl_only_with_a_reference():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]]))
    new = torch.log(torch.tensor([[0.6, 0.5], [0.2, 0.4]]))
    ref = torch.log(torch.tensor([[0.25, 1.0], [0.5, 0.5]]))
    adv = torch.tensor([1.0, -2.0])
    plain, st_plain = anchored_ppo_loss(new, old, adv, 0.1)
    anchored, st = anchored_ppo_loss(new, old, adv, 0.1, ref, kl_coef=0.5)
    assert float(plain) == pytest.approx(0.375, abs=1e-6) and st == st_plain
    d = torch.tensor([[0.25 / 0.6, 1.0 / 0.5], [0.5 / 0.2, 0.5 / 0.4]]).log()  # ref - new, per step
    k3 = float((d.exp() - d - 1).mean())
    assert float(anchored) == pytest.approx(0.375 + 0.5 * k3, abs=1e-6) and k3 > 0.1


def test_sampler_never_picks_an_impossible_chunk_and_always_a_certain_one():
    picks = sample_sequences(torch.tensor([0.0, float("-inf"), 0.0]), 2, group=50,
                             generator=torch.Generator().manual_seed(0))
    assert all(sorted(row) == [0, 2] for row in picks.tolist())
    first = sample_sequences(torch.tensor([60.0, 0.0, 0.0]), 1, group=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, torch.zeros(50, 1, dtype=torch.long))


# --------------------------------------------------------------------------- sampling and the objective (statistics)


def test_sampled_sequences_are_distinct_and_sized():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, generator=g) * 3
    for n in range(8):
        a = sample_sequences(logits, n, group=6, generator=g)
        assert a.shape == (6, n)
        assert all(len(set(row)) == n and all(0 <= i < 7 for i in row) for row in a.tolist())
    with pytest.raises(ValueError, match="distinct chunks"):
        sample_sequences(logits, 8, group=2)


def test_log_probs_match_a_step_by_step_recomputation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, generator=g) * 2
    actions = sample_sequences(logits, 4, group=5, generator=g)
    got = sequence_log_probs(logits, actions)
    for b, row in enumerate(actions.tolist()):
        left = list(range(6))
        for t, a in enumerate(row):
            want = logits[a] - torch.logsumexp(logits[left], 0)
            assert float(got[b, t]) == pytest.approx(float(want), abs=1e-5)
            left.remove(a)
    # The sequence probabilities over all ordered picks sum to one (a proper distribution).
    perms = torch.tensor(list(itertools.permutations(range(6), 3)))
    assert float(sequence_log_probs(logits, perms).sum(1).exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_sampling_frequencies_follow_the_masked_softmax():
    logits = torch.tensor([2.0, 0.0, -1.0])
    a = sample_sequences(logits, 2, group=20000, generator=torch.Generator().manual_seed(0))
    perms = torch.tensor(list(itertools.permutations(range(3), 2)))
    probs = sequence_log_probs(logits, perms).sum(1).exp()
    for seq, p in zip(perms.tolist(), probs.tolist()):
        freq = float((a == torch.tensor(seq)).all(1).float().mean())
        assert freq == pytest.approx(p, abs=0.015)


def test_group_advantages_and_ppo_clipping():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(group_advantages(torch.full((4,), 2.5)), torch.zeros(4))
    old = torch.log(torch.full((2, 3), 0.2))
    a = torch.tensor([1.0, -1.0])
    loss, st = ppo_clipped_loss(old.clone(), old, a, 0.2)
    assert float(loss) == pytest.approx(0.0, abs=1e-7) and st["clip_frac"] == 0.0
    new = (old + torch.log(torch.tensor(2.0))).requires_grad_(True)  # ratio 2 on every step
    loss, st = ppo_clipped_loss(new, old, a, 0.2)
    # positive advantage: clipped at 1.2; negative advantage: min(-2, -1.2) = -2 (not clipped)
    assert float(loss.detach()) == pytest.approx(-(1.2 - 2.0) / 2, abs=1e-5)
    loss.backward()
    assert torch.all(new.grad[0] == 0) and torch.all(new.grad[1] != 0)
    assert st["clip_frac"] == 1.0



def test_reference_kl_estimates_the_kl_from_the_reference():
    g = torch.Generator().manual_seed(3)
    cur, ref = torch.randn(6, generator=g), torch.randn(6, generator=g) * 2
    lp, lq = cur.log_softmax(-1), ref.log_softmax(-1)
    exact = float((lp.exp() * (lp - lq)).sum())  # KL(current || reference)
    actions = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=g).view(-1, 1)  # (G, 1) from current
    est = float(reference_kl(lp[actions], lq[actions]))
    assert exact > 0.1 and est == pytest.approx(exact, rel=0.05)
    assert float(reference_kl(lp[actions], lp[actions])) == 0.0


