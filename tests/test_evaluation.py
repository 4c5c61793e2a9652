"""The evaluation harness on tiny models: every field is produced, numbers are consistent, and
interrupted runs resume. Plus one quick integration run of the three CLI commands."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from refrag_integrations.evaluation import bench as B
from refrag_integrations.evaluation import ppl as P
from refrag_integrations.evaluation import qa as Q
from refrag_integrations.evaluation.data import QAExample, build_context, heldout_windows, load_qa, with_distractors
from refrag_integrations.evaluation.report import target_check, write_benchmarks_doc
from refrag_integrations.evaluation.runs import JsonlLog

from tiny import CORPUS

@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (2-core CI machines, often shared); restored after."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SENTENCES = [s.strip() + "." for s in CORPUS.split(". ") if len(s.split()) > 4]
QUESTION = "Who is the Eiffel Tower named after?"


def _examples() -> list[QAExample]:
    # Real sentences as passages; the answer is a word of the passage (the tiny model won't find it).
    return [QAExample(f"What about {s.split()[1]}?", (s.split()[0],), s, 100 + i) for i, s in enumerate(SENTENCES)]


# --------------------------------------------------------------------------- data


def test_with_distractors_is_deterministic_nested_and_contains_gold():
    ex = _examples()
    p5, gold5 = with_distractors(ex, 0, 5, seed=0)
    assert len(p5) == 5 and p5[gold5] == ex[0].passage and len(set(p5)) == 5
    assert with_distractors(ex, 0, 5, seed=0) == (p5, gold5)
    p3, gold3 = with_distractors(ex, 0, 3, seed=0)
    assert set(p3) - {ex[0].passage} <= set(p5)  # the N=3 distractors are inside the N=5 set
    assert with_distractors(ex, 0, 5, seed=1)[0] != p5
    with pytest.raises(ValueError, match="distractors"):
        with_distractors(ex, 0, len(ex) + 1, seed=0)


def test_build_context_and_windows_hit_the_token_counts(tiny_engine):
    tok = tiny_engine.tokenizer
    ctx = build_context(SENTENCES * 10, tok, 100)
    n = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in ctx)
    assert abs(n - 100) <= 2  # exact up to re-tokenisation at the cut
    with pytest.raises(ValueError, match="fewer than"):
        build_context(SENTENCES[:1], tok, 10_000)
    windows = heldout_windows(CORPUS * 3, tok, 40, 8, limit=3)
    assert len(windows) == 3 and all(len(c) == 8 and text.strip() for text, c in windows)


def test_load_qa_reads_and_validates(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "q1?", "answers": ["a"], "ctxs": [{"title": "T", "text": "body one"}]},
            {"question": "q2?", "answers": ["b"], "ctxs": [{"title": "", "text": "body two"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_qa(path)
    assert [e.passage for e in ex] == ["T\nbody one", "body two"] and ex[1].line == 2
    path.write_text(json.dumps({"question": "q", "answers": [], "ctxs": []}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        load_qa(path)
    with pytest.raises(ValueError, match="split"):
        load_qa(path, "test")


def test_nq_eval_split_is_lines_2001_to_2655(shared_data):
    ex = load_qa(shared_data / "nq-open-oracle.jsonl.gz", "eval")
    assert len(ex) == 655 and ex[0].line == 2001 and ex[-1].line == 2655


# --------------------------------------------------------------------------- bench


def test_kv_cache_formula_matches_a_real_cache(tiny_engine):
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.arange(3, 20).unsqueeze(0)  # (1, 17)
    with torch.no_grad():
        tiny_engine.decoder(input_ids=ids, past_key_values=cache, use_cache=True)
    real = 0
    for layer in cache.layers:
        real += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    assert B.kv_cache_bytes(tiny_engine.decoder, 17, torch.float32) == real
    assert B.kv_cache_bytes(tiny_engine.decoder, 17, torch.bfloat16) == real // 2
    assert B.kv_bytes_per_position(tiny_engine) * 17 == real  # the probe the benchmark uses
    bf16 = B.engine_for_k(tiny_engine, 8)
    bf16.autocast_dtype = torch.bfloat16
    # Under bf16 autocast at least the values are bf16 (on CPU the keys stay fp32 after RoPE).
    assert real // 2 <= B.kv_bytes_per_position(bf16) * 17 < real


def test_peak_memory_sees_an_allocation():
    with B.PeakMemory("cpu") as mem:
        block = torch.ones(40 * 2**20 // 4)  # 40 MiB, touched
        del block
    assert mem.method != "unavailable"
    assert mem.peak_bytes >= 30 * 2**20


def test_bench_settings_validate():
    with pytest.raises(ValueError, match="p must lie"):
        B.BenchSettings(ps=(1.5,))
    with pytest.raises(ValueError, match="output_tokens"):
        B.BenchSettings(output_tokens=1)
    s = B.BenchSettings(lengths=(64,), ks=(4, 8), ps=(0.0, 0.5))
    assert len(s.settings()) == 1 + 2 * 2 * 2


BENCH_FIELDS = {
    "key", "mode", "length", "k", "p", "context_tokens", "prompt_tokens", "positions", "context_positions",
    "passages", "chunks", "chunks_expanded", "ttft_s", "ttft_runs_s", "ttit_s", "total_s", "throughput_tok_s",
    "encode_s", "peak_memory_mb", "peak_memory_method", "kv_cache_mb", "kv_cache_end_mb", "projector_trained",
    "load_average_before", "load_average_after", "measured_at",
}


def test_bench_produces_every_field_and_resumes(tiny_engine, tmp_path):
    settings = B.BenchSettings(lengths=(96,), ks=(4, 8), ps=(0.0, 0.5), repeats=2, output_tokens=3,
                               extra={"corpus": "tiny"})
    ctx = {s: build_context(SENTENCES * 10, tiny_engine.tokenizer, s) for s in settings.lengths}
    out = tmp_path / "bench"
    first = B.run_bench(tiny_engine, QUESTION, ctx, settings, out, limit=4, progress=False)
    assert len(first["results"]) == 4 and first["complete"] is False
    kept = {r["key"]: r["measured_at"] + repr(r["ttft_runs_s"]) for r in first["results"]}

    doc = B.run_bench(tiny_engine, QUESTION, ctx, settings, out, progress=False)  # the "rerun"
    assert doc["complete"] is True
    assert len(doc["results"]) == len(settings.settings()) == 9
    for r in doc["results"]:
        assert BENCH_FIELDS <= set(r), BENCH_FIELDS - set(r)
        assert r["ttft_s"] > 0 and r["ttit_s"] > 0 and r["throughput_tok_s"] > 0 and len(r["ttft_runs_s"]) == 2
        assert r["kv_cache_mb"] < r["kv_cache_end_mb"]
    for key, stamp in kept.items():  # finished settings were kept, not re-measured
        r = next(r for r in doc["results"] if r["key"] == key)
        assert r["measured_at"] + repr(r["ttft_runs_s"]) == stamp
    assert len(doc["commands"]) == 2
    by = {r["key"]: r for r in doc["results"]}
    rag = by["rag|s=96"]
    assert rag["chunks_expanded"] == rag["chunks"] and rag["positions"] == rag["prompt_tokens"]
    assert rag["context_positions"] == rag["context_tokens"]
    c, nc = by["cached|s=96|k=4|p=0.0"], by["not_cached|s=96|k=4|p=0.0"]
    assert c["encode_s"] == 0.0 and nc["encode_s"] > 0.0  # cached never encodes; not cached always
    assert c["chunks_expanded"] == 0 and c["positions"] == nc["positions"] < rag["positions"]
    assert c["context_positions"] == c["chunks"]  # one position per compressed chunk
    half = by["cached|s=96|k=4|p=0.5"]
    assert half["chunks_expanded"] == math.floor(0.5 * half["chunks"])
    assert by["cached|s=96|k=8|p=0.0"]["positions"] < c["positions"]  # larger k, fewer positions
    assert c["kv_cache_mb"] / rag["kv_cache_mb"] == pytest.approx(c["positions"] / rag["positions"])
    assert c["projector_trained"] is False and doc["note"] == B.UNTRAINED_NOTE
    summary = {s["key"]: s for s in doc["summary"]}
    assert len(summary) == 8
    assert summary[c["key"]]["kv_cache_reduction"] == pytest.approx(rag["kv_cache_mb"] / c["kv_cache_mb"])
    assert summary[c["key"]]["ttft_speedup"] == pytest.approx(rag["ttft_s"] / c["ttft_s"])
    table = (out / "bench.md").read_text()
    assert "untrained" in table and table.count("\n| ") == 1 + 9
    assert (out / "bench_speedup.png").stat().st_size > 1000 and (out / "bench_memory.png").is_file()
    json.loads((out / "bench.json").read_text())  # valid JSON on disk

    changed = B.BenchSettings(lengths=(96,), ks=(4,), ps=(0.0,), repeats=1, output_tokens=3, extra={"corpus": "tiny"})
    with pytest.raises(ValueError, match="other settings"):  # repeats differ: not the same run
        B.run_bench(tiny_engine, QUESTION, ctx, changed, out, progress=False)


def test_target_check_reads_the_numbers():
    doc = {"summary": [
        {"mode": "cached", "k": 16, "p": 0.0, "length": 2048, "ttft_speedup": 6.0, "kv_cache_reduction": 9.0},
        {"mode": "cached", "k": 16, "p": 0.0, "length": 4096, "ttft_speedup": 12.5, "kv_cache_reduction": 11.0},
    ]}
    lines = target_check(doc)
    assert "12.50x" in lines[0] and ": met" in lines[0] and "grows with length" in lines[1]
    doc["summary"][1]["ttft_speedup"] = 5.0
    lines = target_check(doc)
    assert "NOT met" in lines[0] and "does not grow" in lines[1]
    assert "not measured" in target_check({"summary": []})[0]


# --------------------------------------------------------------------------- qa


QA_FIELDS = {"setting", "policy", "p", "n", "examples", "match", "em", "f1", "ttft_s", "positions",
             "prompt_tokens", "projector_trained"}


def test_qa_harness_fields_and_resume(tiny_engine, tmp_path):
    examples = _examples()
    out = tmp_path / "qa"
    settings = Q.qa_settings(["relevance", "random", "perplexity-desc"], [0.0, 0.5])
    kw = dict(ns=(1, 3), settings=settings, max_new_tokens=3, progress=False, signature={"data": "tiny"})
    first = Q.run_qa(tiny_engine, examples, out, limit=2, **kw)
    assert first["examples"] == 2
    per_example = 1 + (len(settings) - 1) * 2  # closed-book once, every other setting per N
    log = out / Q.PREDICTIONS_FILE
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * per_example
    # Simulate an interruption in the middle of writing: the last record is cut short.
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    doc = Q.run_qa(tiny_engine, examples, out, limit=3, **kw)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(recs) == 3 * per_example and len({r["key"] for r in recs}) == len(recs)
    old = {json.loads(x)["key"]: json.loads(x)["prediction"] for x in lines[:-1]}
    for r in recs:  # earlier answers were kept verbatim
        if r["key"] in old:
            assert r["prediction"] == old[r["key"]]
    assert doc["examples"] == 3
    rows = {(r["setting"], r["n"]): r for r in doc["rows"]}
    assert set(rows) == {("closed_book", 0)} | {(s.name, n) for s in settings[1:] for n in (1, 3)}
    for r in doc["rows"]:
        assert QA_FIELDS <= set(r)
        for m in ("match", "em", "f1"):
            assert 0.0 <= r[m]["low"] <= r[m]["mean"] <= r[m]["high"] <= 1.0 and r[m]["n"] == 3
        assert r["ttft_s"] > 0
    assert rows[("rag", 3)]["positions"] > rows[("refrag_p0", 3)]["positions"] > rows[("closed_book", 0)]["positions"]
    assert rows[("rag", 3)]["gold_in_passages"] == 1.0
    assert rows[("refrag_p0", 1)]["projector_trained"] is False and doc["note"] == Q.UNTRAINED_NOTE
    assert (out / Q.PLOT_FILE).stat().st_size > 1000 and "Match [95% CI]" in (out / Q.TABLE_FILE).read_text()
    # Scores are the metric functions of the stored predictions.
    from refrag_integrations.evaluation.metrics import qa_scores

    for r in recs:
        assert {k: r[k] for k in ("match", "em", "f1")} == qa_scores(r["prediction"], r["answers"])
    with pytest.raises(ValueError, match="other settings"):
        Q.run_qa(tiny_engine, examples, out, limit=1, **{**kw, "max_new_tokens": 4})


def test_half_precision_weights_do_not_resume_into_a_bf16_autocast_run(tiny_dirs, tiny_engine, tmp_path):
    # Both runs compute in bfloat16, but one has float32 weights under autocast and the other
    # bfloat16 weights: their results directories must not mix. float32-weight runs keep the
    # signature they always had (no new key), so existing results directories still resume.
    import torch

    from refrag_integrations import RefragEngine

    dec, enc = tiny_dirs
    half = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu",
                                        decoder_dtype="bfloat16")
    kw = dict(ns=(1,), settings=Q.qa_settings([], [0.0]), limit=1, max_new_tokens=2, progress=False)
    out = tmp_path / "qa"
    tiny_engine.autocast_dtype = torch.bfloat16
    try:
        Q.run_qa(tiny_engine, _examples(), out, **kw)
    finally:
        tiny_engine.autocast_dtype = None
    first = json.loads((out / "run.json").read_text())
    assert first["dtype"] == "bfloat16" and "decoder_weights" not in first
    with pytest.raises(ValueError, match="other settings"):
        Q.run_qa(half, _examples(), out, **kw)
    Q.run_qa(half, _examples(), tmp_path / "qa_half", **kw)
    assert json.loads((tmp_path / "qa_half" / "run.json").read_text())["decoder_weights"] == "bfloat16"


def test_qa_with_a_retriever_records_whether_gold_was_retrieved(tiny_engine, tmp_path):
    examples = _examples()
    corpus = [e.passage for e in examples]

    def retrieve(question: str, n: int) -> list[str]:  # always the first n passages of the corpus
        return corpus[:n]

    doc = Q.run_qa(tiny_engine, examples, tmp_path / "qa", ns=(2,), settings=Q.qa_settings([], [0.0]), limit=4,
                   max_new_tokens=2, retrieve=retrieve, progress=False)
    rows = {r["setting"]: r for r in doc["rows"]}
    assert rows["rag"]["gold_in_passages"] == pytest.approx(2 / 4)  # examples 0 and 1 have their gold in top 2
    assert "gold_in_passages" not in rows["closed_book"]
    recs = [json.loads(x) for x in (tmp_path / "qa" / Q.PREDICTIONS_FILE).read_text().splitlines()]
    assert {r["gold_position"] for r in recs if r["setting"] == "rag"} == {0, 1, None}
    assert json.loads((tmp_path / "qa" / "run.json").read_text())["passages"] == "retrieved"


@pytest.mark.integration
def test_chroma_retriever_finds_the_relevant_passage(tmp_path):
    from refrag_integrations.evaluation.retrieval import ChromaRetriever

    r = ChromaRetriever(SENTENCES, tmp_path / "idx", progress=False)
    assert r.size == len(set(SENTENCES))
    hits = r.search("Which tower in Paris did Gustave Eiffel design?", 2)
    assert len(hits) == 2 and "Eiffel" in hits[0]
    again = ChromaRetriever(SENTENCES + SENTENCES[:2], tmp_path / "idx", progress=False)  # reused, deduplicated
    assert again.size == r.size
    with pytest.raises(ValueError, match="n must be"):
        r.search("x", 0)


def test_qa_settings_validate_policies():
    assert [s.name for s in Q.qa_settings(["perplexity-desc"], [0.25])][-1] == "refrag_perplexity-desc_p0.25"
    with pytest.raises(ValueError, match="unknown expansion policy"):
        Q.qa_settings(["relevence"], [0.25])
    with pytest.raises(ValueError, match="fixed setting"):
        Q.qa_settings(["all"], [0.25])
    with pytest.raises(ValueError, match="p must lie"):
        Q.qa_settings([], [1.5])


def test_qa_evaluates_another_checkpoints_learned_policy(tiny_engine, tmp_path):
    from refrag_integrations.checkpoint import save_checkpoint
    from refrag_integrations.policy import LearnedPolicy

    enc = tiny_engine.chunk_encoder
    policy = LearnedPolicy(enc.encoder_dim, query_conditioned=False, expand_fraction=0.5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial weights (a fresh policy is uniform)
        for w in policy.parameters():
            w.add_(torch.randn(w.shape, generator=g) * 0.5)
    proj = enc.projector.state_dict()
    ckpt = save_checkpoint(tmp_path / "other", tiny_engine.config, proj,
                           policy=policy.state_dict(), policy_config=policy.policy_config())
    loaded = Q.load_extra_policy(tiny_engine, ckpt)
    passages = SENTENCES[:3]
    assert tiny_engine.decide(QUESTION, passages, loaded, expand_fraction=0.5) == tiny_engine.decide(
        QUESTION, passages, policy, expand_fraction=0.5)

    settings = Q.qa_settings(["learned-chunks"], [0.5])
    assert settings[-1].name == "refrag_learned-chunks_p0.5"
    kw = dict(ns=(3,), settings=settings, max_new_tokens=2, progress=False, limit=1)
    with pytest.raises(ValueError, match="learned-chunks"):  # named but not given: refused before answering
        Q.run_qa(tiny_engine, _examples(), tmp_path / "qa", **kw)
    assert not (tmp_path / "qa" / Q.PREDICTIONS_FILE).is_file() or not (tmp_path / "qa" / Q.PREDICTIONS_FILE).read_text()
    doc = Q.run_qa(tiny_engine, _examples(), tmp_path / "qa", extra_policies={"chunks": loaded}, **kw)
    assert any(r["setting"] == "refrag_learned-chunks_p0.5" for r in doc["rows"])
    rec = next(json.loads(x) for x in (tmp_path / "qa" / Q.PREDICTIONS_FILE).read_text().splitlines()
               if json.loads(x)["setting"] == "refrag_learned-chunks_p0.5")
    assert rec["chunks_expanded"] == rec["chunks"] // 2  # the policy chose its budget

    # A policy trained on other encoder weights reads other chunk vectors: refused.
    name, value = next(iter(enc.encoder.state_dict().items()))
    bad = save_checkpoint(tmp_path / "bad", tiny_engine.config, proj, encoder_delta={name: value + 1.0},
                          policy=policy.state_dict(), policy_config=policy.policy_config())
    with pytest.raises(ValueError, match="encoder weights differ"):
        Q.load_extra_policy(tiny_engine, bad)
    with pytest.raises(ValueError, match="no learned policy"):
        Q.load_extra_policy(tiny_engine, save_checkpoint(tmp_path / "none", tiny_engine.config, proj))


def test_random_policy_decisions_do_not_depend_on_order(tiny_engine):
    setting = Q.QASetting("refrag_random_p0.5", "random", 0.5)
    chunks = [object()] * 10
    a = Q._policy_for(tiny_engine, setting, 0, 7, 5).select("q", chunks, None, 0.5)
    Q._policy_for(tiny_engine, setting, 0, 8, 5).select("q", chunks, None, 0.5)  # another request between
    b = Q._policy_for(tiny_engine, setting, 0, 7, 5).select("q", chunks, None, 0.5)
    assert a == b and sum(a) == 5


def test_equal_latency_pairs_more_refrag_passages_with_fewer_rag_passages():
    def row(setting, n, ttft, m):
        return {"setting": setting, "n": n, "ttft_s": ttft, "match": {"mean": m}}

    rows = [row("rag", 1, 1.0, 0.30), row("rag", 5, 3.0, 0.40),
            row("refrag_p0", 1, 0.2, 0.20), row("refrag_p0", 5, 0.6, 0.35), row("refrag_p0", 10, 1.5, 0.45)]
    pairs = Q.equal_latency(rows)
    assert [(p["rag_n"], p["refrag_n"]) for p in pairs] == [(1, 5), (5, 10)]
    assert pairs[0]["delta_match"] == pytest.approx(0.05)


# --------------------------------------------------------------------------- ppl


def test_full_context_nll_equals_the_plain_decoder(tiny_engine):
    """policy="all" through the engine must score exactly like the plain decoder on the tokens."""
    tok = tiny_engine.tokenizer
    context, cont = heldout_windows(CORPUS, tok, 30, 6, limit=1)[0]
    nll, positions = P.continuation_nll(tiny_engine, context, cont, "all")
    ids = P.start_ids(tok) + tok(context, add_special_tokens=False)["input_ids"] + list(cont)
    with torch.no_grad():
        logits = tiny_engine.decoder(input_ids=torch.tensor([ids])).logits[0]
    o = len(cont)
    ref = torch.nn.functional.cross_entropy(logits[-o - 1 : -1], torch.tensor(cont))
    assert positions == len(ids)
    assert nll == pytest.approx(float(ref), abs=1e-4)
    none_nll, none_pos = P.continuation_nll(tiny_engine, None, cont)
    assert none_pos == len(P.start_ids(tok)) + o and math.isfinite(none_nll)
    comp_nll, comp_pos = P.continuation_nll(tiny_engine, context, cont, "none")
    assert comp_pos < positions and math.isfinite(comp_nll)


def test_ppl_harness_fields_and_resume(tiny_engine, tmp_path):
    windows = heldout_windows(CORPUS * 4, tiny_engine.tokenizer, 24, 6, limit=4)
    out = tmp_path / "ppl"
    P.run_ppl(tiny_engine, windows[:2], out, ks=(4, 8), ps=(0.0, 0.5), progress=False, signature={"data": "tiny"})
    first = (out / P.WINDOWS_FILE).read_text().splitlines()
    assert len(first) == 2 * 6
    doc = P.run_ppl(tiny_engine, windows, out, ks=(4, 8), ps=(0.0, 0.5), progress=False, signature={"data": "tiny"})
    lines = (out / P.WINDOWS_FILE).read_text().splitlines()
    assert lines[: len(first)] == first and len(lines) == 4 * 6  # kept, then extended
    assert doc["windows"] == 4
    rows = {r["setting"]: r for r in doc["rows"]}
    assert list(rows) == ["no_context", "full_context", "refrag_k4", "refrag_k4_p0.5", "refrag_k8", "refrag_k8_p0.5"]
    for r in rows.values():
        c = r["log_ppl"]
        assert c["low"] <= c["mean"] <= c["high"] and r["ppl"] == pytest.approx(math.exp(c["mean"]))
    assert rows["full_context"]["positions"] > rows["refrag_k4_p0.5"]["positions"] > rows["refrag_k4"]["positions"]
    assert rows["refrag_k4"]["positions"] > rows["refrag_k8"]["positions"] > rows["no_context"]["positions"]
    assert rows["refrag_k4"]["projector_trained"] is False and rows["full_context"]["projector_trained"] is None
    assert (out / P.PLOT_FILE).is_file() and "log-PPL" in (out / P.TABLE_FILE).read_text()
    # Gap share: only for REFRAG rows, recomputed from the per-window NLLs.
    assert rows["no_context"]["gap_closed"] is None and rows["full_context"]["gap_closed"] is None
    recs = [json.loads(line) for line in lines]
    nll = {s: [r["nll"] for r in recs if r["setting"] == s] for s in rows}
    none, full = statistics.fmean(nll["no_context"]), statistics.fmean(nll["full_context"])
    if none > full:
        g = rows["refrag_k4"]["gap_closed"]
        assert g["mean"] == pytest.approx((none - statistics.fmean(nll["refrag_k4"])) / (none - full))
        assert g["low"] <= g["mean"] <= g["high"] and "gap closed" in (out / P.TABLE_FILE).read_text()


def test_gap_closed_ci_is_paired_and_refuses_no_gap():
    none = [4.0, 3.0, 5.0, 4.5, 3.5]
    full = [x - 1.0 for x in none]  # full context always 1 nat better
    half = [x - 0.5 for x in none]  # closes exactly half on every window
    ci = P.gap_closed_ci(none, full, half, resamples=500)
    # Paired resampling: every resample closes exactly half, whatever the windows' spread.
    assert ci.mean == pytest.approx(0.5) and ci.low == pytest.approx(0.5) and ci.high == pytest.approx(0.5)
    noisy = P.gap_closed_ci(none, full, [4.0, 2.0, 4.6, 3.9, 3.2], resamples=500)
    assert noisy.low < noisy.mean < noisy.high
    assert P.gap_closed_ci(none, none, half) is None  # full context no better: nothing to close
    with pytest.raises(ValueError, match="same windows"):
        P.gap_closed_ci(none, full[:3], half)


# --------------------------------------------------------------------------- report


def test_report_assembles_the_page(tiny_engine, tmp_path):
    settings = B.BenchSettings(lengths=(48,), ks=(4,), ps=(0.0,), repeats=1, output_tokens=2)
    ctx = {48: build_context(SENTENCES * 5, tiny_engine.tokenizer, 48)}
    B.run_bench(tiny_engine, QUESTION, ctx, settings, tmp_path / "b", progress=False)
    windows = heldout_windows(CORPUS * 2, tiny_engine.tokenizer, 24, 4, limit=2)
    P.run_ppl(tiny_engine, windows, tmp_path / "p", ks=(4,), progress=False)
    page = write_benchmarks_doc(tmp_path / "b", tmp_path / "missing", tmp_path / "p", tmp_path / "doc" / "bench.md",
                                label="quick test run")
    text = page.read_text()
    assert "**quick test run**" in text and "## Latency and memory" in text and "## Perplexity" in text
    assert "## Question answering" not in text  # no QA results: no QA section
    assert "not measured in this run" in text  # the 4096-token target was not part of this run
    for img in ("bench_speedup.png", "bench_memory.png", "p-ppl.png"):
        assert (tmp_path / "doc" / "bench" / img).is_file() and f"bench/{img}" in text
    with pytest.raises(ValueError, match="no results"):
        write_benchmarks_doc(tmp_path / "x", tmp_path / "y", tmp_path / "z", tmp_path / "d.md")


def test_jsonl_log_drops_a_partial_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v"')
    log = JsonlLog(path)
    assert "a" in log and "b" not in log and len(log) == 1
    log.append({"key": "b", "v": 2})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b"]


# --------------------------------------------------------------------------- CLI, real models


@pytest.mark.integration
def test_cli_commands_run_end_to_end_on_default_models(shared_data, tmp_path):
    from typer.testing import CliRunner

    from refrag_integrations.cli import app

    runner = CliRunner()
    common = ["--data-dir", str(shared_data), "--no-progress"]
    res = runner.invoke(app, ["bench", "--lengths", "128", "--k", "16", "--expand-fraction", "0", "--repeats", "1",
                              "--output-tokens", "2", "--out", str(tmp_path / "b"), *common])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert doc["complete"] and {r["mode"] for r in doc["results"]} == {"rag", "cached", "not_cached"}
    res = runner.invoke(app, ["eval", "qa", "--limit", "1", "--n", "2", "--expand-fraction", "0", "--policies", "",
                              "--max-new-tokens", "4", "--out", str(tmp_path / "q"), *common])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert {r["setting"] for r in summary["rows"]} == {"closed_book", "rag", "refrag_p0"}
    assert json.loads((tmp_path / "q" / "predictions.jsonl").read_text().splitlines()[0])["line"] == 2001
    res = runner.invoke(app, ["eval", "ppl", "--limit", "1", "--context-tokens", "64", "--continuation-tokens", "8",
                              "--k", "16", "--out", str(tmp_path / "p"), *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "p" / "summary.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["no_context", "full_context", "refrag_k16"]
    res = runner.invoke(app, ["eval", "report", "--bench-dir", str(tmp_path / "b"), "--qa-dir", str(tmp_path / "q"),
                              "--ppl-dir", str(tmp_path / "p"), "--out", str(tmp_path / "bench.md")])
    assert res.exit_code == 0, res.output
    assert "## Question answering" in (tmp_path / "bench.md").read_text()


@pytest.mark.integration
def test_cli_bench_concurrency_runs_end_to_end_on_default_models(shared_data, tmp_path):
    from typer.testing import CliRunner

    from refrag_integrations.cli import app

    res = CliRunner().invoke(app, [
        "bench", "--concurrency", "1,2", "--lengths", "128", "--expand-fraction", "0", "--repeats", "1",
        "--output-tokens", "2", "--out", str(tmp_path / "b"), "--docs", str(tmp_path / "bench.md"),
        "--data-dir", str(shared_data), "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "throughput.json").read_text())
    assert doc["complete_for_backend"] and len(doc["results"]) == 4
    assert {(r["mode"], r["concurrency"]) for r in doc["results"]} == {("rag", 1), ("rag", 2), ("cached", 1), ("cached", 2)}
    assert all(r["output_tokens"] == 2 * r["requests"] for r in doc["results"])
    assert "## Throughput under concurrent requests" in (tmp_path / "bench.md").read_text()
