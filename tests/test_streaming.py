"""Streaming on the tiny random models (issue 18): an abandoned stream stops decoding, and pieces
never split a multi-byte character.

Abandoned streams: the decoder's next token is forced to an ASCII token, so the first piece comes
from the prefill; the decoder pauses at its first decode step until the test has closed the
stream; then it counts the decoder forwards the stream made. Without cancellation a stream would
run all ``max_new_tokens`` steps, and the next request would wait for them.
"""

from __future__ import annotations

import asyncio

import pytest

from refrag_integrations import RefragEngine
from tiny import DecoderCalls

PASSAGES = ["Gustave Eiffel designed the tower in Paris, France.", "Robert Boulter is an English film actor."]
QUESTION = "Who designed the tower?"
LONG = 200  # max_new_tokens of the abandoned streams
STREAM_STEPS = 2  # the prefill, and the decode step that was running when the stream was closed
JAPANESE = "日本語の質問です"


@pytest.fixture()
def engine(tiny_chat_dirs):
    """A private engine (the tests wrap its decoder); chat template, so both adapters work."""
    dec, enc = tiny_chat_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")


def paused(engine) -> DecoderCalls:
    """Every next token is 'a' (a piece per token); the first decode step waits for ``resume``."""
    return DecoderCalls(engine, force=engine.tokenizer.convert_tokens_to_ids("a"), pause_after=1)


def engine_released(engine, calls: DecoderCalls) -> int:
    """Resume the decoder, run one more request (it waits for the engine), and return how many
    forwards the abandoned stream made."""
    calls.resume.set()
    engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=1)  # 1 forward, after the stream's
    return len(calls.sizes) - 1


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("how", ["close", "with", "drop"])
def test_closed_engine_stream_stops_decoding(engine, how):
    calls = paused(engine)
    stream = engine.stream(QUESTION, PASSAGES, policy="none", max_new_tokens=LONG)
    if how == "with":
        with stream:
            first = next(stream)
    else:
        first = next(stream)
        if how == "close":
            stream.close()
        else:
            del stream  # the last reference: finalised at once
    assert first == "a"
    assert engine_released(engine, calls) <= STREAM_STEPS


def test_finished_stream_is_not_cut(engine):
    calls = DecoderCalls(engine, force=engine.tokenizer.convert_tokens_to_ids("a"))
    stream = engine.stream(QUESTION, PASSAGES, policy="none", max_new_tokens=12)
    assert "".join(stream) == "a" * 12
    assert stream.result.finish_reason == "length" and stream.result.stats.new_tokens == 12
    assert len(calls.sizes) == 12


def test_cancel_event_stops_generate_prepared(engine):
    import threading

    calls = paused(engine)
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(_: int, piece: str) -> None:
        pieces.append(piece)
        cancel.set()  # the consumer leaves after its first piece

    prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
    calls.resume.set()
    result = engine.generate_prepared([prepared], on_text=on_text, cancel=cancel, max_new_tokens=LONG)[0]
    assert result.finish_reason == "cancelled" and pieces == ["a"]
    assert len(calls.sizes) == 1  # cancelled before the first decode step


# --------------------------------------------------------------------------- LangChain


def test_closed_langchain_stream_stops_decoding(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    calls = paused(engine)
    chunks = ChatRefrag(engine=engine, max_tokens=LONG).stream(QUESTION)
    assert next(chunks).content == "a"
    chunks.close()  # no gc.collect(): reference counting alone must finalise the inner generators
    assert engine_released(engine, calls) <= STREAM_STEPS


async def test_closed_langchain_astream_stops_decoding(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    calls = paused(engine)
    chunks = ChatRefrag(engine=engine, max_tokens=LONG).astream(QUESTION)
    assert (await chunks.__anext__()).content == "a"
    await chunks.aclose()
    for _ in range(10):  # let the loop run the inner generators' scheduled aclose()
        await asyncio.sleep(0)
    assert await asyncio.to_thread(engine_released, engine, calls) <= STREAM_STEPS


async def test_cancelled_langchain_astream_task_stops_decoding(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    calls = paused(engine)
    first = asyncio.Event()

    async def consume():
        async for chunk in ChatRefrag(engine=engine, max_tokens=LONG).astream(QUESTION):
            first.set()  # then waits for the second piece: the decoder is paused, so it never comes

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(engine_released, engine, calls) <= STREAM_STEPS


# --------------------------------------------------------------------------- LlamaIndex


def test_closed_llama_index_stream_stops_decoding(engine):
    pytest.importorskip("llama_index.core")
    from refrag_integrations.llama_index import RefragLLM

    calls = paused(engine)
    responses = RefragLLM(engine=engine, max_new_tokens=LONG).stream_complete(QUESTION)
    assert next(responses).delta == "a"
    responses.close()
    assert engine_released(engine, calls) <= STREAM_STEPS


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_abandoned_llama_index_astream_stops_decoding(engine, how):
    pytest.importorskip("llama_index.core")
    from refrag_integrations.llama_index import RefragLLM

    calls = paused(engine)
    llm = RefragLLM(engine=engine, max_new_tokens=LONG)
    if how == "aclose":
        responses = await llm.astream_complete(QUESTION)
        assert (await responses.__anext__()).delta == "a"
        await responses.aclose()
        for _ in range(10):
            await asyncio.sleep(0)
    else:
        first = asyncio.Event()

        async def consume():
            async for _ in await llm.astream_complete(QUESTION):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()  # while a worker thread waits for the next piece
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await asyncio.to_thread(engine_released, engine, calls) <= STREAM_STEPS


# --------------------------------------------------------------------------- multi-byte characters


def _japanese_script(engine) -> list[int]:
    ids = engine.tokenizer(JAPANESE, add_special_tokens=False)["input_ids"]
    # The tiny byte-level BPE has no Japanese merges: every character is 3 single-byte tokens.
    assert len(ids) == 3 * len(JAPANESE) and engine.tokenizer.decode(ids[:1]) == "\ufffd"
    return ids


@pytest.mark.parametrize("n", range(1, 3 * len(JAPANESE) + 1))
def test_streamed_japanese_equals_generated(engine, n):
    """Whatever token a generation ends on, pieces hold back half characters and the final text
    has none (a multi-byte character cut by max_new_tokens is left out)."""
    DecoderCalls(engine, script=_japanese_script(engine))
    full = engine.generate(JAPANESE, PASSAGES, policy="none", max_new_tokens=n)
    stream = engine.stream(JAPANESE, PASSAGES, policy="none", max_new_tokens=n)
    pieces = list(stream)
    assert full.text == JAPANESE[: n // 3]
    assert "".join(pieces) == full.text and stream.result.text == full.text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert len(full.token_ids) == n  # the ids of a cut character are kept


def test_langchain_stream_of_japanese_equals_invoke(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    llm = ChatRefrag(engine=engine, max_tokens=3 * len(JAPANESE) - 1)  # ends mid-character
    DecoderCalls(engine, script=_japanese_script(engine))
    full = llm.invoke(JAPANESE).content
    pieces = [c.content for c in llm.stream(JAPANESE)]
    assert full == JAPANESE[:-1] and "".join(pieces) == full
    assert not any("\ufffd" in p for p in pieces)
