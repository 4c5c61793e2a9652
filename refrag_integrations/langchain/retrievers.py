"""The retrieval side of REFRAG for LangChain: a document compressor and a retriever wrapper.

Both take the documents an ordinary retriever found and, for the query, decide per chunk which
stay tokens (the expansion policy), make sure each passage's chunk vectors are at hand (the
engine's cache, its vector source such as the Chroma chunk store, or query-time encoding), and
register each passage in the engine's bounded process-local cache. They return the same
documents, ``page_content`` unchanged, with a few small metadata fields; no tensor ever travels
through the chain. The chat model (:class:`~refrag_integrations.langchain.ChatRefrag`) later finds
the registered passages inside its prompt and compresses exactly those.

Chunk vectors precomputed at indexing time are used when the engine has a vector source: attach
the project's Chroma chunk store with ``ChunkStore.for_engine(engine, path).attach(engine)``;
:class:`ChunkStoreRetriever` also makes that store's passages a LangChain retriever.

Registrations belong to the request (:mod:`refrag_integrations.registrations`): the chat model
compresses the passages registered for the question it is answering, with that request's
decisions, so concurrent queries that share a passage keep their own decisions, and a passage of
an earlier turn that reappears in the chat history stays tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, Field, field_validator

from ..config import DEFAULT_TOP_K
from ..engine import RefragEngine
from ..policy import POLICY_NAMES, ExpansionPolicy
from ..registrations import record_registration
from ._engine import RefragEngineFields

# Metadata keys the adapters add to each Document (small values only).
PASSAGE_ID_KEY = "refrag_passage_id"
EXPANDED_KEY = "refrag_expanded"
CHUNKS_KEY = "refrag_chunks"
COMPRESSION_RATE_KEY = "refrag_compression_rate"


def check_policy(value: Any) -> Any:
    """Validate a ``policy`` setting: None, a policy name, or an :class:`ExpansionPolicy`."""
    if value is None or isinstance(value, ExpansionPolicy):
        return value
    if isinstance(value, str):
        if value not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {POLICY_NAMES} or an ExpansionPolicy, got {value!r}.")
        return value
    raise TypeError(f"policy must be a policy name, an ExpansionPolicy or None, got {type(value).__name__}.")


def check_expand_fraction(value: Any) -> Any:
    """Validate an expand fraction p: None or a number in [0, 1]."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
        raise ValueError(f"expand_fraction (p) must be a number in [0, 1] or None, got {value!r}.")
    return value


