"""The chunk-vector capacity probe (evaluation/capacity.py, `refrag eval capacity`) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from refrag_integrations.evaluation import capacity
from refrag_integrations.evaluation.data import QAExample

PASSAGE = ("Gustave Eiffel designed the tower in Paris, France. Robert Boulter is an English film, television "
           "and theatre actor. He had a guest starring role on the television series The Bill in 2000.")
EXAMPLES = [
    QAExample(question="Who designed the tower in Paris?", answers=("Gustave Eiffel",), passage=PASSAGE, line=1),
    QAExample(question="Who is Robert Boulter?", answers=("an English actor", "actor"), passage=PASSAGE, line=2),
]


def test_qa_input_puts_vectors_where_the_engine_puts_compressed_chunks(tiny_chat_engine):
    eng = tiny_chat_engine
    own = capacity.initial_vectors(eng, PASSAGE, "encoder")
    ours = capacity.qa_input(eng, EXAMPLES[0].question, PASSAGE, own)
    theirs = eng.prepare_rag(EXAMPLES[0].question, [PASSAGE], "none").embeds
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="vectors for"):
        capacity.qa_input(eng, EXAMPLES[0].question, PASSAGE, own[:-1])


def test_fit_lowers_reconstruction_nll_and_leaves_the_decoder_alone(tiny_engine):
    eng = tiny_engine
    before = {n: p.detach().clone() for n, p in eng.decoder.named_parameters()}
    flags = [p.requires_grad for p in eng.decoder.parameters()]
    chunks = eng.chunk(PASSAGE)
    init = capacity.initial_vectors(eng, PASSAGE, "mean")
    assert init.shape == (len(chunks), eng.decoder.get_input_embeddings().weight.shape[1])
    fit = capacity.fit_chunk_vectors(eng, chunks, init, steps=25, lr=0.1)
    assert fit.vectors.shape == init.shape
    assert fit.nll < fit.nll_start  # the tiny random decoder barely reacts to its inputs: any drop shows the fit works
    assert not torch.allclose(fit.vectors, init)
    assert 0.0 <= fit.token_acc <= 1.0
    for n, p in eng.decoder.named_parameters():
        assert torch.equal(p, before[n]), n
    assert [p.requires_grad for p in eng.decoder.parameters()] == flags
    with pytest.raises(ValueError, match="steps"):
        capacity.fit_chunk_vectors(eng, chunks, init, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="init"):
        capacity.initial_vectors(eng, PASSAGE, "zeros")


def test_run_capacity_summarises_and_resumes(tiny_chat_engine, tmp_path, monkeypatch):
    eng = tiny_chat_engine
    doc = capacity.run_capacity(eng, EXAMPLES, tmp_path, steps=2, lr=0.05, max_new_tokens=4, progress=False)
    assert doc["examples"] == 2
    assert [r["setting"] for r in doc["rows"]] == list(capacity.SETTINGS)
    lines = (tmp_path / capacity.EXAMPLES_FILE).read_text().splitlines()
    assert len(lines) == 2 and {"nll_fitted_p0", "match_full", "recon_acc", "recon_nll_none"} <= set(json.loads(lines[0]))
    assert doc["recon_nll_none"] > 0 and 0 <= doc["recon_acc_none"] <= 1
    assert "| fitted_p0 |" in (tmp_path / capacity.TABLE_FILE).read_text()

    def boom(*a, **k):
        raise AssertionError("a finished example was probed again")

    monkeypatch.setattr(capacity, "probe_example", boom)
    again = capacity.run_capacity(eng, EXAMPLES, tmp_path, steps=2, lr=0.05, max_new_tokens=4, progress=False)
    assert again["rows"] == doc["rows"]
    with pytest.raises(ValueError):  # other settings in the same directory
        capacity.run_capacity(eng, EXAMPLES, tmp_path, steps=3, lr=0.05, max_new_tokens=4, progress=False)


def test_summary_gap_closed_by_hand():
    def rec(line, closed, full, enc, fit):
        return {"line": line, "recon_acc": 0.5, "recon_nll": 1.0, "recon_nll_start": 2.0,
                **{f"nll_{s}": v for s, v in zip(capacity.SETTINGS, (closed, full, enc, fit))},
                **{f"match_{s}": 0.0 for s in capacity.SETTINGS}}

    doc = capacity.summarize_capacity([rec(1, 5.0, 1.0, 5.0, 3.0), rec(2, 3.0, 1.0, 3.0, 2.0)])
    gaps = {r["setting"]: r["gap_closed"] for r in doc["rows"]}
    assert gaps == pytest.approx({"closed_book": 0.0, "full": 1.0, "encoder_p0": 0.0, "fitted_p0": 0.5})


def test_cli_refuses_bad_values_before_loading(monkeypatch):
    from refrag_integrations.cli import app
    from refrag_integrations.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_engine", lambda *a, **k: pytest.fail("loaded a model"))
    for args in (["--steps", "0"], ["--lr", "0"], ["--init", "zeros"], ["--limit", "0"]):
        res = CliRunner().invoke(app, ["eval", "capacity", *args])
        assert res.exit_code == 2, (args, res.output)
