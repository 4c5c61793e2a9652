"""LlamaIndex adapters on tiny random models over a real embedded Chroma (ChromaVectorStore).

The tiny decoder's answers are noise (random weights); these tests check the plumbing: what is
registered, what is compressed, that sources/scores/order survive, streaming, async, the response
modes, and that nothing falls back to LlamaIndex's network defaults.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.vector_stores.chroma")

import chromadb  # noqa: E402
from chromadb.config import Settings as ChromaSettings  # noqa: E402
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.indices.prompt_helper import PromptHelper  # noqa: E402
from llama_index.core.llms import ChatMessage, MockLLM  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.response_synthesizers import get_response_synthesizer  # noqa: E402
from llama_index.core.schema import MetadataMode  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from refrag_integrations import RefragEngine, passage_id  # noqa: E402
from refrag_integrations.llama_index import (  # noqa: E402
    METADATA_CHUNKS,
    METADATA_EXPANDED,
    METADATA_PASSAGE_ID,
    ContextWindowExceededError,
    RefragLLM,
    RefragNodePostprocessor,
    RefragQueryEngine,
    SentenceTransformerEmbedding,
    collect_generation_stats,
    compressed_context_window,
)
from refrag_integrations.llama_index.postprocessor import passage_id_of  # noqa: E402
import refrag_integrations.shared as shared  # noqa: E402

NUM_DOCS = 8  # NQ train passages in the test index
WORDS = 30  # words kept per passage: the tiny decoder's byte-level BPE makes ~4 tokens a word
TOP_K = 3
MAX_NEW = 6
WINDOW = 2048  # positions for the tiny decoder: LlamaIndex's own templates are long in its tokens


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_settings_fallback():
    """Nothing here may resolve LlamaIndex's global (network) LLM or embedding."""
    assert Settings._llm is None and Settings._embed_model is None
    yield
    assert Settings._llm is None, "a test touched Settings.llm (the network default)"
    assert Settings._embed_model is None, "a test touched Settings.embed_model (the network default)"


@pytest.fixture()
def no_network(monkeypatch):
    """Refuse every outgoing inet connection for the duration of the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: guarded(socket.socket(), a[0]))


@pytest.fixture(scope="module")
def nq_rows(shared_data):
    """The first NQ-open lines (train split), with their gold passages."""
    rows = []
    with gzip.open(shared_data / "nq-open-oracle.jsonl.gz", "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == NUM_DOCS:
                break
    return rows


@pytest.fixture(scope="module")
def engine(tiny_chat_dirs):
    """A fresh tiny engine (its own passage cache) whose tokenizer has a chat template; default
    policy "none" (an untrained engine's own default is ordinary RAG), as in conftest.py."""
    dec, enc = tiny_chat_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


@pytest.fixture(scope="module")
def plain_engine(tiny_dirs):
    """A tiny engine without a chat template (LlamaIndex's completion path); default policy "none"."""
    dec, enc = tiny_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


@pytest.fixture(scope="module")
def embed_model(tiny_chat_dirs):
    return SentenceTransformerEmbedding(str(tiny_chat_dirs[1]))


@pytest.fixture(scope="module")
def chroma_store(tmp_path_factory, nq_rows, embed_model):
    client = chromadb.PersistentClient(
        path=str(tmp_path_factory.mktemp("chroma")), settings=ChromaSettings(anonymized_telemetry=False)
    )
    store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("nq-train", embedding_function=None))
    docs = [
        Document(text=" ".join(r["ctxs"][0]["text"].split()[:WORDS]), metadata={"title": r["ctxs"][0]["title"]})
        for r in nq_rows
    ]
    VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed_model
    )
    return store


@pytest.fixture(scope="module")
def index(chroma_store, embed_model):
    return VectorStoreIndex.from_vector_store(chroma_store, embed_model=embed_model)


@pytest.fixture()
def retriever(index):
    return index.as_retriever(similarity_top_k=TOP_K)


@pytest.fixture(scope="module")
def questions(nq_rows):
    return [r["question"] for r in nq_rows]


def make_llm(engine, **kw):
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("context_window", WINDOW)
    return RefragLLM(engine=engine, **kw)


def node_chunks(nodes) -> int:
    return sum(n.node.metadata[METADATA_CHUNKS] for n in nodes)