def check_max_expanded(value: Any) -> Any:
    """Validate a cap on expanded chunks: None or a non-negative integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"max_expanded must be a non-negative integer or None, got {value!r}.")
    return value


class ExpansionFields(BaseModel):
    """The expansion settings of the retrieval side (mixed into the LangChain classes):
    the expansion policy, the expand fraction p and a cap on expanded chunks."""

    policy: Any = Field(
        default=None,
        description="Expansion policy (name: all, none, random, relevance, perplexity-desc; or an "
        "ExpansionPolicy). None = the engine's default policy (a learned one when the checkpoint has it).",
    )
    expand_fraction: float | None = Field(
        default=None, description="Expand fraction p: the fraction of chunks kept as tokens. None = the engine's default."
    )
    max_expanded: int | None = Field(
        default=None, description="At most this many chunks kept as tokens. None = the engine's default."
    )

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, value: Any) -> Any:
        return check_policy(value)

    @field_validator("expand_fraction")
    @classmethod
    def _check_expand_fraction(cls, value: Any) -> Any:
        return check_expand_fraction(value)

    @field_validator("max_expanded")
    @classmethod
    def _check_max_expanded(cls, value: Any) -> Any:
        return check_max_expanded(value)

    def _register(self, engine: RefragEngine, documents: Sequence[Document], query: str) -> list[Document]:
        return register_documents(
            engine, documents, query, self.policy, expand_fraction=self.expand_fraction, max_expanded=self.max_expanded
        )


def passage_text(page_content: str) -> str:
    """The text a document is registered under: its content without surrounding whitespace,
    because prompt templates and chat templates may trim or re-indent the ends of a passage but
    never change its inside."""
    return page_content.strip()


def register_documents(
    engine: RefragEngine,
    documents: Sequence[Document],
    query: str,
    policy: Any = None,
    *,
    expand_fraction: float | None = None,
    max_expanded: int | None = None,
) -> list[Document]:
    """Decide, fetch chunk vectors for, and register the passages of ``documents``.

    Args:
        engine: the engine whose cache the chat model will read.
        documents: retrieved documents; empty ones pass through untouched.
        query: the question (query-aware policies read it).
        policy: the expansion policy (object or name); None = the engine's default policy.
        expand_fraction, max_expanded: the expansion budget; None = the engine's default.

    Returns:
        New ``Document`` objects with the same ``page_content``, ``id`` and metadata plus
        ``refrag_passage_id``, ``refrag_expanded`` (indices of the chunks kept as tokens),
        ``refrag_chunks`` and ``refrag_compression_rate`` (passage tokens per decoder position).

    Example:
        >>> docs = register_documents(engine, [Document("Hamlet is a tragedy by Shakespeare.")],
        ...                           "Who wrote Hamlet?", policy="none")       # doctest: +SKIP
        >>> docs[0].metadata["refrag_expanded"]                              # doctest: +SKIP
        []
    """
    if isinstance(documents, Document):
        raise TypeError("documents must be a list of Document, not a single Document.")
    docs = list(documents)
    for i, doc in enumerate(docs):
        if not isinstance(doc, Document):
            raise TypeError(f"documents[{i}] must be a langchain Document, got {type(doc).__name__}.")
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}.")
    texts = [passage_text(d.page_content) for d in docs]
    registered = engine.register_retrieved(
        query, [t for t in texts if t], policy, expand_fraction=expand_fraction, max_expanded=max_expanded
    )
    if not registered:
        return docs
    record_registration(engine, query, registered)  # what the chat model compresses, for this request only
    info = {
        p.text: {
            PASSAGE_ID_KEY: p.passage_id,
            EXPANDED_KEY: p.expanded,
            CHUNKS_KEY: len(p.expand),
            COMPRESSION_RATE_KEY: round(p.compression_rate, 4),
        }
        for p in registered
    }
    out = []
    for doc, text in zip(docs, texts):
        if not text:
            out.append(doc)
            continue
        out.append(Document(page_content=doc.page_content, metadata={**doc.metadata, **info[text]}, id=doc.id))
    return out


class RefragCompressor(RefragEngineFields, ExpansionFields, BaseDocumentCompressor):
    """A document compressor that prepares retrieved passages for REFRAG decoding.

    It keeps every document and its text (it compresses the *decoder input*, not the list):
    per query it runs the expansion policy over all chunks of the documents, makes sure their
    chunk vectors are ready, and registers each passage in the engine's cache. Use it with a
    ``ContextualCompressionRetriever``, or use :class:`RefragRetriever`, which does the same.

    Example:
        >>> from refrag_integrations.langchain import ChatRefrag, RefragCompressor
        >>> compressor = RefragCompressor(policy="relevance", expand_fraction=0.25)   # doctest: +SKIP
        >>> docs = compressor.compress_documents(vectorstore.similarity_search(q), q)  # doctest: +SKIP
        >>> ChatRefrag().invoke(f"{docs[0].page_content}\\n\\nQuestion: {q}")   # doctest: +SKIP
    """

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Register ``documents`` for ``query``; returns them with REFRAG metadata added."""
        return self._register(self.get_engine(), documents, query)

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async twin of :meth:`compress_documents`; the model work runs in a worker thread."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)


