"""langchain-tests standard suites for the LangChain adapters.

Unit and integration chat-model suites and the retriever integration suite run on the tiny random
models (fast, offline). The chat-model integration suite runs once more on the real default
decoder (marked ``integration``), since only a real model says something a user would read.

Unsupported features are declared through the suites' properties rather than xfailed: a local
decoder without tool-calling training has no tool calling, tool choice, structured output or JSON
mode, reads text only (no image / audio / PDF inputs), and serves one decoder per instance (no
per-call model override).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
pytest.importorskip("langchain_chroma")

from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from refrag_integrations.langchain import ChatRefrag, RefragRetriever  # noqa: E402

# Real sentences (WikiText-2, CC BY-SA 3.0) for the tiny retriever corpus.
PASSAGES = [
    "Robert Boulter is an English film, television and theatre actor.",
    "He had a guest starring role on the television series The Bill in 2000.",
    "This was followed by a starring role in the play Herons written by Simon Stephens.",
    "He had a guest role in the television series Judge John Deed in 2002.",
    "Gustave Eiffel designed the tower in Paris, France.",
    "He was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur.",
]


@pytest.fixture(scope="module")
def lc_engine(tiny_chat_dirs):
    """A private tiny engine: the retriever suite registers passages, which must not leak into
    other test modules through the session-wide engine."""
    from refrag_integrations import RefragEngine

    dec, enc = tiny_chat_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")


class _OnEngine:
    """Puts the module's tiny chat engine where the suites' properties can read it."""

    engine: Any = None

    @pytest.fixture(autouse=True)
    def _use_engine(self, lc_engine) -> None:
        type(self).engine = lc_engine


class _Unsupported:
    """What a local REFRAG decoder does not do; declared, not xfailed."""

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        """A local decoder has no network timeout and no retries; ChatRefrag refuses unknown
        arguments (``timeout=``, ``max_retries=``) instead of ignoring them."""
        return {"temperature": 0, "max_tokens": 100, "stop": []}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatRefragUnit(_OnEngine, _Unsupported, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatRefrag]:
        return ChatRefrag

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self.engine}


class TestChatRefragIntegrationTiny(_OnEngine, _Unsupported, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatRefrag]:
        return ChatRefrag

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self.engine, "max_tokens": 6}


@pytest.mark.integration
class TestChatRefragIntegrationDefault(_Unsupported, ChatModelIntegrationTests):
    engine: Any = None

    @pytest.fixture(autouse=True)
    def _use_engine(self, default_engine) -> None:
        type(self).engine = default_engine

    @property
    def chat_model_class(self) -> type[ChatRefrag]:
        return ChatRefrag

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": self.engine, "max_tokens": 12}


class TestRefragRetriever(_OnEngine, RetrieversIntegrationTests):
    _base: Any = None

    @pytest.fixture(autouse=True)
    def _use_base(self) -> None:
        if type(self)._base is None:
            from langchain_chroma import Chroma

            store = Chroma.from_texts(
                PASSAGES, DeterministicFakeEmbedding(size=16), collection_name=f"refrag-test-{uuid.uuid4().hex}"
            )
            type(self)._base = store.as_retriever(search_kwargs={"k": 4})

    @property
    def retriever_constructor(self) -> type[RefragRetriever]:
        return RefragRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"base_retriever": self._base, "engine": self.engine, "policy": "none"}

    @property
    def retriever_query_example(self) -> str:
        return "Who designed the tower in Paris?"
