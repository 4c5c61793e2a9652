"""RefragQueryEngine: a stock ``RetrieverQueryEngine`` wired for REFRAG in one call.

It adds :class:`RefragNodePostprocessor` (last, after your own postprocessors), uses
:class:`RefragLLM` on the same engine, counts prompt tokens with the decoder's tokenizer, and puts
the stats of every generation of a query into ``response.metadata["refrag_stats"]``. Everything
else is LlamaIndex's own ``RetrieverQueryEngine``.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, AsyncIterator, Iterator, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer, ResponseMode, get_response_synthesizer
from llama_index.core.schema import QueryBundle

from ..engine import RefragEngine
from ..policy import ExpansionPolicy
from ._request import collect_generation_stats
from .llm import RefragLLM, expected_expand_fraction
from .postprocessor import RefragNodePostprocessor

STATS_METADATA_KEY = "refrag_stats"


class RefragQueryEngine(RetrieverQueryEngine):
    """A ``RetrieverQueryEngine`` with the REFRAG postprocessor and LLM wired in.

    ``response.metadata["refrag_stats"]`` lists the :class:`~refrag_integrations.GenerationStats`
    of each LLM call the query made (for a streaming response, filled in as the stream is consumed).

    Example:
        >>> import chromadb                                                           # doctest: +SKIP
        >>> from llama_index.vector_stores.chroma import ChromaVectorStore            # doctest: +SKIP
        >>> store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient("db")
        ...                           .get_or_create_collection("docs"))              # doctest: +SKIP
        >>> qe = RefragQueryEngine.from_vector_store(store, similarity_top_k=5,
        ...                                          policy="relevance", expand_fraction=0.25)  # doctest: +SKIP
        >>> response = qe.query("Who wrote Hamlet?")                                  # doctest: +SKIP
        >>> response.metadata["refrag_stats"][0].positions                            # doctest: +SKIP
    """

    @classmethod
    def from_args(  # type: ignore[override]
        cls,
        retriever: BaseRetriever,
        llm: Optional[RefragLLM] = None,
        response_synthesizer: Optional[BaseSynthesizer] = None,
        node_postprocessors: Optional[List[BaseNodePostprocessor]] = None,
        callback_manager: Optional[CallbackManager] = None,
        *,
        engine: Optional[RefragEngine] = None,
        policy: "str | ExpansionPolicy | None" = None,
        expand_fraction: Optional[float] = None,
        max_expanded: Optional[int] = None,
        prompt_helper: Optional[PromptHelper] = None,
        response_mode: ResponseMode = ResponseMode.COMPACT,
        **synthesizer_kwargs: Any,
    ) -> "RefragQueryEngine":
        """Build the query engine around ``retriever``.

        Args:
            retriever: any LlamaIndex retriever (e.g. ``index.as_retriever(similarity_top_k=5)``).
            llm: a :class:`RefragLLM`; default: one on ``engine`` sized for the chosen policy.
            response_synthesizer: your own synthesizer (its LLM must be ``llm``); default: LlamaIndex's
                for ``response_mode``, with a PromptHelper that counts decoder tokens.
            node_postprocessors: your postprocessors; the REFRAG one is appended last unless present.
            callback_manager: LlamaIndex callback manager.
            engine: the :class:`~refrag_integrations.RefragEngine` (default: ``llm``'s, else the shared one).
            policy, expand_fraction, max_expanded: the postprocessor's expansion policy and budget.
            prompt_helper: overrides the PromptHelper of the default synthesizer.
            response_mode: compact (default), refine, tree_summarize, ...
            **synthesizer_kwargs: passed to ``get_response_synthesizer`` (streaming, use_async,
                text_qa_template, refine_template, summary_template, ...).
        """
        if llm is not None and not isinstance(llm, RefragLLM):
            raise TypeError(
                f"llm must be a RefragLLM (it finds the passages the postprocessor registers), got "
                f"{type(llm).__name__}; use RetrieverQueryEngine for other LLMs."
            )
        if llm is None:
            llm = RefragLLM(engine=engine)
            if expand_fraction is not None or policy is not None:
                llm.expand_fraction = _expected_fraction(llm.engine, policy, expand_fraction, max_expanded)
        elif engine is not None and llm.engine is not engine:
            raise ValueError("llm and engine must share one RefragEngine (pass only one of them).")
        engine = llm.engine

        postprocessors = list(node_postprocessors or [])
        ours = [p for p in postprocessors if isinstance(p, RefragNodePostprocessor)]
        if any(p.engine is not engine for p in ours):
            raise ValueError("The RefragNodePostprocessor given must use the same engine as the LLM.")
        if not ours:
            postprocessors.append(
                RefragNodePostprocessor(
                    engine=engine, policy=policy, expand_fraction=expand_fraction, max_expanded=max_expanded
                )
            )
        if response_synthesizer is None:
            response_synthesizer = get_response_synthesizer(
                llm=llm,
                prompt_helper=prompt_helper or llm.prompt_helper(),
                response_mode=response_mode,
                callback_manager=callback_manager,
                **synthesizer_kwargs,
            )
        return cls(
            retriever=retriever,
            response_synthesizer=response_synthesizer,
            node_postprocessors=postprocessors,
            callback_manager=callback_manager,
        )

    @classmethod
    def from_vector_store(
        cls,
        vector_store: Any,
        *,
        embed_model: Any = None,
        similarity_top_k: Optional[int] = None,
        **kwargs: Any,
    ) -> "RefragQueryEngine":
        """Query an existing vector store (e.g. a ``ChromaVectorStore``) with REFRAG.

        Args:
            vector_store: a LlamaIndex vector store holding the indexed nodes.
            embed_model: the embedding the store was built with (default: the offline
                :class:`SentenceTransformerEmbedding`, all-MiniLM-L6-v2). Never ``Settings.embed_model``.
            similarity_top_k: nodes to retrieve (default: LlamaIndex's).
            **kwargs: passed to :meth:`from_args` (engine, llm, policy, expand_fraction, response_mode, ...).
        """
        from llama_index.core import VectorStoreIndex

        from .embeddings import SentenceTransformerEmbedding

        if embed_model is None:
            embed_model = SentenceTransformerEmbedding()
        index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
        retriever_kwargs = {} if similarity_top_k is None else {"similarity_top_k": similarity_top_k}
        return cls.from_args(index.as_retriever(**retriever_kwargs), **kwargs)

    def _query(self, query_bundle: QueryBundle):
        with collect_generation_stats() as stats:
            response = super()._query(query_bundle)
            context = contextvars.copy_context()  # this query's decisions and stats sink
        return _with_stats(response, stats, context)

    async def _aquery(self, query_bundle: QueryBundle):
        with collect_generation_stats() as stats:
            response = await super()._aquery(query_bundle)
            context = contextvars.copy_context()
        return _with_stats(response, stats, context)


def _expected_fraction(
    engine: RefragEngine, policy: Any, expand_fraction: Optional[float], max_expanded: Optional[int]
) -> float:
    """p for the LLM's reported window, from the postprocessor's settings (engine defaults fill gaps)."""
    if expand_fraction is not None:
        budget: Any = expand_fraction
    elif max_expanded is not None:
        budget = None  # a count alone bounds no fraction: assume nothing compressed
    else:
        budget = engine.budget
    return expected_expand_fraction(engine.policy if policy is None else policy, budget)


def _with_stats(response: Any, stats: list, context: contextvars.Context) -> Any:
    """Put the stats list in the response's metadata. A streaming synthesizer calls the LLM only
    when its generator is consumed, so the generator is stepped inside the query's context: the
    LLM then sees this query's decisions and reports into this query's stats list."""
    metadata = dict(getattr(response, "metadata", None) or {})
    metadata[STATS_METADATA_KEY] = stats
    response.metadata = metadata
    if isinstance(response, StreamingResponse) and response.response_gen is not None:
        response.response_gen = _stepped_in(context, response.response_gen)
    elif isinstance(response, AsyncStreamingResponse) and response.response_gen is not None:
        response.response_gen = _astepped_in(context, response.response_gen)
    return response


def _stepped_in(context: contextvars.Context, items: Iterator[Any]) -> Iterator[Any]:
    end = object()
    while True:
        item = context.run(next, items, end)
        if item is end:
            return
        yield item


async def _astepped_in(context: contextvars.Context, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async def step() -> Any:
        return await items.__anext__()

    while True:
        try:
            item = await asyncio.get_running_loop().create_task(step(), context=context)
        except StopAsyncIteration:
            return
        yield item
