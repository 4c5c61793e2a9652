"""Indexing: files -> passages -> Chroma (retrieval vectors + precomputed REFRAG chunk vectors).

Files are read by :mod:`~refrag_integrations.readers` and cut into passages by
:mod:`~refrag_integrations.splitting`; retrieval vectors come from an
:mod:`~refrag_integrations.embedder`. Each passage's id is the hash of its text, so indexing is
idempotent: a passage already in the store (with complete, readable chunk vectors for the
engine's fingerprint) is skipped. Work goes in batches, chunk vectors first and the passage record
last, so an interrupted run leaves nothing half-visible and the next run picks up where it
stopped, with nothing lost and nothing duplicated. One process writes an embedded index at a time
(:mod:`~refrag_integrations.index_lock`).

Bad inputs are reported in the :class:`IndexReport` with a clear reason; the other inputs are
still indexed.

Example:
    >>> from refrag_integrations import RefragEngine
    >>> from refrag_integrations.index import SentenceEmbedder, index_paths
    >>> from refrag_integrations.store import ChunkStore
    >>> engine = RefragEngine.from_pretrained()                       # doctest: +SKIP
    >>> store = ChunkStore.for_engine(engine, "/tmp/refrag-index")   # doctest: +SKIP
    >>> report = index_paths(["docs/"], store, engine, SentenceEmbedder())  # doctest: +SKIP
    >>> print(report.summary())                                        # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .chunking import chunk_passage
from .config import DEFAULT_EMBEDDER, DEFAULT_INDEX_BATCH_SIZE, PASSAGE_MAX_WORDS, PASSAGE_MIN_WORDS
from .embedder import Embedder, SentenceEmbedder
from .readers import (
    JSONL_SUFFIXES,
    PDF_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TEXT_SUFFIXES,
    BadInputError,
    check_text_file,
    expand_paths,
    read_passages,
)
from .splitting import PassageSplitter, split_passages, split_sentences
from .store import ChunkStore, PassageRecord

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RefragEngine

# Re-exported: these lived here before the split and are imported from here.
__all__ = [
    "DEFAULT_EMBEDDER",
    "JSONL_SUFFIXES",
    "PDF_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TEXT_SUFFIXES",
    "BadInputError",
    "Embedder",
    "IndexReport",
    "PassageSplitter",
    "SentenceEmbedder",
    "check_text_file",
    "expand_paths",
    "index_paths",
    "read_passages",
    "refresh_chunk_vectors",
    "split_passages",
    "split_sentences",
    "verify_index",
]


# --------------------------------------------------------------------------- indexing


@dataclass
class IndexReport:
    """What an indexing run did.

    Attributes:
        files: files read completely.
        passages: distinct passages read.
        added: passages newly written to the store.
        present: passages that were already indexed (skipped).
        chunks: chunk vectors written.
        repaired: stored passages whose vectors could not be read back, written again.
        seconds: wall time of the run.
        problems: ``(where, why)`` for every input that was skipped, in whole or in part.
    """

    files: int = 0
    passages: int = 0
    added: int = 0
    present: int = 0
    chunks: int = 0
    repaired: int = 0
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["problems"] = [{"where": w, "why": y} for w, y in self.problems]
        d["passages_per_s"] = round(self.passages_per_s, 2)
        d["chunks_per_s"] = round(self.chunks_per_s, 2)
        return d

    def summary(self) -> str:
        lines = [
            f"indexed {self.files} file(s): {self.passages} passages ({self.added} added, {self.present} already "
            f"indexed), {self.chunks} chunk vectors written, in {self.seconds:.1f} s "
            f"({self.passages_per_s:.1f} passages/s, {self.chunks_per_s:.1f} chunk vectors/s)"
        ]
        if self.repaired:
            lines.append(f"repaired {self.repaired} stored passage(s) whose vectors could not be read back")
        lines += [f"skipped {where}: {why}" for where, why in self.problems]
        return "\n".join(lines)


class _Indexer:
    """Writes batches of passages: chunk vectors first, then the passage records (the commit)."""

    def __init__(self, store: ChunkStore, engine: "RefragEngine | None", embedder: Any, report: IndexReport,
                 batch_size: int) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if engine is not None and store.fingerprint != engine.chunk_vector_fingerprint():
            raise ValueError(
                "The store is not bound to this engine's chunk-vector fingerprint: open it with "
                "ChunkStore.for_engine(engine, ...)."
            )
        self.store, self.engine, self.embedder, self.report = store, engine, embedder, report
        self.batch_size = batch_size
        self.batch: list[PassageRecord] = []
        self.seen: set[str] = set()  # ids handled in this run (duplicates inside the input)

    def add(self, record: PassageRecord) -> None:
        pid = record.id
        if pid in self.seen:
            return
        self.seen.add(pid)
        self.report.passages += 1
        self.batch.append(record)
        if len(self.batch) >= self.batch_size:
            self.flush()

    def chunk_vectors(self, records: Sequence[PassageRecord]) -> dict[str, Any]:
        import torch

        engine = self.engine
        chunks = [chunk_passage(r.text, engine.tokenizer, engine.k) for r in records]
        with torch.no_grad():
            encoded = engine.chunk_encoder.encode_passages(chunks)  # [(L_i, d_enc)]
        return {r.id: v.float().cpu() for r, v in zip(records, encoded)}

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        ids = [r.id for r in batch]
        present = self.store.has_passages(ids)
        self.write(batch, present)
        self.report.added += len(batch) - len(present)
        self.report.present += len(present)

    def write(self, batch: Sequence[PassageRecord], present: set[str]) -> int:
        """Write what ``batch`` lacks: chunk vectors that are missing or unreadable, then the
        passages not ``present`` or whose retrieval vector is unreadable (the commit). Returns the
        number of passages whose chunk vectors were missing."""
        ids = [r.id for r in batch]
        broken_passages = self.store.unreadable_passages(list(present)) if self.embedder is not None else set()
        if self.engine is not None:
            complete = self.store.complete_chunk_vectors(ids)
            broken_chunks = self.store.unreadable_chunk_vectors(list(complete))
            need_chunks = [r for r in batch if r.id not in complete or r.id in broken_chunks]
        else:
            broken_chunks, need_chunks = set(), []
        need_passage = [r for r in batch if r.id not in present or r.id in broken_passages]
        if need_chunks:
            self.report.chunks += self.store.write_chunk_vectors(self.chunk_vectors(need_chunks))
        if need_passage and self.embedder is not None:
            self.store.add_passages(need_passage, self.embedder.embed([r.text for r in need_passage]), self.embedder)
        self.report.repaired += len(present & (broken_passages | broken_chunks))
        return len(need_chunks) - len(broken_chunks)


def index_paths(
    paths: Sequence[str | Path],
    store: ChunkStore,
    engine: "RefragEngine | None",
    embedder: Any,
    *,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    min_words: int = PASSAGE_MIN_WORDS,
    max_words: int = PASSAGE_MAX_WORDS,
    progress: bool = True,
    on_file: Callable[[Path], None] | None = None,
) -> IndexReport:
    """Index files and directories into ``store``: passages with retrieval vectors, and (when an
    engine is given) their pre-projection chunk vectors under the engine's fingerprint.

    Idempotent and resumable: passages already complete in the store are skipped, ids are content
    hashes, and every write is an upsert, so re-running after an interruption adds exactly what
    is missing. Unreadable inputs are reported in ``report.problems``; the rest is indexed.

    Args:
        paths: files and/or directories (searched recursively for supported files).
        store: the target store, bound to ``engine``'s fingerprint (``ChunkStore.for_engine``).
        engine: the REFRAG engine whose tokenizer and chunk encoder make the chunk vectors, or
            None to store passages and retrieval vectors only.
        embedder: the retrieval embedder (e.g. :class:`SentenceEmbedder`).
        batch_size: passages per batch (one embedding pass and one write per batch).
        min_words, max_words: passage size range.
        progress: show a tqdm progress bar.
        on_file: called with each file before it is read (e.g. for logging).

    Returns:
        An :class:`IndexReport` (files, passages, added, present, chunks, seconds, problems).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    report = IndexReport()
    files, report.problems = expand_paths(paths)
    indexer = _Indexer(store, engine, embedder, report, batch_size)
    store.lock_for_writing()
    bar = tqdm(total=None, unit="passage", desc="indexing", disable=not progress, dynamic_ncols=True)
    try:
        for path in files:
            if on_file is not None:
                on_file(path)
            bar.set_postfix_str(path.name[-40:], refresh=False)
            problems: list[tuple[str, str]] = []
            try:
                for record in read_passages(path, min_words, max_words, problems):
                    indexer.add(record)
                    bar.update(1)
            except BadInputError as err:
                report.problems.append((str(path), str(err).removeprefix(f"{path}: ")))
            else:
                report.files += 1
            report.problems.extend(problems)
        indexer.flush()
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    return report


