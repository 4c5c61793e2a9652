"""LlamaIndex adapters: arguments honoured or refused, empty prompts, passage counts in every
response, registrations scoped to the query, and the real context window in ``metadata`` so a
chat engine's memory keeps only what the decoder can read (issue 16 section 3). Tiny random
models and an in-memory index with a mock embedding: mechanics, not answers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.base.llms.types import LLMMetadata  # noqa: E402
from llama_index.core.chat_engine import ContextChatEngine  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.memory import ChatMemoryBuffer  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

import refrag_integrations.shared as shared  # noqa: E402
from refrag_integrations import RefragEngine  # noqa: E402
from refrag_integrations.llama_index import ContextWindowExceededError, RefragLLM, RefragNodePostprocessor  # noqa: E402

# Real sentences (WikiText-2, CC BY-SA 3.0).
TEXTS = [
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role on "
    "the television series The Bill in 2000.",
    "This was followed by a starring role in the play Herons written by Simon Stephens, which was "
    "performed in 2001 at the Royal Court Theatre.",
    "Gustave Eiffel designed the tower in Paris, France. Who is the Eiffel Tower named after?",
]
WINDOW = 1024  # a small real window for the tiny decoder
MAX_NEW = 32


@pytest.fixture(scope="module")
def engine(tiny_chat_dirs) -> RefragEngine:
    dec, enc = tiny_chat_dirs  # policy "none": an untrained engine would default to "all" (nothing compressed)
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


@pytest.fixture(scope="module")
def index():
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS], embed_model=MockEmbedding(embed_dim=8))


# --------------------------------------------------------------------------- arguments


def test_unknown_arguments_raise_and_name_the_right_one(engine):
    with pytest.raises(TypeError, match=r"max_tokens=; use max_new_tokens="):
        RefragLLM(engine=engine, max_tokens=5)
    with pytest.raises(TypeError, match=r"model=; use decoder="):
        RefragLLM(engine=engine, model="x")
    with pytest.raises(TypeError, match=r"RefragNodePostprocessor got an unknown argument top_n="):
        RefragNodePostprocessor(engine=engine, top_n=3)
    out = RefragLLM(engine=engine, max_new_tokens=3, temperature=1.0, seed=1).complete("Hello")
    assert out.additional_kwargs["refrag_stats"]["new_tokens"] == 3  # the right name takes effect


def test_engine_settings_select_the_engine_or_are_refused(engine, tiny_chat_dirs, monkeypatch):
    dec, enc = (str(p) for p in tiny_chat_dirs)
    with pytest.raises(ValueError, match="another decoder than the engine's"):
        RefragLLM(engine=engine, decoder="another-decoder")
    with pytest.raises(ValueError, match="not both"):
        RefragNodePostprocessor(engine=engine, device="cpu")
    assert RefragLLM(engine=engine, decoder=str(engine.config.decoder)).engine is engine
    monkeypatch.setattr(shared, "_ENGINES", {})
    settings = {"decoder": dec, "encoder": enc, "chunk_size": 4, "device": "cpu"}
    llm, pp = RefragLLM(**settings), RefragNodePostprocessor(**settings)
    assert shared.loaded_shared_engines() == 0  # construction loads nothing
    assert llm.engine is pp.engine and str(llm.engine.config.decoder) == dec and llm.engine.k == 4


def test_deprecated_budget_is_honoured_with_a_warning(engine):
    with pytest.warns(DeprecationWarning, match="budget"):
        pp = RefragNodePostprocessor(engine=engine, policy="relevance", budget=0.5)
    assert pp.expand_fraction == 0.5
    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in TEXTS]
    out = pp.postprocess_nodes(nodes, query_bundle=QueryBundle("Who designed the tower?"))
    total = sum(n.node.metadata["refrag_chunks"] for n in out)
    assert sum(len(n.node.metadata["refrag_expanded"]) for n in out) == int(0.5 * total)


def test_empty_prompts_are_refused(engine):
    llm = RefragLLM(engine=engine)
    for bad in ("", "  \n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            llm.complete(bad)
        with pytest.raises(ValueError, match="prompt is empty"):
            llm.chat([ChatMessage(role="user", content=bad)])


# --------------------------------------------------------------------------- registrations


def test_passage_counts_and_scope_of_a_registration(engine):
    llm = RefragLLM(engine=engine, max_new_tokens=2, context_window=WINDOW)
    pp = RefragNodePostprocessor(engine=engine, policy="none")
    question = "Which play did Simon Stephens write?"
    pp.postprocess_nodes([NodeWithScore(node=TextNode(text=TEXTS[1]), score=1.0)], query_bundle=QueryBundle(question))
    flat = " ".join(TEXTS[1].split()).replace("play ", "play\n")  # a template that re-wraps lines
    out = llm.complete(f"Context: {flat}\nQuery: {question}\nAnswer:", formatted=True)
    assert out.additional_kwargs["refrag_passages"] == {"registered": 1, "found": 1, "compressed": 1}
    assert out.additional_kwargs["refrag_stats"]["chunks_compressed"] == len(engine.chunk(flat))
    # Another query's postprocessing replaces this one: the passage, now only quoted, stays tokens.
    pp.postprocess_nodes([NodeWithScore(node=TextNode(text=TEXTS[2]), score=1.0)], query_bundle=QueryBundle("Eiffel?"))
    with pytest.warns(UserWarning, match="none was found"):  # this query's passage is not in its prompt
        later = llm.chat([ChatMessage(role="user", content=f"Earlier you read: {TEXTS[1]}"),
                          ChatMessage(role="assistant", content="Yes."), ChatMessage(role="user", content="Eiffel?")])
    assert later.additional_kwargs["refrag_stats"]["chunks"] == 0
    assert later.additional_kwargs["refrag_passages"]["found"] == 0


# --------------------------------------------------------------------------- context window


class InflatedWindowLLM(RefragLLM):
    """What RefragLLM reported before: the compressed window as metadata.context_window."""

    @property
    def metadata(self) -> LLMMetadata:
        real = RefragLLM.metadata.fget(self)
        return LLMMetadata(
            context_window=self.compressed_window, num_output=real.num_output,
            is_chat_model=real.is_chat_model, model_name=real.model_name,
        )


def chat_five_turns(llm: RefragLLM, index) -> list:
    memory = ChatMemoryBuffer.from_defaults(llm=llm, tokenizer_fn=llm.tokenize)  # sized from metadata
    pp = RefragNodePostprocessor(engine=llm.engine, policy="none")
    chat = ContextChatEngine.from_defaults(
        retriever=index.as_retriever(similarity_top_k=2), llm=llm, node_postprocessors=[pp], memory=memory
    )
    ask = (
        "please tell me more about the television and theatre roles of Robert Boulter and the play Herons "
        "by Simon Stephens, in detail. "
    )
    stats = []
    for turn in range(5):
        chat.chat(f"Turn {turn}: {ask * 3}")
        stats.append(llm.last_stats)
    return stats


def test_five_turn_chat_engine_conversation_fits_the_real_window(engine, index):
    llm = RefragLLM(engine=engine, max_new_tokens=MAX_NEW, context_window=WINDOW)
    assert llm.metadata.context_window == WINDOW < llm.compressed_window
    stats = chat_five_turns(llm, index)
    assert len(stats) == 5
    assert all(s.positions + MAX_NEW <= WINDOW for s in stats)
    assert all(s.chunks_compressed > 0 for s in stats)  # the retrieved context is still compressed
    # The inflated window let the memory keep history the decoder cannot read.
    with pytest.raises(ContextWindowExceededError):
        chat_five_turns(InflatedWindowLLM(engine=engine, max_new_tokens=MAX_NEW, context_window=WINDOW), index)


def test_a_stale_context_registration_does_not_stop_compression(engine, tiny_chat_dirs):
    """A registration left in the context by an earlier query (here: another engine's) must not
    hide this request's registered passages (it once did when tests ran in another order)."""
    from refrag_integrations.llama_index._request import set_registration
    from refrag_integrations.registrations import record_registration

    dec, enc = tiny_chat_dirs
    other = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")
    stale = record_registration(other, "an older question", other.register_retrieved("an older question", TEXTS[:1], "none"))
    question = "Who designed the tower in Paris?"
    record_registration(engine, question, engine.register_retrieved(question, TEXTS[2:], "none"))
    set_registration(stale)
    try:
        out = RefragLLM(engine=engine, max_new_tokens=4).complete(f"{TEXTS[2]}\n\nQuestion: {question}")
    finally:
        set_registration(None)
    assert out.additional_kwargs["refrag_passages"]["compressed"] == 1
