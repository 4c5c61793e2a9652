"""Training and held-out data from the shared real data (see ../shared/data/README.md).

Splits follow the agreed ones: NQ-open lines 1-2000 train, 2001-2655 eval; Wikipedia articles,
WikiText-2 valid and the NQ train passages are free for reconstruction / continual pre-training;
``wikitext2-test.txt`` is held out for evaluation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..chunking import tokenize_text
from ..evaluation.config import ENWIKI_FILE
from ..evaluation.data import QAExample as NQExample  # one loader for training and evaluation
from ..evaluation.data import load_qa, nq_path

WIKITEXT_VALID = "wikitext2-valid.txt"
ENWIKI_2015_FILE = "enwiki-2015-articles.jsonl.gz"  # 5,546 articles, ~21 M tokens, no NQ eval titles
WIKITEXT_TEST = "wikitext2-test.txt"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Training data file {path} is missing; point --data-dir at ../shared/data.")
    return path


def load_nq(data_dir: str | Path, split: str) -> list[NQExample]:
    """The NQ-open oracle examples of the ``train`` (lines 1-2000) or ``eval`` (2001-2655) split,
    or ``all`` (the whole file, e.g. as a retrieval corpus); passages are ``title\ntext``."""
    return load_qa(nq_path(data_dir), split)


def pretraining_documents(data_dir: str | Path) -> list[str]:
    """Texts for reconstruction / CPT: the 100 Wikipedia articles, WikiText-2 valid, and the NQ
    *train* gold passages (in-domain for RAG). Never the held-out WikiText-2 test or NQ eval."""
    data_dir = Path(data_dir)
    docs = []
    with open(_require(data_dir / ENWIKI_FILE), encoding="utf-8") as f:
        docs.extend(json.loads(line)["text"] for line in f if line.strip())
    docs.append(_require(data_dir / WIKITEXT_VALID).read_text(encoding="utf-8"))
    docs.extend(ex.passage for ex in load_nq(data_dir, "train"))
    return docs


def distillation_documents(data_dir: str | Path) -> list[str]:
    """Texts for next-paragraph distillation: the 5,546 Wikipedia articles of
    ``enwiki-2015-articles.jsonl.gz`` (none of the NQ eval titles)."""
    import gzip

    with gzip.open(_require(Path(data_dir) / ENWIKI_2015_FILE), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def heldout_documents(data_dir: str | Path) -> list[str]:
    """Held-out evaluation text: WikiText-2 test."""
    return [_require(Path(data_dir) / WIKITEXT_TEST).read_text(encoding="utf-8")]


class TokenCorpus:
    """Documents tokenized with the decoder's tokenizer; draws token windows at random.

    Windows are drawn from documents in proportion to their usable length, so short passages and
    long articles are sampled fairly per token.
    """

    def __init__(self, docs: Iterable[str], tokenizer: Any) -> None:
        self.docs = [np.asarray(tokenize_text(d, tokenizer)[0], dtype=np.int64) for d in docs if d.strip()]
        if not self.docs:
            raise ValueError("TokenCorpus got no non-empty documents.")
        self.tokens = int(sum(len(d) for d in self.docs))

    def window(self, rng: random.Random, length: int) -> list[int]:
        """One window of exactly ``length`` tokens (documents shorter than that are skipped)."""
        weights = [max(len(d) - length + 1, 0) for d in self.docs]
        if not any(weights):
            raise ValueError(f"No document has {length} tokens; lower max_chunks or continuation_tokens.")
        doc = rng.choices(self.docs, weights=weights)[0]
        start = rng.randrange(0, len(doc) - length + 1)
        return doc[start : start + length].tolist()

    def windows(self, rng: random.Random, length: int, n: int) -> list[list[int]]:
        return [self.window(rng, length) for _ in range(n)]


def rag_passages(rng: random.Random, examples: list[NQExample], index: int, num_passages: int) -> tuple[list[str], int]:
    """Gold passage of ``examples[index]`` plus ``num_passages - 1`` distractors (other examples'
    gold passages), in random order. Returns (passages, position of the gold passage)."""
    if num_passages < 1:
        raise ValueError(f"num_passages must be >= 1, got {num_passages}.")
    if num_passages > len(examples):
        raise ValueError(f"num_passages={num_passages} exceeds the {len(examples)} available passages.")
    gold = examples[index].passage
    others = [j for j in rng.sample(range(len(examples)), min(len(examples), num_passages + 4)) if j != index]
    distractors = []
    for j in others:
        if examples[j].passage != gold and examples[j].passage not in distractors:
            distractors.append(examples[j].passage)
        if len(distractors) == num_passages - 1:
            break
    pos = rng.randrange(num_passages)
    return distractors[:pos] + [gold] + distractors[pos:], pos