class RecordingLLM(RefragLLM):
    """RefragLLM that remembers every prompt it prepared and the prepared input."""

    def _prepare(self, rendered, query, registration):
        prepared, passages = super()._prepare(rendered, query, registration)
        self.__dict__.setdefault("_seen", []).append((rendered.text, prepared))
        return prepared, passages

    @property
    def seen(self):
        return self.__dict__.get("_seen", [])


# --------------------------------------------------------------------------- API surface


def test_public_api_is_pinned():
    import refrag_integrations.llama_index as li

    assert sorted(li.__all__) == sorted(
        [
            "ContextWindowExceededError", "METADATA_CHUNKS", "METADATA_EXPANDED", "METADATA_PASSAGE_ID",
            "RefragLLM", "RefragNodePostprocessor", "RefragQueryEngine", "SentenceTransformerEmbedding",
            "collect_generation_stats", "compressed_context_window", "expected_expand_fraction", "shared_engine",
        ]
    )


def test_core_package_does_not_import_llama_index():
    code = "import sys, refrag_integrations; print('llama_index' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "cls, name, expected",
    [
        (RefragLLM, "RefragLLM", {"max_new_tokens", "temperature", "compress", "expand_fraction", "context_window"}),
        (RefragNodePostprocessor, "RefragNodePostprocessor", {"policy", "expand_fraction", "max_expanded"}),
        (SentenceTransformerEmbedding, "SentenceTransformerEmbedding", {"device", "normalize"}),
    ],
)
def test_components_have_class_name_and_described_fields(cls, name, expected):
    assert cls.class_name() == name
    base = next(b for b in cls.__mro__[1:] if b.__module__.startswith("llama_index"))  # the framework class
    own = {k: f for k, f in cls.model_fields.items() if k not in base.model_fields}
    assert expected <= set(own)
    for key, field in own.items():
        assert field.description, f"{cls.__name__}.{key} has no description"


def test_llm_serialises_without_torch_objects(engine):
    llm = make_llm(engine, expand_fraction=0.25)
    data = llm.to_dict()
    json.dumps(data)  # no tensors, no modules
    assert data["expand_fraction"] == 0.25 and data["class_name"] == "RefragLLM"
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.5)
    assert json.loads(pp.to_json())["policy"] == "relevance"


def test_bad_inputs_raise_clear_errors(engine, retriever):
    with pytest.raises(TypeError, match="RefragEngine"):
        RefragLLM(engine="not an engine")
    with pytest.raises(TypeError, match="RefragEngine"):
        RefragNodePostprocessor(engine=object())
    with pytest.raises(ValueError, match="Unknown expansion policy"):
        RefragNodePostprocessor(engine=engine, policy="bogus")
    with pytest.raises(ValueError):
        RefragNodePostprocessor(engine=engine, expand_fraction=1.5)
    with pytest.raises(ValueError):
        RefragLLM(engine=engine, max_new_tokens=0)
    with pytest.raises(TypeError, match="Unknown generation arguments"):
        make_llm(engine).complete("hello", frobnicate=1)
    with pytest.raises(TypeError, match="must be a RefragLLM"):
        RefragQueryEngine.from_args(retriever, llm=MockLLM())
    other = RefragEngine(engine.decoder, engine.tokenizer, engine.chunk_encoder, engine.config)
    with pytest.raises(ValueError, match="same engine"):
        RefragQueryEngine.from_args(
            retriever, llm=make_llm(engine), node_postprocessors=[RefragNodePostprocessor(engine=other)]
        )
    with pytest.raises(ValueError, match="share one"):
        RefragQueryEngine.from_args(retriever, llm=make_llm(engine), engine=other)
    with pytest.raises(ValueError, match="expand_fraction"):
        compressed_context_window(1024, 4, 2.0, 100)


def test_context_window_reflects_compression(engine):
    base = make_llm(engine, compress=False).compressed_window
    none = make_llm(engine, expand_fraction=0.0).compressed_window
    quarter = make_llm(engine, expand_fraction=0.25).compressed_window
    full = make_llm(engine, expand_fraction=1.0).compressed_window
    assert base == full == WINDOW
    # LlamaIndex sizes chat memory from metadata: that is the real window, compression or not
    assert make_llm(engine, expand_fraction=0.0).metadata.context_window == WINDOW
    assert make_llm(engine, expand_fraction=0.0).prompt_helper().context_window == none
    assert none > quarter > base
    reserve = 256 + MAX_NEW
    assert none == reserve + (WINDOW - reserve) * engine.k
    assert make_llm(engine).metadata.is_chat_model is True


