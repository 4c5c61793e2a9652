"""Training and held-out data: the user's files named in the :class:`TrainConfig`, or the shared
real data in ``data_dir`` (see ../shared/data/README.md) for each file the config leaves unset.

- ``corpus`` (reconstruct, cpt, mixed; distill's text examples): ``.jsonl(.gz)`` with a ``text``
  field per line, or ``.txt(.gz)`` (one document). Default: the 100 Wikipedia articles, WikiText-2
  valid and the NQ train gold passages (distill: ``enwiki-2015-articles.jsonl.gz``).
- ``heldout`` (their evaluations): same formats. Default: the last ``HELDOUT_FRACTION`` of the
  corpus when ``corpus`` is given (cut out of the training text), else ``wikitext2-test.txt``.
- ``qa`` (sft, distill, policy): NQ-open-shaped ``.jsonl(.gz)``. Default: NQ-open lines 1-2000.
- ``qa_eval`` (their evaluations): same format. Default: the last ``HELDOUT_FRACTION`` of the
  examples of ``qa`` when ``qa`` is given (never trained on), else NQ-open lines 2001-2655.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..chunking import tokenize_text
from ..evaluation.config import ENWIKI_FILE, NQ_FILE
from ..evaluation.data import QAExample as NQExample  # one loader for training and evaluation
from ..evaluation.data import load_qa, nq_path
from .config import HELDOUT_FRACTION, TrainConfig

WIKITEXT_VALID = "wikitext2-valid.txt"
ENWIKI_2015_FILE = "enwiki-2015-articles.jsonl.gz"  # 5,546 articles, ~21 M tokens, no NQ eval titles
WIKITEXT_TEST = "wikitext2-test.txt"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
TEXT_STAGES = ("reconstruct", "cpt", "mixed")  # the stages that read only text
QA_STAGES = ("sft", "distill", "policy")  # the stages that read QA examples


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Training data file {path} is missing; point --data-dir at ../shared/data.")
    return path


def _config(cfg: Any) -> TrainConfig:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"expected a TrainConfig (its corpus, heldout, qa, qa_eval and data_dir), got {type(cfg).__name__}.")
    return cfg


def load_nq(data_dir: str | Path, split: str) -> list[NQExample]:
    """The NQ-open oracle examples of the ``train`` (lines 1-2000) or ``eval`` (2001-2655) split,
    or ``all`` (the whole file, e.g. as a retrieval corpus); passages are ``title\ntext``."""
    return load_qa(nq_path(data_dir), split)


def read_documents(path: str | Path) -> list[str]:
    """The documents of a text file: one per line of a ``.jsonl`` / ``.jsonl.gz`` file (its
    ``text`` field), or the whole of a ``.txt`` / ``.txt.gz`` file.

    Example:
        >>> docs = read_documents("my-corpus.jsonl.gz")  # doctest: +SKIP
    """
    import gzip

    path = Path(path)
    name = path.name.lower()
    if not name.endswith(TEXT_SUFFIXES):
        raise ValueError(f"{path}: a text corpus must end in one of {TEXT_SUFFIXES}; convert it to JSONL with a "
                         "'text' field per document.")
    if not path.is_file():
        raise FileNotFoundError(f"Text file {path} does not exist; check the path given as corpus / heldout.")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if not name.removesuffix(".gz").endswith(".jsonl"):
            docs = [f.read()]
        else:
            docs = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError) as err:
                    raise ValueError(f"{path}:{n} is not a JSON object ({err}).") from err
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: each line needs a string 'text' field, got {text!r}.")
                docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path} has no non-empty text.")
    return docs


def split_heldout(docs: list[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """Cut documents into (training, held-out) text: the held-out part is the last ``fraction`` of
    their characters, cut at a whitespace (a document may be split in two).

    Example:
        >>> split_heldout(["one two three four five six seven eight nine ten"], 0.2)
        (['one two three four five six seven eight'], [' nine ten'])
    """
    import re

    total = sum(len(d) for d in docs)
    cut = total - int(total * fraction)  # characters kept for training
    train, held, seen = [], [], 0
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            held.append(d)
        else:
            space = re.compile(r"\s").search(d, cut - seen)
            at = space.start() if space else len(d)
            train.append(d[:at])
            held.append(d[at:])
        seen += len(d)
    train, held = [d for d in train if d.strip()], [d for d in held if d.strip()]
    if not train or not held:
        raise ValueError(f"cannot hold out {fraction:.0%} of a {total}-character corpus; give a held-out file.")
    return train, held


def qa_examples(cfg: TrainConfig, split: str) -> list[NQExample]:
    """QA examples of ``split`` (``train`` or ``eval``): from ``cfg.qa`` / ``cfg.qa_eval`` when
    given (see the module docstring for the held-out share), else data_dir's NQ-open split."""
    cfg = _config(cfg)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if split == "eval" and cfg.qa_eval:
        return load_qa(cfg.qa_eval, "all")
    if not cfg.qa:
        return load_nq(cfg.data_dir, split)
    examples = load_qa(cfg.qa, "all")
    if cfg.qa_eval:
        return examples
    n_eval = max(1, round(len(examples) * HELDOUT_FRACTION))
    if len(examples) - n_eval < 1:
        raise ValueError(f"{cfg.qa} has {len(examples)} example(s): too few to hold out {HELDOUT_FRACTION:.0%} for "
                         "evaluation; add examples or give qa_eval (--qa-eval FILE).")
    return examples[:-n_eval] if split == "train" else examples[-n_eval:]


