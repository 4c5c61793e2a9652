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


def target_logits(engine, prefix: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``(B, T, V)`` predicting ``targets (B, T)`` after ``prefix (B, P, d)``."""
    embed = engine.decoder.get_input_embeddings()
    tgt_emb = embed(targets[:, :-1])  # (B, T-1, d)
    inputs = torch.cat([prefix.to(tgt_emb.dtype), tgt_emb], 1)  # (B, P+T-1, d)
    pos = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand(inputs.shape[0], -1)
    out = engine.decoder(inputs_embeds=inputs, position_ids=pos, use_cache=False, logits_to_keep=targets.shape[1])
    return out.logits.float()


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float, ce_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """T^2 * KL(teacher_T || student_T), mean over target positions, plus ``ce_weight`` x CE.

    Args:
        student, teacher: logits ``(B, T, V)``; targets: ``(B, T)`` true token ids.
    """
    t = temperature
    log_s = F.log_softmax(student / t, -1)  # (B, T, V)
    log_t = F.log_softmax(teacher / t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
    ce = F.cross_entropy(student.transpose(1, 2), targets)
    loss = kl + ce_weight * ce if ce_weight else kl
    acc = float((student.argmax(-1) == targets).float().mean())
    agree = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach()), "acc": acc, "agree": agree}


class DistillTrainer(SFTTrainer):
    """Runs the ``distill`` stage (see :class:`~refrag_integrations.training.trainer.Trainer` for the
    loop, resume and checkpoints; :class:`SFTTrainer` for the QA data and its evaluation)."""

    _text = None

    def text_corpus(self):
        if self._text is None:
            from .data import TokenCorpus, distillation_documents

            self._text = TokenCorpus(distillation_documents(self.cfg.data_dir), self.engine.tokenizer)
        return self._text

    def teacher(self):
        """Context manager under which the decoder is the teacher (no gradients, LoRA off)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(lora_disabled(self.engine.decoder))
        return stack

    def qa_example(self, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        from .data import rag_passages

        cfg, eng = self.cfg, self.engine
        examples = self.data()
        idx = rng.randrange(len(examples))
        passages, _ = rag_passages(rng, examples, idx, cfg.num_passages)
        ex = examples[idx]
        chunk_lists = [eng.chunk(p) for p in passages]
        vectors = eng.chunk_encoder.encode_passages(chunk_lists)  # [(L_i, d_enc)], with grad
        n = sum(len(cl) for cl in chunk_lists)
        p = 0.0 if cfg.compressed_share and rng.random() < cfg.compressed_share else cfg.expand_fraction
        picked = set(rng.sample(range(n), int(p * n)))
        decisions, i = [], 0
        for cl in chunk_lists:
            decisions.append([(i + j) in picked for j in range(len(cl))])
            i += len(cl)
        target = torch.tensor([self.answer_ids(ex.answers[0])], device=eng.device)  # (1, T)
        student_in = eng.prepare_rag(ex.question, passages, decisions, vectors=vectors)
        with self.teacher():
            teacher_in = eng.prepare_rag(ex.question, passages, "all")
            teacher = target_logits(eng, teacher_in.embeds.unsqueeze(0), target)
        student = target_logits(eng, student_in.embeds.unsqueeze(0), target)
        return distill_loss(student, teacher, target, cfg.distill_temperature, cfg.distill_ce_weight)

    def text_example(self, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        from .objectives import context_blocks, random_expansion

        cfg, eng = self.cfg, self.engine
        L, k, o = cfg.max_chunks, cfg.chunk_size, cfg.continuation_tokens
        w = torch.tensor([self.text_corpus().window(rng, L * k + o)], device=eng.device)  # (1, L*k + o)
        ctx, cont = w[:, : L * k], w[:, L * k :]
        expand = random_expansion(rng, 1, L, cfg.expand_fraction)
        with self.teacher():
            teacher = target_logits(eng, eng.decoder.get_input_embeddings()(ctx), cont)
        student = target_logits(eng, context_blocks(eng, ctx, expand), cont)
        return distill_loss(student, teacher, cont, cfg.distill_temperature, cfg.distill_ce_weight)

    def loss_for_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        rng = self.micro_rng(step, micro)
        losses, agg = [], {}
        for _ in range(cfg.batch_size):
            qa = cfg.qa_share >= 1.0 or rng.random() < cfg.qa_share
            loss, m = self.qa_example(rng) if qa else self.text_example(rng)
            losses.append(loss)
            for key, v in m.items():
                agg[key] = agg.get(key, 0.0) + v / cfg.batch_size
        return torch.stack(losses).mean(), agg

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """On the first ``eval_examples`` NQ *eval* questions with ``num_passages`` passages: the
        gold answer's mean NLL and greedy Match with no context, full context (RAG) and every chunk
        compressed (p = 0), and the student's KL from the teacher on the answer."""
        from tqdm.auto import tqdm

        from ..evaluation.metrics import match as match_score
        from .data import load_nq, rag_passages

        cfg, eng = self.cfg, self.engine
        was = eng.chunk_encoder.training
        eng.chunk_encoder.eval()
        pool = load_nq(cfg.data_dir, "eval")
        rows: dict[str, dict[str, list[float]]] = {m: {"nll": [], "match": []} for m in ("closed_book", "full", "compressed_p0")}
        kls = []
        for i, ex in enumerate(tqdm(pool[: cfg.eval_examples], desc="distill eval", leave=False)):
            passages = rag_passages(random.Random(10_000 + i), pool, i, cfg.num_passages)[0]
            target = torch.tensor([self.answer_ids(ex.answers[0])], device=eng.device)
            logits = {}
            with eng._autocast():
                for name, (use, expand) in {"closed_book": ([], "all"), "full": (passages, "all"),
                                            "compressed_p0": (passages, "none")}.items():
                    prepared = eng.prepare_rag(ex.question, use, expand)
                    logits[name] = target_logits(eng, prepared.embeds.unsqueeze(0), target)
                    nll = F.cross_entropy(logits[name].transpose(1, 2), target)
                    rows[name]["nll"].append(float(nll))
                    res = eng.generate(ex.question, use, expand=expand, max_new_tokens=24)
                    rows[name]["match"].append(float(match_score(res.text, ex.answers)))
            kls.append(float(distill_loss(logits["compressed_p0"], logits["full"], target, 1.0, 0.0)[1]["kl"]))
        eng.chunk_encoder.train(was)
        out: dict[str, Any] = {"examples": len(kls), "num_passages": cfg.num_passages,
                               "kl_p0": sum(kls) / max(len(kls), 1)}
        for name, r in rows.items():
            out[name] = {k: sum(v) / max(len(v), 1) for k, v in r.items()}
        return out