def test_shared_engine_is_used_by_both_sides_when_none_is_given(engine, monkeypatch):
    monkeypatch.setattr(shared, "_ENGINES", {})
    monkeypatch.setitem(shared._ENGINES, (None, None, None, None, None), engine)
    assert RefragLLM().engine is engine
    assert RefragNodePostprocessor().engine is engine


# --------------------------------------------------------------------------- postprocessor


def test_postprocessor_registers_nodes_and_preserves_order_and_scores(engine, retriever, questions):
    q = questions[0]
    nodes = retriever.retrieve(q)
    before = [(n.node.node_id, n.score, dict(n.node.metadata)) for n in nodes]
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)
    out = pp.postprocess_nodes(nodes, query_str=q)

    assert [(n.node.node_id, n.score) for n in out] == [(i, s) for i, s, _ in before]
    assert [dict(n.node.metadata) for n in nodes] == [m for _, _, m in before], "input nodes were mutated"
    total = expanded = 0
    for n in out:
        meta = n.node.metadata
        rendered = n.node.get_content(metadata_mode=MetadataMode.LLM).strip()
        text = n.node.get_content(metadata_mode=MetadataMode.NONE).strip()  # registered: content, no header
        assert rendered.startswith("title: ") and rendered.endswith(text) and text in rendered
        assert meta[METADATA_PASSAGE_ID] == passage_id(text) == passage_id_of(n.node)
        for key in (METADATA_PASSAGE_ID, METADATA_EXPANDED, METADATA_CHUNKS):
            assert key in n.node.excluded_llm_metadata_keys and key in n.node.excluded_embed_metadata_keys
            assert key not in n.node.get_content(metadata_mode=MetadataMode.EMBED)
            assert key not in rendered
        entry = engine.lookup_passage(meta[METADATA_PASSAGE_ID])
        assert entry is not None and text in engine.registered_passages()
        assert entry.vectors is not None and entry.vectors.shape[0] == meta[METADATA_CHUNKS] == len(entry.chunks)
        assert [i for i, keep in enumerate(entry.expand) if keep] == meta[METADATA_EXPANDED]
        total += meta[METADATA_CHUNKS]
        expanded += len(meta[METADATA_EXPANDED])
    assert expanded == int(0.25 * total)  # one joint budget over all retrieved chunks


def test_nodes_with_rendered_metadata_read_their_stored_chunk_vectors(engine, retriever, questions):
    # The metadata header ("title: ...") is rendered into the prompt, but the passage registered is
    # the node's content, whose id is the one `refrag index` stores: its vectors come from the
    # engine's vector source (the Chroma chunk store in production), not from the encoder.
    q = questions[3]
    nodes = retriever.retrieve(q)
    texts = [n.node.get_content(metadata_mode=MetadataMode.NONE).strip() for n in nodes]
    stored = {passage_id(t): torch.full((len(engine.chunk(t)), engine.chunk_encoder.encoder_dim), 0.5 + i)
              for i, t in enumerate(texts)}
    asked = []

    def source(ids):
        asked.extend(ids)
        return {pid: stored[pid] for pid in ids if pid in stored}

    engine._cache.clear()  # nothing registered or encoded before: every vector must come from the source
    old_source, engine.vector_source = engine.vector_source, source
    encode, encoded = engine.chunk_encoder.encode, []

    def recording_encode(texts, *args, **kwargs):
        encoded.extend(texts)
        return encode(texts, *args, **kwargs)

    engine.chunk_encoder.encode = recording_encode
    try:
        out = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25).postprocess_nodes(
            nodes, query_str=q)
    finally:
        engine.vector_source = old_source
        engine.chunk_encoder.encode = encode
    assert set(asked) == set(stored)
    assert encoded == [q]  # only the query, for the relevance policy; no chunk was encoded
    for n, t in zip(out, texts):
        entry = engine.lookup_passage(n.node.metadata[METADATA_PASSAGE_ID])
        assert entry.text == t and torch.equal(entry.vectors, stored[passage_id(t)])


def test_postprocessor_async_matches_sync(engine, retriever, questions):
    q = questions[1]
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)
    sync = pp.postprocess_nodes(retriever.retrieve(q), query_str=q)
    asyn = asyncio.run(pp.apostprocess_nodes(retriever.retrieve(q), query_str=q))
    assert [(n.node.node_id, n.score, n.node.metadata) for n in sync] == [
        (n.node.node_id, n.score, n.node.metadata) for n in asyn
    ]