def refresh_chunk_vectors(
    store: ChunkStore, engine: "RefragEngine", *, batch_size: int = DEFAULT_INDEX_BATCH_SIZE, progress: bool = True
) -> IndexReport:
    """Compute the chunk vectors of every stored passage that lacks them under ``engine``'s
    fingerprint (after a new checkpoint or k, without the original files), and write again the
    ones that cannot be read back. Resumable like :func:`index_paths`."""
    return verify_index(store, engine, None, batch_size=batch_size, progress=progress)


def verify_index(
    store: ChunkStore,
    engine: "RefragEngine | None",
    embedder: Any,
    *,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    progress: bool = True,
) -> IndexReport:
    """Check every stored passage and repair what is missing or unreadable: chunk vectors under
    ``engine``'s fingerprint (encoded again) and, with an ``embedder``, retrieval vectors
    (embedded again). This is what ``refrag index --verify`` runs.

    Args:
        store: the store, bound to ``engine``'s fingerprint (``ChunkStore.for_engine``).
        engine: makes the chunk vectors, or None to check retrieval vectors only.
        embedder: the retrieval embedder the index was built with, or None to check chunk vectors only.
        batch_size: passages per round trip.
        progress: show a tqdm progress bar.

    Returns:
        An :class:`IndexReport`: ``passages`` checked, ``added`` (passages that had no chunk
        vectors), ``repaired`` (passages with vectors that could not be read back), ``chunks``.
    """
    from tqdm.auto import tqdm

    if engine is None and embedder is None:
        raise ValueError("verify_index needs an engine (chunk vectors), an embedder (retrieval vectors), or both.")
    if engine is not None and store.fingerprint != engine.chunk_vector_fingerprint():
        raise ValueError("Open the store with ChunkStore.for_engine(engine, ...) to check its chunk vectors.")
    if embedder is not None:
        store.check_embedder(embedder)
    t0 = time.perf_counter()
    report = IndexReport()
    indexer = _Indexer(store, engine, embedder, report, batch_size)
    store.lock_for_writing()
    bar = tqdm(total=store.count_passages(), unit="passage", desc="checking", disable=not progress)
    try:
        for page in store.iter_passages(batch_size):
            added = indexer.write(page, {r.id for r in page})
            report.passages += len(page)
            report.added += added
            report.present += len(page) - added
            bar.update(len(page))
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    return report
