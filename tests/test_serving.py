"""``refrag serve``'s endpoint (refrag_integrations.serving) in front of the fake vLLM server:
OpenAI-shaped answers equal to the engine's, streaming, retrieval, health, bounded requests."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from fake_vllm import FakeVllmServer
from refrag_integrations.backends.vllm_server import VllmBackend
from refrag_integrations.export import write_decoder
from refrag_integrations.serving import make_server

PASSAGES = [
    "Gustave Eiffel designed the tower in Paris, France. The Eiffel Tower is named after Gustave Eiffel.",
    "Robert Boulter is an English film, television and theatre actor.",
]
QUESTION = "Who is the Eiffel Tower named after?"


@pytest.fixture(scope="module")
def vllm(tiny_chat_engine, tmp_path_factory):
    srv = FakeVllmServer(write_decoder(tiny_chat_engine, tmp_path_factory.mktemp("serve") / "decoder"))
    yield srv
    srv.close()


def start(engine, backend, **kwargs):
    server = make_server(engine, backend, port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def endpoint(tiny_chat_engine, vllm):
    retrieved = []

    def retrieve(question, top_k):
        retrieved.append((question, top_k))
        return PASSAGES[:top_k]

    server, url = start(tiny_chat_engine, VllmBackend(vllm.url), retrieve=retrieve, max_request_bytes=4096)
    yield url, retrieved
    server.shutdown()
    server.server_close()


def chat(url, **body):
    return httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}], **body},
                      timeout=60)


def test_an_answer_equals_the_engines(tiny_chat_engine, endpoint, vllm):
    url, _ = endpoint
    local = tiny_chat_engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=8)
    before = len(vllm.requests)
    response = chat(url, passages=PASSAGES, policy="none", max_tokens=8)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == local.text
    assert body["usage"]["prompt_tokens"] == local.stats.positions
    assert body["refrag"]["chunks_compressed"] == local.stats.chunks_compressed > 0
    assert len(vllm.requests) == before + 1


def test_streaming_sends_the_same_text_in_chunks(tiny_chat_engine, endpoint):
    url, _ = endpoint
    whole = chat(url, passages=PASSAGES, policy="all", max_tokens=8).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": QUESTION}], "passages": PASSAGES, "policy": "all", "max_tokens": 8,
        "stream": True,
    }) as response:
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["refrag"]["chunks"] > 0


def test_without_passages_it_retrieves_for_the_question(endpoint):
    url, retrieved = endpoint
    response = chat(url, top_k=1, max_tokens=4)
    assert response.status_code == 200, response.text
    assert retrieved[-1] == (QUESTION, 1) and response.json()["refrag"]["chunks"] > 0


def test_bad_requests_are_refused_with_the_reason(endpoint):
    url, _ = endpoint
    too_big = chat(url, passages=["x" * 5000])
    assert too_big.status_code == 413 and "at most 4096" in too_big.json()["error"]["message"]
    multi = httpx.post(url + "/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]})
    assert multi.status_code == 400 and "one user message" in multi.json()["error"]["message"]
    assert chat(url, max_tokens=0).status_code == 400
    assert chat(url, passages="one string").status_code == 400
    bad_json = httpx.post(url + "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]


def test_health_reports_the_backend(tiny_chat_engine, endpoint):
    url, _ = endpoint
    ok = httpx.get(url + "/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    server, down_url = start(tiny_chat_engine, VllmBackend(dead))
    try:
        health = httpx.get(down_url + "/health")
        assert health.status_code == 503 and dead in health.json()["error"]
        answer = chat(down_url, passages=PASSAGES, max_tokens=4)
        assert answer.status_code == 502 and "not reachable" in answer.json()["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_no_index_and_no_passages_is_a_clear_error(tiny_chat_engine, vllm):
    server, url = start(tiny_chat_engine, VllmBackend(vllm.url))
    try:
        response = chat(url, max_tokens=4)
        assert response.status_code == 400 and "Give 'passages'" in response.json()["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_leaves_a_stream_stops_the_vllm_request(tiny_chat_engine, tmp_path):
    """The client goes away mid-stream: the endpoint closes its stream, whose connection to vLLM
    closes (vLLM aborts a request whose client disconnected)."""
    import time

    slow = FakeVllmServer(write_decoder(tiny_chat_engine, tmp_path / "decoder"), pace_s=0.05, ignore_eos=True)
    server, url = start(tiny_chat_engine, VllmBackend(slow.url))
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": QUESTION}], "passages": PASSAGES, "max_tokens": 100,
            "stream": True,
        }) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the first piece of text: leave
        deadline = time.monotonic() + 20
        while not slow.disconnects and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.disconnects and slow.disconnects[0] < 50  # of 100 tokens
    finally:
        server.shutdown()
        server.server_close()
        slow.close()
