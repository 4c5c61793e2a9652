"""Top-N retrieval over a passage corpus through Chroma, for ``refrag eval qa --retrieval chroma``.

The corpus (by default all 2,655 NQ-open gold passages) is embedded once with the retrieval
embedder (all-MiniLM-L6-v2 from the offline package) into a persistent Chroma collection;
later runs reuse it. Each question's own gold passage is then one of many, as in a real system.
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
        embedder: a sentence-transformers model path (default: the offline MiniLM).
        collection: Chroma collection name.
        batch_size: passages embedded per batch.

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
        try:
            import chromadb
            from sentence_transformers import SentenceTransformer
        except ImportError as err:  # pragma: no cover - both are core dependencies
            raise ImportError("Retrieval needs chromadb and sentence-transformers: pip install refrag-integrations.") from err
        from tqdm.auto import tqdm

        from ..models import default_encoder_dir

        unique = list(dict.fromkeys(p for p in passages if p.strip()))
        if not unique:
            raise ValueError("the retrieval corpus is empty.")
        self._model = SentenceTransformer(str(embedder or default_encoder_dir()), device="cpu")
        client = chromadb.PersistentClient(path=str(persist_dir))
        self._col = client.get_or_create_collection(collection, metadata={"hnsw:space": "cosine"})
        have = set(self._col.get(include=[])["ids"]) if self._col.count() else set()
        todo = [p for p in unique if passage_id(p) not in have]
        for i in tqdm(range(0, len(todo), batch_size), desc="embed corpus", disable=not progress or not todo):
            batch = todo[i : i + batch_size]
            emb = self._model.encode(batch, normalize_embeddings=True, convert_to_numpy=True)
            self._col.upsert(ids=[passage_id(p) for p in batch], documents=batch, embeddings=emb.tolist())
        self.size = self._col.count()

    def search(self, query: str, n: int) -> list[str]:
        """The ``n`` passages most similar to ``query``, best first."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        q = self._model.encode([query], normalize_embeddings=True, convert_to_numpy=True)
        hits = self._col.query(query_embeddings=q.tolist(), n_results=min(n, self.size), include=["documents"])
        return list(hits["documents"][0])
