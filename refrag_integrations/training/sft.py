"""RAG fine-tuning (``sft``) on the NQ *train* split with the inference prompt format.

Each example: the question, its gold passage plus distractors (other train questions' gold
passages) in random order, a random fraction p of chunks expanded, and the gold answer as the
target (followed by end-of-turn). The prompt is built by the engine's own ``prepare_rag`` so
training and inference share it exactly.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .trainer import Trainer


class SFTTrainer(Trainer):
    """Runs the ``sft`` stage (see :class:`Trainer` for the loop, resume and checkpoints)."""

    def data(self):
        if self._data is None:
            from .data import qa_examples

            self._data = qa_examples(self.cfg, "train")
        return self._data

    def answer_ids(self, answer: str) -> list[int]:
        """The target: the answer's tokens followed by EOS."""
        from .data import answer_ids

        return answer_ids(self.engine.tokenizer, answer)

    def example_loss(self, question: str, passages: list[str], answer: str, rng: random.Random) -> tuple[torch.Tensor, float]:
        """Answer NLL for one RAG example with random expansion; returns (mean NLL, token acc)."""
        from .objectives import lm_loss

        eng = self.engine
        chunk_lists = [eng.chunk(p) for p in passages]
        per = eng.chunk_encoder.encode_passages(chunk_lists)  # [(L_i, d_enc)], with grad
        flat = [c for cl in chunk_lists for c in cl]
        p = 0.0 if self.cfg.compressed_share and rng.random() < self.cfg.compressed_share else self.cfg.expand_fraction
        n_expand = int(p * len(flat))
        picked = set(rng.sample(range(len(flat)), n_expand))
        decisions, i = [], 0
        for cl in chunk_lists:
            decisions.append([(i + j) in picked for j in range(len(cl))])
            i += len(cl)
        prepared = eng.prepare_rag(question, passages, decisions, vectors=per)
        target = torch.tensor([self.answer_ids(answer)], device=eng.device)
        nll, correct = lm_loss(eng, prepared.embeds.unsqueeze(0), target)
        return nll.mean(), float(correct.float().mean())

    def loss_for_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        from .data import rag_passages

        cfg = self.cfg
        rng = self.micro_rng(step, micro)
        examples = self.data()
        losses, accs = [], []
        for _ in range(cfg.batch_size):
            idx = rng.randrange(len(examples))
            passages, _ = rag_passages(rng, examples, idx, cfg.num_passages)
            ex = examples[idx]
            loss, acc = self.example_loss(ex.question, passages, ex.answers[0], rng)
            losses.append(loss)
            accs.append(acc)
        return torch.stack(losses).mean(), {"acc": sum(accs) / len(accs)}

    def evaluate(self) -> dict[str, Any]:
        """Match on the first ``eval_examples`` NQ eval questions with ``num_passages`` passages:
        closed-book, full context, and compressed (p = 0 and p = expand_fraction, relevance)."""
        from ..evaluation.metrics import match as match_score
        from .data import qa_examples, rag_passages

        cfg = self.cfg
        was = self.engine.chunk_encoder.training
        self.engine.chunk_encoder.eval()
        pool = qa_examples(cfg, "eval")
        eval_set = pool[: cfg.eval_examples]
        settings = {"closed_book": ("all", 0.0, 0), "full": ("all", 0.0, cfg.num_passages),
                    "compressed_p0": ("none", 0.0, cfg.num_passages),
                    f"relevance_p{cfg.expand_fraction}": ("relevance", cfg.expand_fraction, cfg.num_passages)}
        out: dict[str, Any] = {"examples": len(eval_set), "num_passages": cfg.num_passages}
        from tqdm.auto import tqdm

        for name, (policy, p, n) in settings.items():
            hits = []
            for i, ex in enumerate(tqdm(eval_set, desc=f"sft eval {name}", leave=False)):
                rng = random.Random(10_000 + i)
                passages = rag_passages(rng, pool, pool.index(ex), n)[0] if n else []
                res = self.engine.generate(ex.question, passages, policy=policy, expand_fraction=p or None, max_new_tokens=24)
                hits.append(match_score(res.text, ex.answers))
            out[name] = {"match": sum(hits) / len(hits)}
        self.engine.chunk_encoder.train(was)
        return out
