"""Training the RL selective-expansion policy (stage ``policy``): both learned variants (the
paper's, reading chunk vectors only, and the query-conditioned one) trained side by side with a
GRPO group baseline and the PPO clipped objective (maths in :mod:`.rl_objectives`), the reward
being minus the gold answer's log-perplexity under the mixed input; the REFRAG model stays frozen.
The policy itself (:class:`~refrag_integrations.policy.LearnedPolicy`) lives in
:mod:`refrag_integrations.policy`, so inference never imports this module. The design, and how
the ranks share a step: docs/training.md, "How the trainer is organised".

Example:
    >>> from refrag_integrations import RefragEngine                          # doctest: +SKIP
    >>> engine = RefragEngine.from_pretrained("runs/policy/checkpoint")        # doctest: +SKIP
    >>> engine.generate("Who wrote Hamlet?", passages, expand_fraction=0.25).text  # doctest: +SKIP

    The checkpoint's learned policy is the engine's default policy; ``expand_fraction`` may be left out,
    the policy then expands the fraction p it was trained for.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..checkpoint import save_checkpoint
from ..config import DEFAULT_EXPAND_FRACTION, POLICY_EVAL_SEED
from ..policy import ExpansionBudget, ExpansionPolicy, LearnedPolicy, resolve_policy
from .config import TrainConfig
from .rl_objectives import anchored_ppo_loss, group_advantages, sample_sequences, sequence_log_probs
from .trainer import CHECKPOINT_DIR, Trainer, micro_batch_seed

if TYPE_CHECKING:  # pragma: no cover
    from ..chunking import Chunk
    from ..engine import RefragEngine

logger = logging.getLogger(__name__)

VARIANTS = ("chunks", "query")  # the paper's policy, the query-conditioned one


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
    are summed over the ranks (see docs/training.md): N ranks with ``batch_size`` b train the
    policies of one process with ``batch_size`` N * b, to float rounding.

    Args:
        cfg: a :class:`TrainConfig` with ``stage="policy"`` and ``expand_fraction`` p > 0.
        engine: an already built engine (tests); default: built from ``cfg``.

    Example:
        >>> cfg = TrainConfig(stage="policy", init_checkpoint="runs/sft/checkpoint",
        ...                   output_dir="runs/policy", expand_fraction=0.25, num_passages=10)  # doctest: +SKIP
        >>> metrics = PolicyTrainer(cfg).train()                                               # doctest: +SKIP
    """

    # A step's questions depend only on ``world_size * batch_size * grad_accum``, so, as in
    # :class:`Trainer`, a run may resume on another number of ranks with ``world_size * grad_accum`` kept.
    RESUME_KEYS = ("num_passages", "expand_fraction", "group_size", "ppo_epochs", "ppo_clip", "lr", "kl_coef",
                   *Trainer.RESUME_KEYS)
    RESUME_DEFAULTS = {"kl_coef": 0.0}  # state files written before the KL anchor existed

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

    def set_trainable(self) -> None:
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

    def module_params(self):
        for v in VARIANTS:
            yield from self.policies[v].parameters()

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {v: self.policies[v].state_dict() for v in VARIANTS}

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for v in VARIANTS:
            self.policies[v].load_state_dict(state[v])

    def broadcast_initial_weights(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's policy weights (one flat broadcast; the policies live on
        the CPU, so under nccl the buffer goes through this rank's GPU)."""
        self.dist.broadcast_params_flat(params)

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
        from .data import answer_ids

        return answer_ids(self.engine.tokenizer, answer)

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
            loss, st = anchored_ppo_loss(log_probs, r.old_log_probs, r.advantages, self.cfg.ppo_clip,
                                         r.ref_log_probs, self.cfg.kl_coef)
            losses.append(loss)
            clips.append(st["clip_frac"])
            kls.append(st["kl"])
        return losses, clips, kls

    def ppo_update(self, rollouts: Sequence[Rollout], counts: dict[str, int] | None = None) -> dict[str, float]:
        """``ppo_epochs`` AdamW steps on the clipped objective over all rollouts (both variants).
        Returns the last epoch's loss, clipped fraction and KL per variant.

        In a multi-rank run ``rollouts`` are this rank's, ``counts`` the number of rollouts per
        variant over all ranks (summed here when not given; every rank must call this), and the
        step and the returned statistics are those of one process holding every rank's rollouts:
        each rank's loss is the sum of its rollouts' losses over the step's global count, the
        gradients are summed over the ranks, then every rank clips and steps alike.
        """
        cfg, ranks = self.cfg, self.dist.enabled
        if counts is None:
            counts = self._global_counts(rollouts)
        live = [v for v in VARIANTS if counts[v] > 0]  # the same list on every rank
        stats: dict[str, float] = {}
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = None
            for v in live:
                mine = [r for r in rollouts if r.variant == v]
                losses, clips, kls = self._clipped_losses(v, mine)
                if ranks:  # this rank's share of the mean over all ranks (None: no rollouts of v here)
                    loss_v = torch.stack(losses).sum() / counts[v] if losses else None
                    clip, kl = sum(clips) / counts[v], sum(kls) / counts[v]
                else:
                    loss_v = torch.stack(losses).mean()
                    clip, kl = sum(c / len(mine) for c in clips), sum(k / len(mine) for k in kls)
                stats.update({f"loss_{v}": 0.0 if loss_v is None else float(loss_v.detach()),
                              f"clip_{v}": clip, f"kl_{v}": kl})
                if loss_v is not None:
                    total = loss_v if total is None else total + loss_v
            if not live:
                return {}
            if total is not None:
                total.backward()
            # Each rank scaled its loss by 1 / (questions of the whole step): the sum over the ranks is
            # the single-process gradient of the mean over all questions.
            self.dist.sum_grads([p for v in live for p in self.policies[v].parameters() if p.requires_grad])
            for v in VARIANTS:
                torch.nn.utils.clip_grad_norm_(list(self.policies[v].parameters()), cfg.max_grad_norm)
            self.optimizer.step()
        if not ranks:
            return stats
        keys = sorted(stats)
        summed = self.dist.sum_over_ranks(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist()))

    def _global_counts(self, rollouts: Sequence[Rollout]) -> dict[str, int]:
        """Rollouts per variant over all ranks."""
        local = torch.tensor([float(sum(r.variant == v for r in rollouts)) for v in VARIANTS], dtype=torch.float64)
        return {v: int(round(x)) for v, x in zip(VARIANTS, self.dist.sum_over_ranks(local).tolist())}

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
            tot = self.dist.sum_over_ranks(torch.tensor(local, dtype=torch.float64)).tolist()
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

    def agree_on_step(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """:meth:`train_step`'s metrics are already over all ranks; only the stop is agreed on."""
        return metrics, self.dist.any_rank(stop)

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {f"r_{v}": f"{metrics[f'reward_{v}']:.3f}" for v in VARIANTS if f"reward_{v}" in metrics}

    # ------------------------------------------------------------------ evaluation + export

    def before_training(self) -> None:
        if self.dist.is_main and not self.engine.trained:
            logger.warning("the REFRAG projector is untrained: compressed chunks are noise, so rewards mostly "
                           "reflect which chunks stay tokens; train from an sft checkpoint for real use.")

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
            prefixes = [eng.prepare_rag(ex.question, passages, policy, vectors=vectors,
                                        # p applies to the selective settings; `none` / `all` take no budget
                                        expand_fraction=None if policy.name in ("none", "all") else self.budget.fraction,
                                        ).embeds
                        for policy in (make(i) for make in settings.values())]
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

    def export_metrics(self, after: dict[str, Any], final: bool) -> dict[str, Any]:
        if not final:
            return {"stage": "policy", "step": self.step, "after": after}
        metrics = {"stage": "policy", "steps": self.step, "exported_variant": self.cfg.policy_variant, "after": after}
        if self.prev is not None and self.prev.metrics:
            metrics["init_checkpoint_metrics"] = self.prev.metrics
        return metrics

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


__all__ = [
    "Episode",
    "PolicyTrainer",
    "Rollout",
]
