"""Retrieval embedders: the :class:`Embedder` protocol the store needs, and
:class:`SentenceEmbedder`, the sentence-transformers implementation (offline default MiniLM)."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .config import DEFAULT_EMBEDDER


class Embedder(Protocol):
    """What the store needs from a retrieval embedder (see :class:`SentenceEmbedder`)."""

    name: str
    fingerprint: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # (N, dim) float32, L2-normalised
        ...


class SentenceEmbedder:
    """Retrieval embedder: a sentence-transformers model (default: the packaged all-MiniLM-L6-v2,
    offline). Vectors are L2-normalised float32.

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (offline default), a local directory or a hub id.
        device: ``"cpu"``, ``"cuda"``, ... (default: sentence-transformers' choice).
        batch_size: texts per forward pass.

    Example:
        >>> emb = SentenceEmbedder()                  # doctest: +SKIP
        >>> emb.embed(["hello world"]).shape          # doctest: +SKIP
        (1, 384)
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        from .models import ModelNotFoundError, model_fingerprint, resolve_encoder_path

        self.name = name_or_path
        path = resolve_encoder_path(name_or_path)
        try:
            self.model = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"Could not load retrieval embedder {name_or_path!r} ({type(err).__name__}: {err}). Use the offline "
                f"default {DEFAULT_EMBEDDER!r}, a local sentence-transformers directory, or a cached hub id."
            ) from err
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.fingerprint = model_fingerprint(self.model)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not a single str.")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)

