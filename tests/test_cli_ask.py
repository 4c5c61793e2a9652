"""`refrag ask` end to end on the real offline default models (integration)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from refrag_integrations.cli import app

PASSAGES = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.\n\n"
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal "
    "sub-range of the Himalayas.\n"
)


@pytest.fixture()
def passages_file(tmp_path):
    path = tmp_path / "passages.txt"
    path.write_text(PASSAGES)
    return path


@pytest.mark.integration
def test_ask_expand_all_answers_from_the_passage(passages_file):
    res = CliRunner().invoke(
        app, ["ask", "Who is the Eiffel Tower named after?", "--passages", str(passages_file), "--mode", "rag", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "Eiffel" in out["answer"] and "Gustave" in out["answer"]
    s = out["stats"]
    assert s["positions"] == s["prompt_tokens"] and s["chunks_expanded"] == s["chunks"] > 0


@pytest.mark.integration
def test_ask_expand_none_runs_end_to_end(passages_file):
    res = CliRunner().invoke(
        app, ["ask", "Who is the Eiffel Tower named after?", "--passages", str(passages_file),
              "--policy", "none", "--json", "--max-new-tokens", "16"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    s = out["stats"]
    assert s["chunks_expanded"] == 0 and s["chunks_compressed"] == s["chunks"] > 0
    assert s["positions"] == s["prompt_tokens"] - (s["context_tokens"] - s["chunks"])
    assert s["new_tokens"] > 0 and s["ttft_s"] > 0


def _flat(output: str) -> str:
    """The CLI's error box, with box drawing and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def test_ask_rejects_bad_input(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["ask", "q?", "--passages", str(tmp_path / "missing.txt")])
    assert res.exit_code != 0 and "does not exist" in _flat(res.output)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = runner.invoke(app, ["ask", "q?", "--passages", str(empty)])
    assert res.exit_code != 0 and "no passages" in _flat(res.output)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00junk")
    res = runner.invoke(app, ["ask", "q?", "--passages", str(bad)])
    assert res.exit_code != 0 and "UTF-8" in _flat(res.output)
    good = tmp_path / "good.txt"
    good.write_text("Gustave Eiffel designed the tower.\n")
    for argv in (["ask", "q?", "--passages", str(good)], ["bench", "--quick"], ["eval", "ppl", "--data", str(good)]):
        res = runner.invoke(app, argv + ["--decoder-dtype", "int8"])
        assert res.exit_code == 2 and "--decoder-dtype" in _flat(res.output) and "bfloat16" in _flat(res.output), argv


@pytest.mark.integration
def test_packaged_default_checkpoint_is_trained_small_and_optional(default_engine, passages_file):
    """The shipped default is picked up automatically; "none" gives the unmodified base decoder."""
    import torch

    from refrag_integrations import RefragEngine
    from refrag_integrations.checkpoint import PACKAGED_DEFAULT, default_checkpoint, load_checkpoint
    from refrag_integrations.policy import LearnedPolicy

    assert default_checkpoint() == PACKAGED_DEFAULT
    size = sum(f.stat().st_size for f in PACKAGED_DEFAULT.iterdir())
    assert size < 25 * 2**20, size  # the ceiling for a package-shipped checkpoint
    ckpt = load_checkpoint(PACKAGED_DEFAULT)
    assert ckpt.trained_stages == ["reconstruct", "sft", "policy"] and ckpt.metrics["qa_eval"]["rows"]
    assert default_engine.trained is True
    assert isinstance(default_engine.policy, LearnedPolicy) and default_engine.policy.query_conditioned
    base = RefragEngine.from_pretrained("none", device="cpu")
    assert base.trained is False
    # The default merges its decoder LoRA: some decoder weight differs from the base decoder's.
    mine, theirs = dict(default_engine.decoder.named_parameters()), dict(base.decoder.named_parameters())
    assert any(not torch.equal(mine[n], theirs[n]) for n in mine if "q_proj" in n)
    res = CliRunner().invoke(app, ["ask", "Who is the Eiffel Tower named after?", "--passages", str(passages_file),
                                   "--checkpoint", "none", "--json", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["stats"]["trained"] is False
