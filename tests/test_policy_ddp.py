"""The policy stage data-parallel: two CPU processes (gloo), launched the way torchrun launches them
(``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``), split each step's
questions, stay in sync, agree on stopping when only one of them is signalled, resume together, and
end with the policy weights of one process that sees the same questions (``batch_size`` x 2).

Two of the four questions are made ineligible (T' = 0: nothing to choose), so the ranks hold
different numbers of rollouts in a step (2 and 0, 2 and 1) and in one step none at all: a wrong
weighting of the ranks' gradients (e.g. averaging per-rank means) changes the result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from refrag_integrations.training.config import TrainConfig
from refrag_integrations.training.policy_rl import VARIANTS, PolicyTrainer
from refrag_integrations.training.trainer import CHECKPOINT_DIR, STATE_FILE

from test_distributed import WORLD, run_rank_interrupted, spawn_interrupted_ranks  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from test_policy_rl import EXAMPLES  # noqa: E402

STEPS = 4
PER_RANK = 2  # questions per rank and step
SKIPPED = {EXAMPLES[0].question, EXAMPLES[1].question}  # episodes with nothing to choose


class _Trainer(PolicyTrainer):
    def make_episode(self, question, passages, answer):
        ep = super().make_episode(question, passages, answer)
        return dataclasses.replace(ep, n=0) if question in SKIPPED else ep


def _trainer(cfg: TrainConfig) -> PolicyTrainer:
    tr = _Trainer(cfg)
    tr._data, tr._eval_data = EXAMPLES, EXAMPLES
    return tr


def _cfg(out, tiny_dirs, batch_size: int) -> TrainConfig:
    dec, enc = tiny_dirs
    return TrainConfig(
        stage="policy", output_dir=str(out), decoder=str(dec), encoder=str(enc), device="cpu", threads=1,
        chunk_size=4, expand_fraction=0.25, num_passages=2, batch_size=batch_size, group_size=4, ppo_epochs=2,
        max_steps=STEPS, save_every=100, bf16=False, eval_examples=2, lr=1e-2, warmup_frac=0.0,
    )


def _gauge_mask(name: str, value: torch.Tensor) -> torch.Tensor:
    """The entries of a policy weight that only shift all logits (final norm and head biases) or
    all attention scores of a query (the key bias) by a constant: invisible to softmax and loss."""
    mask = torch.zeros(value.shape, dtype=torch.bool)
    if name in ("head.bias", "norm.bias"):
        mask[:] = True
    elif name.endswith("qkv.bias"):
        width = value.shape[0] // 3
        mask[width : 2 * width] = True
    return mask


def _worker(rank: int, cfg: dict, ports: list[int], result_dir: str) -> None:
    """One rank: train until rank 1 alone gets SIGTERM, then a new trainer resumes to the end."""

    def check(first: PolicyTrainer) -> None:
        assert first.question_share() == (rank * PER_RANK, PER_RANK)

    stopped, second, metrics = run_rank_interrupted(_trainer, cfg, rank, ports, on_first=check)
    torch.save(
        {"stopped": stopped, "metrics": metrics, "step": second.step, "trainable": second.trainable_state()},
        Path(result_dir) / f"rank{rank}.pt",
    )


def test_two_gloo_ranks_train_the_policies_of_one_process(tmp_path, tiny_dirs, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # One process over the same questions: batch_size x WORLD.
    single = _trainer(_cfg(tmp_path / "single", tiny_dirs, batch_size=PER_RANK * WORLD))
    # The test discriminates: some step gives the ranks' shares different numbers of rollouts.
    eligible = []
    for step in range(STEPS):
        flags = [ep.question not in SKIPPED for ep in single.episodes_for_step(step)]
        eligible.append([sum(flags[r * PER_RANK : (r + 1) * PER_RANK]) for r in range(WORLD)])
    assert any(a != b for a, b in eligible) and any(0 in e and sum(e) for e in eligible), eligible
    init = single.trainable_state()
    metrics_single = single.train()
    want = single.trainable_state()

    dist_cfg = _cfg(tmp_path / "ddp", tiny_dirs, batch_size=PER_RANK)
    # Both ranks stopped after the same step although only rank 1 was signalled, then resumed.
    ranks = spawn_interrupted_ranks(_worker, dist_cfg, tmp_path)

    # In sync: identical weights of both variants on both ranks.
    a, b = ranks[0]["trainable"], ranks[1]["trainable"]
    for v in VARIANTS:
        assert a[v] and a[v].keys() == b[v].keys()
        for name in a[v]:
            assert torch.equal(a[v][name], b[v][name]), f"{v}.{name} differs between ranks"

    # The single process's weights, and training moved them (not the trivial match of untouched weights).
    # Directions the loss cannot see (a constant added to every logit or to a query's attention
    # scores) get gradients of pure rounding noise, which Adam turns into steps of about lr: those
    # are compared through the logits (up to a constant), everything else weight by weight.
    for v in VARIANTS:
        for name, value in want[v].items():
            mask = _gauge_mask(name, value)
            torch.testing.assert_close(a[v][name][~mask], value[~mask], rtol=1e-4, atol=1e-5, msg=f"{v}.{name}")
        assert any(not torch.equal(want[v][n], init[v][n]) for n in want[v]), f"{v} did not train"
    episodes = [ep for step in range(STEPS) for ep in single.episodes_for_step(step)]
    with torch.no_grad():
        want_logits = {v: [single._logits(v, ep) for ep in episodes] for v in VARIANTS}
        single.load_trainable_state(a)
        for v in VARIANTS:
            for ep, w in zip(episodes, want_logits[v]):
                got = single._logits(v, ep)
                torch.testing.assert_close(got - got.mean(), w - w.mean(), rtol=1e-4, atol=1e-4)

    # Only rank 0 wrote: one log line per step with the single run's metrics, one state, both exports.
    out = tmp_path / "ddp"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == list(range(1, STEPS + 1))
    for d, s in zip(log, single_log):
        assert d.keys() == s.keys()
        for key in d:
            if key != "sec":
                assert abs(d[key] - s[key]) <= 1e-4 * (1 + abs(s[key])), (d["step"], key, d[key], s[key])
    saved = torch.load(out / STATE_FILE, weights_only=False)
    assert saved["step"] == STEPS and saved["world_size"] == WORLD
    for v in VARIANTS:
        assert (out / (CHECKPOINT_DIR if v == dist_cfg.policy_variant else f"{CHECKPOINT_DIR}-{v}") / "refrag_config.json").is_file()
    # Rank 0's evaluation of the same weights gives the single run's numbers.
    for name, s in metrics_single["after"]["answer_nll"].items():
        assert abs(ranks[0]["metrics"]["after"]["answer_nll"][name]["mean"] - s["mean"]) < 1e-4, name