# --------------------------------------------------------------------------- query engines


def test_stock_retriever_query_engine_compresses_registered_nodes(engine, retriever, questions, no_network):
    llm = RecordingLLM(engine=engine, max_new_tokens=MAX_NEW, context_window=WINDOW)
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)
    qe = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=[pp])
    q = questions[2]
    expected = [(n.node.node_id, n.score) for n in retriever.retrieve(q)]
    with collect_generation_stats() as stats:
        response = qe.query(q)

    assert isinstance(response.response, str) and response.response
    assert [(n.node.node_id, n.score) for n in response.source_nodes] == expected
    assert all(n.node.get_content() for n in response.source_nodes)
    assert len(stats) == 1, "COMPACT must pack all retrieved nodes into one call"
    s = stats[0]
    assert s.chunks == node_chunks(response.source_nodes)  # every node arrived whole and was compressed
    assert s.chunks_expanded == sum(len(n.node.metadata[METADATA_EXPANDED]) for n in response.source_nodes)
    assert s.chunks_compressed > 0 and s.positions < s.prompt_tokens
    compressed_tokens = sum(
        len(c.token_ids)
        for n in response.source_nodes
        for c in engine.chunk(n.node.get_content(metadata_mode=MetadataMode.NONE).strip())
        if c.index not in n.node.metadata[METADATA_EXPANDED]
    )
    assert s.positions == s.prompt_tokens - compressed_tokens + s.chunks_compressed  # one position per compressed chunk
    assert s.trained is False and llm.last_stats is s
    prompt, prepared = llm.seen[-1]
    assert engine.tokenizer.decode(prepared.token_ids) == prompt  # every character decoded, none mangled


def test_refrag_query_engine_from_vector_store(engine, chroma_store, embed_model, questions):
    qe = RefragQueryEngine.from_vector_store(
        chroma_store, embed_model=embed_model, similarity_top_k=TOP_K,
        llm=make_llm(engine), policy="relevance", expand_fraction=0.25,
    )
    response = qe.query(questions[3])
    stats = response.metadata["refrag_stats"]
    assert len(response.source_nodes) == TOP_K and len(stats) == 1
    assert stats[0].chunks == node_chunks(response.source_nodes) and stats[0].positions < stats[0].prompt_tokens


def test_compact_packs_all_nodes_only_thanks_to_compression(engine, index, questions):
    """With a decoder window too small for the uncompressed nodes, the full-context baseline needs
    several refine calls; REFRAG reports the compressed window and answers in one call."""
    retriever = index.as_retriever(similarity_top_k=5)
    q = questions[4]
    window = 1024
    baseline = make_llm(engine, compress=False, context_window=window)
    pp = RefragNodePostprocessor(engine=engine, policy="none")
    stock = RetrieverQueryEngine.from_args(
        retriever, node_postprocessors=[pp], llm=baseline,
        response_synthesizer=get_response_synthesizer(
            llm=baseline, prompt_helper=PromptHelper.from_llm_metadata(baseline.metadata, tokenizer=baseline.tokenize)
        ),
    )
    with collect_generation_stats() as base_stats:
        stock.query(q)
    assert len(base_stats) > 1 and all(s.chunks == 0 for s in base_stats)
    assert all(s.positions + MAX_NEW <= window for s in base_stats)

    qe = RefragQueryEngine.from_args(retriever, llm=make_llm(engine, context_window=window), policy="none")
    response = qe.query(q)
    stats = response.metadata["refrag_stats"]
    assert len(stats) == 1 and stats[0].chunks == node_chunks(response.source_nodes)
    assert stats[0].chunks_expanded == 0 and stats[0].positions + MAX_NEW <= window < stats[0].prompt_tokens


