"""Micro-batching of concurrent requests (issue 17 item 4) on the tiny random models.

Concurrent single requests share one left-padded prefill and a batched decode, and every answer
equals the one the same request gets alone; per-request stats stay per request; sampled requests
are never grouped; LangChain ``batch`` / ``abatch`` go through one batched call.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from refrag_integrations import RefragEngine
from refrag_integrations.batching import MicroBatcher
from tiny import DecoderCalls

# Real sentences (WikiText-2, CC BY-SA 3.0).
PASSAGES = [
    "Robert Boulter is an English film, television and theatre actor.",
    "He had a guest starring role on the television series The Bill in 2000.",
    "This was followed by a starring role in the play Herons written by Simon Stephens.",
    "Gustave Eiffel designed the tower in Paris, France.",
]
QUESTIONS = ["Who designed the tower?", "Which play did Simon Stephens write?", "When was Boulter in The Bill?",
             "Who is Robert Boulter?"]
POLICIES = ["none", "all", [[True, False] + [False] * 20], "relevance"]
# 16 different requests: questions x passage subsets x policies (rows of different lengths).
REQUESTS = [
    (QUESTIONS[i % 4], PASSAGES[: 1 + (i // 4)] if i % 3 else PASSAGES[i % 4 :], POLICIES[(i // 4) % 4])
    for i in range(16)
]
MAX_NEW = 8


@pytest.fixture()
def engine(tiny_dirs):
    """A private engine: these tests wrap its decoder and change its batcher. Its random decoder's
    weights are scaled up: at their initial scale every prompt gets the same answer, which could
    not reveal one request receiving another's tokens."""
    import torch

    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    with torch.no_grad():
        for name, param in engine.decoder.named_parameters():
            if "norm" not in name:
                param.mul_(16.0)
    return engine


def _policy(engine, passages, policy):
    """Explicit decisions sized to the passages (the table above gives a pattern)."""
    if isinstance(policy, list):
        return [[i == 0 for i in range(len(engine.chunk(p)))] for p in passages]
    return policy


def hold_batcher(engine, queued: int):
    """Keep the batcher busy with one request, paused at its first decoder call, until ``queued``
    requests wait behind it: they then share the next batch whatever the timing of their threads
    (a request reaching an idle batcher would run at once, alone). Returns the decoder-call
    recorder, whose first prefill is the holding request's, and the holding thread."""
    calls = DecoderCalls(engine, pause_after=0)
    holder = threading.Thread(
        target=engine.generate, args=(QUESTIONS[0], PASSAGES[:1]), kwargs={"policy": "none", "max_new_tokens": 1}
    )
    holder.start()
    deadline = time.monotonic() + 60
    while not calls.sizes and time.monotonic() < deadline:  # the holder is decoding (paused)
        time.sleep(0.002)

    def release() -> None:
        while engine.batcher.queued < queued and time.monotonic() < deadline:
            time.sleep(0.002)
        calls.resume.set()

    threading.Thread(target=release, daemon=True).start()
    return calls, holder


def _stats(result):
    s = result.stats
    return (s.positions, s.prompt_tokens, s.chunks, s.chunks_expanded, s.expanded, s.new_tokens)


def test_sixteen_threads_share_one_batch_and_match_one_at_a_time(engine):
    engine.batcher.window_s = 0.0  # one at a time: nothing else is waiting
    alone = [
        engine.generate(q, p, policy=_policy(engine, p, pol), max_new_tokens=MAX_NEW) for q, p, pol in REQUESTS
    ]
    # A batch size of exactly 16: the batch starts once all 16 queued behind the holding request.
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, len(REQUESTS)
    calls, holder = hold_batcher(engine, len(REQUESTS))

    def ask(i: int):
        q, p, pol = REQUESTS[i]
        return engine.generate(q, p, policy=_policy(engine, p, pol), max_new_tokens=MAX_NEW)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(ask, range(len(REQUESTS))))
    holder.join()
    assert calls.prefills == [1, len(REQUESTS)]  # the holder's, then one left-padded prefill for all 16
    assert len(calls.sizes) - 1 <= MAX_NEW  # and one batched decode, not 16
    assert len({r.stats.positions for r in alone}) > 3  # rows of different lengths: really padded
    assert len({tuple(r.token_ids) for r in alone}) > 3  # different answers, each compared below
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a.token_ids and t.text == a.text, f"request {i} differs when batched"
        assert t.finish_reason == a.finish_reason
        assert _stats(t) == _stats(a), f"request {i}: stats of another request"
        assert 0 < t.stats.ttft_s <= t.stats.total_s


