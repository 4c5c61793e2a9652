"""Top-N retrieval over a passage corpus through Chroma, for ``refrag eval qa --retrieval chroma``.

The corpus (by default all 2,655 NQ-open gold passages) is embedded once with the retrieval
embedder (all-MiniLM-L6-v2 from the offline package) into a persistent Chroma store, the same
:class:`~refrag_integrations.store.ChunkStore` passage collection that ``refrag index`` writes
(embedder recorded and checked, upserts keyed by content hash); later runs reuse it. Each
question's own gold passage is then one of many, as in a real system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..chunking import passage_id
from .config import QA_RETRIEVAL_COLLECTION


class ChromaRetriever:
    """Dense top-N retrieval over a fixed list of passages.

    Args:
        passages: the corpus (duplicates are stored once).
        persist_dir: where the Chroma database lives (reused across runs).
        embedder: a sentence-transformers model name or path (default: the offline MiniLM).
        collection: collection prefix in the store (passages go to ``<collection>_passages``).
        batch_size: passages embedded per batch.
        progress: show a progress bar while embedding.

    Example:
        >>> r = ChromaRetriever([e.passage for e in load_qa(nq_path("../shared/data"))], "runs/nq-index")  # doctest: +SKIP
        >>> r.search("who wrote hamlet", 5)                                                             # doctest: +SKIP
    """

    def __init__(
        self,
        passages: Sequence[str],
        persist_dir: str | Path,
        embedder: str | Path | None = None,
        collection: str = QA_RETRIEVAL_COLLECTION,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        from tqdm.auto import tqdm

        from ..index import DEFAULT_EMBEDDER, SentenceEmbedder
        from ..store import ChunkStore, PassageRecord

        unique = list(dict.fromkeys(p for p in passages if p.strip()))
        if not unique:
            raise ValueError("the retrieval corpus is empty.")
        self._embedder = SentenceEmbedder(str(embedder) if embedder else DEFAULT_EMBEDDER, device="cpu")
        self._store = ChunkStore(persist_dir, collection=collection, embedder=self._embedder)
        have = self._store.has_passages([passage_id(p) for p in unique])
        todo = [p for p in unique if passage_id(p) not in have]
        for i in tqdm(range(0, len(todo), batch_size), desc="embed corpus", disable=not progress or not todo):
            batch = todo[i : i + batch_size]
            records = [PassageRecord(text=p, source="retrieval corpus", position=i + j) for j, p in enumerate(batch)]
            self._store.add_passages(records, self._embedder.embed(batch))
        self.size = self._store.count_passages()

    def search(self, query: str, n: int) -> list[str]:
        """The ``n`` passages most similar to ``query``, best first."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}.")
        return [hit.text for hit in self._store.search(query, n)]
