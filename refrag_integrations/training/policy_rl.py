"""Training the RL selective-expansion policy (stage ``policy``). The policy itself
(:class:`~refrag_integrations.policy.LearnedPolicy`) and the perplexity-desc baseline live in
:mod:`refrag_integrations.policy`, so inference never imports this module.

The paper's policy (training recipe, step 6): a 2-layer transformer reads the pre-projection chunk
vectors c_i of all retrieved chunks and gives one logit per chunk; it picks T' = floor(p L) chunks
one after another, sampling from a softmax over the logits with the already picked chunks masked
out (the logits are computed once, not after each pick). It is trained with a GRPO-style group
baseline: for each question G action sequences are sampled, each is rewarded with the negative
log-perplexity of the gold answer under the mixed input it produces, advantages are
(r - mean) / std within the group, and the PPO clipped-ratio objective is averaged over the T'
steps. The REFRAG model (encoder, projector, decoder) stays frozen; only the policy learns.

Two learned variants are trained side by side on the same questions:

* ``chunks``: the paper's policy, which sees only the chunk vectors.
* ``query``: our query-conditioned variant: the question, embedded by the same chunk encoder, is an
  extra input token, and cos(c_i, query) enters each chunk's logit with a learned weight (so it
  starts close to the training-free relevance heuristic and learns where that heuristic is wrong).

Position information: each chunk gets a learned embedding of its index *inside its passage*
(capped at ``POLICY_MAX_CHUNK_INDEX``), and no global position. Retrieved passages arrive in an
arbitrary order (the gold passage sits at a random position in training), so a global position
would only teach the policy a prior that does not transfer; the index inside a passage does
carry meaning (chunk 0 holds the title and the opening sentence).

Scale-out. The stage runs data-parallel under ``torchrun --nproc_per_node N`` like the other stages
(see :mod:`.trainer`: gloo on CPU, nccl on CUDA). Its cost is the frozen decoder's reward forwards,
so the ranks split the questions of a step: a step has ``N * batch_size * grad_accum`` questions,
drawn one after another from the step's RNG exactly as a single process with ``N`` times the batch
draws them, and rank r builds and scores questions ``r * Q ... r * Q + Q - 1`` (``Q =
batch_size * grad_accum``; it replays the earlier ranks' cheap draws without encoding them). The G
sampled action sequences of question i are seeded by (seed, step, i) with i the global index, so
an N-rank run samples the actions, and computes the rewards, of a single process with
``batch_size * N`` over the same questions. Group advantages are per question (one GRPO group) and
stay on the rank that scored it. Every PPO epoch each rank backpropagates its questions' clipped
losses divided by the number of questions of the whole step (per variant), the policy gradients
are summed over the ranks (one flat all-reduce, through the GPU under nccl: the policy lives on the
CPU), so every rank holds the single-process gradient of the mean over all questions, and clipping
and the AdamW step then run identically on every rank (the initial weights are broadcast from rank
0). Logged metrics are global means. Rank 0 alone writes the resume state, the log and both
variants' checkpoints, and runs the evaluations while the others wait; every rank resumes from the
same ``trainer_state.pt``, and a signal on any rank stops all ranks after the same step. ``fsdp``
does not apply (only the small policy trains).

Example:
    >>> from refrag_integrations import RefragEngine                          # doctest: +SKIP
    >>> engine = RefragEngine.from_pretrained("runs/policy/checkpoint")        # doctest: +SKIP
    >>> engine.generate("Who wrote Hamlet?", passages, expand_fraction=0.25).text  # doctest: +SKIP

    The checkpoint's learned policy is the engine's default policy; ``expand_fraction`` may be left out,
    the policy then expands the fraction p it was trained for.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import save_checkpoint
from ..config import (
    DEFAULT_EXPAND_FRACTION,
    GRPO_STD_EPS,
    POLICY_EVAL_SEED,
)
from ..policy import (
    ExpansionBudget,
    ExpansionPolicy,
    LearnedPolicy,
    resolve_policy,
)
from .config import TrainConfig
from .trainer import CHECKPOINT_DIR, Trainer, micro_batch_seed

if TYPE_CHECKING:  # pragma: no cover
    from ..chunking import Chunk
    from ..engine import RefragEngine

logger = logging.getLogger(__name__)

VARIANTS = ("chunks", "query")  # the paper's policy, the query-conditioned one


# --------------------------------------------------------------------------- sampling + objective


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


# --------------------------------------------------------------------------- rewards


@dataclass
class Episode:
    """One question's frozen inputs: passages, chunks, chunk vectors, query vector, T'."""

    question: str
    passages: list[str]
    target: list[int]
    chunks: list["Chunk"]
    vectors: list[torch.Tensor]  # per passage (L_j, d_enc)
    query_vector: torch.Tensor  # (d_enc,)
    n: int  # T': chunks to expand

    @property
    def flat_vectors(self) -> torch.Tensor:
        return torch.cat(self.vectors, 0)  # (L, d_enc)

    def decisions(self, picked: Sequence[int]) -> list[list[bool]]:
        """Per-passage expansion decisions that expand the flat chunk indices ``picked``."""
        chosen, out, i = set(int(a) for a in picked), [], 0
        for v in self.vectors:
            out.append([(i + j) in chosen for j in range(v.shape[0])])
            i += v.shape[0]
        return out


@dataclass
class Rollout:
    """G sampled action sequences of one variant on one episode, with what PPO needs."""

    episode: Episode
    variant: str
    actions: torch.Tensor  # (G, n)
    old_log_probs: torch.Tensor  # (G, n)
    rewards: torch.Tensor  # (G,)
    advantages: torch.Tensor  # (G,)
    ref_log_probs: torch.Tensor | None = None  # (G, n) under the initial policy (kl_coef > 0)


# --------------------------------------------------------------------------- the trainer


class PolicyTrainer(Trainer):
    """Trains both learned policy variants with GRPO + PPO on NQ *train*; the REFRAG model stays
    frozen. Resume, signals and checkpoints work as in :class:`Trainer`; the exported checkpoint is
    the init checkpoint plus the ``cfg.policy_variant`` policy, and its ``metrics.json`` compares
    both variants with the random, perplexity-desc and relevance policies at the same p.

    Under ``torchrun`` each rank scores its share of every step's questions and the policy gradients
    are summed over the ranks (see the module docstring): N ranks with ``batch_size`` b train the
    policies of one process with ``batch_size`` N * b, to float rounding.

    Args:
        cfg: a :class:`TrainConfig` with ``stage="policy"`` and ``expand_fraction`` p > 0.
        engine: an already built engine (tests); default: built from ``cfg``.

    Example:
        >>> cfg = TrainConfig(stage="policy", init_checkpoint="runs/sft/checkpoint",
        ...                   output_dir="runs/policy", expand_fraction=0.25, num_passages=10)  # doctest: +SKIP
        >>> metrics = PolicyTrainer(cfg).train()                                               # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, engine: "RefragEngine | None" = None) -> None:
        if cfg.stage != "policy":
            raise ValueError(f"PolicyTrainer runs the 'policy' stage, got stage={cfg.stage!r}.")
        if not 0.0 < cfg.expand_fraction < 1.0:
            raise ValueError(
                f"the policy stage needs an expand fraction 0 < p < 1 (chunks to choose), got {cfg.expand_fraction!r}; "
                f"e.g. --set expand_fraction={DEFAULT_EXPAND_FRACTION}."
            )
        if cfg.group_size < 2:
            raise ValueError(f"group_size (G) must be >= 2 for a group baseline, got {cfg.group_size!r}.")
        if cfg.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {cfg.ppo_epochs!r}.")
        if not 0.0 < cfg.ppo_clip < 1.0:
            raise ValueError(f"ppo_clip must be in (0, 1), got {cfg.ppo_clip!r}.")
        if cfg.policy_variant not in VARIANTS:
            raise ValueError(f"policy_variant must be one of {VARIANTS}, got {cfg.policy_variant!r}.")
        if getattr(cfg, "fsdp", False):
            raise ValueError("fsdp=true does not apply to the policy stage (only the small policy trains); drop it.")
        self.policies: dict[str, LearnedPolicy] = {}
        super().__init__(cfg, engine)
        self.budget = ExpansionBudget(fraction=cfg.expand_fraction)
        self._eval_data = None

    # ------------------------------------------------------------------ parameters

    def _set_trainable(self) -> None:
        eng, cfg = self.engine, self.cfg
        for p in list(eng.decoder.parameters()) + list(eng.chunk_encoder.parameters()):
            p.requires_grad_(False)
        eng.decoder.eval()
        eng.chunk_encoder.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.policies = {
                v: LearnedPolicy(
                    eng.chunk_encoder.encoder_dim, query_conditioned=(v == "query"),
                    expand_fraction=cfg.expand_fraction, encoder=eng.chunk_encoder,
                )
                for v in VARIANTS
            }
        # The KL anchor's reference: a frozen copy of the initial policies (the query variant's is
        # the relevance heuristic with weight POLICY_SIM_SCALE, the paper's variant is uniform).
        # The initial weights depend only on the seed, so a resumed run rebuilds the same copies.
        self.ref_policies: dict[str, LearnedPolicy] = {}
        if cfg.kl_coef > 0:
            with torch.random.fork_rng(devices=[]):  # building the copies draws (overwritten) init weights
                for v, policy in self.policies.items():
                    ref = LearnedPolicy.from_state(policy.policy_config(), policy.state_dict())
                    for p in ref.parameters():
                        p.requires_grad_(False)
                    self.ref_policies[v] = ref

    def _modules_params(self):
        for v in VARIANTS:
            yield from self.policies[v].parameters()

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {v: self.policies[v].state_dict() for v in VARIANTS}

    def _load_trainable(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for v in VARIANTS:
            self.policies[v].load_state_dict(state[v])

    # ------------------------------------------------------------------ distributed

    def _broadcast_params(self, params: list[torch.Tensor] | None = None) -> None:
        """Start every rank from rank 0's policy weights (one flat broadcast; the policies live on
        the CPU, so under nccl the buffer goes through this rank's GPU)."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        params = list(self.params if params is None else params)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self._comm_device())  # (n,)
            dist.broadcast(flat, src=0)
            flat = flat.cpu()
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (on every rank; a CPU tensor comes back on the CPU)."""
        if not self.dist.enabled:
            return t
        import torch.distributed as dist

        buf = t.to(self._comm_device())
        dist.all_reduce(buf)
        return buf.to(t.device)

    def _sum_policy_grads(self, variants: Sequence[str]) -> None:
        """Sum the gradients of ``variants``' policies over the ranks (a rank without questions of
        a variant contributes zeros). Each rank scaled its loss by 1 / (questions of the whole
        step), so the sum is the single-process gradient of the mean over all questions."""
        if not self.dist.enabled or not variants:
            return
        params = [p for v in variants for p in self.policies[v].parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = self._sum_over_ranks(torch.cat([p.grad.reshape(-1) for p in params]))  # (n,)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def try_resume(self) -> bool:
        """Continue from ``output_dir``'s resume state (both variants' weights, optimizer, step) if
        there is one; in a multi-rank run every rank loads the same file. A step's questions depend
        only on ``world_size * batch_size * grad_accum``, so, as in :class:`Trainer`, a run may
        resume on another number of ranks with ``world_size * grad_accum`` kept."""
        from .trainer import STATE_FILE

        path = self.out / STATE_FILE
        found = path.is_file()
        if self.dist.enabled and 0 < self._count_ranks(found) < self.dist.world_size:
            # Checked before the settings below, so that no rank raises while the others wait.
            raise ValueError(f"{path} is visible on only some of the {self.dist.world_size} ranks; put output_dir "
                             "on a filesystem that every rank shares.")
        if found:
            saved = torch.load(path, weights_only=False, map_location="cpu")["config"]
            saved.setdefault("kl_coef", 0.0)  # written before the KL anchor existed
            for key in ("num_passages", "expand_fraction", "group_size", "ppo_epochs", "ppo_clip", "lr", "kl_coef"):
                if saved.get(key) != getattr(self.cfg, key):
                    raise ValueError(
                        f"{path} was written with {key}={saved.get(key)!r} but this run has "
                        f"{key}={getattr(self.cfg, key)!r}; use the same settings to resume, or another --output-dir."
                    )
        return super().try_resume()

    # ------------------------------------------------------------------ data

    def data(self):
        if self._data is None:
            from .data import qa_examples

            self._data = qa_examples(self.cfg, "train")
        return self._data

    def eval_data(self):
        if self._eval_data is None:
            from .data import qa_examples

            self._eval_data = qa_examples(self.cfg, "eval")
        return self._eval_data

    def answer_ids(self, answer: str) -> list[int]:
        """The target: the answer's tokens followed by EOS (as in the sft stage)."""
        tok = self.engine.tokenizer
        ids = tok(answer.strip(), add_special_tokens=False)["input_ids"]
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    def make_episode(self, question: str, passages: list[str], answer: str) -> Episode:
        """Chunk vectors c_i (once, no grad; cached by the engine per passage), query vector, T'."""
        eng = self.engine
        chunks = [c for p in passages for c in eng.chunk(p)]
        query_vector = self.policies["query"].embed_query(question)
        return Episode(question, list(passages), self.answer_ids(answer), chunks, self.passage_vectors(passages),
                       query_vector, self.budget.count(len(chunks)))

    def passage_vectors(self, passages: Sequence[str]) -> list[torch.Tensor]:
        """c_i per passage, each passage encoded on its own (cached by the engine), so the values
        never depend on which passages happened to share an encoder batch: exact resume."""
        return [self.engine.chunk_vectors([p]).vectors[0] for p in passages]

    def question_share(self) -> tuple[int, int]:
        """``(first, count)``: this rank's questions of a step are those with global indices
        ``first ... first + count - 1`` (``count = batch_size * grad_accum``; one process: ``(0, count)``)."""
        count = self.cfg.batch_size * self.cfg.grad_accum
        return self.dist.rank * count, count

    def episodes_for_step(self, step: int) -> list[Episode]:
        """This rank's ``batch_size * grad_accum`` questions of optimizer step ``step``.

        The step's ``world_size * batch_size * grad_accum`` questions are drawn one after another
        from an RNG seeded by the step (the draws of the ranks before this one are replayed, which
        is cheap; only this rank's questions are encoded), so N ranks together see the questions of
        one process with N times the batch."""
        from .data import rag_passages

        cfg = self.cfg
        first, count = self.question_share()
        rng = self.micro_rng(step, 0)
        examples = self.data()
        out = []
        for i in range(first + count):
            idx = rng.randrange(len(examples))
            passages, _ = rag_passages(rng, examples, idx, cfg.num_passages)
            if i >= first:
                out.append(self.make_episode(examples[idx].question, passages, examples[idx].answers[0]))
        return out

    # ------------------------------------------------------------------ RL

    def _logits(self, variant: str, ep: Episode, policies: dict[str, LearnedPolicy] | None = None) -> torch.Tensor:
        policy = (self.policies if policies is None else policies)[variant]
        return policy.forward_logits(ep.flat_vectors, policy.chunk_index(ep.chunks), ep.query_vector)

    @torch.no_grad()
    def rewards(self, ep: Episode, action_sets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Negative log-perplexity of the gold answer under the mixed input of each action set
        ``(len(action_sets),)``; each distinct set is scored once."""
        keys = [frozenset(int(a) for a in s) for s in action_sets]
        unique = list(dict.fromkeys(keys))
        prefixes = [self.engine.prepare_rag(ep.question, ep.passages, ep.decisions(sorted(s)), vectors=ep.vectors).embeds
                    for s in unique]
        nll = dict(zip(unique, self.engine.score(prefixes, ep.target)))
        return -torch.stack([nll[k] for k in keys])

    def rollout(self, episodes: Sequence[Episode], step: int, first: int = 0) -> list[Rollout]:
        """Sample G sequences per episode and variant (seeded by step, the episode's global index
        ``first + position`` and variant) and score them; one batched reward call per episode
        covers both variants."""
        cfg = self.cfg
        out = []
        for b, ep in enumerate(episodes, start=first):
            if ep.n == 0 or ep.n >= len(ep.chunks):
                continue  # nothing to choose
            sampled = {}
            for v in VARIANTS:
                seed = random.Random(f"{micro_batch_seed(cfg.seed, step, b)}/{v}").getrandbits(63)
                gen = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    logits = self._logits(v, ep)  # (L,)
                actions = sample_sequences(logits, ep.n, cfg.group_size, gen)  # (G, n)
                ref = None
                if v in self.ref_policies:
                    with torch.no_grad():
                        ref = sequence_log_probs(self._logits(v, ep, self.ref_policies), actions)  # (G, n)
                sampled[v] = (actions, sequence_log_probs(logits, actions), ref)
            rewards = self.rewards(ep, [a.tolist() for v in VARIANTS for a in sampled[v][0]])  # (2G,)
            for vi, v in enumerate(VARIANTS):
                r = rewards[vi * cfg.group_size : (vi + 1) * cfg.group_size]
                actions, old, ref = sampled[v]
                out.append(Rollout(ep, v, actions, old, r, group_advantages(r), ref))
        return out

    def _clipped_losses(self, variant: str, rollouts: Sequence[Rollout]) -> tuple[list[torch.Tensor], list[float], list[float]]:
        """PPO clipped loss (plus ``kl_coef`` times the KL from the initial policy), clipped fraction
        and KL of each of ``variant``'s rollouts under the current policy (the callers aggregate them
        over one process or over the ranks)."""
        losses, clips, kls = [], [], []
        for r in rollouts:
            log_probs = sequence_log_probs(self._logits(variant, r.episode), r.actions)
            loss, st = ppo_clipped_loss(log_probs, r.old_log_probs, r.advantages, self.cfg.ppo_clip)
            if r.ref_log_probs is not None:
                loss = loss + self.cfg.kl_coef * reference_kl(log_probs, r.ref_log_probs)
            losses.append(loss)
            clips.append(st["clip_frac"])
            kls.append(st["kl"])
        return losses, clips, kls

    def ppo_update(self, rollouts: Sequence[Rollout], counts: dict[str, int] | None = None) -> dict[str, float]:
        """``ppo_epochs`` AdamW steps on the clipped objective over all rollouts (both variants).
        Returns the last epoch's loss, clipped fraction and KL per variant.

        In a multi-rank run ``rollouts`` are this rank's, ``counts`` the number of rollouts per
        variant over all ranks (summed here when not given; every rank must call this), and the
        step and the returned statistics are those of one process holding every rank's rollouts.
        """
        if self.dist.enabled:
            return self._ppo_update_ranks(rollouts, counts if counts is not None else self._global_counts(rollouts))
        cfg = self.cfg
        stats: dict[str, float] = {}
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = None
            for v in VARIANTS:
                mine = [r for r in rollouts if r.variant == v]
                if not mine:
                    continue
                losses, clips, kls = self._clipped_losses(v, mine)
                clip = sum(c / len(mine) for c in clips)
                kl = sum(k / len(mine) for k in kls)
                loss_v = torch.stack(losses).mean()
                stats.update({f"loss_{v}": float(loss_v.detach()), f"clip_{v}": clip, f"kl_{v}": kl})
                total = loss_v if total is None else total + loss_v
            if total is None:
                return stats
            total.backward()
            for v in VARIANTS:
                torch.nn.utils.clip_grad_norm_(list(self.policies[v].parameters()), cfg.max_grad_norm)
            self.optimizer.step()
        return stats

    def _global_counts(self, rollouts: Sequence[Rollout]) -> dict[str, int]:
        """Rollouts per variant over all ranks."""
        local = torch.tensor([float(sum(r.variant == v for r in rollouts)) for v in VARIANTS], dtype=torch.float64)
        return {v: int(round(x)) for v, x in zip(VARIANTS, self._sum_over_ranks(local).tolist())}

    def _ppo_update_ranks(self, rollouts: Sequence[Rollout], counts: dict[str, int]) -> dict[str, float]:
        """:meth:`ppo_update` of a multi-rank run: each rank's loss is the sum of its rollouts'
        losses over the step's global count, the gradients are summed over the ranks, then every
        rank clips and steps alike. Statistics are summed over the ranks the same way."""
        cfg = self.cfg
        live = [v for v in VARIANTS if counts[v] > 0]  # the same list on every rank
        shares: dict[str, float] = {}
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = None
            for v in live:
                mine = [r for r in rollouts if r.variant == v]
                losses, clips, kls = self._clipped_losses(v, mine)
                clip, kl = sum(clips), sum(kls)
                loss_v = torch.stack(losses).sum() / counts[v] if losses else None  # this rank's share of the mean
                shares.update({f"loss_{v}": 0.0 if loss_v is None else float(loss_v.detach()),
                               f"clip_{v}": clip / counts[v], f"kl_{v}": kl / counts[v]})
                if loss_v is not None:
                    total = loss_v if total is None else total + loss_v
            if not live:
                return {}
            if total is not None:
                total.backward()
            self._sum_policy_grads(live)
            for v in VARIANTS:
                torch.nn.utils.clip_grad_norm_(list(self.policies[v].parameters()), cfg.max_grad_norm)
            self.optimizer.step()
        keys = sorted(shares)
        summed = self._sum_over_ranks(torch.tensor([shares[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist()))

    def train_step(self) -> dict[str, float]:
        """One step: this rank's questions rolled out and scored, ``ppo_epochs`` PPO updates with
        the gradients summed over the ranks. Returns the step's metrics (over all ranks)."""
        first, _ = self.question_share()
        rollouts = self.rollout(self.episodes_for_step(self.step), self.step, first)
        if self.dist.enabled:
            local = []
            for v in VARIANTS:
                rs = [r.rewards for r in rollouts if r.variant == v]
                local += [float(len(rs)), sum(float(x.double().sum()) for x in rs), float(sum(x.numel() for x in rs))]
            tot = self._sum_over_ranks(torch.tensor(local, dtype=torch.float64)).tolist()
            m = self.ppo_update(rollouts, {v: int(round(tot[3 * i])) for i, v in enumerate(VARIANTS)})
            for i, v in enumerate(VARIANTS):
                if tot[3 * i + 2] > 0:
                    m[f"reward_{v}"] = tot[3 * i + 1] / tot[3 * i + 2]
        else:
            m = self.ppo_update(rollouts)
            for v in VARIANTS:
                rs = [r.rewards for r in rollouts if r.variant == v]
                if rs:
                    m[f"reward_{v}"] = float(torch.cat(rs).mean())
        m["loss"] = sum(m.get(f"loss_{v}", 0.0) for v in VARIANTS)
        self.scheduler.step()
        self.step += 1
        return m

    # ------------------------------------------------------------------ evaluation + export

    def eval_policies(self) -> dict[str, Callable[[int], ExpansionPolicy]]:
        """The settings compared at the same p: both learned variants and the baselines, plus
        p = 0 (``none``) and full context (``all``) for reference. Values map the example
        number to a policy."""
        eng = self.engine
        ppl = resolve_policy("perplexity-desc", engine=eng)
        rel = resolve_policy("relevance", engine=eng)
        return {
            "learned_chunks": lambda i: self.policies["chunks"],
            "learned_query": lambda i: self.policies["query"],
            "random": lambda i: resolve_policy("random", seed=POLICY_EVAL_SEED + i),
            "perplexity_desc": lambda i: ppl,
            "relevance": lambda i: rel,
            "none": lambda i: resolve_policy("none"),
            "all": lambda i: resolve_policy("all"),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean gold-answer NLL on the first ``eval_examples`` NQ *eval* questions (gold +
        distractors as in the sft evaluation) per setting, with paired differences of each learned
        variant against every other setting (negative = the learned policy is better)."""
        from tqdm.auto import tqdm

        from .data import rag_passages

        cfg, eng = self.cfg, self.engine
        pool = self.eval_data()
        eval_set = pool[: cfg.eval_examples]
        settings = self.eval_policies()
        nll: dict[str, list[float]] = {name: [] for name in settings}
        for i, ex in enumerate(tqdm(eval_set, desc="policy eval", dynamic_ncols=True)):
            passages = rag_passages(random.Random(POLICY_EVAL_SEED + i), pool, i, cfg.num_passages)[0]
            vectors = self.passage_vectors(passages)
            prefixes = [eng.prepare_rag(ex.question, passages, make(i), expand_fraction=self.budget.fraction,
                                        vectors=vectors).embeds
                        for make in settings.values()]
            for name, value in zip(settings, eng.score(prefixes, self.answer_ids(ex.answers[0])).tolist()):
                nll[name].append(value)

        def summary(xs: list[float]) -> dict[str, float]:
            t = torch.tensor(xs, dtype=torch.float64)
            err = float(t.std() / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")
            return {"mean": float(t.mean()), "stderr": err}

        out: dict[str, Any] = {
            "examples": len(eval_set), "num_passages": cfg.num_passages, "expand_fraction": cfg.expand_fraction,
            "trained_projector": bool(eng.trained), "answer_nll": {k: summary(v) for k, v in nll.items()},
        }
        for v in VARIANTS:
            mine = nll[f"learned_{v}"]
            out[f"delta_learned_{v}"] = {
                other: summary([a - b for a, b in zip(mine, xs)]) for other, xs in nll.items() if not other.startswith("learned")
            }
        return out

    def variant_dir(self, variant: str) -> Path:
        """Where ``variant``'s checkpoint goes: ``output_dir/checkpoint`` for ``cfg.policy_variant``,
        ``output_dir/checkpoint-<variant>`` for the other one (so both can be evaluated)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        return self.out / (CHECKPOINT_DIR if variant == self.cfg.policy_variant else f"{CHECKPOINT_DIR}-{variant}")

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> Path:
        """Export the init checkpoint (projector, deltas, adapters) plus a learned policy, once per
        variant: ``output_dir/checkpoint`` holds the ``cfg.policy_variant`` policy and
        ``output_dir/checkpoint-<other variant>`` the other. Returns the first. Only rank 0 writes
        (the ranks hold the same policies); other ranks return the path at once."""
        if not self.dist.is_main:
            return self.variant_dir(self.cfg.policy_variant)
        eng, prev = self.engine, self.prev
        for variant in sorted(VARIANTS, key=lambda v: v != self.cfg.policy_variant):
            policy = self.policies[variant]
            save_checkpoint(
                self.variant_dir(variant), eng.config, eng.chunk_encoder.projector.state_dict(),
                encoder_delta=(prev.encoder_delta or None) if prev else None,
                decoder_delta=(prev.decoder_delta or None) if prev else None,
                decoder_lora=(prev.decoder_lora or None) if prev else None,
                policy=policy.state_dict(), policy_config=policy.policy_config(),
                trained_stages=self.prev_stages + ["policy"],
                metrics=None if metrics is None else {**metrics, "exported_variant": variant},
            )
        return self.variant_dir(self.cfg.policy_variant)

    def train(self, resume: bool = True) -> dict[str, Any]:
        """Run (or continue) to ``max_steps``, evaluate, export; returns the metrics (on every rank).

        In a multi-rank run every rank trains; rank 0 alone writes the log, the resume state and the
        checkpoints and runs the evaluations (the others wait), and the trainer leaves the process
        group it created when it returns.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        main = self.dist.is_main
        if resume:
            self.try_resume()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            if not self.engine.trained:
                logger.warning("the REFRAG projector is untrained: compressed chunks are noise, so rewards mostly "
                               "reflect which chunks stay tokens; train from an sft checkpoint for real use.")
        self._barrier()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log = open(self.out / "train_log.jsonl", "a") if main else None
        stop = False
        try:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="refrag policy", dynamic_ncols=True,
                       disable=not main)
            while self.step < cfg.max_steps and not stop:
                t0 = time.perf_counter()
                m = self.train_step()
                stop = self._any_rank(self._stop)  # every rank takes the same decision
                m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], sec=time.perf_counter() - t0)
                if log is not None:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                bar.set_postfix({f"r_{v}": f"{m[f'reward_{v}']:.3f}" for v in VARIANTS if f"reward_{v}" in m})
                bar.update(1)
                if self.step % cfg.save_every == 0 or stop:
                    self.save_state()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and not stop:
                    if main:
                        ev = self.evaluate()
                        log.write(json.dumps({"step": self.step, "eval": ev}) + "\n")
                        self.save_checkpoint({"stage": "policy", "step": self.step, "after": ev})
                    self._barrier()
            bar.close()
            self.save_state()
            # A signal that arrived after the last step's agreement still stops every rank alike.
            stop = self._any_rank(stop or self._stop)
        finally:
            if log is not None:
                log.close()
            for s, h in old.items():
                signal.signal(s, h)
        if stop:
            logger.warning("stopped at step %d; rerun the same command to resume", self.step)
            self.close()
            return {"stopped_at": self.step}
        metrics: dict[str, Any] | None = None
        if main:
            metrics = {"stage": "policy", "steps": self.step, "exported_variant": cfg.policy_variant,
                       "after": self.evaluate()}
            if self.prev is not None and self.prev.metrics:
                metrics["init_checkpoint_metrics"] = self.prev.metrics
            self.save_checkpoint(metrics)
        self._barrier()
        metrics = self._broadcast_object(metrics)
        self.close()
        return metrics


__all__ = [
    "PolicyTrainer",
    "group_advantages",
    "ppo_clipped_loss",
    "sample_sequences",
    "sequence_log_probs",
]
