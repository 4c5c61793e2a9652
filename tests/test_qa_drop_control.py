"""The equal-selection drop control of ``refrag eval qa`` on tiny models: a drop twin per selective
REFRAG row, the same decisions, only the expanded chunks' text in the prompt, resumable runs, the
paired REFRAG - drop difference in the summary and the report, and a clean CLI refusal."""

from __future__ import annotations

import json

import pytest
import torch

from refrag_integrations.evaluation import qa as Q
from refrag_integrations.evaluation.data import QAExample
from refrag_integrations.evaluation.report import write_benchmarks_doc

from tiny import CORPUS

SENTENCES = [s.strip() + "." for s in CORPUS.split(". ") if len(s.split()) > 4]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (2-core CI machines, often shared); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _examples() -> list[QAExample]:
    return [QAExample(f"What about {s.split()[1]}?", (s.split()[0],), s, 100 + i) for i, s in enumerate(SENTENCES)]


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / Q.PREDICTIONS_FILE).read_text().splitlines()]


class _GenerateSpy:
    """Wraps ``engine.generate``: records (question, passages, expand) of every call, in order."""

    def __init__(self, engine) -> None:
        self.engine, self.real, self.calls = engine, engine.generate, []

    def __call__(self, question, passages=(), **kw):
        self.calls.append((question, list(passages), kw.get("policy")))
        return self.real(question, passages, **kw)


def test_qa_settings_add_a_drop_twin_per_selective_row_only():
    settings = Q.qa_settings(["relevance", "random"], [0.0, 0.5], controls=["drop"])
    names = [s.name for s in settings]
    assert names == ["closed_book", "rag", "refrag_p0", "refrag_relevance_p0.5", "refrag_random_p0.5",
                     "drop_relevance_p0.5", "drop_random_p0.5"]
    drops = {s.name: s for s in settings if s.control_of}
    assert {s.control_of for s in drops.values()} == {"refrag_relevance_p0.5", "refrag_random_p0.5"}
    assert all(not s.is_refrag and s.uses_passages for s in drops.values())
    assert drops["drop_random_p0.5"].expand == "random" and drops["drop_random_p0.5"].p == 0.5
    assert [s.name for s in Q.qa_settings(["relevance"], [0.0, 0.5])] == names[:4]  # no control: unchanged
    with pytest.raises(ValueError, match="unknown control 'dorp'"):
        Q.qa_settings(["relevance"], [0.5], controls=["dorp"])
    with pytest.raises(TypeError, match="list of names"):
        Q.qa_settings(["relevance"], [0.5], controls="drop")
    with pytest.raises(ValueError, match="needs a selective REFRAG setting"):
        Q.qa_settings(["relevance"], [0.0], controls=["drop"])


def test_run_qa_refuses_a_drop_row_without_its_refrag_row_first(tiny_engine, tmp_path):
    settings = Q.qa_settings(["random"], [0.5], controls=["drop"])
    with pytest.raises(ValueError, match="must be a REFRAG setting listed before it"):
        Q.run_qa(tiny_engine, _examples(), tmp_path / "qa", ns=(1,), settings=settings[::-1], limit=1,
                 max_new_tokens=2, progress=False)


