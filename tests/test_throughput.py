"""`refrag bench --concurrency` (refrag_integrations.evaluation.throughput) on the tiny models:
every field, fixed-length requests, concurrency that really happens (the micro-batcher runs
batches of several rows), resumable runs, the table and the report section. The vLLM side is in
tests/test_vllm_backend.py (against the fake server)."""

from __future__ import annotations

import json

import pytest
import torch

from refrag_integrations import RefragEngine
from refrag_integrations.evaluation import throughput as T
from refrag_integrations.evaluation.data import build_context
from refrag_integrations.evaluation.report import write_benchmarks_doc
from tiny import CORPUS

SENTENCES = [s.strip() + "." for s in CORPUS.split(". ") if len(s.split()) > 4]
QUESTION = "Who is the Eiffel Tower named after?"
FIELDS = {
    "key", "backend", "mode", "length", "k", "p", "concurrency", "requests", "wall_s", "requests_per_s",
    "output_tokens", "output_tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "rows_per_batch",
    "context_tokens", "positions", "chunks", "chunks_expanded", "projector_trained", "load_average_before",
    "load_average_after", "measured_at",
}


@pytest.fixture()
def engine(tiny_dirs):
    """A private engine whose batcher waits up to 0.2 s for requests on their way (its default
    2 ms could, on a loaded machine, let the clients' first requests miss each other), on one
    torch thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    engine.batcher.window_s = 0.2
    yield engine
    torch.set_num_threads(threads)


def test_settings_validate_and_order():
    with pytest.raises(ValueError, match="concurrency"):
        T.ThroughputSettings(concurrency=(0,))
    with pytest.raises(ValueError, match="p must lie"):
        T.ThroughputSettings(concurrency=(1,), ps=(2.0,))
    s = T.ThroughputSettings(concurrency=(1, 4), lengths=(64,), ps=(0.0, 0.25))
    with pytest.raises(ValueError, match="default_k"):
        s.settings()
    assert s.settings(default_k=16) == [
        ("rag", 64, None, None, 1), ("cached", 64, 16, 0.0, 1), ("cached", 64, 16, 0.25, 1),
        ("rag", 64, None, None, 4), ("cached", 64, 16, 0.0, 4), ("cached", 64, 16, 0.25, 4),
    ]
    assert T.setting_key("vllm", "cached", 4096, 16, 0, 16) == "vllm|cached|s=4096|k=16|p=0.0|c=16"
    assert T.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and T.percentile([5.0], 95) == 5.0


def test_in_process_run_measures_every_setting_batches_and_resumes(engine, tmp_path):
    settings = T.ThroughputSettings(concurrency=(1, 4), lengths=(96,), ks=(4,), ps=(0.0, 0.5), requests_per_client=2,
                                    output_tokens=3, extra={"corpus": "tiny"})
    ctx = {96: build_context(SENTENCES * 10, engine.tokenizer, 96)}
    out = tmp_path / "bench"
    first = T.run_throughput(engine, QUESTION, ctx, settings, out, limit=2, progress=False)
    assert len(first["results"]) == 2 and first["complete_for_backend"] is False
    kept = {r["key"]: r["measured_at"] for r in first["results"]}
    doc = T.run_throughput(engine, QUESTION, ctx, settings, out, progress=False)  # the rerun
    assert doc["complete_for_backend"] is True and len(doc["results"]) == 6 and len(doc["commands"]) == 2
    by = {r["key"]: r for r in doc["results"]}
    for key, stamp in kept.items():
        assert by[key]["measured_at"] == stamp  # kept, not measured again
    for r in doc["results"]:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["backend"] == "transformers" and r["requests"] == 2 * r["concurrency"]
        assert r["output_tokens"] == 3 * r["requests"]  # every request decoded exactly output_tokens
        assert r["requests_per_s"] == pytest.approx(r["requests"] / r["wall_s"])
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert 0 < r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p95_s"]
    rag1, rag4 = by["transformers|rag|s=96|c=1"], by["transformers|rag|s=96|c=4"]
    assert rag1["rows_per_batch"] == 1.0  # one client: one row per batch
    assert by["transformers|cached|s=96|k=4|p=0.0|c=1"]["rows_per_batch"] == 1.0
    assert rag4["rows_per_batch"] > 1.0  # four clients: their requests shared batches
    assert by["transformers|cached|s=96|k=4|p=0.0|c=4"]["rows_per_batch"] > 1.0
    cached = by["transformers|cached|s=96|k=4|p=0.0|c=4"]
    assert cached["chunks_expanded"] == 0 and cached["positions"] < rag4["positions"]
    assert rag4["chunks_expanded"] == rag4["chunks"]
    assert by["transformers|cached|s=96|k=4|p=0.5|c=4"]["chunks_expanded"] > 0
    ratios = T.ratios(doc["results"])
    assert ratios[cached["key"]]["vs_rag"] == pytest.approx(cached["requests_per_s"] / rag4["requests_per_s"])
    assert ratios[cached["key"]]["vs_in_process"] is None and ratios[rag4["key"]]["vs_rag"] is None
    table = (out / T.TABLE_FILE).read_text()
    assert table.count("\n| transformers |") == 6 and "untrained" in table
    json.loads((out / T.RESULTS_FILE).read_text())

    other = T.ThroughputSettings(concurrency=(1,), lengths=(96,), ks=(4,), ps=(0.0,), requests_per_client=1,
                                 output_tokens=3, extra={"corpus": "tiny"})
    with pytest.raises(ValueError, match="other settings"):  # requests per client differ: another run
        T.run_throughput(engine, QUESTION, ctx, other, out, progress=False)


def test_the_report_has_a_throughput_section(engine, tmp_path):
    settings = T.ThroughputSettings(concurrency=(2,), lengths=(48,), ks=(4,), ps=(0.0,), requests_per_client=1,
                                    output_tokens=2)
    ctx = {48: build_context(SENTENCES * 5, engine.tokenizer, 48)}
    T.run_throughput(engine, QUESTION, ctx, settings, tmp_path / "b", progress=False)
    text = write_benchmarks_doc(tmp_path / "b", tmp_path / "q", tmp_path / "p", tmp_path / "doc.md").read_text()
    assert "## Throughput under concurrent requests" in text and "## Latency and memory" not in text
    assert text.count("| transformers |") == 2
    assert "in-process engine at 16 concurrent requests and 4096 context tokens" in text and "not measured" in text
