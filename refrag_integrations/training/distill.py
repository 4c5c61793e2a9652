"""Distillation (``distill``): the decoder reading compressed chunks learns to match itself reading
the same passages as tokens.

The teacher is the REFRAG model's own decoder with every chunk expanded (ordinary RAG; a LoRA the
run trains is switched off for it); the student is the same decoder reading the passages compressed
(a fraction ``expand_fraction`` expanded at random, 0 by default). The loss is the KL divergence
from the teacher's to the student's next-token distributions at temperature T (scaled by T^2, as in
Hinton et al.), on two kinds of example mixed by ``qa_share``:

- NQ *train* questions with their gold passage and ``num_passages - 1`` distractors, in the
  inference prompt (the engine's own ``prepare_rag``), teacher-forced on the gold answer;
- Wikipedia next-paragraph continuations: ``max_chunks`` chunks of context, ``continuation_tokens``
  tokens predicted (``enwiki-2015-articles.jsonl.gz`` when present).

``distill_ce_weight`` adds cross-entropy on the true tokens. PISCO (arXiv 2501.16075) reaches 16x
compression with 0-3% accuracy loss from distillation alone; this stage is that idea on REFRAG's
per-chunk vectors. What trains is what the other stages train: projector, the top
``encoder_trainable_layers`` encoder layers, and a decoder LoRA when ``lora_rank > 0``.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .sft import SFTTrainer


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base weights: every LoRA adapter's scale is 0 inside the block."""
    from .lora import LoRALinear

    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in mods]
    for m in mods:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(mods, scales):
            m.scale = s