def test_passage_split_across_calls_stays_tokens(engine, retriever, questions):
    """A PromptHelper chunk limit makes LlamaIndex cut the packed text into pieces: a passage that
    arrives whole is compressed, a piece of one is decoded as ordinary tokens, nothing is mangled."""
    llm = RecordingLLM(engine=engine, max_new_tokens=MAX_NEW, context_window=WINDOW)
    qe = RefragQueryEngine.from_args(
        retriever, llm=llm, policy="none",
        prompt_helper=PromptHelper.from_llm_metadata(llm.metadata, tokenizer=llm.tokenize, chunk_size_limit=120),
    )
    response = qe.query(questions[5])
    texts = [n.node.get_content(metadata_mode=MetadataMode.NONE).strip() for n in response.source_nodes]  # registered
    assert len(llm.seen) > 1
    split = [t for t in texts if not any(t in p for p, _ in llm.seen)]
    assert split, "expected at least one passage to be split by the chunk limit"
    for (prompt, prepared), stats in zip(llm.seen, response.metadata["refrag_stats"], strict=True):
        whole = [t for t in texts if t in prompt]
        assert stats.chunks == sum(len(engine.chunk(t)) for t in whole)
        assert engine.tokenizer.decode(prepared.token_ids) == prompt

    # The same at the LLM level: half a registered passage is ordinary text.
    half = texts[0][: len(texts[0]) // 2]
    out = make_llm(engine).complete(f"Context: {half}\nQuestion: {questions[5]}")
    assert out.additional_kwargs["refrag_stats"]["chunks"] == 0
    whole = make_llm(engine).complete(f"Context: {texts[0]}\nQuestion: {questions[5]}")
    assert whole.additional_kwargs["refrag_stats"]["chunks"] == len(engine.chunk(texts[0]))


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize"])
def test_response_modes_answer_and_compress(engine, retriever, questions, mode):
    llm = make_llm(engine)
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)
    qe = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=[pp], response_mode=mode)
    with collect_generation_stats() as stats:
        response = qe.query(questions[6])
    assert isinstance(response.response, str) and response.response
    assert len(response.source_nodes) == TOP_K
    assert len(stats) == (TOP_K if mode == "refine" else 1)  # refine: one call per node
    assert all(s.chunks_compressed > 0 and s.positions < s.prompt_tokens for s in stats)
    assert sum(s.chunks for s in stats) == node_chunks(response.source_nodes)


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "completion"])
def test_streaming_equals_non_streaming(engine, plain_engine, index, questions, chat):
    eng = engine if chat else plain_engine
    llm = make_llm(eng)
    assert llm.metadata.is_chat_model is chat
    retriever = index.as_retriever(similarity_top_k=TOP_K)
    q = questions[7]
    plain = RefragQueryEngine.from_args(retriever, llm=llm, policy="relevance", expand_fraction=0.25).query(q)
    streamed = RefragQueryEngine.from_args(
        retriever, llm=llm, policy="relevance", expand_fraction=0.25, streaming=True
    ).query(q)
    pieces = list(streamed.response_gen)
    assert len(pieces) > 1
    assert "".join(pieces) == plain.response
    s_plain, s_stream = plain.metadata["refrag_stats"][0], streamed.metadata["refrag_stats"][0]
    assert s_stream.chunks_compressed == s_plain.chunks_compressed > 0
    assert s_stream.expanded == s_plain.expanded and s_stream.positions == s_plain.positions


def test_llm_stream_and_async_stream_match_complete(engine, retriever, questions):
    q = questions[0]
    RefragNodePostprocessor(engine=engine, policy="none").postprocess_nodes(retriever.retrieve(q), query_str=q)
    text = engine.registered_passages()[-1]
    llm = make_llm(engine)
    prompt = f"Context:\n{text}\n\nQuestion: {q}"
    done = llm.complete(prompt)
    items = list(llm.stream_complete(prompt))
    assert items[-1].text == done.text and items[-1].additional_kwargs["refrag_stats"]["chunks"] > 0
    assert "".join(i.delta for i in items) == done.text

    async def astream():
        return [r async for r in await llm.astream_complete(prompt)]

    aitems = asyncio.run(astream())
    assert "".join(i.delta for i in aitems) == done.text
    chat = asyncio.run(llm.achat([ChatMessage(role="user", content=prompt)]))
    assert chat.message.content == done.text


def test_async_generation_does_not_block_the_event_loop(engine):
    llm = make_llm(engine, max_new_tokens=48)

    async def main():
        ticks = 0
        task = asyncio.create_task(llm.acomplete("Robert Boulter is an English film, television and theatre actor."))
        while not task.done():
            await asyncio.sleep(0.001)
            ticks += 1
        return ticks, await task

    ticks, out = asyncio.run(main())
    assert out.additional_kwargs["refrag_stats"]["new_tokens"] > 0
    assert ticks >= 5, f"event loop ran only {ticks} times while generating"


