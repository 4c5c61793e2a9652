"""The LangChain adapters on the real offline default models (marked ``integration``).

The standard LCEL RAG chain over real NQ passages (training split) with the SmolLM2 chat
template, and the cookbook notebook executed end to end. With the untrained projector the
compressed answers are noise, so these tests check what is true regardless: passages are found
inside the real chat template's rendering, compressed, and streaming equals invoke.
"""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_chroma")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402

pytestmark = pytest.mark.integration

COOKBOOK = Path(__file__).resolve().parents[1] / "cookbook" / "langchain_rag.ipynb"
N_PASSAGES = 12


def format_docs(docs):
    return "\n\n".join(doc.page_content for doc in docs)


class LastMessage(BaseCallbackHandler):
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()

    def on_llm_end(self, response, **kwargs: Any) -> None:
        with self.lock:
            self.messages.append(response.generations[0][0].message)


@pytest.fixture(scope="module")
def engine():
    """A private default engine: this module registers passages, which must not leak into the
    session-wide ``default_engine`` other modules use."""
    from refrag_integrations import RefragEngine

    return RefragEngine.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def nq_rows(shared_data) -> list[dict]:
    rows = []
    with gzip.open(shared_data / "nq-open-oracle.jsonl.gz", "rt") as f:
        for line in f:  # the first lines are in the agreed training split (1-2000)
            rows.append(json.loads(line))
            if len(rows) == N_PASSAGES:
                break
    return rows


def test_standard_chain_on_the_default_models(engine, nq_rows):
    from langchain_chroma import Chroma

    from refrag_integrations.langchain import ChatRefrag, LocalEmbeddings, RefragRetriever

    texts = [r["ctxs"][0]["text"] for r in nq_rows]
    store = Chroma.from_texts(texts, LocalEmbeddings(), collection_name=f"nq-{uuid.uuid4().hex}")
    retriever = RefragRetriever(base_retriever=store.as_retriever(search_kwargs={"k": 3}), engine=engine,
                                policy="relevance", expand_fraction=0.25)
    llm = ChatRefrag(engine=engine, max_tokens=12)
    prompt = ChatPromptTemplate.from_template(
        "Answer the question using the passages.\n\n{context}\n\nQuestion: {question}"
    )
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()

    question = nq_rows[0]["question"]
    docs = retriever.invoke(question)
    assert texts[0] in [d.page_content for d in docs]  # MiniLM finds the gold passage
    handler = LastMessage()
    answer = chain.invoke(question, config={"callbacks": [handler]})
    assert isinstance(answer, str) and answer.strip()
    stats = handler.messages[-1].response_metadata["refrag"]
    # All three passages were found in the SmolLM2 chat template's rendering and compressed
    # per the retriever's decisions (a quarter of the chunks kept as tokens).
    assert stats["chunks"] == sum(d.metadata["refrag_chunks"] for d in docs)
    assert stats["expanded"] == [d.metadata["refrag_expanded"] for d in docs]
    assert stats["chunks_expanded"] == int(0.25 * stats["chunks"])
    assert stats["positions"] < stats["prompt_tokens"]
    assert handler.messages[-1].usage_metadata["input_tokens"] == stats["positions"]
    assert stats["trained"] == engine.trained

    assert "".join(chain.stream(question)) == answer

    # The same chain with an ordinary retriever and full-context decoding reads every token.
    baseline = ({"context": store.as_retriever(search_kwargs={"k": 3}) | format_docs,
                 "question": RunnablePassthrough()} | prompt | ChatRefrag(engine=engine, policy="all", max_tokens=12)
                | StrOutputParser())
    baseline.invoke(question, config={"callbacks": [handler]})
    base = handler.messages[-1].response_metadata["refrag"]
    assert base["positions"] == base["prompt_tokens"] > stats["positions"]


def test_cookbook_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(COOKBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(COOKBOOK.parent)}}
    ).execute()  # raises CellExecutionError on any failing cell; nothing is written back
    out = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "ordinary RAG            : median TTFT" in out and "REFRAG default, cached  : median TTFT" in out
    assert "REFRAG default, uncached: median TTFT" in out
    assert out.count("  ordinary RAG: ") == out.count("  REFRAG      : ") == 8  # the 8 shipped questions
    assert "<Figure" in out  # the TTFT / quality plot
    assert "trained projector:" in out
    if "trained projector: False" in out:
        assert "UNTRAINED" in out
