"""An engine without a trained checkpoint is loud about it and does ordinary RAG by default; the
packaged checkpoint is found for a local copy of its decoder by weight fingerprint (issue 16 §1)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from refrag_integrations import ExpandAll, ExpandNone, QueryRelevancePolicy, RefragEngine, UntrainedProjectorWarning
from refrag_integrations.checkpoint import save_engine

from tiny import make_tiny_models

TEXT = ("Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the "
        "television series The Bill in 2000.")
QUESTION = "Who is Robert Boulter?"


def _load(dec, enc, **kwargs) -> RefragEngine:
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", **kwargs)


def _untrained_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, UntrainedProjectorWarning)]


def test_untrained_engine_warns_on_every_creation_and_expands_everything(tiny_dirs):
    dec, enc = tiny_dirs
    for _ in range(2):  # every creation, not only the first
        with pytest.warns(UntrainedProjectorWarning, match="UNTRAINED.*ordinary RAG"):
            engine = _load(dec, enc)
    assert not engine.trained and isinstance(engine.policy, ExpandAll)
    result = engine.generate(QUESTION, [TEXT], max_new_tokens=2)
    s = result.stats.to_dict()
    assert s["trained"] is False
    assert s["chunks"] > 1 and s["chunks_expanded"] == s["chunks"] and s["positions"] == s["prompt_tokens"]
    stream = engine.stream(QUESTION, [TEXT], max_new_tokens=2)
    "".join(stream)
    assert stream.result.stats.trained is False and stream.result.stats.chunks_compressed == 0
    batch = engine.generate_batch([{"question": QUESTION, "passages": [TEXT]}], max_new_tokens=2)
    assert batch[0].stats.trained is False and batch[0].stats.chunks_compressed == 0


def test_refrag_is_opt_in_on_an_untrained_engine(tiny_dirs):
    dec, enc = tiny_dirs
    with pytest.warns(UntrainedProjectorWarning):
        selective = _load(dec, enc, expand_fraction=0.5)
    assert isinstance(selective.policy, QueryRelevancePolicy)
    s = selective.generate(QUESTION, [TEXT], max_new_tokens=1).stats
    assert 0 < s.chunks_expanded < s.chunks and s.positions < s.prompt_tokens
    with pytest.warns(UntrainedProjectorWarning, match="'none'"):
        compressing = _load(dec, enc, policy="none")
    assert compressing.generate(QUESTION, [TEXT], max_new_tokens=1).stats.chunks_expanded == 0
    with pytest.warns(UntrainedProjectorWarning):
        default = _load(dec, enc)
    per_request = default.generate(QUESTION, [TEXT], policy="none", max_new_tokens=1).stats
    assert per_request.chunks_expanded == 0 and per_request.trained is False


def test_a_request_budget_opts_into_refrag_and_is_never_silently_ignored(tiny_dirs, tiny_engine, tmp_path):
    """expand_fraction= on one request used to be ignored by a non-selective default policy (every
    chunk stayed tokens on an untrained engine, every chunk compressed on a trained one)."""
    dec, enc = tiny_dirs
    with pytest.warns(UntrainedProjectorWarning):
        untrained = _load(dec, enc)
    s = untrained.generate(QUESTION, [TEXT], expand_fraction=0.5, max_new_tokens=1).stats
    assert 0 < s.chunks_expanded < s.chunks and s.positions < s.prompt_tokens and s.trained is False
    assert untrained.generate(QUESTION, [TEXT], max_new_tokens=1).stats.chunks_compressed == 0  # default unchanged
    path = save_engine(tiny_engine, tmp_path / "ckpt", trained_stages=["reconstruct"])
    trained = RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), device="cpu")
    assert isinstance(trained.policy, ExpandNone)
    s = trained.generate(QUESTION, [TEXT], max_expanded=1, max_new_tokens=1).stats
    assert s.chunks_expanded == 1
    assert trained.decide(QUESTION, [TEXT], expand_fraction=0.5) != trained.decide(QUESTION, [TEXT])
    # A policy named explicitly means what it says, with or without a budget.
    assert trained.generate(QUESTION, [TEXT], policy="none", expand_fraction=0.5, max_new_tokens=1).stats.chunks_expanded == 0
    assert trained.generate(QUESTION, [TEXT], policy="all", expand_fraction=0.5, max_new_tokens=1).stats.chunks_compressed == 0


def test_trained_checkpoint_is_quiet_and_keeps_its_default(tiny_engine, tiny_dirs, tmp_path):
    dec, enc = tiny_dirs
    path = save_engine(tiny_engine, tmp_path / "ckpt", trained_stages=["reconstruct"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), device="cpu")
    assert engine.trained and not _untrained_warnings(record)
    assert isinstance(engine.policy, ExpandNone)  # unchanged for trained checkpoints without a learned policy


def test_packaged_checkpoint_found_for_a_local_copy_by_fingerprint(tiny_engine, tiny_dirs, tmp_path, monkeypatch):
    """A checkpoint saved for a decoder named X is picked up for a copy of X at another path."""
    import refrag_integrations.engine as engine_module

    dec, enc = tiny_dirs
    packaged = save_engine(tiny_engine, tmp_path / "packaged", trained_stages=["reconstruct", "sft"])
    monkeypatch.setattr(engine_module, "default_checkpoint", lambda: packaged)
    dec_copy, enc_copy = tmp_path / "elsewhere" / "my-decoder", tmp_path / "elsewhere" / "my-encoder"
    shutil.copytree(dec, dec_copy)
    shutil.copytree(enc, enc_copy)
    assert str(dec_copy) != tiny_engine.config.decoder
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = RefragEngine.from_pretrained(decoder=str(dec_copy), encoder=str(enc_copy), device="cpu")
    assert engine.trained and not _untrained_warnings(record)
    assert engine.k == tiny_engine.k == 4
    for name, value in tiny_engine.chunk_encoder.projector.state_dict().items():
        assert torch.equal(engine.chunk_encoder.projector.state_dict()[name], value), name

    # Another decoder of the same architecture (other weights) does not get it, and says so.
    other_dec, _ = make_tiny_models(tmp_path / "other", seed=1)
    with pytest.warns(UntrainedProjectorWarning):
        other = RefragEngine.from_pretrained(decoder=str(other_dec), encoder=str(enc_copy), device="cpu")
    assert not other.trained and isinstance(other.policy, ExpandAll)
    # Neither does the right decoder with another encoder.
    _, other_enc = make_tiny_models(tmp_path / "other-enc", seed=2)
    with pytest.warns(UntrainedProjectorWarning):
        mixed = RefragEngine.from_pretrained(decoder=str(dec_copy), encoder=str(other_enc), device="cpu")
    assert not mixed.trained


@pytest.mark.integration
def test_a_local_copy_of_the_default_decoder_gets_the_packaged_checkpoint(tmp_path):
    """The real case: `decoder=` pointing at a copy of the default decoder's weights, at another path."""
    from refrag_integrations.checkpoint import default_checkpoint
    from refrag_integrations.models import default_decoder_dir

    if default_checkpoint() is None:
        pytest.skip("this build ships no packaged checkpoint")
    copy = tmp_path / "SmolLM2-135M-Instruct"
    copy.mkdir()
    for f in default_decoder_dir().iterdir():  # a copy made of links: same bytes, another path and name
        (copy / f.name).symlink_to(f)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = RefragEngine.from_pretrained(decoder=str(copy), device="cpu")
    assert engine.trained and not _untrained_warnings(record)
    assert engine.policy.name.startswith("learned")  # the packaged default's learned policy, as by name