class _Barrier(BaseNodePostprocessor):
    """Holds every query after postprocessing until all have registered their passages, so the
    LLM calls of concurrent queries that share a passage really do see each other's registrations."""

    _barrier: Any = PrivateAttr(default=None)

    def _postprocess_nodes(self, nodes, query_bundle=None):
        return nodes

    async def _apostprocess_nodes(self, nodes, query_bundle=None):
        await self._barrier.wait()
        return nodes


def test_four_concurrent_aqueries_keep_their_own_decisions(engine, retriever, questions):
    pp = RefragNodePostprocessor(engine=engine, policy="relevance", expand_fraction=0.25)
    barrier = _Barrier()
    qe = RefragQueryEngine.from_args(retriever, llm=make_llm(engine), node_postprocessors=[pp, barrier])

    async def main():
        barrier._barrier = asyncio.Barrier(4)
        return await asyncio.gather(*(qe.aquery(q) for q in questions[:4]))

    responses = asyncio.run(main())
    assert len(responses) == 4
    ids = [n.node.node_id for r in responses for n in r.source_nodes]
    assert len(set(ids)) < len(ids), "the four queries should share at least one passage"
    for r in responses:
        assert isinstance(r.response, str) and r.response
        [s] = r.metadata["refrag_stats"]
        # the decisions this query's postprocessor made, even where queries share a passage
        assert s.expanded == [n.node.metadata[METADATA_EXPANDED] for n in r.source_nodes]
        assert s.chunks == node_chunks(r.source_nodes) and s.positions < s.prompt_tokens


def test_too_long_prompt_raises_through_the_query_engine(engine, retriever, questions):
    """An overflow must surface (LlamaIndex's refine loop swallows ValueError/TypeError)."""
    llm = make_llm(engine, compress=False, context_window=300)
    qe = RetrieverQueryEngine.from_args(
        retriever, llm=llm, node_postprocessors=[RefragNodePostprocessor(engine=engine, policy="none")],
        response_synthesizer=get_response_synthesizer(
            llm=llm, prompt_helper=PromptHelper(context_window=4096, num_output=MAX_NEW)
        ),
    )
    with pytest.raises(ContextWindowExceededError, match="decoder positions"):
        qe.query(questions[0])


def test_unregistered_prompt_is_ordinary_generation(engine):
    llm = make_llm(engine)
    out = llm.complete("Who is the Eiffel Tower named after?", formatted=True)
    s = out.additional_kwargs["refrag_stats"]
    assert s["chunks"] == 0 and s["positions"] == s["prompt_tokens"]
    prepared = engine.prepare("Who is the Eiffel Tower named after?", [], [], add_special_tokens=True)
    ref = engine.generate_prepared([prepared], max_new_tokens=MAX_NEW)[0]
    assert out.text == ref.text


def test_token_counting_never_waits_for_a_generation(engine):
    """PromptHelper counts tokens on the event loop's thread; it must not queue behind a request
    that holds the engine (generation), or async queries would stall the loop."""
    import threading

    llm = make_llm(engine)
    text = "Gustave Eiffel designed the tower in Paris."
    assert llm.tokenize(text) == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    held, release = threading.Event(), threading.Event()

    def hold_engine():
        with engine._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_engine)
    holder.start()
    held.wait(5)
    counted = []
    worker = threading.Thread(target=lambda: counted.append(len(llm.tokenize(text))))
    worker.start()
    worker.join(5)
    release.set()
    holder.join()
    assert counted and counted[0] > 0, "tokenize blocked while the engine was busy"


def test_async_streaming_query_equals_non_streaming(engine, retriever, questions):
    q = questions[1]
    args = dict(llm=make_llm(engine), policy="relevance", expand_fraction=0.25)
    plain = RefragQueryEngine.from_args(retriever, **args).query(q)
    qe = RefragQueryEngine.from_args(
        retriever, llm=make_llm(engine), policy="relevance", expand_fraction=0.25, streaming=True
    )

    async def main():
        response = await qe.aquery(q)
        pieces = [t async for t in response.async_response_gen()]
        return response, pieces

    response, pieces = asyncio.run(main())
    assert len(pieces) > 1 and "".join(pieces) == plain.response
    [s] = response.metadata["refrag_stats"]
    assert s.chunks_compressed > 0 and s.expanded == plain.metadata["refrag_stats"][0].expanded
