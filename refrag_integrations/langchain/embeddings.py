"""An offline LangChain ``Embeddings`` over a local sentence-transformers model (default: the
packaged all-MiniLM-L6-v2, the project's retrieval embedder). Nothing is downloaded."""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class LocalEmbeddings(BaseModel, Embeddings):
    """Sentence-transformers embeddings from a local directory, loaded on first use.

    Example:
        >>> from langchain_chroma import Chroma
        >>> from refrag_integrations.langchain import LocalEmbeddings
        >>> store = Chroma.from_texts(["Hamlet is a tragedy by Shakespeare."], LocalEmbeddings())  # doctest: +SKIP
        >>> len(LocalEmbeddings().embed_query("Who wrote Hamlet?"))                              # doctest: +SKIP
        384
    """

    model_config = ConfigDict(protected_namespaces=())

    model_path: str | None = Field(
        default=None,
        description="Local sentence-transformers model directory (None: the packaged all-MiniLM-L6-v2).",
    )
    device: str | None = Field(default=None, description="Device (None: sentence-transformers' choice).")
    normalize: bool = Field(default=True, description="L2-normalise the vectors (cosine = dot product).")

    _model: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def _get_model(self) -> Any:
        with self._lock:
            if self._model is None:
                from ..embedder import load_sentence_transformer
                from ..models import default_encoder_dir

                path = self.model_path or str(default_encoder_dir())
                self._model = load_sentence_transformer(path, device=self.device, local_files_only=True)
            return self._model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed passages; one vector per text."""
        if isinstance(texts, str):
            raise TypeError("embed_documents takes a list of strings; use embed_query for one string.")
        if not texts:
            return []
        model = self._get_model()
        with self._lock:  # the model's tokenizer is not safe to share between threads
            vecs = model.encode(list(texts), normalize_embeddings=self.normalize, convert_to_numpy=True)
        return vecs.tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes a str, got {type(text).__name__}.")
        return self.embed_documents([text])[0]
