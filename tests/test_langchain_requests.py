"""LangChain adapters: arguments that are honoured or refused, the engine shared with the
retriever, passages found despite a whitespace-normalising ``format_docs``, registrations scoped
to their request (chat history of a later turn, 16 concurrent requests sharing passages), and
empty prompts (issue 16 section 3, issue 18 FAIL 4). Tiny random models: mechanics, not answers.
"""

from __future__ import annotations

import gc
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402

import refrag_integrations.shared as shared  # noqa: E402
from refrag_integrations import RefragEngine  # noqa: E402
from refrag_integrations.langchain import ChatRefrag, RefragCompressor, RefragLLM, RefragRetriever  # noqa: E402

# Real sentences (WikiText-2, CC BY-SA 3.0), with the line breaks and double spaces of a raw file.
PASSAGES = [
    "Robert Boulter is an English film,\ntelevision and  theatre actor.",
    "He had a guest starring role on the television\nseries The Bill in 2000.",
    "This was followed by a starring role in the play Herons written by Simon Stephens.",
]
OTHER = "Gustave Eiffel designed the tower in Paris, France."
TEMPLATE = "Answer the question using the passages.\n\n{context}\n\nQuestion: {question}"


class ListRetriever(BaseRetriever):
    docs: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return list(self.docs)


class LastMessage(BaseCallbackHandler):
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()

    def on_llm_end(self, response, **kwargs: Any) -> None:
        with self.lock:
            self.messages.append(response.generations[0][0].message)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def chain_of(retriever, llm, fmt=format_docs):
    prompt = ChatPromptTemplate.from_template(TEMPLATE)
    inputs = {"context": retriever | RunnableLambda(fmt), "question": RunnablePassthrough()}
    return inputs | prompt | llm | StrOutputParser()


@pytest.fixture(scope="module")
def engine(tiny_chat_dirs) -> RefragEngine:
    dec, enc = tiny_chat_dirs  # policy "none": an untrained engine would default to "all" (nothing compressed)
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


def chunks(engine: RefragEngine, *texts: str) -> int:
    return sum(len(engine.chunk(t)) for t in texts)


# --------------------------------------------------------------------------- arguments


def test_unknown_arguments_raise_and_name_the_right_one(engine):
    with pytest.raises(TypeError, match=r"max_new_tokens=; use max_tokens="):
        ChatRefrag(engine=engine, max_new_tokens=5)
    with pytest.raises(TypeError, match=r"max_new_tokens=; use max_tokens="):
        RefragLLM(engine=engine, max_new_tokens=5)
    with pytest.raises(TypeError, match=r"temprature=; use temperature="):
        ChatRefrag(engine=engine, temprature=0.5)
    with pytest.raises(TypeError, match=r"RefragRetriever got an unknown argument search_type="):
        RefragRetriever(base_retriever=ListRetriever(docs=[]), engine=engine, search_type="mmr")
    with pytest.raises(TypeError, match=r"RefragCompressor"):
        RefragCompressor(engine=engine, top_n=3)
    # max_tokens, the right name, takes effect
    msg = ChatRefrag(engine=engine, max_tokens=3, temperature=1.0, seed=1).invoke("Hello")
    assert msg.response_metadata["refrag"]["new_tokens"] <= 3 and msg.response_metadata["finish_reason"] == "length"


def test_deprecated_names_still_work_with_a_warning(engine):
    with pytest.warns(DeprecationWarning, match="budget"):
        compressor = RefragCompressor(engine=engine, budget=0.25)
    assert compressor.expand_fraction == 0.25
    with pytest.warns(DeprecationWarning, match="expand"):
        assert ChatRefrag(engine=engine, expand="all").policy == "all"


def test_model_selects_the_decoder_or_is_refused(engine, tiny_chat_dirs):
    dec = str(tiny_chat_dirs[0])
    llm = ChatRefrag(model=dec, encoder=str(tiny_chat_dirs[1]), chunk_size=4, device="cpu")
    assert llm.decoder == dec and llm.resolved_model_name == dec  # what the adapter will load
    with pytest.raises(ValueError, match="disagree"):
        ChatRefrag(model=dec, decoder="another-decoder")
    with pytest.raises(ValueError, match="another decoder than the engine's"):
        ChatRefrag(engine=engine, model="another-decoder")
    same = ChatRefrag(engine=engine, model=str(engine.config.decoder))  # the engine's own: accepted
    assert same.engine is engine and same.decoder is None
    with pytest.raises(ValueError, match="cannot switch"):
        same.invoke("Hello", model="another-decoder")


def test_empty_prompts_are_refused(engine):
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            ChatRefrag(engine=engine).invoke(bad)
        with pytest.raises(ValueError, match="prompt is empty"):
            RefragLLM(engine=engine).invoke(bad)
    with pytest.raises(ValueError, match="prompt is empty"):
        ChatRefrag(engine=engine).invoke([SystemMessage(""), HumanMessage(" ")])


# --------------------------------------------------------------------------- the engine is shared


@pytest.mark.parametrize("chat_first", [True, False])
def test_retriever_engine_is_shared_with_a_chat_model_without_one(engine, monkeypatch, chat_first):
    monkeypatch.setattr(shared, "_ENGINES", {})
    base = ListRetriever(docs=[Document(PASSAGES[2])])
    if chat_first:
        llm = ChatRefrag(max_tokens=2)
        retriever = RefragRetriever(base_retriever=base, engine=engine, policy="none")
    else:
        retriever = RefragRetriever(base_retriever=base, engine=engine, policy="none")
        llm = ChatRefrag(max_tokens=2)
    handler = LastMessage()
    question = f"Which play did Simon Stephens write ({chat_first})?"
    chain_of(retriever, llm).invoke(question, config={"callbacks": [handler]})
    meta = handler.messages[-1].response_metadata
    assert shared.loaded_shared_engines() == 0, "a second engine was loaded"
    assert meta["refrag_passages"] == {"registered": 1, "found": 1, "compressed": 1}
    assert meta["refrag"]["chunks_compressed"] == chunks(engine, PASSAGES[2])