def test_sampled_requests_run_alone_and_keep_their_samples(engine):
    engine.batcher.window_s = 0.0
    greedy = [(q, PASSAGES[:2], {}) for q in QUESTIONS]
    sampled = [(QUESTIONS[0], PASSAGES[:1], {"do_sample": True, "temperature": 1.0, "seed": s}) for s in (1, 2)]
    requests = greedy + sampled
    alone = [engine.generate(q, p, policy="none", max_new_tokens=MAX_NEW, **g).token_ids for q, p, g in requests]
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, len(greedy)
    calls, holder = hold_batcher(engine, len(requests))

    def ask(i: int):
        q, p, g = requests[i]
        return engine.generate(q, p, policy="none", max_new_tokens=MAX_NEW, **g).token_ids

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, range(len(requests))))
    holder.join()
    assert together == alone
    assert sorted(calls.prefills[1:]) == [1, 1, len(greedy)]


def test_different_settings_are_not_mixed(engine):
    """Requests with another max_new_tokens or stop strings get their own batch, and their answers."""
    engine.batcher.window_s = 0.0
    settings = [{"max_new_tokens": 4}, {"max_new_tokens": 4}, {"max_new_tokens": 6}, {"max_new_tokens": 4, "stop": ["e"]}]
    alone = [engine.generate(QUESTIONS[0], PASSAGES[:2], policy="none", **g) for g in settings]
    calls = DecoderCalls(engine)
    engine.batcher.window_s, engine.batcher.max_batch_size = 0.5, len(settings)
    start = threading.Barrier(len(settings))

    def ask(i: int):
        start.wait()
        return engine.generate(QUESTIONS[0], PASSAGES[:2], policy="none", **settings[i])

    with ThreadPoolExecutor(len(settings)) as pool:
        together = list(pool.map(ask, range(len(settings))))
    assert [(r.text, r.finish_reason) for r in together] == [(r.text, r.finish_reason) for r in alone]
    assert max(calls.prefills) <= 2 and sum(calls.prefills) == len(settings)


def test_a_bad_request_fails_alone(engine):
    """A request too long for the decoder's window is refused in its own thread; the others of
    its batch are answered."""
    engine.batcher.window_s = 0.0
    ok = engine.generate(QUESTIONS[0], PASSAGES[:1], policy="none", max_new_tokens=4).text
    engine.batcher.window_s = 0.3
    start = threading.Barrier(3)

    def ask(i: int):
        start.wait()
        return engine.generate(QUESTIONS[0], PASSAGES[:1], policy="none", max_new_tokens=4 if i else 5000).text

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, i) for i in range(3)]
        with pytest.raises(ValueError, match="context window"):
            futures[0].result()
        assert [f.result() for f in futures[1:]] == [ok, ok]


@pytest.mark.parametrize(
    "window, size, error, match",
    [(-1, 4, ValueError, "window_s must be >= 0"), (float("nan"), 4, ValueError, "window_s"),
     ("5ms", 4, TypeError, "number of seconds"), (0.01, 0, ValueError, "max_batch_size must be >= 1"),
     (0.01, 2.5, TypeError, "max_batch_size must be an int")],
)
def test_batch_settings_are_checked(window, size, error, match):
    with pytest.raises(error, match=match):
        MicroBatcher(lambda *a, **k: [], window_s=window, max_batch_size=size)


def test_ignore_eos_decodes_exactly_max_new_tokens_and_is_not_mixed(engine):
    """What the throughput benchmark relies on: with ignore_eos an EOS is one more token; such a
    request never shares a batch with requests that stop at EOS."""
    eos = engine.tokenizer.eos_token_id
    prepared = [engine.prepare_rag(QUESTIONS[0], PASSAGES[:1], "none") for _ in range(2)]
    engine.batcher.window_s, engine.batcher.max_batch_size = 0.05, 2  # no batch fills: each waits the window
    calls, holder = hold_batcher(engine, 2)
    calls.force = eos  # every next token is EOS (the holder's single token too)

    def ask(i: int):
        return engine.generate_prepared([prepared[i]], max_new_tokens=5, ignore_eos=bool(i))[0]

    with ThreadPoolExecutor(2) as pool:
        stops, fixed = pool.map(ask, range(2))
    holder.join()
    assert stops.token_ids == [] and stops.finish_reason == "stop"
    assert fixed.token_ids == [eos] * 5 and fixed.stats.new_tokens == 5 and fixed.finish_reason == "length"
    assert calls.prefills == [1, 1, 1]  # the holder's, then each alone: different EOS rules


# --------------------------------------------------------------------------- the batcher itself


