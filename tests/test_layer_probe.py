"""The layer probe (evaluation/layer_probe.py, `refrag eval layers`) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from refrag_integrations.evaluation import layer_probe
from refrag_integrations.evaluation.capacity import answer_ids, compressed_prompt

from test_capacity_probe import EXAMPLES, PASSAGE  # noqa: E402  (tests/ is on sys.path via conftest)


def test_summaries_are_each_chunks_mean_hidden_state(tiny_chat_engine):
    eng = tiny_chat_engine
    chunks = eng.chunk(PASSAGE)
    got = layer_probe.chunk_summaries(eng, PASSAGE, [1, 2])
    ids = torch.tensor([layer_probe.start_ids(eng) + [t for c in chunks for t in c.token_ids]])
    with torch.no_grad():
        states = eng.decoder(input_ids=ids, output_hidden_states=True).hidden_states
    first = states[2][0, len(layer_probe.start_ids(eng)):][: len(chunks[0].token_ids)].mean(0)
    assert got[2].shape == (len(chunks), eng.decoder.config.hidden_size)
    assert torch.allclose(got[2][0], first, atol=1e-5)
    assert not torch.allclose(got[1], got[2])


def test_replacing_rows_with_their_own_states_changes_nothing_and_other_vectors_change_the_score(tiny_chat_engine):
    """The hook is where it claims to be: putting back the states the rows already have at the
    input of layer L leaves the answer NLL unchanged; other vectors change it; outside the block
    the decoder is untouched."""
    eng = tiny_chat_engine
    ex = EXAMPLES[0]
    prompt, (a, b) = compressed_prompt(eng, ex.question, ex.passage)
    target = answer_ids(eng, ex.answers[0])
    with torch.no_grad():
        plain = float(eng.score([prompt], target)[0])
        inputs = torch.cat([prompt, eng.decoder.get_input_embeddings()(torch.tensor(target[:-1]))])[None]
        own = eng.decoder(inputs_embeds=inputs, output_hidden_states=True).hidden_states[1][0, a:b]
        with layer_probe.residual_rows_replaced(eng, 1, (a, b), own):
            same = float(eng.score([prompt], target)[0])
        with layer_probe.residual_rows_replaced(eng, 1, (a, b), torch.randn(own.shape, generator=torch.Generator().manual_seed(0)) * 50):
            moved = float(eng.score([prompt], target)[0])
        after = float(eng.score([prompt], target)[0])
    assert same == pytest.approx(plain, abs=1e-5)
    assert abs(moved - plain) > 1e-4  # the tiny random decoder reads little; same is within 1e-5
    assert after == plain
    with pytest.raises(ValueError, match="vectors for rows"):
        with layer_probe.residual_rows_replaced(eng, 1, (a, b), own[:-1]):
            pass


def test_run_summarises_resumes_and_checks_layers(tiny_chat_engine, tmp_path, monkeypatch):
    eng = tiny_chat_engine  # 2 blocks: layer 1 is the only one a summary can enter and be read after
    doc = layer_probe.run_layer_probe(eng, EXAMPLES, tmp_path, layers=[1], max_new_tokens=4, progress=False)
    assert doc["examples"] == 2
    assert [r["setting"] for r in doc["rows"]] == ["closed_book", "full", "encoder_p0", "L1_content", "L1_blank"]
    records = [json.loads(x) for x in (tmp_path / layer_probe.EXAMPLES_FILE).read_text().splitlines()]
    diff = sum(r["nll_L1_blank"] - r["nll_L1_content"] for r in records) / 2
    assert [r["layer"] for r in doc["layers"]] == [1]
    assert doc["layers"][0]["content_minus_blank"] == pytest.approx(diff)
    assert records[0]["nll_L1_content"] != records[0]["nll_L1_blank"]
    assert {"answer_full", "match_closed_book", "answer_L1_content", "match_L1_blank"} <= set(records[0])
    assert all(0 <= r["match"] <= 1 for r in doc["rows"]) and "match_content_minus_blank" in doc["layers"][0]
    assert "| L1_blank |" in (tmp_path / layer_probe.TABLE_FILE).read_text()

    monkeypatch.setattr(layer_probe, "probe_example", lambda *a, **k: pytest.fail("a finished example was probed again"))
    assert layer_probe.run_layer_probe(eng, EXAMPLES, tmp_path, layers=[1], max_new_tokens=4, progress=False)["rows"] == doc["rows"]
    n = eng.decoder.config.num_hidden_layers
    for bad in ([0], [n], []):
        with pytest.raises(ValueError, match="layers must be in"):
            layer_probe.run_layer_probe(eng, EXAMPLES, tmp_path / "other", layers=bad, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError):  # other settings in the same directory
        layer_probe.run_layer_probe(eng, EXAMPLES[:1], tmp_path, layers=[1], max_new_tokens=5, progress=False)


def test_cli_refuses_bad_values_before_loading(monkeypatch):
    from refrag_integrations.cli import app
    from refrag_integrations.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_engine", lambda *a, **k: pytest.fail("loaded a model"))
    for args in (["--limit", "0"], ["--layers", "x"], ["--layers", ""], ["--max-new-tokens", "0"]):
        res = CliRunner().invoke(app, ["eval", "layers", *args])
        assert res.exit_code == 2, (args, res.output)