def test_chat_model_naming_another_engine_is_refused(engine, monkeypatch):
    gc.collect()  # engines of earlier test modules that some other reference cycle still holds
    monkeypatch.setattr(shared, "_ENGINES", {})
    base = ListRetriever(docs=[Document(PASSAGES[2])])
    retriever = RefragRetriever(base_retriever=base, engine=engine, policy="none")
    llm = ChatRefrag(decoder="some-other-decoder", max_tokens=2)
    with pytest.raises(ValueError, match="registered on 1 other RefragEngine"):
        chain_of(retriever, llm).invoke("Who wrote Herons, asked of another engine?")
    assert shared.loaded_shared_engines() == 0  # refused before loading anything


# --------------------------------------------------------------------------- finding passages


def test_whitespace_normalising_format_docs_still_compresses(engine):
    docs = [Document(p) for p in PASSAGES]
    retriever = RefragRetriever(base_retriever=ListRetriever(docs=docs), engine=engine, policy="none")
    handler = LastMessage()
    flat = lambda ds: "\n".join(" ".join(d.page_content.split()) for d in ds)  # noqa: E731
    chain_of(retriever, ChatRefrag(engine=engine, max_tokens=2), flat).invoke(
        "Who is Robert Boulter?", config={"callbacks": [handler]}
    )
    meta = handler.messages[-1].response_metadata
    assert meta["refrag_passages"] == {"registered": 3, "found": 3, "compressed": 3}
    normalised = [" ".join(p.split()) for p in PASSAGES]
    assert meta["refrag"]["chunks"] == meta["refrag"]["chunks_compressed"] == chunks(engine, *normalised)


def test_warns_when_registered_passages_are_not_in_the_prompt(engine):
    retriever = RefragRetriever(base_retriever=ListRetriever(docs=[Document(OTHER)]), engine=engine, policy="none")
    handler = LastMessage()
    shout = lambda ds: "\n".join(d.page_content.upper() for d in ds)  # noqa: E731
    with pytest.warns(UserWarning, match="none was found in the prompt"):
        chain_of(retriever, ChatRefrag(engine=engine, max_tokens=2), shout).invoke(
            "Who designed the tower in Paris?", config={"callbacks": [handler]}
        )
    meta = handler.messages[-1].response_metadata
    assert meta["refrag_passages"] == {"registered": 1, "found": 0, "compressed": 0}
    assert meta["refrag"]["chunks"] == 0
    with warnings.catch_warnings():  # a prompt unrelated to any registration: no warning
        warnings.simplefilter("error")
        ChatRefrag(engine=engine, max_tokens=2).invoke("Hello there")


# --------------------------------------------------------------------------- scoped to the request


def test_passage_of_an_earlier_turn_stays_tokens_in_the_history(engine):
    llm = ChatRefrag(engine=engine, max_tokens=3)
    q1, q2 = "Who is Robert Boulter, in turn one?", "Who designed the tower, in turn two?"
    RefragCompressor(engine=engine, policy="none").compress_documents([Document(PASSAGES[0])], q1)
    turn1 = HumanMessage(f"{PASSAGES[0]}\n\nQuestion: {q1}")
    first = llm.invoke([turn1])
    assert first.response_metadata["refrag"]["chunks_compressed"] == chunks(engine, PASSAGES[0])

    # Turn 2 retrieves another passage; turn 1's passage is only in the history.
    RefragCompressor(engine=engine, policy="none").compress_documents([Document(OTHER)], q2)
    history = [turn1, AIMessage(first.content)]
    second = llm.invoke([*history, HumanMessage(f"{OTHER}\n\nQuestion: {q2}")])
    assert second.response_metadata["refrag"]["chunks"] == chunks(engine, OTHER)
    assert second.response_metadata["refrag_passages"]["found"] == 1

    # A follow-up without retrieval: nothing of this turn was registered, the history stays tokens.
    third = llm.invoke([*history, AIMessage("..."), HumanMessage("And what else?")])
    assert third.response_metadata["refrag"]["chunks"] == 0


def test_sixteen_concurrent_requests_sharing_passages_match_sequential(engine):
    """Issue 18 FAIL 4: with a query-aware policy, each request keeps its own decisions."""
    docs = [Document(p) for p in PASSAGES]
    retriever = RefragRetriever(
        base_retriever=ListRetriever(docs=docs), engine=engine, policy="relevance", expand_fraction=0.3
    )
    subjects = ["Boulter", "The Bill", "Herons", "Simon Stephens", "television", "theatre", "2000", "play"]
    questions = [f"{kind} {s}?" for s in subjects for kind in ("What about", "Tell me of")]
    assert len(set(questions)) == 16
    llm = ChatRefrag(engine=engine, max_tokens=4)

    def run(q: str, barrier: threading.Barrier | None = None) -> tuple[str, list]:
        handler = LastMessage()

        def fmt(ds):
            if barrier is not None:
                barrier.wait(timeout=120)  # every request registers before any generates
            return format_docs(ds)

        answer = chain_of(retriever, llm, fmt).invoke(q, config={"callbacks": [handler]})
        return answer, handler.messages[-1].response_metadata["refrag"]["expanded"]

    sequential = [run(q) for q in questions]
    decisions = {str(expanded) for _, expanded in sequential}
    assert len(decisions) > 1, "the questions should get different decisions for the shared passages"
    barrier = threading.Barrier(16)
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda q: run(q, barrier), questions))
    assert concurrent == sequential
