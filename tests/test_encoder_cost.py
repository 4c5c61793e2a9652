"""``refrag bench encoders`` on tiny models: option parsing, the results' structure, resuming, that
"not cached" really computes the chunk vectors at query time, the docs section and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from refrag_integrations import RefragEngine
from refrag_integrations.chunking import passage_id
from refrag_integrations.evaluation import bench as B
from refrag_integrations.evaluation import encoder_cost as E
from refrag_integrations.evaluation.data import QAExample

from tiny import CORPUS

SENTENCES = [s.strip() + "." for s in CORPUS.split(". ") if len(s.split()) > 4]
QUESTION = "Who is the Eiffel Tower named after?"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _factory(tiny_dirs, built: list[str]):
    dec, enc = tiny_dirs

    def make(option: E.EncoderOption) -> RefragEngine:
        built.append(option.key)
        return RefragEngine.from_pretrained("none", decoder=str(dec), encoder=option.encoder, chunk_size=4,
                                            chunk_context=option.chunk_context, device="cpu")
    return make


def _examples() -> list[QAExample]:
    return [QAExample(f"What about {s.split()[1]}?", (s.split()[0],), s, 100 + i) for i, s in enumerate(SENTENCES)]


def test_options_parse_and_validate():
    assert E.EncoderOption.parse("decoder:8@passage") == E.EncoderOption("decoder:8", "passage")
    assert E.EncoderOption.parse(" all-minilm-l6-v2 ").key == "all-minilm-l6-v2@chunk"
    assert [o.key for o in E.EncoderBenchSettings().options] == [
        "all-minilm-l6-v2@chunk", "all-minilm-l6-v2@passage", "decoder:8@chunk", "decoder:8@passage"]
    with pytest.raises(ValueError, match="chunk context"):
        E.EncoderOption.parse("decoder:8@sentence")
    with pytest.raises(ValueError, match="given twice"):
        E.parse_encoder_options(["decoder:8", "decoder:8@chunk"])
    with pytest.raises(ValueError, match="no encoder options"):
        E.parse_encoder_options(["", " "])
    with pytest.raises(ValueError, match="passage counts"):
        E.EncoderBenchSettings(passage_counts=(0,))
    s = E.EncoderBenchSettings(options=E.parse_encoder_options(["a", "b@passage"]), passage_counts=(1, 5))
    keys = [k for k, _ in s.settings()]
    assert keys[:2] == ["rag|n=1", "rag|n=5"] and len(keys) == 2 + 2 * (1 + 2 * 2)
    assert keys[2:7] == ["index|a@chunk", "cached|a@chunk|n=1", "not_cached|a@chunk|n=1", "cached|a@chunk|n=5",
                         "not_cached|a@chunk|n=5"]


def test_passages_follow_eval_qa_and_the_index_batch():
    examples = _examples()
    question, contexts, indexed = E.encoder_bench_passages(examples, (1, 3), 4)
    assert question == examples[0].question
    assert contexts[1] == [examples[0].passage] and examples[0].passage in contexts[3] and len(contexts[3]) == 3
    assert indexed == [e.passage for e in examples[:4]]
    with pytest.raises(ValueError, match="distinct passages"):
        E.encoder_bench_passages(examples, (1,), len(examples) + 1)


def test_not_cached_computes_every_requests_vectors_and_cached_never(tiny_engine, monkeypatch):
    passages = SENTENCES[:3]
    seen: list[tuple[str, bool]] = []
    real = B.timed_request

    def spy(engine, question, texts, expand, budget, output_tokens):
        entries = [engine.lookup_passage(passage_id(t)) for t in texts]
        seen.append((expand, all(e is not None and e.vectors is not None for e in entries),
                     any(e is not None and e.vectors is not None for e in entries)))
        return real(engine, question, texts, expand, budget, output_tokens)

    monkeypatch.setattr(B, "timed_request", spy)
    encodes = []
    encode = tiny_engine.chunk_encoder.encode_passages
    monkeypatch.setattr(tiny_engine.chunk_encoder, "encode_passages",
                        lambda lists: encodes.append(len(lists)) or encode(lists))

    row = B.measure(tiny_engine, "not_cached", QUESTION, passages, 0.0, None, 3, 2)
    assert len(seen) == 4 and not any(anyv for _, _, anyv in seen)  # the cache is empty before every request
    assert encodes == [3, 3, 3, 3]  # ... and every request (warm-up + 3 timed) encodes all three passages
    assert row["cached_chunks_runs"] == [0, 0, 0] and all(s > 0 for s in row["encode_runs_s"])

    seen.clear()
    encodes.clear()
    tiny_engine.forget_vectors(passages)
    row = B.measure(tiny_engine, "cached", QUESTION, passages, 0.0, None, 2, 2)
    assert encodes == [3] and len(seen) == 3 and all(allv for _, allv, _ in seen)  # computed once, beforehand
    assert row["encode_runs_s"] == [0.0, 0.0] and row["cached_chunks_runs"] == [row["chunks"]] * 2


def test_not_cached_refuses_vectors_from_a_store(tiny_engine):
    passages = SENTENCES[:2]
    vectors = {passage_id(t): v for t, v in zip(passages, tiny_engine.chunk_vectors(passages).vectors)}
    tiny_engine.vector_source = lambda ids: {i: vectors[i] for i in ids if i in vectors}
    try:
        with pytest.raises(RuntimeError, match="not-cached mode found precomputed"):
            B.measure(tiny_engine, "not_cached", QUESTION, passages, 0.0, None, 1, 2)
    finally:
        tiny_engine.vector_source = None
        tiny_engine.forget_vectors(passages)


def test_run_has_every_field_resumes_and_writes_the_section(tiny_dirs, tmp_path):
    _, enc = tiny_dirs
    options = E.parse_encoder_options([str(enc), "decoder:2@passage"])
    settings = E.EncoderBenchSettings(options=options, passage_counts=(1, 3), repeats=2, index_passages=3,
                                      extra={"data": "tiny"})
    question, contexts, indexed = E.encoder_bench_passages(_examples(), settings.passage_counts, 3)
    out = tmp_path / "enc"
    built: list[str] = []
    first = E.run_encoder_bench(_factory(tiny_dirs, built), question, contexts, indexed, settings, out,
                                limit=4, progress=False)
    assert built == [options[0].key] and len(first["results"]) == 4 and first["complete"] is False
    kept = {r["key"]: r["measured_at"] + repr(r.get("ttft_runs_s") or r.get("compute_runs_s"))
            for r in first["results"]}

    built.clear()
    doc = E.run_encoder_bench(_factory(tiny_dirs, built), question, contexts, indexed, settings, out, progress=False)
    assert built == [o.key for o in options]  # the first option still had work; each engine built once
    assert doc["complete"] and len(doc["results"]) == len(settings.settings()) == 2 + 2 * 5
    assert len(doc["commands"]) == 2
    for r in doc["results"]:
        if r["key"] in kept:  # finished settings were kept, not re-measured
            assert r["measured_at"] + repr(r.get("ttft_runs_s") or r.get("compute_runs_s")) == kept[r["key"]]
    by = {r["key"]: r for r in doc["results"]}
    for opt in options:
        idx = by[f"index|{opt.key}"]
        assert idx["passages"] == 3 and idx["chunks"] >= 3 and len(idx["compute_runs_s"]) == 2
        assert idx["compute_ms_per_passage"] > 0 and idx["store_ms_per_passage"] > 0
        assert idx["index_ms_per_passage"] == pytest.approx(idx["compute_ms_per_passage"] + idx["store_ms_per_passage"])
        assert idx["compute_ms_per_chunk"] == pytest.approx(idx["compute_s"] * 1000 / idx["chunks"])
        for n in (1, 3):
            c, nc, rag = by[f"cached|{opt.key}|n={n}"], by[f"not_cached|{opt.key}|n={n}"], by[f"rag|n={n}"]
            assert c["passages"] == nc["passages"] == n and c["chunks"] == nc["chunks"] == rag["chunks"]
            assert c["positions"] == nc["positions"] < rag["positions"] and c["chunks_expanded"] == 0
            assert c["encode_runs_s"] == [0.0, 0.0] and all(s > 0 for s in nc["encode_runs_s"])
            assert nc["cached_chunks_runs"] == [0, 0]
    info = doc["options"]
    assert info[options[1].key]["reads_decoder_tokens"] and not info[options[0].key]["reads_decoder_tokens"]
    assert info[options[1].key]["encoder_dim"] == 32 and info[options[0].key]["encoder_dim"] == 24
    assert all(not o["projector_trained"] for o in info.values())
    summary = {(r["option"], r["n"]): r for r in doc["summary"]}
    assert len(summary) == 4
    s = summary[(options[1].key, 3)]
    c3 = by[f"cached|{options[1].key}|n=3"]
    assert s["cached_speedup"] == pytest.approx(by["rag|n=3"]["ttft_s"] / c3["ttft_s"])
    assert s["cached_vs_first"] == pytest.approx(c3["ttft_s"] / by[f"cached|{options[0].key}|n=3"]["ttft_s"])
    assert summary[(options[0].key, 1)]["cached_vs_first"] == pytest.approx(1.0)
    table = (out / E.TABLE_FILE).read_text()
    assert table.count("| decoder:2 | passage | untrained |") == 1 and table.count("| decoder:2 | passage |") == 3
    assert "Cached TTFT over the encoder options: N = 1:" in table and "untrained" in table
    json.loads((out / E.RESULTS_FILE).read_text())

    page = tmp_path / "page.md"
    page.write_text("# Page\n\nintro\n\n## Other\n\nkept\n")
    E.write_encoders_docs(out, page)
    E.write_encoders_docs(out, page)  # rewriting replaces the section, never duplicates it
    text = page.read_text()
    assert text.count(E.SECTION_TITLE) == 1 and text.startswith("# Page") and "## Other\n\nkept" in text
    assert "Status: complete." in text and "Machine:" in text and "```bash" in text
    from refrag_integrations.evaluation.report import write_benchmarks_doc

    none = tmp_path / "missing"
    generated = write_benchmarks_doc(none, none, none, tmp_path / "doc" / "benchmarks.md", encoders_dir=out).read_text()
    assert generated.count(E.SECTION_TITLE) == 1 and "| decoder:2 | passage | untrained |" in generated

    with pytest.raises(ValueError, match="other settings"):  # other repeats: refused even with nothing to do
        E.run_encoder_bench(_factory(tiny_dirs, []), question, contexts, indexed,
                            E.EncoderBenchSettings(options=options, passage_counts=(1, 3), repeats=1,
                                                   index_passages=3, extra={"data": "tiny"}), out, progress=False)


def test_replace_section_keeps_the_rest():
    sec = f"{E.SECTION_TITLE}\n\nnew\n"
    assert E.replace_section("# T\n\n## A\n\na\n", sec) == f"# T\n\n## A\n\na\n\n{sec}"
    page = f"# T\n\n{E.SECTION_TITLE}\n\nold\n### sub\n\nold too\n\n## B\n\nb\n"
    assert E.replace_section(page, sec) == f"# T\n\n{sec}\n## B\n\nb\n"


def test_cli_refuses_options_of_the_wrong_command():
    from typer.testing import CliRunner

    from refrag_integrations.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--quick", "encoders"])
    assert res.exit_code == 2 and "--quick" in res.output and "of `refrag bench` itself" in " ".join(res.output.split())
    res = runner.invoke(app, ["bench", "encoders", "--checkpoint", "some/dir"])
    assert res.exit_code == 2 and "--checkpoint" in res.output
    res = runner.invoke(app, ["bench", "encoders", "--encoders", "x@sentence"])
    assert res.exit_code == 2 and "chunk context" in res.output


def test_cli_runs_on_real_passages(tiny_dirs, shared_data, tmp_path):
    from typer.testing import CliRunner

    from refrag_integrations.cli import app

    dec, enc = tiny_dirs
    out, page = tmp_path / "enc", tmp_path / "page.md"
    argv = ["bench", "encoders", "--decoder", str(dec), "--encoders", f"{enc},decoder:1@passage", "--k", "4",
            "--n", "1", "--repeats", "1", "--index-passages", "2", "--checkpoint", "none", "--threads", "2",
            "--data-dir", str(shared_data), "--out", str(out), "--docs", str(page), "--no-progress"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / E.RESULTS_FILE).read_text())
    assert doc["complete"] and len(doc["results"]) == 1 + 2 * 3 and doc["run"]["k"] == 4
    assert doc["run"]["threads"] == 2 == doc["machine"]["torch_threads"]  # --threads is set before the run
    assert doc["run"]["data"].endswith("nq-open-oracle.jsonl.gz") and doc["run"]["index_passages"] == 2
    assert E.SECTION_TITLE in page.read_text() and "refrag bench encoders" in page.read_text()
