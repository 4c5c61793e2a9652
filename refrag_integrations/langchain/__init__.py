"""LangChain adapters for REFRAG (install with ``pip install 'refrag-integrations[langchain]'``).

Swap two objects in an existing RAG chain and keep everything else:

- :class:`RefragRetriever` wraps your retriever (or :class:`RefragCompressor` compresses for a
  ``ContextualCompressionRetriever``): same documents, registered for REFRAG decoding.
- :class:`ChatRefrag` (chat) or :class:`RefragLLM` (text) decode with REFRAG: registered passages
  found in the prompt are compressed, everything else stays tokens.

Example:
    >>> from langchain_core.output_parsers import StrOutputParser
    >>> from langchain_core.prompts import ChatPromptTemplate
    >>> from langchain_core.runnables import RunnablePassthrough
    >>> from refrag_integrations.langchain import ChatRefrag, RefragRetriever
    >>> chain = (
    ...     {"context": RefragRetriever(base_retriever=retriever) | format_docs,
    ...      "question": RunnablePassthrough()}
    ...     | prompt | ChatRefrag() | StrOutputParser()
    ... )                                                                  # doctest: +SKIP
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "refrag_integrations.langchain needs LangChain: pip install 'refrag-integrations[langchain]'"
    ) from err

from ..shared import shared_engine
from .chat_models import ChatRefrag, RefragLLM
from .embeddings import LocalEmbeddings
from .retrievers import ChunkStoreRetriever, RefragCompressor, RefragRetriever, register_documents

__all__ = [
    "ChatRefrag",
    "ChunkStoreRetriever",
    "LocalEmbeddings",
    "RefragCompressor",
    "RefragLLM",
    "RefragRetriever",
    "register_documents",
    "shared_engine",
]
