"""Ingestion into a real embedded Chroma: splitting, round trip, idempotence, resume after a
failure, bad inputs, a 50 MB file in bounded memory; `refrag index` / `ask --index` / `demo`."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tiny import make_pdf

from refrag_integrations import RefragEngine, chunk_passage, passage_id
from refrag_integrations.index import (
    PassageSplitter,
    SentenceEmbedder,
    index_paths,
    read_passages,
    refresh_chunk_vectors,
    split_passages,
    split_sentences,
)
from refrag_integrations.store import ChunkStore, FingerprintMismatchError

EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed La dame "
    "de fer, it was constructed as the centrepiece of the 1889 World's Fair."
)
EVEREST = (
    "Mount Everest is the highest mountain on Earth above sea level, located in the Mahalangur Himal sub-range of "
    "the Himalayas. The China-Nepal border runs across its summit point. Its elevation of 8,848.86 m was most "
    "recently established in 2020 by the Chinese and Nepali authorities."
)
VIOLIN = (
    "The violin is a wooden chordophone, the smallest and thus highest-pitched instrument in regular use in the "
    "violin family. Most violins have a hollow wooden body and four strings, usually tuned in perfect fifths."
)
PHOTO = (
    "Photosynthesis is a biological process by which photosynthetic organisms convert light energy into chemical "
    "energy. Most plants, algae and cyanobacteria perform photosynthesis, releasing oxygen as a by-product."
)
SIZES = {"min_words": 30, "max_words": 60}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(device="cpu")  # the offline default MiniLM


@pytest.fixture()
def engine(tiny_engine):
    return RefragEngine(tiny_engine.decoder, tiny_engine.tokenizer, tiny_engine.chunk_encoder, tiny_engine.config)


@pytest.fixture()
def docs(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "eiffel.txt").write_text(EIFFEL + "\n\n" + EVEREST + "\n")
    (d / "sub" / "notes.md").write_text(f"# Violin\n\n{VIOLIN}\n\n## Light\n\n{PHOTO}\n")
    with open(d / "records.jsonl", "w") as f:
        f.write(json.dumps({"title": "Violin", "text": VIOLIN}) + "\n")
        f.write(json.dumps({"question": "q", "ctxs": [{"title": "Photosynthesis", "text": PHOTO}]}) + "\n")
    with gzip.open(d / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": EVEREST + " " + EIFFEL}) + "\n")
    (d / ".hidden.txt").write_text("never indexed")
    (d / "image.png").write_bytes(b"\x89PNG\r\n")
    return d


def store_state(store: ChunkStore) -> dict:
    """Everything in a store, for comparing final states."""
    pcol, ccol = store._passage_collection(), store._chunk_collection()
    p = pcol.get(include=["documents", "metadatas", "embeddings"])
    c = ccol.get(include=["metadatas", "embeddings"])
    porder, corder = np.argsort(p["ids"]), np.argsort(c["ids"])
    return {
        "passage_ids": [p["ids"][i] for i in porder],
        "documents": [p["documents"][i] for i in porder],
        "metadatas": [p["metadatas"][i] for i in porder],
        "passage_vectors": np.asarray(p["embeddings"])[porder],
        "chunk_ids": [c["ids"][i] for i in corder],
        "chunk_metadatas": [c["metadatas"][i] for i in corder],
        "chunk_vectors": np.asarray(c["embeddings"])[corder],
        "counts": (pcol.count(), ccol.count()),
    }


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("passage_ids", "documents", "metadatas", "chunk_ids", "chunk_metadatas", "counts"):
        assert a[key] == b[key], key
    np.testing.assert_allclose(a["passage_vectors"], b["passage_vectors"], atol=1e-5)
    np.testing.assert_allclose(a["chunk_vectors"], b["chunk_vectors"], atol=1e-5)


# --------------------------------------------------------------------------- splitting


def test_split_sentences_keeps_quotes_and_lowercase_continuations():
    assert split_sentences('He said "Hi." Then he left! Why? Because... of it.') == [
        'He said "Hi."', "Then he left!", "Why?", "Because... of it.",
    ]


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n)) + "."


def test_splitter_prefers_paragraphs_then_sentences_then_words():
    # paragraphs of 30 words: two fit in [50, 80]
    paras = [words(30, f"p{i}x") for i in range(4)]
    out = split_passages("\n\n".join(paras), min_words=50, max_words=80)
    assert out == [paras[0] + "\n\n" + paras[1], paras[2] + "\n\n" + paras[3]]
    # one long paragraph of 15-word sentences: cut on sentence ends, never past max
    sentences = [words(15, f"S{i}x") for i in range(10)]  # capitalised: sentence starts
    out = split_passages(" ".join(sentences), min_words=50, max_words=80)
    assert all(len(p.split()) <= 80 and p.endswith(".") for p in out)
    assert " ".join(out).split() == " ".join(sentences).split()
    # a 500-word run without punctuation: cut on words
    run = " ".join(f"w{i}" for i in range(500))
    out = split_passages(run, min_words=50, max_words=80)
    assert [len(p.split()) for p in out] == [80] * 6 + [20] and " ".join(out) == run
    # a short tail joins the passage before it when both fit
    assert split_passages(words(60, "a") + "\n\n" + words(10, "b"), min_words=50, max_words=80) == [
        words(60, "a") + "\n\n" + words(10, "b")
    ]
    with pytest.raises(ValueError, match="min_words"):
        PassageSplitter(min_words=10, max_words=5)


def test_read_passages_formats(docs):
    txt = list(read_passages(docs / "eiffel.txt", **SIZES))
    assert [r.text for r in txt] == [EIFFEL, EVEREST] and [r.position for r in txt] == [0, 1]
    md = list(read_passages(docs / "sub" / "notes.md", **SIZES))
    assert md[0].text.startswith("# Violin\n\n" + VIOLIN[:20]) and "## Light" in md[1].text
    jl = list(read_passages(docs / "records.jsonl", **SIZES))
    assert [r.text for r in jl] == [f"Violin\n{VIOLIN}", f"Photosynthesis\n{PHOTO}"]
    assert jl[0].title == "Violin" and jl[0].id == passage_id(f"Violin\n{VIOLIN}")
    gz = list(read_passages(docs / "more.jsonl.gz", **SIZES))
    assert " ".join(r.text for r in gz).split() == (EVEREST + " " + EIFFEL).split() and len(gz) >= 2


def test_pdf_is_read(tmp_path):
    pytest.importorskip("pypdf", reason="PDF support needs the `pdf` extra (pypdf)")
    path = tmp_path / "doc.pdf"
    path.write_bytes(make_pdf(["The Eiffel Tower is in Paris.", "It was built from 1887 to 1889."]))
    out = list(read_passages(path, **SIZES))
    assert len(out) == 1 and "Eiffel Tower is in Paris" in out[0].text and "1887" in out[0].text


# --------------------------------------------------------------------------- indexing


def test_index_then_query_round_trip(tmp_path, docs, engine, embedder):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    report = index_paths([docs], store, engine, embedder, progress=False, **SIZES)
    files = [docs / "eiffel.txt", docs / "more.jsonl.gz", docs / "records.jsonl", docs / "sub" / "notes.md"]
    expected = {r.id: r for f in files for r in read_passages(f, **SIZES)}
    assert report.files == 4 and not report.problems
    assert report.passages == len(expected) == report.added and report.present == 0
    assert report.chunks == sum(len(chunk_passage(r.text, engine.tokenizer, engine.k)) for r in expected.values())
    assert store.count_passages() == len(expected) and report.seconds > 0
    hits = store.search("Who designed the Eiffel Tower?", top_k=3, embedder=embedder)
    assert hits[0].id == passage_id(EIFFEL) and hits[0].metadata["source"].endswith("eiffel.txt")
    # the stored chunk vectors are what the engine would compute at query time
    got = store.fetch_chunk_vectors(list(expected))
    assert set(got) == set(expected)
    with torch.no_grad():
        direct = engine.chunk_encoder.encode([c.text for c in engine.chunk(EIFFEL)])
    torch.testing.assert_close(got[passage_id(EIFFEL)], direct, rtol=1e-4, atol=1e-5)
    store.attach(engine)
    result = engine.generate("Who designed the Eiffel Tower?", [h.text for h in hits], policy="none", max_new_tokens=2)
    assert result.stats.cached_chunks == result.stats.chunks > 0 and result.stats.encode_s == 0.0


def test_reindex_is_a_no_op(tmp_path, docs, engine, embedder, monkeypatch):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    first = index_paths([docs], store, engine, embedder, progress=False, **SIZES)
    before = store_state(store)
    writes = []
    monkeypatch.setattr(store, "add_passages", lambda *a, **k: writes.append("passages"))
    monkeypatch.setattr(store, "write_chunk_vectors", lambda *a, **k: writes.append("chunks"))
    again = index_paths([docs], store, engine, embedder, progress=False, **SIZES)
    assert writes == [] and again.added == 0 and again.chunks == 0 and again.present == first.passages
    assert_same_state(before, store_state(ChunkStore.for_engine(engine, tmp_path / "idx")))


@pytest.mark.parametrize("fail_in", ["add_passages", "write_chunk_vectors"])
def test_interrupted_indexing_resumes_to_the_same_state(tmp_path, docs, engine, embedder, monkeypatch, fail_in):
    reference = ChunkStore.for_engine(engine, tmp_path / "ref")
    index_paths([docs], reference, engine, embedder, batch_size=2, progress=False, **SIZES)

    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    real = getattr(store, fail_in)
    calls = []

    def failing(*args, **kwargs):  # the third batch dies; earlier batches were committed
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, fail_in, failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        index_paths([docs], store, engine, embedder, batch_size=2, progress=False, **SIZES)
    monkeypatch.setattr(store, fail_in, real)
    assert 0 < store.count_passages() < reference.count_passages()
    resumed = index_paths([docs], store, engine, embedder, batch_size=2, progress=False, **SIZES)
    assert resumed.present == 4 and resumed.added == reference.count_passages() - 4
    assert_same_state(store_state(reference), store_state(store))


def test_bad_inputs_are_reported_and_the_rest_is_indexed(tmp_path, engine, embedder):
    good = tmp_path / "good.txt"
    good.write_text(EIFFEL)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes([0, 159, 146, 150]) + os.urandom(4096))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Le caf\u00e9 est au coin de la rue.".encode("latin-1"))
    lines = tmp_path / "mixed.jsonl"
    lines.write_text(json.dumps({"text": EVEREST}) + "\n{not json\n" + json.dumps({"title": "no text"}) + "\n")
    fake_pdf = tmp_path / "fake.pdf"
    fake_pdf.write_text("not a pdf at all")
    missing = tmp_path / "missing.txt"
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    report = index_paths([missing, empty, junk, good, latin, lines, fake_pdf], store, engine, embedder, progress=False)
    why = {os.path.basename(w.split(":")[0]): y for w, y in report.problems}
    assert "no such file" in why["missing.txt"]
    assert "empty file" in why["empty.txt"]
    assert "binary" in why["junk.txt"]
    assert "not UTF-8" in why["latin1.txt"] and "offset 6" in why["latin1.txt"] and "iconv" in why["latin1.txt"]
    assert "not valid JSON" in dict(report.problems)[f"{lines}:2"]
    assert "'text'" in dict(report.problems)[f"{lines}:3"]
    assert "PDF" in why["fake.pdf"]
    assert report.files == 2 and store.count_passages() == 2  # good.txt and the good line of mixed.jsonl
    assert store.has_passages([passage_id(EIFFEL), passage_id(EVEREST)]) == {passage_id(EIFFEL), passage_id(EVEREST)}


def test_50mb_file_is_streamed_in_bounded_memory(tmp_path, engine, embedder):
    big = tmp_path / "big.txt"
    # three paragraphs of 100-200 words, repeated: each is one passage, stored once
    paragraphs = [" ".join([EIFFEL, EVEREST, VIOLIN]), " ".join([VIOLIN, PHOTO, EIFFEL]), " ".join([EVEREST, PHOTO, EIFFEL])]
    block = ("\n\n".join(paragraphs) + "\n\n").encode()
    with open(big, "wb") as f:
        f.write((" ".join([PHOTO] * 8000)).encode() + b"\n\n")  # a 1.5 MB line: longer than a read block
        while f.tell() < 50 * 2**20:
            f.write(block * 64)
    assert big.stat().st_size >= 50 * 2**20
    good = tmp_path / "good.txt"
    good.write_text("A small file indexed in the same batch. " * 10)
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    tracemalloc.start()
    try:
        report = index_paths([big, good], store, engine, embedder, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.files == 2 and not report.problems
    assert peak < 32 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB while streaming a 50 MiB file"
    assert len(store.has_passages([passage_id(p) for p in paragraphs])) == 3
    assert store.count_passages() == report.passages < 200  # repeats are stored once
    assert store.has_passages([passage_id(good.read_text().strip())])


def test_refresh_adds_vectors_for_a_new_fingerprint(tmp_path, docs, engine, embedder):
    store = ChunkStore.for_engine(engine, tmp_path / "idx")
    index_paths([docs / "eiffel.txt"], store, engine, embedder, progress=False, **SIZES)
    k8 = RefragEngine(engine.decoder, engine.tokenizer, engine.chunk_encoder,
                      dataclasses.replace(engine.config, chunk_size=8))
    other = ChunkStore.for_engine(k8, tmp_path / "idx")
    with pytest.raises(FingerprintMismatchError):
        other.attach(k8)
    report = refresh_chunk_vectors(other, k8, progress=False)
    assert report.added == 2 and report.chunks == len(k8.chunk(EIFFEL)) + len(k8.chunk(EVEREST))
    other.attach(k8)  # no longer a mismatch
    assert refresh_chunk_vectors(other, k8, progress=False).chunks == 0  # idempotent
    assert set(store.fingerprints()) == {engine.chunk_vector_fingerprint(), k8.chunk_vector_fingerprint()}


# --------------------------------------------------------------------------- CLI argument checks


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "0"], "--batch-size"),
    (["--max-words", "0"], "--max-words"),
    (["--min-words", "300", "--max-words", "200"], "--min-words (300) must not exceed --max-words (200)"),
    (["--embedder", "bogus-embedder"], "'bogus-embedder' is not a local directory"),
    (["--embedder", "not/a/valid/hub/id"], "neither a local directory nor a valid hub id"),
    (["--server-timeout", "0"], "--server-timeout"),
    (["--lock-timeout", "-1"], "--lock-timeout"),
])
def test_cli_index_refuses_bad_values_before_loading_anything(tmp_path, docs, monkeypatch, args, says):
    from refrag_integrations import embedder as embedder_module
    from refrag_integrations.cli import app

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(RefragEngine, "from_pretrained", no_loading)
    monkeypatch.setattr(embedder_module, "SentenceEmbedder", no_loading)
    res = CliRunner().invoke(app, ["index", str(docs), "--index", str(tmp_path / "idx"), *args])
    text = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and says in text, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    assert not (tmp_path / "idx").exists()  # nothing was created either


# --------------------------------------------------------------------------- CLI (real default models)


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.integration
def test_cli_index_then_ask_from_the_index(tmp_path, docs):
    from refrag_integrations.cli import app

    runner = CliRunner()
    idx = tmp_path / "cli-index"
    res = runner.invoke(app, ["index", str(docs), str(tmp_path / "missing.txt"), "--index", str(idx), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = _last_json(res.stdout)
    assert rep["files"] == 4 and rep["added"] == rep["passages"] > 0 and rep["chunks"] > 0
    assert [p["where"] for p in rep["problems"]] == [str(tmp_path / "missing.txt")]
    again = _last_json(runner.invoke(app, ["index", str(docs), "--index", str(idx), "--json", "--quiet"]).stdout)
    assert again["added"] == 0 and again["chunks"] == 0 and again["repaired"] == 0
    verified = _last_json(runner.invoke(app, ["index", "--verify", "--index", str(idx), "--json", "--quiet"]).stdout)
    assert verified["verify"]["passages"] == rep["passages"] and verified["verify"]["repaired"] == 0
    res = runner.invoke(app, ["ask", "Who is the Eiffel Tower named after?", "--index", str(idx), "--top-k", "2",
                              "--json", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    out = _last_json(res.stdout)
    assert len(out["sources"]) == 2 and "Eiffel" in out["sources"][0]["text"]
    s = out["stats"]
    assert s["chunks_compressed"] > 0 and s["cached_chunks"] == s["chunks"] and s["encode_s"] == 0.0
    res = runner.invoke(app, ["ask", "q?", "--index", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "refrag index" in " ".join(res.output.replace("│", " ").split())


@pytest.mark.integration
def test_cli_demo_runs_and_reuses_its_index(tmp_path):
    from refrag_integrations.cli import app

    args = ["demo", "--index", str(tmp_path / "demo"), "--questions", "1", "--top-k", "4", "--max-new-tokens", "4", "--json",
            "--threads", "1"]  # one torch thread: no oversubscription when other tests share the CPU
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    out = _last_json(first.stdout)
    assert out["index_state"] == "built" and out["index_report"]["added"] == 300
    r = out["results"][0]
    assert r["rag"]["positions"] > r["refrag"]["positions"] and r["refrag"]["cached_chunks"] == r["refrag"]["chunks"]
    assert r["gold_rank"] is not None  # the question's own passage is retrieved
    if not out["trained"]:
        assert "UNTRAINED" in first.stdout and "not REFRAG quality" in first.stdout
    second = _last_json(CliRunner().invoke(app, args).stdout)
    assert second["index_state"] == "reused" and second["index_report"]["added"] == 0
