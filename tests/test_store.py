"""ChunkStore on a real Chroma: embedded (PersistentClient in tmp_path) and a real server started
by the test (`chroma run`, through HttpClient), with the same API; chunk-vector fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refrag_integrations import RefragEngine, passage_id
from refrag_integrations.encoder import ChunkEncoder, compute_chunk_vector_fingerprint
from refrag_integrations.store import (
    ChromaTimeoutError,
    ChunkStore,
    EmbedderMismatchError,
    FingerprintMismatchError,
    PassageRecord,
)
from tiny import FakeEmbedder  # noqa: E402  (tests/ is on sys.path via conftest)

PASSAGES = [
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the "
    "television series The Bill in 2000.",
    "Gustave Eiffel designed the tower in Paris, France. The tower was performed at the Royal Court Theatre in 2001.",
    "He was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur, which was performed at the "
    "Drum Theatre in Plymouth.",
]
QUESTION = "Who is the Eiffel Tower named after?"


def fresh_engine(base: RefragEngine, **config_changes) -> RefragEngine:
    """A new engine (own cache and hooks) on the same modules; config changes like k apply."""
    cfg = dataclasses.replace(base.config, **config_changes)
    return RefragEngine(base.decoder, base.tokenizer, base.chunk_encoder, cfg)


@pytest.fixture()
def engine(tiny_engine):
    return fresh_engine(tiny_engine)


def encoded(engine: RefragEngine, text: str) -> torch.Tensor:
    with torch.no_grad():
        return engine.chunk_encoder.encode([c.text for c in engine.chunk(text)]).float()


# --------------------------------------------------------------------------- the shared contract


def exercise_store(make_store, engine: RefragEngine) -> None:
    """The ChunkStore contract, run against the embedded database and against a server."""
    store = make_store(engine)
    emb = FakeEmbedder()
    # chunk vectors: written, read back bit for bit, many passages in one call
    vectors = {passage_id(p): torch.randn(len(engine.chunk(p)), engine.chunk_encoder.encoder_dim) for p in PASSAGES}
    assert store.write_chunk_vectors(vectors) == sum(v.shape[0] for v in vectors.values())
    got = store.fetch_chunk_vectors(list(vectors) + ["0" * 32])
    assert set(got) == set(vectors)  # the unknown id is simply absent
    for pid, v in vectors.items():
        assert got[pid].dtype == torch.float32 and torch.equal(got[pid], v)
    assert store.complete_chunk_vectors(list(vectors)) == set(vectors)
    # passages: retrieval round trip
    records = [PassageRecord(p, source="mem", position=i) for i, p in enumerate(PASSAGES)]
    store.add_passages(records, emb.embed(PASSAGES), emb)
    assert store.count_passages() == len(PASSAGES)
    hits = store.search(PASSAGES[1], top_k=2, embedder=emb)
    assert hits[0].id == passage_id(PASSAGES[1]) and hits[0].text == PASSAGES[1]
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].metadata["position"] == 1
    assert store.get_passages([hits[0].id])[hits[0].id].source == "mem"
    # the engine reads these vectors instead of encoding
    fresh = fresh_engine(engine)
    store.attach(fresh)
    prepared = fresh.prepare_rag(QUESTION, PASSAGES, "none")
    assert prepared.stats.cached_chunks == prepared.stats.chunks and prepared.stats.encode_s == 0.0
    # a different fingerprint is reported, never used
    other = fresh_engine(engine, chunk_size=engine.k + 1)
    mismatched = make_store(other)
    with pytest.raises(FingerprintMismatchError, match=engine.chunk_vector_fingerprint()):
        mismatched.attach(other)


def test_embedded_store_contract(tmp_path, engine):
    exercise_store(lambda e: ChunkStore.for_engine(e, tmp_path / "index"), engine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def chroma_server(chroma_server_process):
    """The port of a real Chroma server (see chroma_server_process)."""
    return chroma_server_process[0]


@pytest.fixture()
def chroma_server_process(tmp_path):
    """(port, process) of a real Chroma server on a free loopback port, started with the `chroma`
    CLI of this env."""
    exe = Path(sys.executable).with_name("chroma")
    if not exe.exists():
        found = shutil.which("chroma")
        if found is None:
            pytest.skip(f"the `chroma` server binary is not installed (looked next to {sys.executable} and on PATH)")
        exe = Path(found)
    port = _free_port()
    log = open(tmp_path / "chroma.log", "w")
    proc = subprocess.Popen(
        [str(exe), "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    import chromadb
    from chromadb.config import Settings

    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                pytest.skip(f"`chroma run` exited with {proc.returncode}: {(tmp_path / 'chroma.log').read_text()[-500:]}")
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port, settings=Settings(anonymized_telemetry=False)).heartbeat()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.skip("`chroma run` did not answer on loopback within 60 s")
                time.sleep(0.3)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_server_store_contract(chroma_server, engine):
    store = ChunkStore(host="127.0.0.1", port=chroma_server, collection="srv")
    assert store.location == f"http://127.0.0.1:{chroma_server}"
    exercise_store(lambda e: ChunkStore.for_engine(e, host="127.0.0.1", port=chroma_server), engine)


def _call_with_cap(call, cap_s: float):
    """Run ``call`` in a thread; return (exception it raised or None, seconds it took, finished in time)."""
    result: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - handed to the test to judge
            result["error"] = err
        result["took"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap_s)
    return result.get("error"), result.get("took"), not thread.is_alive()


def test_frozen_server_times_out_naming_host_port_and_timeout(chroma_server_process, engine):
    """Every server call on a frozen (SIGSTOPped) server ends because of the store's timeout: the
    error is a ChromaTimeoutError caused by httpx's own timeout, naming host, port and the timeout.
    Time is checked only loosely (the call waited at least the timeout, and did not block past a cap
    many times larger), so a busy machine cannot make it fail; without the timeout it would block
    until the server resumes, which the cap turns into a failure instead of a hung test."""
    import httpx

    timeout_s, cap_s = 2, 120
    port, proc = chroma_server_process
    store = ChunkStore.for_engine(engine, host="127.0.0.1", port=port, timeout=timeout_s)
    emb = FakeEmbedder()
    store.add_passages([PassageRecord(p) for p in PASSAGES], emb.embed(PASSAGES), emb)
    calls = {
        "search": lambda: store.search("tower", top_k=2, embedder=emb),
        "fetch_chunk_vectors": lambda: store.fetch_chunk_vectors([passage_id(PASSAGES[0])]),
        "add_passages": lambda: store.add_passages([PassageRecord("new one")], emb.embed(["new one"]), emb),
        "open": lambda: ChunkStore(host="127.0.0.1", port=port, timeout=timeout_s),
    }
    proc.send_signal(signal.SIGSTOP)  # the server is frozen: it accepts connections and never answers
    try:
        for name, call in calls.items():
            err, took, finished = _call_with_cap(call, cap_s)
            assert finished, f"{name} still blocked after {cap_s} s on a frozen server with a {timeout_s} s timeout"
            assert isinstance(err, ChromaTimeoutError), f"{name} raised {err!r}, not ChromaTimeoutError"
            # it returned because the HTTP timeout fired, not for any other reason
            assert isinstance(err.__cause__, httpx.TimeoutException), f"{name}: caused by {err.__cause__!r}"
            message = str(err)
            assert f"http://127.0.0.1:{port}" in message, (name, message)
            assert f"{timeout_s} s timeout" in message, (name, message)
            assert took >= timeout_s * 0.9, f"{name} gave up after {took:.2f} s, before its {timeout_s} s timeout"
    finally:
        proc.send_signal(signal.SIGCONT)
    assert store.search("tower", top_k=1, embedder=emb)[0].text  # answers again once resumed
    with pytest.raises(ValueError, match="timeout"):
        ChunkStore(host="127.0.0.1", port=port, timeout=0)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match="chroma run"):
        ChunkStore(host="127.0.0.1", port=_free_port())


# --------------------------------------------------------------------------- embedded details


def test_vectors_persist_and_fetch_is_one_round_trip(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    vectors = {passage_id(f"p{i}"): torch.randn(3 + i, engine.chunk_encoder.encoder_dim) for i in range(20)}
    store.write_chunk_vectors(vectors)
    reopened = ChunkStore.for_engine(engine, tmp_path / "idx")
    col = reopened._chunk_collection()
    calls = []
    real_get = col.get
    col.get = lambda *a, **kw: calls.append(kw) or real_get(*a, **kw)
    got = reopened.fetch_chunk_vectors(list(vectors))
    assert len(calls) == 1
    assert all(torch.equal(got[pid], v) for pid, v in vectors.items())


def test_incomplete_chunk_vectors_count_as_missing(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    pid = passage_id(PASSAGES[0])
    store.write_chunk_vectors({pid: torch.randn(5, engine.chunk_encoder.encoder_dim)})
    store._chunk_collection().delete(ids=[f"{pid}:3"])  # as if a write had been cut short
    assert store.fetch_chunk_vectors([pid]) == {}
    assert store.complete_chunk_vectors([pid]) == set()


def test_engine_uses_stored_vectors_not_its_encoder(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    text = PASSAGES[1]
    n = len(engine.chunk(text))
    stored = torch.zeros(n, engine.chunk_encoder.encoder_dim)  # unlike anything the encoder makes
    store.write_chunk_vectors({passage_id(text): stored})
    store.attach(engine)
    found = engine.chunk_vectors([text])
    vectors, cached, encode_s = found.vectors, found.cached_chunks, found.encode_s
    assert cached == n and encode_s == 0.0 and torch.equal(vectors[0], stored)
    plain = fresh_engine(engine)
    assert not torch.allclose(plain.chunk_vectors([text]).vectors[0], stored)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused_by_the_store_and_from_it(tmp_path, engine, bad):
    """Issue 18 FAIL 6 for a real store: non-finite chunk and retrieval vectors are refused where
    they enter, naming the passage, before anything is written (Chroma's own refusal names
    neither). What the engine reads from a vector source is checked too
    (test_engine_reliability.py::test_non_finite_vectors_from_a_vector_source_are_refused)."""
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    text = PASSAGES[1]
    pid = passage_id(text)
    vecs = torch.randn(len(engine.chunk(text)), engine.chunk_encoder.encoder_dim)
    vecs[1, 2] = bad
    with pytest.raises(ValueError, match=f"chunk vectors of passage {pid} contain 1 NaN or infinite"):
        store.write_chunk_vectors({pid: vecs})
    assert store.fetch_chunk_vectors([pid]) == {}  # nothing was written
    emb = FakeEmbedder()
    retrieval = emb.embed([text])
    retrieval[0, 3] = bad
    with pytest.raises(ValueError, match=rf"retrieval vector of passage {pid} \(record 0\) contains NaN or infinite"):
        store.add_passages([PassageRecord(text)], retrieval, emb)
    assert store.count_passages() == 0


def test_write_back_stores_query_time_encodings(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    store.attach(engine, write_back=True)
    text = PASSAGES[2]
    found = engine.chunk_vectors([text])
    cached, encode_s = found.cached_chunks, found.encode_s
    assert cached == 0 and encode_s > 0
    back = store.fetch_chunk_vectors([passage_id(text)])[passage_id(text)]
    torch.testing.assert_close(back, encoded(engine, text), rtol=1e-5, atol=1e-6)
    again = fresh_engine(engine)
    store.attach(again)
    assert again.chunk_vectors([text]).cached_chunks == len(engine.chunk(text))  # now precomputed
    without = ChunkStore.for_engine(engine, tmp_path / "idx2")
    without.attach(fresh_engine(engine))  # default: no write-back
    assert without.fetch_chunk_vectors([passage_id(text)]) == {}


def test_fingerprint_mismatch_is_reported_and_encode_mode_never_reads_them(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    emb = FakeEmbedder()
    store.add_passages([PassageRecord(p) for p in PASSAGES], emb.embed(PASSAGES), emb)
    store.write_chunk_vectors({passage_id(p): encoded(engine, p) for p in PASSAGES})
    other = fresh_engine(engine, chunk_size=engine.k * 2)
    fp_a, fp_b = engine.chunk_vector_fingerprint(), other.chunk_vector_fingerprint()
    assert fp_a != fp_b
    strict = ChunkStore.for_engine(other, tmp_path / "idx")
    with pytest.raises(FingerprintMismatchError) as err:
        strict.attach(other)
    assert fp_a in str(err.value) and fp_b in str(err.value) and "refrag index" in str(err.value)
    with pytest.raises(FingerprintMismatchError):  # per passage, at fetch time, too
        strict.fetch_chunk_vectors([passage_id(PASSAGES[0])])
    lenient = ChunkStore.for_engine(other, tmp_path / "idx", on_mismatch="encode")
    lenient.attach(other, write_back=True)
    prepared = other.prepare_rag(QUESTION, PASSAGES, "none")
    assert prepared.stats.cached_chunks == 0 and prepared.stats.encode_s > 0  # old vectors not used
    assert set(store.fingerprints()) == {fp_a, fp_b}  # both kept apart, each complete
    assert lenient.complete_chunk_vectors([passage_id(p) for p in PASSAGES]) == {passage_id(p) for p in PASSAGES}
    # a store object bound to one fingerprint refuses an engine of another
    with pytest.raises(FingerprintMismatchError, match="bound to"):
        store.attach(fresh_engine(other))


def test_fingerprint_follows_everything_the_vectors_depend_on(engine):
    fp = engine.chunk_vector_fingerprint()
    assert engine.chunk_vector_fingerprint() == fp and len(fp) == 16
    # the same modules give the same fingerprint; the projector and the chat template do not matter
    assert fresh_engine(engine).chunk_vector_fingerprint() == fp
    other_projector = ChunkEncoder(engine.chunk_encoder.encoder, engine.chunk_encoder.tokenizer, decoder_dim=32)
    assert compute_chunk_vector_fingerprint(other_projector, engine.tokenizer, engine.k) == fp
    # k, pooling, the encoder's weights (anywhere) and the decoder tokenizer do
    assert fresh_engine(engine, chunk_size=engine.k + 1).chunk_vector_fingerprint() != fp
    cls_pool = ChunkEncoder(engine.chunk_encoder.encoder, engine.chunk_encoder.tokenizer, decoder_dim=32, pooling="cls")
    assert compute_chunk_vector_fingerprint(cls_pool, engine.tokenizer, engine.k) != fp
    enc = copy.deepcopy(engine.chunk_encoder.encoder)
    with torch.no_grad():
        last = dict(enc.named_parameters())["encoder.layer.1.output.dense.weight"]
        last.view(-1)[-1] += 1e-3  # deep inside one tensor, as a trained delta might be
    delta = ChunkEncoder(enc, engine.chunk_encoder.tokenizer, decoder_dim=32)
    assert compute_chunk_vector_fingerprint(delta, engine.tokenizer, engine.k) != fp
    tok = copy.deepcopy(engine.tokenizer)
    tok.add_tokens(["Eiffelturm"])
    assert compute_chunk_vector_fingerprint(engine.chunk_encoder, tok, engine.k) != fp
    # using the tokenizers (which rewrites their truncation/padding state) changes nothing
    engine.chunk_encoder.encode(["some text to encode", "more"])
    assert engine.chunk_vector_fingerprint(refresh=True) == fp


def test_embedder_mismatch_is_reported(tmp_path, engine):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    a, b = FakeEmbedder("a"), FakeEmbedder("b")
    store.add_passages([PassageRecord(PASSAGES[0])], a.embed(PASSAGES[:1]), a)
    with pytest.raises(EmbedderMismatchError, match="'a'"):
        store.add_passages([PassageRecord(PASSAGES[1])], b.embed(PASSAGES[1:2]), b)
    with pytest.raises(EmbedderMismatchError):
        ChunkStore(tmp_path / "idx", embedder=b)
    with pytest.raises(EmbedderMismatchError):
        store.search("tower", top_k=1, embedder=b)


def test_bad_arguments(tmp_path, engine):
    with pytest.raises(ValueError, match="exactly one of path"):
        ChunkStore(tmp_path / "a", host="localhost")
    with pytest.raises(ValueError, match="collection"):
        ChunkStore(tmp_path / "a", collection="bad name!")
    with pytest.raises(ValueError, match="on_mismatch"):
        ChunkStore(tmp_path / "a", on_mismatch="ignore")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ChunkStore(tmp_path / "file")
    unbound = ChunkStore(tmp_path / "a")
    with pytest.raises(ValueError, match="fingerprint"):
        unbound.fetch_chunk_vectors(["x"])
    store = ChunkStore.for_engine(engine, tmp_path / "b")
    with pytest.raises(ValueError, match="holds no passages"):
        store.search("q", top_k=3, embedder=FakeEmbedder())
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk_vectors({"p": torch.randn(3, engine.chunk_encoder.encoder_dim + 1)})
    emb = FakeEmbedder()
    with pytest.raises(ValueError, match="shape"):
        store.add_passages([PassageRecord("a b c")], np.zeros((2, emb.dim)), emb)
    store.add_passages([PassageRecord("a b c")], emb.embed(["a b c"]), emb)
    with pytest.raises(ValueError, match="top_k"):
        store.search("q", top_k=0, embedder=emb)


def _damage(db: Path, start: int, length: int | None = None) -> None:
    """Write random bytes over part of a file (to the end when length is None)."""
    size = db.stat().st_size
    rng = np.random.default_rng(0)
    with open(db, "r+b") as f:
        f.seek(start)
        f.write(rng.integers(0, 256, size=(length or size - start), dtype=np.uint8).tobytes())


@pytest.mark.parametrize("where", ["header", "pages"])
def test_a_damaged_database_names_the_index_and_says_rebuild(tmp_path, engine, where):
    from typer.testing import CliRunner

    from refrag_integrations.cli import app
    from refrag_integrations.store import CorruptIndexError

    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    emb = FakeEmbedder()
    store.add_passages([PassageRecord(p) for p in PASSAGES], emb.embed(PASSAGES), emb)
    store.write_chunk_vectors({passage_id(p): encoded(engine, p) for p in PASSAGES})
    copies = []
    for name in ("lib", "cli"):  # chromadb keeps a failed open per directory and process: one copy each
        copy = tmp_path / name
        shutil.copytree(tmp_path / "idx", copy)
        db = copy / "chroma.sqlite3"
        _damage(db, 0, 4096) if where == "header" else _damage(db, 4096)
        copies.append(copy)
    with pytest.raises(CorruptIndexError) as err:
        damaged = ChunkStore.for_engine(engine, copies[0])
        damaged.count_passages()
        damaged.fetch_chunk_vectors([passage_id(PASSAGES[0])])
    assert str(copies[0]) in str(err.value) and "chroma.sqlite3" in str(err.value) and "Rebuild" in str(err.value)
    # the CLI says the same in one line, before loading any model, and exits 1
    res = CliRunner().invoke(app, ["index", "--no-chunk-vectors", "--verify", "--index", str(copies[1])])
    assert res.exit_code == 1 and "is damaged" in res.output and "Traceback" not in res.output, res.output
    assert store.count_passages() == len(PASSAGES)  # the original is untouched
