"""The vLLM decoder backend against a fake OpenAI-compatible server (tests/fake_vllm.py) that
decodes the posted ``prompt_embeds`` with the exported tiny decoder: same answers as the
in-process engine, streaming, stop strings, the served-model check, and clear errors."""

from __future__ import annotations

import base64
import io
import json
import socket

import pytest
import torch

from fake_vllm import FakeVllmServer
from refrag_integrations.backends import resolve_backend, shared_backend
from refrag_integrations.backends.vllm_server import ServedModelMismatchError, VllmBackend, VllmBackendError
from refrag_integrations.config import DECODER_FINGERPRINT_FILE
from refrag_integrations.export import SERVED_NAME_PREFIX, decoder_fingerprint, write_decoder
from refrag_integrations.registrations import record_registration

PASSAGES = [
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the "
    "television series The Bill in 2000.",
    "Gustave Eiffel designed the tower in Paris, France. The Eiffel Tower is named after Gustave Eiffel.",
]
QUESTION = "Who is the Eiffel Tower named after?"
SETTINGS = [("all", None), ("relevance", 0.25), ("none", None)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny chat engine whose random decoder weights are scaled up, so its greedy answers depend
    on the input (at the usual init scale a tiny decoder repeats one token whatever it reads)."""
    from transformers import AutoModelForCausalLM

    from refrag_integrations import RefragEngine
    from tiny import make_tiny_models

    dec, enc = make_tiny_models(tmp_path_factory.mktemp("sharp"), chat=True)
    model = AutoModelForCausalLM.from_pretrained(dec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0)
    model.save_pretrained(dec)
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")


@pytest.fixture(scope="module")
def exported(engine, tmp_path_factory):
    return write_decoder(engine, tmp_path_factory.mktemp("export") / "decoder", checkpoint="test")


@pytest.fixture(scope="module")
def server(exported):
    srv = FakeVllmServer(exported)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def backend(server):
    b = VllmBackend(server.url)
    yield b
    b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- choosing a backend


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'vlm'.*'transformers', 'vllm'"):
        resolve_backend("vlm", "http://localhost:8000/v1")


def test_vllm_needs_a_base_url_and_transformers_refuses_one():
    with pytest.raises(ValueError, match="needs base_url"):
        resolve_backend("vllm")
    with pytest.raises(ValueError, match="backend='vllm'"):
        resolve_backend("transformers", "http://localhost:8000/v1")
    with pytest.raises(ValueError, match="http"):
        resolve_backend("vllm", "localhost:8000")
    assert resolve_backend("transformers") is None and resolve_backend(None) is None
    assert isinstance(resolve_backend("vllm", "http://h:1/v1/"), VllmBackend)
    assert resolve_backend("vllm", "http://h:1/v1/").base_url == "http://h:1/v1"


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("policy, p", SETTINGS)
def test_vllm_answers_exactly_like_the_in_process_engine(engine, backend, server, policy, p):
    local = engine.generate(QUESTION, PASSAGES, policy=policy, expand_fraction=p, max_new_tokens=12)
    prepared = engine.prepare_rag(QUESTION, PASSAGES, policy, expand_fraction=p)
    remote = engine.generate_prepared([prepared], max_new_tokens=12, backend=backend)[0]
    assert remote.text == local.text and remote.token_ids == local.token_ids
    assert remote.finish_reason == local.finish_reason
    assert remote.stats.positions == local.stats.positions and remote.stats.chunks_expanded == local.stats.chunks_expanded
    assert remote.stats.new_tokens == local.stats.new_tokens == len(local.token_ids)
    assert 0 < remote.stats.ttft_s <= remote.stats.total_s
    sent = torch.load(io.BytesIO(base64.b64decode(server.requests[-1]["prompt_embeds"])), weights_only=True)
    assert sent.dtype == torch.float32 and torch.equal(sent, prepared.embeds.float())
    assert server.requests[-1]["temperature"] == 0.0 and server.requests[-1]["max_tokens"] == 12


def test_the_answers_are_not_trivial(engine, backend):
    texts = [
        engine.generate_prepared(
            [engine.prepare_rag(QUESTION, PASSAGES, policy, expand_fraction=p)], max_new_tokens=12,
            backend=backend,
        )[0].text
        for policy, p in SETTINGS
    ]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts), (
        f"the tiny decoder's answers {texts} do not depend on the input: the equality tests prove little"
    )


def test_engine_backend_attribute_routes_generate_and_batch(engine, backend, server):
    local = engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=8)
    local_batch = engine.generate_batch(
        [{"question": QUESTION, "passages": PASSAGES, "policy": "none"}, {"question": "Who?", "passages": PASSAGES[:1]}],
        max_new_tokens=8,
    )
    before = len(server.requests)
    engine.backend = backend
    try:
        remote = engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=8)
        remote_batch = engine.generate_batch(
            [{"question": QUESTION, "passages": PASSAGES, "policy": "none"}, {"question": "Who?", "passages": PASSAGES[:1]}],
            max_new_tokens=8,
        )
    finally:
        engine.backend = None
    assert len(server.requests) == before + 3
    assert remote.text == local.text
    assert [r.text for r in remote_batch] == [r.text for r in local_batch]


def test_streaming_equals_non_streaming(engine, backend):
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "all")
    whole = engine.generate_prepared([prepared], max_new_tokens=12, backend=backend)[0]
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "all")
    stream = engine.stream_prepared(prepared, max_new_tokens=12, backend=backend)
    pieces = list(stream)
    assert "".join(pieces) == whole.text == stream.result.text
    assert len([p for p in pieces if p]) >= min(2, len(whole.token_ids))  # streamed, not one final blob
    assert stream.result.stats.ttft_s <= stream.result.stats.total_s


def test_stop_strings_cut_like_the_in_process_engine(engine, backend, server):
    full = engine.generate(QUESTION, PASSAGES, policy="all", max_new_tokens=12)
    if len(full.text.strip()) < 3:
        pytest.skip(f"the tiny decoder's answer {full.text!r} is too short to cut")
    stop = full.text.strip()[1:3]
    local = engine.generate(QUESTION, PASSAGES, policy="all", max_new_tokens=12, stop=[stop])
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "all")
    remote = engine.generate_prepared([prepared], max_new_tokens=12, stop=[stop], backend=backend)[0]
    assert server.requests[-1]["stop"] == [stop]
    assert remote.text == local.text and stop not in remote.text and remote.finish_reason == "stop"
    assert len(remote.text) < len(full.text)


def test_a_backend_name_where_an_object_belongs_is_refused(engine):
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
    with pytest.raises(TypeError, match="resolve_backend"):
        engine.generate_prepared([prepared], max_new_tokens=4, backend="vllm")


def test_the_context_window_is_checked_before_any_request(engine, backend, server):
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "all")
    before = len(server.requests)
    with pytest.raises(ValueError, match="context window"):
        engine.generate_prepared([prepared], max_new_tokens=5000, backend=backend)
    assert len(server.requests) == before


# --------------------------------------------------------------------------- errors


def test_a_server_that_is_down_is_named(engine):
    url = f"http://127.0.0.1:{free_port()}/v1"
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
    with pytest.raises(VllmBackendError, match=f"vLLM server at {url} is not reachable"):
        engine.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(url))


def test_a_refused_request_carries_the_servers_message(engine, exported):
    srv = FakeVllmServer(exported)
    try:
        srv.refuse = (400, "prompt_embeds is not enabled")
        prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
        with pytest.raises(VllmBackendError, match="HTTP 400: prompt_embeds is not enabled.*--enable-prompt-embeds"):
            engine.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(srv.url))
    finally:
        srv.close()


def test_another_decoder_is_refused(engine, tmp_path):
    from refrag_integrations import RefragEngine
    from tiny import make_tiny_models

    dec, enc = make_tiny_models(tmp_path / "seed1", chat=True, seed=1)  # same shape, other weights
    other_engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    other = write_decoder(other_engine, tmp_path / "other")
    assert decoder_fingerprint(other_engine) != decoder_fingerprint(engine)
    srv = FakeVllmServer(other)
    try:
        prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
        with pytest.raises(ServedModelMismatchError, match=decoder_fingerprint(engine)):
            engine.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(srv.url))
        assert srv.requests == []  # nothing was decoded with the wrong weights
    finally:
        srv.close()


def test_a_model_that_cannot_be_identified_is_refused_unless_named(engine, exported):
    fp = decoder_fingerprint(engine)
    anonymous = FakeVllmServer(exported, served_id="some-model", root="/nowhere")
    named = FakeVllmServer(exported, served_id=f"{SERVED_NAME_PREFIX}{fp}", root="/nowhere")
    try:
        prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
        with pytest.raises(ServedModelMismatchError, match="Cannot tell which decoder"):
            engine.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(anonymous.url))
        unchecked = VllmBackend(anonymous.url, verify_model=False)
        assert engine.generate_prepared([prepared], max_new_tokens=4, backend=unchecked)[0].stats.new_tokens >= 0
        out = engine.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(named.url))[0]
        assert named.requests[-1]["model"] == f"{SERVED_NAME_PREFIX}{fp}" and out.finish_reason in ("stop", "length")
    finally:
        anonymous.close()
        named.close()


# --------------------------------------------------------------------------- export


def test_export_writes_the_engines_decoder_with_tokenizer_and_fingerprint(engine, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = json.loads((exported / DECODER_FINGERPRINT_FILE).read_text())
    assert card["decoder_fingerprint"] == decoder_fingerprint(engine)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    for name, param in engine.decoder.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template == engine.tokenizer.chat_template and tok.eos_token_id is not None


def test_export_refuses_a_non_empty_directory(engine, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        write_decoder(engine, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_cli_export_merges_the_checkpoints_lora(engine, tmp_path):
    """A checkpoint with a decoder LoRA exports merged weights, and the served fingerprint is the
    one an engine loaded from that checkpoint has (so the backend accepts it)."""
    from typer.testing import CliRunner

    from refrag_integrations import RefragEngine
    from refrag_integrations.checkpoint import save_checkpoint
    from refrag_integrations.cli import app

    torch.manual_seed(1)
    name = "model.layers.0.self_attn.q_proj"
    w = engine.decoder.get_submodule(name).weight
    lora = {f"{name}.lora_A": torch.randn(2, w.shape[1]), f"{name}.lora_B": torch.randn(w.shape[0], 2),
            f"{name}.lora_scale": torch.tensor(0.5)}
    ckpt = save_checkpoint(tmp_path / "ckpt", engine.config, engine.chunk_encoder.projector.state_dict(),
                           decoder_lora=[lora], trained_stages=["sft"])
    result = CliRunner().invoke(app, ["export", "decoder", str(ckpt), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "out" / DECODER_FINGERPRINT_FILE).read_text())
    loaded = RefragEngine.from_pretrained(str(ckpt), device="cpu")
    assert card["decoder_fingerprint"] == decoder_fingerprint(loaded) != decoder_fingerprint(engine)
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))[f"{name}.weight"]
    assert torch.allclose(merged, w + 0.5 * lora[f"{name}.lora_B"] @ lora[f"{name}.lora_A"], atol=1e-5)
    again = CliRunner().invoke(app, ["export", "decoder", str(ckpt), str(tmp_path / "out")])
    assert again.exit_code != 0 and "not empty" in again.output


# --------------------------------------------------------------------------- adapters and CLI


def test_langchain_chat_model_on_vllm_answers_like_in_process(engine, server):
    from langchain_core.messages import HumanMessage

    from refrag_integrations.langchain import ChatRefrag

    # the passages of this request (what a retriever / postprocessor records for the adapters)
    record_registration(engine, QUESTION, engine.register_retrieved(QUESTION, PASSAGES, "none"))
    messages = [HumanMessage(content="\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}")]
    local = ChatRefrag(engine=engine, max_tokens=10).invoke(messages)
    chat = ChatRefrag(engine=engine, max_tokens=10, backend="vllm", base_url=server.url)
    before = len(server.requests)
    remote = chat.invoke(messages)
    streamed = "".join(c.content for c in chat.stream(messages))
    assert len(server.requests) == before + 2
    assert remote.content == local.content == streamed
    assert remote.response_metadata["refrag"]["chunks_compressed"] > 0


def test_adapters_refuse_an_unknown_backend_at_construction(engine):
    from refrag_integrations.langchain import ChatRefrag
    from refrag_integrations.llama_index import RefragLLM

    with pytest.raises(ValueError, match="Unknown decoder backend 'vlm'"):
        ChatRefrag(engine=engine, backend="vlm")
    with pytest.raises(ValueError, match="needs base_url"):
        RefragLLM(engine=engine, backend="vllm")


def test_llama_index_llm_on_vllm_answers_like_in_process(engine, server):
    from refrag_integrations.llama_index import RefragLLM

    # the passages of this request (what a retriever / postprocessor records for the adapters)
    record_registration(engine, QUESTION, engine.register_retrieved(QUESTION, PASSAGES, "none"))
    prompt = "\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}"
    local = RefragLLM(engine=engine, max_new_tokens=10).complete(prompt)
    llm = RefragLLM(engine=engine, max_new_tokens=10, backend="vllm", base_url=server.url)
    before = len(server.requests)
    remote = llm.complete(prompt)
    streamed = "".join(r.delta for r in llm.stream_complete(prompt))
    assert len(server.requests) == before + 2
    assert remote.text == local.text == streamed
    assert llm.last_stats.chunks_compressed > 0


def test_cli_ask_on_vllm_answers_like_in_process(engine, server, tmp_path):
    from typer.testing import CliRunner

    from refrag_integrations.checkpoint import save_engine
    from refrag_integrations.cli import app

    ckpt = save_engine(engine, tmp_path / "ckpt")
    (tmp_path / "p.txt").write_text("\n\n".join(PASSAGES))
    base = ["ask", QUESTION, "--passages", str(tmp_path / "p.txt"), "--checkpoint", str(ckpt), "--policy", "none",
            "--max-new-tokens", "8", "--json"]
    local = CliRunner().invoke(app, base)
    remote = CliRunner().invoke(app, [*base, "--backend", "vllm", "--base-url", server.url])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    answer = [json.loads(r.stdout.strip().splitlines()[-1])["answer"] for r in (local, remote)]
    assert answer[0] == answer[1] and answer[0]
    down = CliRunner().invoke(app, [*base, "--backend", "vllm", "--base-url", f"http://127.0.0.1:{free_port()}/v1"])
    assert down.exit_code == 2 and "not reachable" in down.output


def test_shared_backend_is_one_object_per_url(server):
    assert shared_backend("vllm", server.url) is shared_backend("vllm", server.url)
    assert shared_backend("transformers") is None


def test_bench_times_a_fixed_length_decode_on_the_backend(engine, backend, server):
    """`refrag bench --backend vllm` times the same fixed-length decode (EOS ignored), streamed."""
    from refrag_integrations.evaluation.bench import engine_for_k, timed_request

    engine.backend = backend
    try:
        run = timed_request(engine, QUESTION, PASSAGES, "none", None, 6)
        assert engine_for_k(engine, 8).backend is backend  # every k of a bench run decodes on the server
    finally:
        engine.backend = None
    assert server.requests[-1]["ignore_eos"] is True and server.requests[-1]["max_tokens"] == 6
    assert 0 < run["ttft_s"] <= run["total_s"] and len(run["steps_s"]) == 5


# --------------------------------------------------------------------------- abandoned streams

LONG = 100  # tokens a slow server would stream (5 s): a consumer that leaves must not wait for them


@pytest.fixture(scope="module")
def slow_server(exported):
    """A server that streams LONG tokens (EOS ignored), one every 50 ms, and records disconnects."""
    srv = FakeVllmServer(exported, pace_s=0.05, ignore_eos=True)
    yield srv
    srv.close()


def wait_for_disconnect(server, before: int) -> int:
    """How many token events the server had written when its client went away (fails after 20 s)."""
    import time

    deadline = time.monotonic() + 20
    while len(server.disconnects) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.disconnects) > before, "the server never saw its client go away"
    return server.disconnects[before]


async def await_disconnect(server, before: int) -> int:
    """:func:`wait_for_disconnect` for a test on an event loop: the loop keeps running meanwhile
    (an abandoned async generator is finalised by a task on the loop)."""
    import asyncio
    import time

    deadline = time.monotonic() + 20
    while len(server.disconnects) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return wait_for_disconnect(server, before)


def test_closing_a_stream_closes_the_connection(engine, slow_server):
    backend = VllmBackend(slow_server.url)
    before = len(slow_server.disconnects)
    stream = engine.stream_prepared(engine.prepare_rag(QUESTION, PASSAGES, "all"), max_new_tokens=LONG, backend=backend)
    assert next(iter(stream))
    stream.close()
    assert wait_for_disconnect(slow_server, before) < LONG // 2  # long before the answer's end
    backend.close()


def test_a_cancelled_request_ends_cancelled_and_disconnects(engine, slow_server):
    import threading

    backend = VllmBackend(slow_server.url)
    before = len(slow_server.disconnects)
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(row: int, piece: str) -> None:
        pieces.append(piece)
        cancel.set()  # the consumer leaves after its first piece

    prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
    result = engine.generate_prepared([prepared], max_new_tokens=LONG, on_text=on_text, cancel=cancel, backend=backend)[0]
    assert result.finish_reason == "cancelled" and result.text == "".join(pieces)
    assert result.stats.new_tokens < LONG
    assert wait_for_disconnect(slow_server, before) < LONG // 2
    # cancelled before it started: no request leaves at all
    sent = len(slow_server.requests)
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "none")
    early = engine.generate_prepared([prepared], max_new_tokens=LONG, cancel=cancel, backend=backend)[0]
    assert early.finish_reason == "cancelled" and early.text == "" and len(slow_server.requests) == sent
    backend.close()


async def test_leaving_a_langchain_astream_closes_the_connection(engine, slow_server):
    from langchain_core.messages import HumanMessage

    from refrag_integrations.langchain import ChatRefrag

    record_registration(engine, QUESTION, engine.register_retrieved(QUESTION, PASSAGES, "none"))
    chat = ChatRefrag(engine=engine, max_tokens=LONG, backend="vllm", base_url=slow_server.url)
    before = len(slow_server.disconnects)
    chunks = chat.astream([HumanMessage(content="\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}")])
    async for chunk in chunks:
        if chunk.content:
            break
    await chunks.aclose()
    assert await await_disconnect(slow_server, before) < LONG // 2


async def test_leaving_a_llama_index_astream_closes_the_connection(engine, slow_server):
    from refrag_integrations.llama_index import RefragLLM

    record_registration(engine, QUESTION, engine.register_retrieved(QUESTION, PASSAGES, "none"))
    llm = RefragLLM(engine=engine, max_new_tokens=LONG, backend="vllm", base_url=slow_server.url)
    before = len(slow_server.disconnects)
    responses = await llm.astream_complete("\n\n".join(PASSAGES) + f"\n\nQuestion: {QUESTION}")
    async for response in responses:
        if response.delta:
            break
    await responses.aclose()
    assert await await_disconnect(slow_server, before) < LONG // 2


# --------------------------------------------------------------------------- throughput


def test_throughput_on_vllm_sends_concurrent_fixed_length_requests(engine, exported, tmp_path):
    """`refrag bench --concurrency --backend vllm`: concurrent HTTP requests (the server answers
    several at once), exactly output_tokens tokens each, rows next to the in-process run's."""
    from refrag_integrations.evaluation import throughput as T

    srv = FakeVllmServer(exported, pace_s=0.02)  # each answer takes a while: concurrent requests overlap
    backend = VllmBackend(srv.url)
    settings = T.ThroughputSettings(concurrency=(1, 4), lengths=(48,), ks=(4,), ps=(0.0,), requests_per_client=2,
                                    output_tokens=3)
    ctx = {48: (PASSAGES * 4)[:3]}
    out = tmp_path / "bench"
    try:
        T.run_throughput(engine, QUESTION, ctx, settings, out, progress=False)  # in-process
        engine.backend = backend
        doc = T.run_throughput(engine, QUESTION, ctx, settings, out, progress=False)
    finally:
        engine.backend = None
        backend.close()
        srv.close()
    assert srv.max_in_flight >= 2  # four clients: requests overlapped on the server
    assert all(r["ignore_eos"] is True and r["max_tokens"] == 3 for r in srv.requests)
    assert len(srv.requests) == (1 + 2) * 1 * 2 + (1 + 2) * 4 * 2  # warm-up round + timed, 2 modes, c = 1 and 4
    by = {r["key"]: r for r in doc["results"]}
    assert len(by) == 8 and doc["complete_for_backend"] is True
    remote = by["vllm|cached|s=48|k=4|p=0.0|c=4"]
    assert remote["output_tokens"] == 3 * remote["requests"] == 3 * 8 and remote["rows_per_batch"] is None
    local = by["transformers|cached|s=48|k=4|p=0.0|c=4"]
    assert remote["positions"] == local["positions"]  # the same prepared inputs
    ratio = T.ratios(doc["results"])[remote["key"]]["vs_in_process"]
    assert ratio == pytest.approx(remote["requests_per_s"] / local["requests_per_s"])
    assert "| vllm | cached | 48 | 4 | 0 | 4 |" in (out / T.TABLE_FILE).read_text()
