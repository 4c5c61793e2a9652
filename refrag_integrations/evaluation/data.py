"""Evaluation data from real text: NQ-open questions with gold passages, distractor sets,
benchmark contexts of a given token length, and held-out windows for perplexity.

Passages are ``"title\\ntext"``, the same form the training stages and ``refrag ask`` use, so
training and evaluation see the same prompts.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import ENWIKI_FILE, NQ_EVAL_LINES, NQ_FILE, NQ_TRAIN_LINES

SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answers and gold passage.

    Attributes:
        question: the question text.
        answers: the gold answers (any of them counts).
        passage: the gold passage, ``"title\\ntext"``.
        line: 1-based line number in the source file (the example's stable id).
    """

    question: str
    answers: tuple[str, ...]
    passage: str
    line: int


def _open_text(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point --data-dir / --data at ../shared/data.")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _passage(ctx: Any, where: str) -> str:
    if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str) or not ctx["text"].strip():
        raise ValueError(f"{where}: ctxs[0] must be an object with a non-empty 'text'.")
    title = ctx.get("title")
    return f"{title}\n{ctx['text'].strip()}" if title else ctx["text"].strip()


def load_qa(path: str | Path, split: str = "all") -> list[QAExample]:
    """Read QA examples from an NQ-open-shaped JSONL file (``.jsonl`` or ``.jsonl.gz``).

    Each line is ``{"question": str, "answers": [str, ...], "ctxs": [{"title", "text"}, ...]}``;
    the first ctx is the gold passage.

    Args:
        path: the file.
        split: ``"train"`` (lines 1-2000), ``"eval"`` (lines 2001-2655) of the shared
            NQ-open file, or ``"all"`` (every line; for other files).

    Example:
        >>> examples = load_qa("../shared/data/nq-open-oracle.jsonl.gz", "eval")  # doctest: +SKIP
        >>> len(examples), examples[0].line                                      # doctest: +SKIP
        (655, 2001)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    lo, hi = {"train": NQ_TRAIN_LINES, "eval": NQ_EVAL_LINES, "all": (1, float("inf"))}[split]
    path = Path(path)
    out: list[QAExample] = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if n < lo or n > hi or not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err}).") from err
            q, answers, ctxs = obj.get("question"), obj.get("answers"), obj.get("ctxs")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string.")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: 'answers' must be a non-empty list of strings.")
            if not isinstance(ctxs, list) or not ctxs:
                raise ValueError(f"{where}: 'ctxs' must be a non-empty list (the first is the gold passage).")
            out.append(QAExample(q.strip(), tuple(answers), _passage(ctxs[0], where), n))
    if not out:
        raise ValueError(f"{path} has no examples in split {split!r}.")
    return out


def nq_path(data_dir: str | Path) -> Path:
    """The shared NQ-open oracle file inside ``data_dir``."""
    return Path(data_dir) / NQ_FILE


def with_distractors(
    examples: Sequence[QAExample], index: int, n: int, seed: int
) -> tuple[list[str], int]:
    """The gold passage of ``examples[index]`` plus ``n - 1`` distractors: other examples' gold
    passages, drawn without replacement; the gold passage sits at a random position. The
    distractors are a prefix of one fixed shuffle per (seed, example), so the N=5 set is inside
    the N=10 set; every setting (closed-book, RAG, REFRAG) sees the same passages.

    Returns:
        (passages, position of the gold passage).

    Example:
        >>> passages, gold_at = with_distractors(examples, 0, 5, seed=0)   # doctest: +SKIP
    """
    if n < 1:
        raise ValueError(f"the number of passages N must be >= 1, got {n}.")
    ex = examples[index]
    pool = sorted({e.passage for e in examples if e.passage != ex.passage})
    if len(pool) < n - 1:
        raise ValueError(f"N={n} needs {n - 1} distractors but only {len(pool)} other passages exist.")
    random.Random(f"{seed}:{ex.line}").shuffle(pool)
    distractors = pool[: n - 1]
    gold_at = random.Random(f"{seed}:{ex.line}:{n}").randrange(n)
    return distractors[:gold_at] + [ex.passage] + distractors[gold_at:], gold_at


def wiki_passages(data_dir: str | Path, tokenizer: Any, passage_tokens: int) -> list[str]:
    """Wikipedia articles from the shared sample cut into passages of ``passage_tokens`` decoder
    tokens (cut at token boundaries, decoded back to text)."""
    from ..chunking import tokenize_text

    out: list[str] = []
    with _open_text(Path(data_dir) / ENWIKI_FILE) as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            ids, offsets = tokenize_text(text, tokenizer)
            for i in range(0, len(ids) - passage_tokens + 1, passage_tokens):
                if offsets is not None:
                    piece = text[offsets[i][0] : offsets[i + passage_tokens - 1][1]]
                else:
                    piece = tokenizer.decode(ids[i : i + passage_tokens])
                if piece.strip():
                    out.append(piece.strip())
    return out


def build_context(passages: Sequence[str], tokenizer: Any, target_tokens: int) -> list[str]:
    """Take passages in order until they hold ``target_tokens`` decoder tokens; the last one is
    cut (at a token boundary) so the total is ``target_tokens`` up to re-tokenisation at the cut.

    Raises:
        ValueError: the passages together are shorter than ``target_tokens``.

    Example:
        >>> ctx = build_context(passages, engine.tokenizer, 1024)   # doctest: +SKIP
    """
    from ..chunking import tokenize_text

    if target_tokens < 1:
        raise ValueError(f"context length must be >= 1 token, got {target_tokens}.")
    out, total = [], 0
    for p in passages:
        ids, offsets = tokenize_text(p, tokenizer)
        need = target_tokens - total
        if len(ids) <= need:
            out.append(p)
            total += len(ids)
        else:
            cut = p[: offsets[need - 1][1]] if offsets is not None else tokenizer.decode(ids[:need])
            if cut.strip():
                out.append(cut)
            total = target_tokens
        if total >= target_tokens:
            return out
    raise ValueError(
        f"the corpus holds only {total} tokens, fewer than the {target_tokens} requested; "
        "use a shorter --lengths value or a larger corpus."
    )


def heldout_windows(
    text: str, tokenizer: Any, context_tokens: int, continuation_tokens: int, limit: int | None = None
) -> list[tuple[str, list[int]]]:
    """Consecutive non-overlapping windows of held-out text, each split into the text of
    ``context_tokens`` decoder tokens and the ids of the ``continuation_tokens`` that follow.

    Example:
        >>> windows = heldout_windows(open("wikitext2-test.txt").read(), tok, 512, 128, limit=10)  # doctest: +SKIP
        >>> context_text, continuation_ids = windows[0]                                            # doctest: +SKIP
    """
    from ..chunking import tokenize_text

    if context_tokens < 1 or continuation_tokens < 1:
        raise ValueError(
            f"need context_tokens >= 1 and continuation_tokens >= 1, got {context_tokens}, {continuation_tokens}."
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    ids, offsets = tokenize_text(text, tokenizer)
    size = context_tokens + continuation_tokens
    windows = []
    for i in range(0, len(ids) - size + 1, size):
        ctx_ids = ids[i : i + context_tokens]
        if offsets is not None:
            ctx = text[offsets[i][0] : offsets[i + context_tokens - 1][1]]
        else:
            ctx = tokenizer.decode(ctx_ids)
        if ctx.strip():
            windows.append((ctx, ids[i + context_tokens : i + size]))
        if limit is not None and len(windows) >= limit:
            break
    if not windows:
        raise ValueError(f"the held-out text has fewer than {size} tokens.")
    return windows