def test_drop_rows_reuse_decisions_and_keep_only_the_expanded_chunks(tiny_engine, tmp_path, monkeypatch):
    spy = _GenerateSpy(tiny_engine)
    monkeypatch.setattr(tiny_engine, "generate", spy)
    settings = Q.qa_settings(["relevance", "random"], [0.0, 0.5], controls=["drop"])
    out = tmp_path / "qa"
    doc = Q.run_qa(tiny_engine, _examples(), out, ns=(1, 3), settings=settings, limit=2, max_new_tokens=3,
                   progress=False)
    recs = {r["key"]: r for r in _records(out)}
    rows = {(r["setting"], r["n"]) for r in doc["rows"]}
    for n in (1, 3):  # a drop row for each selective row, none for closed-book / rag / p = 0
        assert {s for s, m in rows if m == n and s.startswith("drop_")} == {"drop_relevance_p0.5", "drop_random_p0.5"}

    calls = iter(spy.calls)  # one generate call per record, in log order
    checked = 0
    for rec in _records(out):
        question, passages, expand = next(calls)
        if not rec["setting"].startswith("drop_"):
            refrag_passages = passages  # the REFRAG twin is answered just before (same question and N)
            continue
        twin = recs[Q.record_key(rec["setting"].replace("drop_", "refrag_", 1), rec["n"], rec["line"])]
        assert rec["expanded"] == twin["expanded"] and rec["decisions_from"] == "refrag record"
        assert rec["chunks_expanded"] == twin["chunks_expanded"] > 0 and rec["chunks"] == twin["chunks"]
        assert expand == "all" and question == twin["question"]
        chunks = [tiny_engine.chunk(p) for p in refrag_passages]
        want = ["".join(c.text for c in cs if c.index in e) for cs, e in zip(chunks, twin["expanded"])]
        assert passages == [w for w in want if w.strip()] and rec["passages_kept"] == len(passages)
        # The input the decoder sees holds, where the passages go, exactly the expanded chunks' spans
        # (cut from the original passages by offset), in order, under the engine's passage labels.
        prepared = tiny_engine.prepare_rag(question, passages, "all")
        rag = tiny_engine.build_prompt(question, passages)
        prompt, spans = rag.text, rag.spans
        assert tiny_engine.tokenizer.decode(prepared.token_ids).endswith(prompt)
        spans_kept = ["".join(p[c.start:c.end] for c in cs if c.index in e)
                      for p, cs, e in zip(refrag_passages, chunks, twin["expanded"])]
        region = prompt[spans[0][0] - len("Passage 1:\n"):spans[-1][1]]
        assert region == "\n\n".join(f"Passage {i + 1}:\n{t}" for i, t in enumerate(x for x in spans_kept if x.strip()))
        for p, cs, e in zip(refrag_passages, chunks, twin["expanded"]):  # no unexpanded chunk's text
            dropped = [c.text.strip() for c in cs if c.index not in e and c.text.strip()]
            assert dropped and all(t not in region for t in dropped if t not in "".join(spans_kept)), dropped
        assert prepared.stats.positions == rec["positions"] == rec["prompt_tokens"] < twin["positions"]
        assert rec["projector_trained"] is None and rec["ttft_s"] > 0
        checked += 1
    assert checked == 2 * 2 * 2  # 2 questions x 2 N x 2 policies


def test_drop_rows_resume_and_recover_decisions_of_older_records(tiny_engine, tmp_path):
    settings = Q.qa_settings(["random", "perplexity-desc"], [0.5], controls=["drop"])
    kw = dict(ns=(3,), settings=settings, max_new_tokens=3, progress=False)
    out = tmp_path / "qa"
    Q.run_qa(tiny_engine, _examples(), out, limit=2, **kw)
    first = {r["key"]: r for r in _records(out)}
    # An older run: REFRAG records without decisions, no drop rows yet; then resumed with the control.
    old = [{k: v for k, v in r.items() if k != "expanded"} for r in first.values() if not r["setting"].startswith("drop_")]
    (out / Q.PREDICTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in old))
    doc = Q.run_qa(tiny_engine, _examples(), out, limit=3, **kw)
    again = {r["key"]: r for r in _records(out)}
    assert len(again) == 3 * len(settings)  # every row for 3 questions, once (one N)
    for key, rec in first.items():
        if rec["setting"].startswith("drop_"):
            assert again[key]["decisions_from"] == "recomputed" and again[key]["expanded"] == rec["expanded"]
            assert again[key]["prediction"] == rec["prediction"]  # same prompt, greedy
        else:
            assert again[key]["prediction"] == rec["prediction"]  # kept verbatim, not answered again
    third = [r for r in again.values() if r["line"] == 102 and r["setting"].startswith("drop_")]
    assert len(third) == 2 and all(r["decisions_from"] == "refrag record" for r in third)
    assert doc["examples"] == 3

    # A record whose counts the policy cannot reproduce is refused, not silently re-decided.
    key = Q.record_key("refrag_random_p0.5", 3, 100)
    tampered = [dict(r, chunks_expanded=r["chunks_expanded"] + 1) if r["key"] == key else r
                for r in again.values() if r["key"] != Q.record_key("drop_random_p0.5", 3, 100)]
    (out / Q.PREDICTIONS_FILE).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "expanded"}) + "\n"
                                                  for r in tampered))
    with pytest.raises(ValueError, match="cannot be recovered"):
        Q.run_qa(tiny_engine, _examples(), out, limit=3, **kw)