def pretraining_documents(cfg: TrainConfig) -> list[str]:
    """Texts for reconstruction / CPT: ``cfg.corpus`` (less its held-out share when no ``heldout``
    is given), else data_dir's 100 Wikipedia articles, WikiText-2 valid, and the NQ *train* gold
    passages (in-domain for RAG), never the held-out WikiText-2 test or NQ eval."""
    cfg = _config(cfg)
    if cfg.corpus:
        docs = read_documents(cfg.corpus)
        return docs if cfg.heldout else split_heldout(docs)[0]
    data_dir = Path(cfg.data_dir)
    docs = []
    with open(_require(data_dir / ENWIKI_FILE), encoding="utf-8") as f:
        docs.extend(json.loads(line)["text"] for line in f if line.strip())
    docs.append(_require(data_dir / WIKITEXT_VALID).read_text(encoding="utf-8"))
    docs.extend(ex.passage for ex in load_nq(data_dir, "train"))
    return docs


def distillation_documents(cfg: TrainConfig) -> list[str]:
    """Texts for next-paragraph distillation: the training part of ``cfg.corpus``, else the 5,546
    Wikipedia articles of data_dir's ``enwiki-2015-articles.jsonl.gz`` (none of the NQ eval titles)."""
    cfg = _config(cfg)
    if cfg.corpus:
        return pretraining_documents(cfg)
    return read_documents(_require(Path(cfg.data_dir) / ENWIKI_2015_FILE))


def heldout_documents(cfg: TrainConfig) -> list[str]:
    """Held-out evaluation text: ``cfg.heldout``, else the held-out share of ``cfg.corpus``, else
    data_dir's WikiText-2 test."""
    cfg = _config(cfg)
    if cfg.heldout:
        return read_documents(cfg.heldout)
    if cfg.corpus:
        return split_heldout(read_documents(cfg.corpus))[1]
    return [_require(Path(cfg.data_dir) / WIKITEXT_TEST).read_text(encoding="utf-8")]


def input_files(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """The files stage ``cfg.stage`` reads, each with the TrainConfig field that names it
    (``data_dir`` for the shared defaults), so a run can check them before any model loads.

    Example:
        >>> input_files(TrainConfig(stage="sft", qa="my-qa.jsonl"))
        [('qa', PosixPath('my-qa.jsonl'))]
    """
    cfg = _config(cfg)
    d = Path(cfg.data_dir)
    out: list[tuple[str, Path]] = []
    if cfg.stage in TEXT_STAGES or (cfg.stage == "distill" and cfg.qa_share < 1.0):
        if cfg.corpus:
            out.append(("corpus", Path(cfg.corpus)))
        elif cfg.stage == "distill":
            out.append(("data_dir", d / ENWIKI_2015_FILE))
        else:
            out += [("data_dir", d / ENWIKI_FILE), ("data_dir", d / WIKITEXT_VALID), ("data_dir", d / NQ_FILE)]
    if cfg.stage in TEXT_STAGES:
        if cfg.heldout:
            out.append(("heldout", Path(cfg.heldout)))
        elif not cfg.corpus:
            out.append(("data_dir", d / WIKITEXT_TEST))
    if cfg.stage in QA_STAGES:
        out.append(("qa", Path(cfg.qa)) if cfg.qa else ("data_dir", d / NQ_FILE))
        if cfg.qa_eval:
            out.append(("qa_eval", Path(cfg.qa_eval)))
    return list(dict.fromkeys(out))


def missing_input(cfg: TrainConfig) -> str | None:
    """A one-line message about the first input file of stage ``cfg.stage`` that does not exist
    (naming the setting to fix), or None when every file is there. Reads no file.

    Example:
        >>> missing_input(TrainConfig(stage="sft", qa="no-such-file.jsonl"))
        'qa file no-such-file.jsonl does not exist; check the path.'
    """
    for name, path in input_files(cfg):
        if name == "data_dir" and not Path(cfg.data_dir).is_dir():
            return (f"--data-dir {cfg.data_dir} is not a directory ({Path(cfg.data_dir).resolve()}); pass --data-dir "
                    "DIR, the folder with the training data files.")
        if name == "data_dir" and not path.is_file():
            return (f"--data-dir {cfg.data_dir} has no {path.name}; pass the folder with the shared data files, or "
                    "your own files (corpus, heldout, qa, qa_eval).")
        if not path.is_file():
            return f"{name} file {path} does not exist; check the path."
    return None


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


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The training target of a QA example: the answer's tokens followed by EOS (when the
    tokenizer has one), as the sft, distill and policy stages score it. The answer is text: a
    special-token string in it (``<|im_end|>``) is split into ordinary tokens, as in passages."""
    ids, _ = tokenize_text(answer.strip(), tokenizer)
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


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
