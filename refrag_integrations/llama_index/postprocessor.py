"""RefragNodePostprocessor: register retrieved nodes with the engine so RefragLLM compresses them.

For the retrieved nodes it gets the chunk vectors (engine cache, the engine's vector source such
as the Chroma chunk store, or the encoder), runs the expansion policy with the query over all
chunks at once, registers each node's content (without its metadata header, which stays tokens;
content hash -> chunk vectors + decision) in the engine's bounded cache, and returns the nodes in
the same order with the same scores, carrying only small metadata that never reaches a prompt or
an embedding.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from ..chunking import passage_id
from ..engine import RefragEngine
from ..policy import POLICY_NAMES, ExpansionPolicy, resolve_policy
from ..registrations import record_registration
from ._engine import EngineSettings, checked_arguments
from ._request import set_registration

METADATA_PASSAGE_ID = "refrag_passage_id"
METADATA_EXPANDED = "refrag_expanded"
METADATA_CHUNKS = "refrag_chunks"
_METADATA_KEYS = (METADATA_PASSAGE_ID, METADATA_EXPANDED, METADATA_CHUNKS)


def passage_text(node: Any) -> str:
    """The passage REFRAG compresses for ``node``: its content without the metadata header.

    LlamaIndex renders a node into a prompt as ``"{metadata_str}\n\n{content}"`` (the content
    verbatim), so the content always occurs in the prompt. Registering the content rather than the
    whole rendering keeps a small metadata header (``file_name: ...``, a title) as tokens, and
    gives the passage the id that ``refrag index`` gives the same text, so a node whose text was
    indexed gets its precomputed chunk vectors from the store even when metadata is rendered.
    """
    return node.get_content(metadata_mode=MetadataMode.NONE).strip()


class RefragNodePostprocessor(EngineSettings, BaseNodePostprocessor):
    """Decide per chunk what stays tokens, and register each retrieved node with the engine.

    Put it last in ``node_postprocessors`` (after anything that filters or rewrites nodes) and use
    a :class:`~refrag_integrations.llama_index.RefragLLM` on the same engine. Nodes come back in
    the same order with the same scores, as copies whose metadata gains ``refrag_passage_id``,
    ``refrag_expanded`` (expanded chunk indices) and ``refrag_chunks``, all listed in
    ``excluded_llm_metadata_keys`` and ``excluded_embed_metadata_keys``.

    Args:
        engine: the :class:`~refrag_integrations.RefragEngine` shared with the LLM (default: the
            process-wide :func:`~refrag_integrations.llama_index.shared_engine`).
        policy: an expansion policy object or name (``relevance``, ``random``, ``none``, ``all``);
            None = the engine's default (a trained checkpoint's learned policy, if it has one).
        expand_fraction: fraction p of all retrieved chunks to keep as tokens.
        max_expanded: at most this many chunks kept as tokens.
        checkpoint, decoder, encoder, chunk_size, device: the shared engine's settings when no
            engine is given. ``budget=`` / ``expand=`` are deprecated names of
            ``expand_fraction``/``max_expanded`` / ``policy`` (they warn); unknown arguments raise.

    Example:
        >>> pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)  # doctest: +SKIP
        >>> nodes = pp.postprocess_nodes(retriever.retrieve("Who wrote Hamlet?"),
        ...                              query_str="Who wrote Hamlet?")                        # doctest: +SKIP
        >>> nodes[0].node.metadata["refrag_expanded"]                                          # doctest: +SKIP
        [3, 4]
    """

    policy: Optional[str] = Field(
        default=None,
        description="Expansion policy name (relevance, random, none, all); None = the engine's "
        "default policy (a trained checkpoint's learned policy, if any).",
    )
    expand_fraction: Optional[float] = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fraction p of all retrieved chunks kept as tokens; None (and no max_expanded) "
        "= the engine's default budget.",
    )
    max_expanded: Optional[int] = Field(
        default=None, ge=0, description="At most this many chunks kept as tokens over all retrieved nodes."
    )
    _policy: Optional[ExpansionPolicy] = PrivateAttr(default=None)

    def __init__(
        self,
        engine: Optional[RefragEngine] = None,
        policy: "str | ExpansionPolicy | None" = None,
        **kwargs: Any,
    ) -> None:
        kwargs = checked_arguments(type(self), engine, {"policy": policy, **kwargs})
        policy = kwargs.pop("policy")
        policy_obj = None
        if isinstance(policy, ExpansionPolicy):
            policy_obj, policy = policy, policy.name
        elif policy is not None and not isinstance(policy, str):
            raise TypeError(
                f"policy must be an ExpansionPolicy, a policy name or None, got {type(policy).__name__}."
            )
        super().__init__(policy=policy, **kwargs)
        self._engine = engine
        if policy_obj is None and policy is not None and policy not in POLICY_NAMES:
            raise ValueError(f"Unknown expansion policy {policy!r}; choose one of {POLICY_NAMES}.")
        self._policy = policy_obj

    @classmethod
    def class_name(cls) -> str:
        return "RefragNodePostprocessor"

    def _resolved_policy(self) -> ExpansionPolicy | None:
        if self._policy is None and self.policy is not None:
            self._policy = resolve_policy(self.policy, engine=self.engine)
        return self._policy  # None = the engine's default

    # ------------------------------------------------------------------ work

    def _plan(
        self, nodes: List[NodeWithScore], query: str
    ) -> tuple[list[tuple[NodeWithScore, Any, str | None, Any]], Any]:
        """Copy the nodes with our metadata keys excluded, render their prompt text, decide the
        expansion of all their chunks in one policy call and register the passages with the
        engine. Heavy part (may run in a thread)."""
        copies = []
        for nws in nodes:
            node = nws.node
            update = {
                "metadata": dict(node.metadata),
                "excluded_llm_metadata_keys": _with_keys(node.excluded_llm_metadata_keys),
                "excluded_embed_metadata_keys": _with_keys(node.excluded_embed_metadata_keys),
            }
            for key in _METADATA_KEYS:  # a node postprocessed before: drop stale values
                update["metadata"].pop(key, None)
            copy = node.model_copy(update=update)
            text = passage_text(copy)
            copies.append((nws, copy, text or None))
        registered, registration = {}, None
        if any(t for _, _, t in copies):
            found = self.engine.register_retrieved(
                query, [t for _, _, t in copies if t], self._resolved_policy(),
                expand_fraction=self.expand_fraction, max_expanded=self.max_expanded,
            )
            registered = {p.text: p for p in found}
            registration = record_registration(self.engine, query, found) if found else None
        return [(nws, copy, text, registered.get(text)) for nws, copy, text in copies], registration

    def _apply(self, planned: list, registration: Any) -> List[NodeWithScore]:
        """Tag the copies with their registered passages, publish the registration to this request's context."""
        out: List[NodeWithScore] = []
        for nws, copy, text, passage in planned:
            if passage is not None:
                copy.metadata[METADATA_PASSAGE_ID] = passage.passage_id
                copy.metadata[METADATA_EXPANDED] = passage.expanded
                copy.metadata[METADATA_CHUNKS] = len(passage.expand)
            out.append(NodeWithScore(node=copy, score=nws.score))
        set_registration(registration)
        return out

    @staticmethod
    def _query(query_bundle: Optional[QueryBundle]) -> str:
        return query_bundle.query_str if query_bundle is not None else ""

    def _postprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        return self._apply(*self._plan(nodes, self._query(query_bundle)))

    async def _apostprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        # Encoding and the policy run in a worker thread; registering and publishing the decisions
        # happen here, in the query's own context, so its LLM call sees them.
        planned, registration = await asyncio.to_thread(self._plan, nodes, self._query(query_bundle))
        return self._apply(planned, registration)


def _with_keys(keys: List[str]) -> List[str]:
    return list(keys) + [k for k in _METADATA_KEYS if k not in keys]


def passage_id_of(node: Any) -> str:
    """The passage id RefragNodePostprocessor registers for ``node`` (the hash of its content
    without metadata, :func:`passage_text`)."""
    return passage_id(passage_text(node))