def test_drop_difference_is_paired():
    refrag = [1.0, 1.0, 0.0, 0.0] * 5
    same = [({"match": a, "positions": 60}, {"match": a, "positions": 40}) for a in refrag]
    d = Q.drop_difference("refrag_random_p0.25", "drop_random_p0.25", 5, same)
    # Unpaired, two 0.5-means would give a wide interval; paired, identical answers give exactly 0.
    assert d["difference"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 20, "confidence": 0.95}
    better = [({"match": 1.0, "positions": 60}, {"match": b, "positions": 40}) for b in [0.0, 1.0] * 10]
    d = Q.drop_difference("refrag_random_p0.25", "drop_random_p0.25", 5, better)
    assert d["refrag"] == 1.0 and d["drop"] == 0.5 and d["difference"]["mean"] == pytest.approx(0.5)
    assert 0.0 < d["difference"]["low"] < 0.5 < d["difference"]["high"] <= 1.0
    assert d["refrag_positions"] == 60 and d["drop_positions"] == 40
    with pytest.raises(ValueError, match="no questions answered in both"):
        Q.drop_difference("a", "b", 5, [])


def test_summary_and_report_show_refrag_minus_drop(tiny_engine, tmp_path):
    settings = Q.qa_settings(["relevance", "random"], [0.0, 0.5], controls=["drop"])
    out = tmp_path / "qa"
    doc = Q.run_qa(tiny_engine, _examples(), out, ns=(1, 3), settings=settings, limit=3, max_new_tokens=3,
                   progress=False)
    recs = {r["key"]: r for r in _records(out)}
    diffs = {(d["setting"], d["n"]): d for d in doc["drop_control"]}
    assert set(diffs) == {(f"refrag_{p}_p0.5", n) for p in ("relevance", "random") for n in (1, 3)}
    for (name, n), d in diffs.items():
        ref = [recs[Q.record_key(name, n, ln)]["match"] for ln in (100, 101, 102)]
        drop = [recs[Q.record_key(d["control"], n, ln)]["match"] for ln in (100, 101, 102)]
        c = d["difference"]
        assert c["mean"] == pytest.approx(sum(ref) / 3 - sum(drop) / 3) and c["n"] == d["examples"] == 3
        assert -1.0 <= c["low"] <= c["mean"] <= c["high"] <= 1.0
    assert json.loads((out / Q.SUMMARY_FILE).read_text())["drop_control"] == doc["drop_control"]
    page = write_benchmarks_doc(tmp_path / "no-bench", out, tmp_path / "no-ppl", tmp_path / "doc" / "bench.md")
    text = page.read_text()
    assert "Drop control:" in text and "| REFRAG setting | N | examples | REFRAG Match | drop Match | REFRAG - drop" in text
    d = diffs[("refrag_random_p0.5", 3)]["difference"]
    assert f"| refrag_random_p0.5 | 3 | 3 |" in text and f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in text
    assert "drop control" in text.lower().split("## question answering")[0]  # defined in "What is measured"

    # Without the control there is no drop section.
    plain = Q.run_qa(tiny_engine, _examples(), tmp_path / "plain", ns=(1,), settings=Q.qa_settings(["random"], [0.5]),
                     limit=1, max_new_tokens=2, progress=False)
    assert "drop_control" not in plain and "Drop control" not in (tmp_path / "plain" / Q.TABLE_FILE).read_text()


