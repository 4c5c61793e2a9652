"""Retrieval embedders: the :class:`Embedder` protocol the store needs, and
:class:`SentenceEmbedder`, the sentence-transformers implementation (offline default MiniLM);
:func:`load_sentence_transformer` loads such a model so that it reads its input as plain text."""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import numpy as np

from .config import DEFAULT_EMBEDDER

logger = logging.getLogger(__name__)


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
        from .models import ModelNotFoundError, model_fingerprint, resolve_encoder_path

        self.name = name_or_path
        path = resolve_encoder_path(name_or_path)
        try:
            self.model = load_sentence_transformer(path, device=device)
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



def load_sentence_transformer(path: str, device: str | None = None, **kwargs: Any) -> Any:
    """Load a sentence-transformers model that reads its input as plain text.

    A special-token string inside a passage or query (``[SEP]``, ``</s>``, ``<|im_start|>``) is
    tokenised as ordinary text, never as the tokenizer's control token, as the engine reads
    passages (:func:`refrag_integrations.chunking.tokenize_text`); the model's own markup (e.g.
    BERT's ``[CLS]`` / ``[SEP]`` around each text) is still added. Text without such strings is
    tokenised exactly as before, so its vectors are unchanged.

    Args:
        path: a local directory or hub id, as ``SentenceTransformer`` takes it.
        device: torch device (default: sentence-transformers' choice).
        **kwargs: further ``SentenceTransformer`` arguments (e.g. ``local_files_only=True``).
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device, **kwargs)
    found = False
    for module in model:
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            continue
        if hasattr(tokenizer, "split_special_tokens"):  # transformers: the default of every call
            tokenizer.split_special_tokens = True
            found = True
        elif hasattr(tokenizer, "encode_special_tokens"):  # a bare `tokenizers.Tokenizer`
            tokenizer.encode_special_tokens = True
            found = True
    if not found:
        logger.warning(
            "The sentence-transformers model %s has no tokenizer refrag-integrations can set to read special-token "
            "strings as text; a passage containing one (e.g. '[SEP]') may be read as a control token.", path,
        )
    return model