def target_logits(engine, prefixes: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher-forced logits predicting each ``targets[i] (T_i,)`` after ``prefixes[i] (P_i, d)``,
    all rows in one right-padded forward (causal attention: padding after a row never reaches it).
    Returns one ``(T_i, V)`` float32 tensor per row; the LM head runs only at target positions."""
    dec = engine.decoder
    embed = dec.get_input_embeddings()
    rows = [torch.cat([p.to(embed.weight.dtype), embed(t[:-1])], 0) for p, t in zip(prefixes, targets)]  # (P+T-1, d)
    x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, S, d)
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
    hidden = dec.get_decoder()(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state  # (B, S, d)
    head = dec.get_output_embeddings()
    out = []
    for i, (p, t) in enumerate(zip(prefixes, targets)):
        start = p.shape[0] - 1  # the last prefix position predicts the first target token
        out.append(head(hidden[i, start : start + t.shape[0]]).float())  # (T_i, V)
    return out


def distill_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], targets: list[torch.Tensor], temperature: float,
    ce_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """T^2 * KL(teacher_T || student_T) averaged over each row's target positions, then over rows,
    plus ``ce_weight`` x cross-entropy on the true tokens.

    Args:
        student, teacher: per-row logits ``(T_i, V)``; targets: per-row true ids ``(T_i,)``.
    """
    t = temperature
    kls, ces, acc, agree = [], [], 0.0, 0.0
    for s_i, t_i, y in zip(student, teacher, targets):
        log_s = F.log_softmax(s_i / t, -1)  # (T_i, V)
        log_t = F.log_softmax(t_i / t, -1)
        kls.append((log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t)
        ces.append(F.cross_entropy(s_i, y))
        acc += float((s_i.argmax(-1) == y).float().mean()) / len(targets)
        agree += float((s_i.argmax(-1) == t_i.argmax(-1)).float().mean()) / len(targets)
    kl, ce = torch.stack(kls).mean(), torch.stack(ces).mean()
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach()), "acc": acc, "agree": agree}


class DistillTrainer(SFTTrainer):
    """Runs the ``distill`` stage (see :class:`~refrag_integrations.training.trainer.Trainer` for the
    loop, resume and checkpoints; :class:`SFTTrainer` for the QA data and its evaluation)."""

    _text = None

    def text_corpus(self):
        if self._text is None:
            from .data import TokenCorpus, distillation_documents

            self._text = TokenCorpus(distillation_documents(self.cfg), self.engine.tokenizer)
        return self._text

    def teacher(self) -> contextlib.ExitStack:
        """Context manager under which the decoder is the teacher (no gradients, LoRA off)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(lora_disabled(self.engine.decoder))
        return stack

    def qa_rows(self, rng: random.Random, n: int) -> tuple[list, list, list]:
        """``n`` NQ train examples as (student prefixes, teacher prefixes, answer targets)."""
        from .data import rag_passages

        cfg, eng = self.cfg, self.engine
        examples = self.data()
        drawn = []
        for _ in range(n):
            idx = rng.randrange(len(examples))
            drawn.append((examples[idx], rag_passages(rng, examples, idx, cfg.num_passages)[0]))
        chunk_lists = [[eng.chunk(p) for p in passages] for _, passages in drawn]
        flat_vectors = eng.chunk_encoder.encode_passages([cl for cls in chunk_lists for cl in cls])  # with grad
        students, teachers, targets, v = [], [], [], 0
        for (ex, passages), cls in zip(drawn, chunk_lists):
            vectors = flat_vectors[v : v + len(cls)]
            v += len(cls)
            total = sum(len(cl) for cl in cls)
            p = 0.0 if cfg.compressed_share and rng.random() < cfg.compressed_share else cfg.expand_fraction
            picked = set(rng.sample(range(total), int(p * total)))
            decisions, i = [], 0
            for cl in cls:
                decisions.append([(i + j) in picked for j in range(len(cl))])
                i += len(cl)
            students.append(eng.prepare_rag(ex.question, passages, decisions, vectors=vectors).embeds)
            with self.teacher():
                teachers.append(eng.prepare_rag(ex.question, passages, "all").embeds)
            targets.append(torch.tensor(self.answer_ids(ex.answers[0]), device=eng.device))
        return students, teachers, targets

    def text_rows(self, rng: random.Random, n: int) -> tuple[list, list, list]:
        """``n`` Wikipedia windows: ``max_chunks`` chunks of context, ``continuation_tokens`` targets."""
        from .objectives import context_blocks, random_expansion

        cfg, eng = self.cfg, self.engine
        L, k, o = cfg.max_chunks, cfg.chunk_size, cfg.continuation_tokens
        w = torch.tensor(self.text_corpus().windows(rng, L * k + o, n), device=eng.device)  # (n, L*k + o)
        ctx, cont = w[:, : L * k], w[:, L * k :]
        student = context_blocks(eng, ctx, random_expansion(rng, n, L, cfg.expand_fraction))  # (n, L', d)
        with self.teacher():
            teacher = eng.decoder.get_input_embeddings()(ctx)  # (n, L*k, d)
        return list(student), list(teacher), list(cont)

    def loss_for_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch: ``batch_size`` examples, each a QA example with probability ``qa_share``
        (else a text example); students in one forward, teachers in another."""
        cfg, eng = self.cfg, self.engine
        rng = self.micro_rng(step, micro)
        n_qa = sum(1 for _ in range(cfg.batch_size) if cfg.qa_share >= 1.0 or rng.random() < cfg.qa_share)
        students, teachers, targets = [], [], []
        for rows in ((self.qa_rows(rng, n_qa) if n_qa else None),
                     (self.text_rows(rng, cfg.batch_size - n_qa) if n_qa < cfg.batch_size else None)):
            if rows is not None:
                students += rows[0]
                teachers += rows[1]
                targets += rows[2]
        with self.teacher():
            teacher_logits = target_logits(eng, teachers, targets)
        student_logits = target_logits(eng, students, targets)
        return distill_loss(student_logits, teacher_logits, targets, cfg.distill_temperature, cfg.distill_ce_weight)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """On the first ``eval_examples`` NQ *eval* questions with ``num_passages`` passages: the
        gold answer's mean NLL with no context, full context (RAG) and every chunk compressed
        (p = 0), the student's KL from the teacher on the answer, and greedy Match at p = 0 (the
        decoder is the teacher's, so closed-book and RAG Match are `refrag eval qa`'s)."""
        from tqdm.auto import tqdm

        from ..evaluation.metrics import match as match_score
        from .data import qa_examples, rag_passages

        cfg, eng = self.cfg, self.engine
        was = eng.chunk_encoder.training
        eng.chunk_encoder.eval()
        pool = qa_examples(cfg, "eval")
        nll: dict[str, list[float]] = {m: [] for m in ("closed_book", "full", "compressed_p0")}
        kls, hits = [], []
        for i, ex in enumerate(tqdm(pool[: cfg.eval_examples], desc="distill eval", leave=False)):
            passages = rag_passages(random.Random(10_000 + i), pool, i, cfg.num_passages)[0]
            target = torch.tensor(self.answer_ids(ex.answers[0]), device=eng.device)
            settings = {"closed_book": ([], "all"), "full": (passages, "all"), "compressed_p0": (passages, "none")}
            with eng.autocast():
                prefixes = [eng.prepare_rag(ex.question, use, expand).embeds for use, expand in settings.values()]
                logits = dict(zip(settings, target_logits(eng, prefixes, [target] * len(settings))))
                res = eng.generate(ex.question, passages, policy="none", max_new_tokens=24)
            for name in settings:
                nll[name].append(float(F.cross_entropy(logits[name], target)))
            hits.append(float(match_score(res.text, ex.answers)))
            kls.append(distill_loss([logits["compressed_p0"]], [logits["full"]], [target], 1.0, 0.0)[1]["kl"])
        eng.chunk_encoder.train(was)
        n = max(len(kls), 1)
        out: dict[str, Any] = {"examples": len(kls), "num_passages": cfg.num_passages, "kl_p0": sum(kls) / n,
                               "match_p0": sum(hits) / n}
        out.update({f"nll_{name}": sum(v) / n for name, v in nll.items()})
        return out