def test_cli_control_flag(tiny_engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from refrag_integrations.cli import app
    from refrag_integrations.cli import eval as eval_cli

    loads = []

    def load_engine(*args, **kwargs):
        loads.append(args)
        return tiny_engine

    monkeypatch.setattr(eval_cli, "load_engine", load_engine)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answers": list(e.answers),
                                        "ctxs": [{"title": "", "text": e.passage}]}) + "\n" for e in _examples()))
    runner = CliRunner()
    args = ["eval", "qa", "--data", str(data), "--n", "2", "--p", "0,0.5", "--policies", "random", "--limit", "1",
            "--max-new-tokens", "2", "--out", str(tmp_path / "q"), "--no-progress"]
    res = runner.invoke(app, [*args, "--control", "dorp"])
    assert res.exit_code == 2 and "unknown control 'dorp'" in res.output and not loads  # refused before loading
    assert not (tmp_path / "q").exists()
    res = runner.invoke(app, [*args, "--control", "drop"])
    assert res.exit_code == 0, res.output
    assert loads and "drop_random_p0.5" in res.output and "Drop control:" in res.output
    summary = json.loads((tmp_path / "q" / Q.SUMMARY_FILE).read_text())
    assert [d["control"] for d in summary["drop_control"]] == ["drop_random_p0.5"]
    res = runner.invoke(app, [*args, "--control", "drop,blank"])  # resumed: only the blank rows are new
    assert res.exit_code == 0, res.output
    assert "Blank control:" in res.output and "Drop control:" in res.output
    summary = json.loads((tmp_path / "q" / Q.SUMMARY_FILE).read_text())
    assert [d["control"] for d in summary["drop_control"]] == ["drop_random_p0.5", "blank_random_p0.5"]


def test_blank_rows_keep_decisions_and_positions_and_give_compressed_chunks_one_content_free_vector(
    tiny_engine, tmp_path, monkeypatch
):
    settings = Q.qa_settings(["random"], [0.5], controls=["drop", "blank"])
    assert [s.name for s in settings][-2:] == ["drop_random_p0.5", "blank_random_p0.5"]
    assert settings[-1].control == "blank" and settings[-1].control_of == "refrag_random_p0.5"
    examples = _examples()
    want_vec = Q.blank_vector(tiny_engine, [e.passage for e in examples[: Q.BLANK_REFERENCE_PASSAGES]])
    tiny_engine.forget_vectors()
    seen = []
    real = tiny_engine.prepare_rag

    def spy(question, passages, policy=None, **kw):
        seen.append((question, list(passages), policy, kw.get("vectors")))
        return real(question, passages, policy, **kw)

    monkeypatch.setattr(tiny_engine, "prepare_rag", spy)
    out = tmp_path / "qa"
    doc = Q.run_qa(tiny_engine, examples, out, ns=(3,), settings=settings, limit=2, max_new_tokens=3, progress=False)
    recs = {r["key"]: r for r in _records(out)}
    blanks = [r for r in recs.values() if r["setting"] == "blank_random_p0.5"]
    assert len(blanks) == 2 and len(seen) == 2  # only the blank rows call prepare_rag directly
    for rec, (question, passages, decisions, vectors) in zip(blanks, seen):
        twin = recs[Q.record_key("refrag_random_p0.5", 3, rec["line"])]
        assert rec["expanded"] == twin["expanded"] and question == twin["question"] and len(passages) == 3
        assert decisions == [[i in e for i in range(len(tiny_engine.chunk(p)))] for p, e in zip(passages, twin["expanded"])]
        assert rec["positions"] == twin["positions"] and rec["chunks_expanded"] == twin["chunks_expanded"]
        for v, d in zip(vectors, decisions):  # every chunk's vector is the reference mean, not its own
            assert v.shape == (len(d), want_vec.shape[0]) and torch.allclose(v, want_vec.expand_as(v))
        own = torch.cat(tiny_engine.chunk_vectors(passages).vectors, 0)
        assert not torch.allclose(own, want_vec.expand_as(own))
    kinds = {d["control"]: d for d in doc["drop_control"]}
    assert set(kinds) == {"drop_random_p0.5", "blank_random_p0.5"}
    text = (out / Q.TABLE_FILE).read_text()
    assert "Blank control:" in text and "| REFRAG setting | N | examples | REFRAG Match | blank Match | REFRAG - blank" in text
    assert "Drop control:" in text