class Recorder:
    """A batch-running function for a bare MicroBatcher: records each batch's rows; with ``gate``
    set, every batch waits for ``gate`` before it returns (so a test can queue requests behind it)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.gate = gate

    def __call__(self, prepared, *, t_start, on_text, cancel, **gen):
        self.batches.append(list(prepared))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(60)
        return [f"answer to {p}" for p in prepared]


def test_a_request_reaching_an_idle_batcher_does_not_wait_the_window():
    run = Recorder()
    batcher = MicroBatcher(run, window_s=10.0, max_batch_size=4)  # a wait would take 10 s
    t0 = time.monotonic()
    assert batcher.submit("q", t_start=0.0) == "answer to q"
    assert time.monotonic() - t0 < 5.0  # returned long before the window would have ended
    assert run.batches == [["q"]]


def test_requests_that_queue_behind_a_batch_still_share_the_next_one():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = MicroBatcher(run, window_s=30.0, max_batch_size=3)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, "a", t_start=0.0)
        assert run.started.wait(60)
        rest = [pool.submit(batcher.submit, x, t_start=0.0) for x in "bcd"]
        deadline = time.monotonic() + 60
        while batcher.queued < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        gate.set()
        assert [f.result() for f in [first, *rest]] == [f"answer to {x}" for x in "abcd"]
    assert run.batches[0] == ["a"] and sorted(run.batches[1]) == ["b", "c", "d"]


def test_an_announced_request_is_waited_for():
    """A request being prepared (announced with preparing()) is not idle time: the queued one
    waits the window for it, and they share a batch."""
    run = Recorder()
    batcher = MicroBatcher(run, window_s=60.0, max_batch_size=2)
    announced, prepared = threading.Event(), threading.Event()

    def late_request() -> str:
        with batcher.preparing():
            announced.set()
            prepared.wait(60)  # still preparing when the other request arrives
            return batcher.submit("b", t_start=0.0)

    with ThreadPoolExecutor(2) as pool:
        late = pool.submit(late_request)
        assert announced.wait(60)
        early = pool.submit(batcher.submit, "a", t_start=0.0)
        deadline = time.monotonic() + 60
        while batcher.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        prepared.set()
        assert (early.result(), late.result()) == ("answer to a", "answer to b")
    assert [sorted(b) for b in run.batches] == [["a", "b"]]


def test_a_burst_shares_one_batch_and_stops_waiting_when_the_last_preparation_ends():
    """Four requests announced together, prepared at different speeds: the first to arrive waits
    for the others (not only the window's first moments) and runs as soon as the last one is
    submitted, long before the window ends (the batch is not full, so only that ends the wait)."""
    run = Recorder()
    batcher = MicroBatcher(run, window_s=60.0, max_batch_size=8)
    announced = threading.Barrier(4)

    def request(i: int) -> str:
        with batcher.preparing():
            announced.wait(60)  # all four are being prepared before any is submitted
            time.sleep(0.1 * i)  # the preparations end one after another
            return batcher.submit(f"q{i}", t_start=0.0)

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(request, range(4)))
    assert time.monotonic() - t0 < 30.0  # not the 60 s window
    assert answers == [f"answer to q{i}" for i in range(4)]
    assert [sorted(b) for b in run.batches] == [["q0", "q1", "q2", "q3"]]


def test_an_announcement_that_is_never_submitted_is_withdrawn():
    run = Recorder()
    batcher = MicroBatcher(run, window_s=10.0, max_batch_size=4)
    with pytest.raises(KeyError):
        with batcher.preparing():
            raise KeyError("preparation failed")
    t0 = time.monotonic()
    assert batcher.submit("q", t_start=0.0) == "answer to q"  # idle again: no wait
    assert time.monotonic() - t0 < 5.0


def test_the_batcher_does_not_keep_a_dropped_engine_alive(tiny_dirs):
    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    engine.generate(QUESTIONS[0], PASSAGES[:1], policy="none", max_new_tokens=2)
    batcher, alive = engine.batcher, weakref.ref(engine)
    gc.disable()  # the batcher makes no reference cycle: dropping the engine frees it at once
    try:
        del engine
        assert alive() is None
    finally:
        gc.enable()
    gc.collect()
    assert alive() is None
    with pytest.raises(ReferenceError, match="engine is gone"):
        batcher.submit("q", t_start=0.0)


def test_batch_settings_changed_later_are_checked(engine):
    engine.batcher.max_batch_size = 0
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        engine.generate(QUESTIONS[0], PASSAGES[:1], policy="none", max_new_tokens=2)


# --------------------------------------------------------------------------- LangChain


def test_langchain_llm_batch_is_one_batched_call(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import RefragLLM

    llm = RefragLLM(engine=engine, max_tokens=MAX_NEW)
    prompts = [f"{p}\nQuestion: {q}\nAnswer:" for p, q in zip(PASSAGES, QUESTIONS)]
    alone = [llm.invoke(p) for p in prompts]
    calls = DecoderCalls(engine)
    assert llm.batch(prompts) == alone
    assert calls.prefills == [len(prompts)]


def prepare_together(engine, n: int) -> None:
    """Make the engine's public ``prepare`` hold each caller until ``n`` callers are inside it (so
    all ``n`` requests are announced before any is submitted, whatever the threads' timing)."""
    inside, original = threading.Barrier(n), engine.prepare

    def prepare(*args, **kwargs):
        inside.wait(60)
        return original(*args, **kwargs)

    engine.prepare = prepare


def test_concurrent_chat_model_calls_share_one_batch_without_waiting_out_the_window(engine):
    """ChatRefrag announces each request while it prepares it: concurrent invokes share one
    prefill, and the batch starts when the last one is prepared, not when the window ends."""
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    llm = ChatRefrag(engine=engine, max_tokens=MAX_NEW)
    prompts = [f"{p}\n\nQuestion: {q}" for p, q in zip(PASSAGES, QUESTIONS)]
    engine.batcher.window_s = 0.0
    alone = [llm.invoke(p).content for p in prompts]
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, 2 * len(prompts)  # never full
    prepare_together(engine, len(prompts))
    calls = DecoderCalls(engine)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: llm.invoke(p).content, prompts))
    assert time.monotonic() - t0 < 30.0
    assert together == alone
    assert calls.prefills == [len(prompts)]


