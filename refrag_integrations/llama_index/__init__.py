"""LlamaIndex adapters for REFRAG: keep your index and query engine, add the node postprocessor
and set the LLM.

- :class:`RefragNodePostprocessor` registers each retrieved node's text (chunk vectors + expansion
  decision) with the engine and tags the node with small, prompt-invisible metadata.
- :class:`RefragLLM` finds those registered texts in the prompts LlamaIndex builds, compresses
  exactly them and leaves every other character as ordinary tokens.
- :class:`RefragQueryEngine` wires both (plus the offline default embedder) around a retriever or
  a Chroma vector store; the stock ``RetrieverQueryEngine.from_args`` works just as well.
- :class:`SentenceTransformerEmbedding` is the default retrieval embedder (all-MiniLM-L6-v2),
  loaded offline.

Needs the ``llamaindex`` extra: ``pip install 'refrag-integrations[llamaindex]'``.

Example:
    >>> from llama_index.core.query_engine import RetrieverQueryEngine          # doctest: +SKIP
    >>> engine = RefragEngine.from_pretrained()                                 # doctest: +SKIP
    >>> qe = RetrieverQueryEngine.from_args(
    ...     index.as_retriever(similarity_top_k=5),
    ...     llm=RefragLLM(engine=engine),
    ...     node_postprocessors=[RefragNodePostprocessor(engine=engine)],
    ... )                                                                       # doctest: +SKIP
    >>> print(qe.query("Who wrote Hamlet?"))                                    # doctest: +SKIP
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "refrag_integrations.llama_index needs LlamaIndex. Install the extra with:\n"
        "    pip install 'refrag-integrations[llamaindex]'"
    ) from err

from ..shared import shared_engine
from ._request import collect_generation_stats
from .embeddings import SentenceTransformerEmbedding
from .llm import ContextWindowExceededError, RefragLLM, compressed_context_window, expected_expand_fraction
from .postprocessor import (
    METADATA_CHUNKS,
    METADATA_EXPANDED,
    METADATA_PASSAGE_ID,
    RefragNodePostprocessor,
)
from .query_engine import RefragQueryEngine

__all__ = [
    "ContextWindowExceededError",
    "METADATA_CHUNKS",
    "METADATA_EXPANDED",
    "METADATA_PASSAGE_ID",
    "RefragLLM",
    "RefragNodePostprocessor",
    "RefragQueryEngine",
    "SentenceTransformerEmbedding",
    "collect_generation_stats",
    "compressed_context_window",
    "expected_expand_fraction",
    "shared_engine",
]