class RefragRetriever(RefragEngineFields, ExpansionFields, BaseRetriever):
    """Wraps any LangChain retriever: same documents, ready for REFRAG decoding.

    Swap it in for your retriever and swap your chat model for
    :class:`~refrag_integrations.langchain.ChatRefrag` on the same engine; the prompt, the
    formatting function and the output parser of your chain stay as they are.

    Example:
        >>> from langchain_chroma import Chroma
        >>> from refrag_integrations.langchain import LocalEmbeddings, RefragRetriever
        >>> store = Chroma.from_texts(passages, LocalEmbeddings())           # doctest: +SKIP
        >>> retriever = RefragRetriever(base_retriever=store.as_retriever(), k=3,
        ...                             policy="relevance", expand_fraction=0.25)  # doctest: +SKIP
        >>> docs = retriever.invoke("Who wrote Hamlet?")                      # doctest: +SKIP
        >>> docs[0].metadata["refrag_compression_rate"]                       # doctest: +SKIP
    """

    base_retriever: BaseRetriever = Field(description="The retriever that finds the documents.")
    k: int | None = Field(
        default=None,
        description="How many documents to return (passed to the base retriever as k, and the "
        "result cut to it). None = whatever the base retriever returns. Overridable per call.",
    )
    @field_validator("k")
    @classmethod
    def _check_k(cls, value: int | None) -> int | None:
        return _check_k(value)

    def _base_kwargs(self, kwargs: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        k = _check_k(kwargs.pop("k", self.k))
        if k is not None:
            kwargs["k"] = k
        return k, kwargs

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k, kwargs = self._base_kwargs(kwargs)
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        docs = docs[:k] if k is not None else docs
        return self._register(self.get_engine(), docs, query)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k, kwargs = self._base_kwargs(kwargs)
        docs = await self.base_retriever.ainvoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        docs = docs[:k] if k is not None else docs
        # Loading, encoding and the policy are model work: keep them off the event loop.
        return await run_in_executor(
            None, lambda: self._register(self.get_engine(), docs, query)
        )


def _check_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"k must be a positive integer (documents to return) or None, got {value!r}.")
    return value


class ChunkStoreRetriever(BaseRetriever):
    """A LangChain retriever over the project's :class:`~refrag_integrations.store.ChunkStore`
    (passages indexed with ``refrag index``). Wrap it in :class:`RefragRetriever`; with the store
    attached to the engine, the chunk vectors come precomputed from the same database.

    Example:
        >>> from refrag_integrations.index import SentenceEmbedder
        >>> from refrag_integrations.store import ChunkStore
        >>> store = ChunkStore.for_engine(engine, "/tmp/refrag-index").attach(engine)   # doctest: +SKIP
        >>> base = ChunkStoreRetriever(store=store, embedder=SentenceEmbedder(), k=3)  # doctest: +SKIP
        >>> retriever = RefragRetriever(base_retriever=base, engine=engine)           # doctest: +SKIP
    """

    store: Any = Field(description="The ChunkStore holding the passages.")
    embedder: Any = Field(default=None, description="Retrieval embedder for queries (None: the store's).")
    k: int = Field(default=DEFAULT_TOP_K, description="Passages to return; overridable per call.")

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: Any) -> Any:
        if not callable(getattr(value, "search", None)):
            raise TypeError(f"store must be a refrag_integrations.store.ChunkStore, got {type(value).__name__}.")
        return value

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: int) -> int:
        if _check_k(value) is None:
            raise ValueError("k must be a positive integer, got None.")
        return value

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k = _check_k(kwargs.pop("k", self.k)) or self.k
        if kwargs:
            raise TypeError(f"Unknown option(s) {sorted(kwargs)} for ChunkStoreRetriever; known: ['k'].")
        hits = self.store.search(query, top_k=k, embedder=self.embedder)
        return [Document(page_content=h.text, metadata={**h.metadata, "score": h.score}, id=h.id) for h in hits]