async def test_langchain_chat_abatch_shares_a_batch(engine):
    pytest.importorskip("langchain_core")
    from refrag_integrations.langchain import ChatRefrag

    llm = ChatRefrag(engine=engine, max_tokens=MAX_NEW)
    prompts = [f"{p}\n\nQuestion: {q}" for p, q in zip(PASSAGES, QUESTIONS)]
    engine.batcher.window_s = 0.0
    alone = [(await llm.ainvoke(p)).content for p in prompts]
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, len(prompts)
    calls, holder = hold_batcher(engine, len(prompts))
    together = await llm.abatch(prompts, config={"max_concurrency": len(prompts)})
    holder.join()
    assert [m.content for m in together] == alone
    assert calls.prefills == [1, len(prompts)]
    assert all(m.usage_metadata["output_tokens"] == MAX_NEW or m.response_metadata["finish_reason"] == "stop"
               for m in together)


# --------------------------------------------------------------------------- LlamaIndex


def test_concurrent_llama_index_calls_share_one_batch_without_waiting_out_the_window(engine):
    pytest.importorskip("llama_index.core")
    from refrag_integrations.llama_index import RefragLLM

    llm = RefragLLM(engine=engine, max_new_tokens=MAX_NEW)
    prompts = [f"{p}\nQuestion: {q}\nAnswer:" for p, q in zip(PASSAGES, QUESTIONS)]
    engine.batcher.window_s = 0.0
    alone = [llm.complete(p, formatted=True).text for p in prompts]
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, 2 * len(prompts)
    prepare_together(engine, len(prompts))
    calls = DecoderCalls(engine)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: llm.complete(p, formatted=True).text, prompts))
    assert time.monotonic() - t0 < 30.0
    assert together == alone
    assert calls.prefills == [len(prompts)]


async def test_llama_index_concurrent_acomplete_share_a_batch(engine):
    """What an async synthesizer (use_async=True) does: concurrent acomplete calls."""
    pytest.importorskip("llama_index.core")
    import asyncio

    from refrag_integrations.llama_index import RefragLLM

    llm = RefragLLM(engine=engine, max_new_tokens=MAX_NEW)
    prompts = [f"{p}\nQuestion: {q}\nAnswer:" for p, q in zip(PASSAGES, QUESTIONS)]
    engine.batcher.window_s = 0.0
    alone = [(await llm.acomplete(p, formatted=True)).text for p in prompts]
    engine.batcher.window_s, engine.batcher.max_batch_size = 60.0, len(prompts)
    calls, holder = hold_batcher(engine, len(prompts))
    together = await asyncio.gather(*(llm.acomplete(p, formatted=True) for p in prompts))
    holder.join()
    assert [r.text for r in together] == alone
    assert calls.prefills == [1, len(prompts)]
    assert [r.additional_kwargs["refrag_stats"]["positions"] for r in together] == [
        len(engine.tokenize(p, add_special_tokens=True)) for p in prompts
    ]
