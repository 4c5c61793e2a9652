"""The RL selective-expansion policy (training/policy_rl.py) on tiny random models."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal

import pytest
import torch

from refrag_integrations import RefragEngine
from refrag_integrations.checkpoint import load_checkpoint, save_checkpoint
from refrag_integrations.policy import ExpansionBudget, LearnedPolicy, PerplexityDescPolicy
from refrag_integrations.training.config import TrainConfig
from refrag_integrations.training.data import NQExample
from refrag_integrations.training.objectives import lm_loss
from refrag_integrations.training.policy_rl import VARIANTS, PolicyTrainer
from refrag_integrations.training.rl_objectives import sequence_log_probs

# Sentences from the tiny tokenizer's corpus (WikiText-2, CC BY-SA 3.0), as NQ-style examples.
EXAMPLES = [
    NQExample("Who wrote the play Herons?", ("Simon Stephens",),
              "Herons\nThis was followed by a starring role in the play Herons written by Simon Stephens, "
              "which was performed in 2001 at the Royal Court Theatre.", 1),
    NQExample("Who is the Eiffel Tower named after?", ("Gustave Eiffel",),
              "Eiffel Tower\nGustave Eiffel designed the tower in Paris, France.", 2),
    NQExample("Where was Mercury Fur performed?", ("Drum Theatre",),
              "Mercury Fur\nHe was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur, "
              "which was performed at the Drum Theatre in Plymouth.", 3),
    NQExample("Which series did Boulter guest star in in 2000?", ("The Bill",),
              "Robert Boulter\nRobert Boulter is an English film, television and theatre actor. He had a guest "
              "starring role on the television series The Bill in 2000.", 4),
]
PASSAGES = [EXAMPLES[0].passage, EXAMPLES[3].passage]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, tiny models are ~10x faster without thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    """A private tiny engine (the trainer freezes its modules; the shared fixture stays untouched)."""
    dec, enc = tiny_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")


def _cfg(out, **kw) -> TrainConfig:
    base = dict(stage="policy", output_dir=str(out), chunk_size=4, expand_fraction=0.25, num_passages=2,
                batch_size=2, group_size=4, ppo_epochs=2, max_steps=4, save_every=1, bf16=False,
                eval_examples=2, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(engine, out, **kw) -> PolicyTrainer:
    tr = PolicyTrainer(_cfg(out, **kw), engine=engine)
    tr._data, tr._eval_data = EXAMPLES, EXAMPLES
    return tr


def _randomized(policy: LearnedPolicy, seed: int) -> LearnedPolicy:
    """Non-trivial weights (a fresh policy has a zero head, i.e. uniform logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return policy


def _flat(engine, passages):
    chunks = [c for p in passages for c in engine.chunk(p)]
    return chunks, torch.cat(engine.chunk_vectors(passages).vectors, 0)


# --------------------------------------------------------------------------- the learned policy


@pytest.mark.parametrize("query_conditioned", [False, True])
def test_learned_policy_respects_budget_and_never_repeats(engine, query_conditioned):
    policy = _randomized(LearnedPolicy(engine.chunk_encoder.encoder_dim, query_conditioned=query_conditioned,
                                       expand_fraction=0.25, encoder=engine.chunk_encoder), seed=0)
    chunks, vecs = _flat(engine, PASSAGES)
    L = len(chunks)
    q = EXAMPLES[0].question
    assert policy.select(q, chunks, vecs, 0) == [False] * L
    assert policy.select(q, chunks, vecs, ExpansionBudget(fraction=0.0)) == [False] * L
    assert policy.select(q, chunks, vecs, L) == [True] * L
    assert policy.select(q, chunks, vecs, 1.0) == [True] * L
    for budget, want in ((3, 3), (0.5, L // 2), (ExpansionBudget(fraction=0.5, max_count=2), 2),
                         (None, int(0.25 * L)), (ExpansionBudget(), int(0.25 * L))):
        got = policy.select(q, chunks, vecs, budget)
        assert len(got) == L and sum(got) == want
    # Through the engine: one decision per chunk per passage, budget over all passages jointly.
    dec = engine.decide(q, PASSAGES, policy, expand_fraction=0.5)
    assert [len(d) for d in dec] == [len(engine.chunk(p)) for p in PASSAGES]
    assert sum(map(sum, dec)) == L // 2


@pytest.mark.parametrize("query_conditioned", [False, True])
def test_greedy_selection_is_deterministic_top_logits(engine, query_conditioned):
    policy = _randomized(LearnedPolicy(engine.chunk_encoder.encoder_dim, query_conditioned=query_conditioned,
                                       encoder=engine.chunk_encoder), seed=1)
    chunks, vecs = _flat(engine, PASSAGES)
    q = EXAMPLES[0].question
    first = policy.select(q, chunks, vecs, 4)
    assert all(policy.select(q, chunks, vecs, 4) == first for _ in range(3))
    logits = policy.logits(q, chunks, vecs)
    top = set(torch.argsort(logits, descending=True)[:4].tolist())
    assert {i for i, x in enumerate(first) if x} == top
    other = policy.logits(EXAMPLES[1].question, chunks, vecs)
    assert torch.equal(other, logits) is (not query_conditioned)  # only the query variant reads the query


def test_learned_policy_input_errors(engine):
    chunks, vecs = _flat(engine, PASSAGES)
    no_encoder = LearnedPolicy(engine.chunk_encoder.encoder_dim, query_conditioned=True)
    with pytest.raises(ValueError, match="attach_encoder"):
        no_encoder.select("q?", chunks, vecs, 2)
    policy = LearnedPolicy(engine.chunk_encoder.encoder_dim)
    with pytest.raises(ValueError, match="shape"):
        policy.select("q?", chunks, vecs[:, :5], 2)
    with pytest.raises(TypeError, match="Chunk objects"):
        policy.select("q?", list(range(len(chunks))), vecs, 2)
    with pytest.raises(ValueError, match="expand_fraction"):
        LearnedPolicy(8, expand_fraction=1.5)
    with pytest.raises(ValueError, match="divisible"):
        LearnedPolicy(8, width=30, heads=4)
    with pytest.raises(ValueError, match="Unknown policy_config"):
        LearnedPolicy.from_state({**policy.policy_config(), "bogus": 1}, policy.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        LearnedPolicy.from_state({**policy.policy_config(), "width": 64}, policy.state_dict())


# --------------------------------------------------------------------------- perplexity-desc


def test_perplexity_desc_expands_the_highest_nll_chunks(engine):
    policy = PerplexityDescPolicy(engine)
    chunks, vecs = _flat(engine, PASSAGES)
    scores = policy.chunk_perplexities(chunks)
    # Independent computation: each passage scored alone after the BOS token, means per chunk.
    embed = engine.decoder.get_input_embeddings()
    want = []
    with torch.no_grad():
        for p in PASSAGES:
            cs = engine.chunk(p)
            ids = torch.tensor([[t for c in cs for t in c.token_ids]])
            start = embed(torch.tensor([[engine.tokenizer.bos_token_id]]))
            nll = lm_loss(engine, start, ids)[0][0]
            i = 0
            for c in cs:
                want.append(float(nll[i : i + len(c.token_ids)].mean()))
                i += len(c.token_ids)
    torch.testing.assert_close(scores, torch.tensor(want), atol=1e-4, rtol=1e-4)
    got = policy.select("q", chunks, vecs, 3)
    assert {i for i, x in enumerate(got) if x} == set(torch.argsort(scores, descending=True)[:3].tolist())
    assert policy.select("q", chunks, vecs, 0) == [False] * len(chunks)
    dec = engine.decide("q", PASSAGES, policy, max_expanded=3)  # usable through the engine
    assert [x for d in dec for x in d] == got
    with pytest.raises(ValueError, match="whole passages"):
        policy.select("q", chunks[1:], vecs[1:], 2)


# --------------------------------------------------------------------------- rewards


def test_batched_answer_nll_matches_unbatched_loss(engine):
    chunks, _ = _flat(engine, PASSAGES)
    L = len(chunks)
    decisions = [[[False] * len(engine.chunk(p)) for p in PASSAGES]]
    for pick in ([0], [1, L - 1], list(range(L // 2))):
        flat = [i in pick for i in range(L)]
        n0 = len(engine.chunk(PASSAGES[0]))
        decisions.append([flat[:n0], flat[n0:]])
    prefixes = [engine.prepare_rag("Who?", PASSAGES, d).embeds for d in decisions]
    assert len({p.shape[0] for p in prefixes}) > 1  # rows of different lengths share a padded batch
    target = engine.tokenizer("Simon Stephens", add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
    got = engine.score(prefixes, target)
    with torch.no_grad():
        want = [float(lm_loss(engine, p.unsqueeze(0), torch.tensor([target]))[0].mean()) for p in prefixes]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_config_errors(engine, tmp_path):
    for kw, match in ((dict(expand_fraction=0.0), "expand fraction"), (dict(group_size=1), "group_size"),
                      (dict(policy_variant="both"), "policy_variant"), (dict(ppo_clip=0.0), "ppo_clip"),
                      (dict(stage="sft"), "policy")):
        with pytest.raises(ValueError, match=match):
            PolicyTrainer(_cfg(tmp_path, **kw), engine=engine)


def test_a_rank_draws_its_share_of_the_single_process_questions_and_actions(engine, tmp_path):
    """Rank r of N (batch_size b) builds questions r*b ... r*b + b - 1 of a single process with
    batch_size N*b and samples the same action sequences for them (no process group needed: the
    share and the seeds depend only on the rank). The 2-process run is in test_policy_ddp.py."""
    from refrag_integrations.training.distributed import DistContext

    whole = _trainer(engine, tmp_path / "whole", batch_size=4)
    assert whole.question_share() == (0, 4)
    step = 3
    want_eps = whole.episodes_for_step(step)
    want = whole.rollout(want_eps, step)
    for rank in range(2):
        part = _trainer(engine, tmp_path / f"rank{rank}", batch_size=2)
        part.dist = DistContext(world_size=2, rank=rank)
        first, count = part.question_share()
        assert (first, count) == (2 * rank, 2)
        eps = part.episodes_for_step(step)
        assert [(e.question, e.passages) for e in eps] == [(e.question, e.passages) for e in want_eps[first : first + count]]
        got = part.rollout(eps, step, first)
        mine = [r for r in want if any(r.episode is e for e in want_eps[first : first + count])]
        assert len(got) == len(mine) > 0
        for g, w in zip(got, mine):
            assert g.variant == w.variant and torch.equal(g.actions, w.actions)
            torch.testing.assert_close(g.rewards, w.rewards)
        if rank:  # seeded by the global index: the local one would give other actions
            other = part.rollout(eps, step)
            assert any(not torch.equal(o.actions, g.actions) for o, g in zip(other, got))


# --------------------------------------------------------------------------- GRPO learns


def _expected_reward(tr, variant, ep, reward_of) -> float:
    """Exact E[reward] under the policy's sequential sampling (enumerating every ordered pick)."""
    with torch.no_grad():
        logits = tr._logits(variant, ep)
    perms = torch.tensor(list(itertools.permutations(range(len(ep.chunks)), ep.n)))
    probs = sequence_log_probs(logits, perms).sum(1).exp()
    return float((probs * torch.stack([reward_of[frozenset(p)] for p in perms.tolist()])).sum())


def test_grpo_steps_raise_the_expected_reward(engine, tmp_path):
    tr = _trainer(engine, tmp_path, group_size=8, ppo_epochs=4, warmup_frac=0.0, max_steps=100)
    ex0, ex1, ex3 = EXAMPLES[0], EXAMPLES[1], EXAMPLES[3]
    episodes = [
        dataclasses.replace(tr.make_episode(ex1.question, [ex1.passage, ex3.passage[:60]], ex1.answers[0]), n=2),
        dataclasses.replace(tr.make_episode(ex0.question, [ex0.passage[:80]], ex0.answers[0]), n=2),
    ]
    rewards, best = [], []
    for ep in episodes:
        sets = [frozenset(c) for c in itertools.combinations(range(len(ep.chunks)), ep.n)]
        r = tr.rewards(ep, [sorted(s) for s in sets])
        rewards.append(dict(zip(sets, r)))
        best.append(float(r.max()))
        assert float(r.max() - r.min()) > 0  # the choice matters
    before = {v: [_expected_reward(tr, v, ep, rw) for ep, rw in zip(episodes, rewards)] for v in VARIANTS}
    for it in range(12):
        tr.ppo_update(tr.rollout(episodes, it))
    for v in VARIANTS:
        after = [_expected_reward(tr, v, ep, rw) for ep, rw in zip(episodes, rewards)]
        closed = [(a - b) / (m - b) for a, b, m in zip(after, before[v], best)]
        assert all(c > 0.1 for c in closed), (v, closed)  # every episode improves
        assert sum(closed) / len(closed) > 0.4, (v, closed)  # and the gap to the best set shrinks a lot


def test_kl_anchor_keeps_the_policy_near_its_start(engine, tmp_path):
    ex1, ex3 = EXAMPLES[1], EXAMPLES[3]
    drift = {}
    for coef in (0.0, 2.0):
        tr = _trainer(engine, tmp_path / str(coef), group_size=8, ppo_epochs=4, warmup_frac=0.0, max_steps=100,
                      lr=1e-2, kl_coef=coef)
        assert bool(tr.ref_policies) is (coef > 0)
        ep = dataclasses.replace(tr.make_episode(ex1.question, [ex1.passage, ex3.passage[:60]], ex1.answers[0]), n=2)
        start = {v: tr._logits(v, ep).detach().log_softmax(-1) for v in VARIANTS}
        for it in range(8):
            tr.ppo_update(tr.rollout([ep], it))
        drift[coef] = {}
        for v in VARIANTS:
            now = tr._logits(v, ep).detach().log_softmax(-1)
            drift[coef][v] = float((now.exp() * (now - start[v])).sum())  # KL(now || start), first pick
            if coef > 0:  # the reference is the untouched initial policy
                ref = tr._logits(v, ep, tr.ref_policies).detach().log_softmax(-1)
                assert torch.allclose(ref, start[v])
    for v in VARIANTS:
        assert drift[0.0][v] > 0.05, drift  # unanchored, the policy moves
        assert drift[2.0][v] < 0.5 * drift[0.0][v], drift  # anchored, it stays much closer to its start
    with pytest.raises(ValueError, match="kl_coef"):
        TrainConfig(stage="policy", kl_coef=-0.1)


# --------------------------------------------------------------------------- checkpoints + resume


def test_checkpoint_round_trip_gives_the_same_selections(engine, tiny_dirs, tmp_path):
    dec, enc = tiny_dirs
    for variant in VARIANTS:
        tr = _trainer(engine, tmp_path / variant, policy_variant=variant)
        policy = _randomized(tr.policies[variant], seed=2)
        path = tr.save_checkpoint({"note": "round trip"})
        assert path == tmp_path / variant / "checkpoint"
        other = next(v for v in VARIANTS if v != variant)  # the other variant is exported beside it
        other_ckpt = load_checkpoint(tmp_path / variant / f"checkpoint-{other}")
        assert other_ckpt.policy_config["query_conditioned"] is (other == "query")
        assert other_ckpt.metrics["exported_variant"] == other
        ckpt = load_checkpoint(path)
        assert ckpt.metrics["exported_variant"] == variant
        assert ckpt.trained_stages == ["policy"] and ckpt.policy_config["query_conditioned"] is (variant == "query")
        loaded = RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), device="cpu")
        assert isinstance(loaded.policy, LearnedPolicy) and loaded.policy.query_conditioned is (variant == "query")
        for q in (EXAMPLES[0].question, EXAMPLES[2].question):
            for budget in (None, 3, 0.5):
                want = engine.decide(q, PASSAGES, policy, budget=budget if budget is not None else 0.25)
                assert loaded.decide(q, PASSAGES, budget=budget) == want  # the checkpoint's policy is the default
        # The same weights through save_checkpoint directly, onto a checkpoint with no policy before.
        direct = save_checkpoint(tmp_path / f"direct-{variant}", engine.config, engine.chunk_encoder.projector.state_dict(),
                                 policy=policy.state_dict(), policy_config=policy.policy_config(), trained_stages=["sft"])
        again = RefragEngine.from_pretrained(direct, decoder=str(dec), encoder=str(enc), device="cpu")
        assert again.decide(EXAMPLES[0].question, PASSAGES, expand_fraction=0.5) == engine.decide(
            EXAMPLES[0].question, PASSAGES, policy, expand_fraction=0.5)


def test_resume_after_interruption_reproduces_the_uninterrupted_run(engine, tmp_path):
    full = _trainer(engine, tmp_path / "full")
    metrics_full = full.train()
    assert metrics_full["steps"] == 4 and set(metrics_full["after"]["answer_nll"]) == {
        "learned_chunks", "learned_query", "random", "perplexity_desc", "relevance", "none", "all"}

    cut = _trainer(engine, tmp_path / "cut")
    step = cut.train_step

    def step_then_interrupt():
        m = step()
        if cut.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: save and stop after this step
        return m

    cut.train_step = step_then_interrupt
    assert cut.train() == {"stopped_at": 2}
    with pytest.raises(ValueError, match="group_size"):
        _trainer(engine, tmp_path / "cut", group_size=8).train()
    with pytest.raises(ValueError, match="kl_coef"):
        _trainer(engine, tmp_path / "cut", kl_coef=0.1).train()
    resumed = _trainer(engine, tmp_path / "cut")
    metrics_resumed = resumed.train()
    for v in VARIANTS:
        a, b = full.policies[v].state_dict(), resumed.policies[v].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_resumed == metrics_full

    def log(path):
        rows = [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "sec"} for r in rows]

    assert log(tmp_path / "cut") == log(tmp_path / "full")
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint")
    assert saved.policy_config["query_conditioned"] is True and saved.metrics["steps"] == 4
