"""Chunk encoder options on tiny models: what a chunk vector sees (``chunk_context``), the decoder's
own first layers as encoder (``encoder="decoder:N"``), windows for long passages, fingerprints and
checkpoints that carry the choice."""

from __future__ import annotations

import pytest
import torch

from refrag_integrations import RefragEngine
from refrag_integrations.chunking import Chunk, chunk_passage, chunks_from_token_ids
from refrag_integrations.config import RefragConfig
from refrag_integrations.models import decoder_encoder_layers, encoder_from_decoder

# Real text (WikiText-2 test, CC BY-SA 3.0).
PASSAGE = (
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the "
    "television series The Bill in 2000. This was followed by a starring role in the play Herons written by "
    "Simon Stephens, which was performed in 2001 at the Royal Court Theatre."
)
OTHER_START = "Gustave Eiffel designed the tower in Paris, France. "


def engine(tiny_dirs, encoder=None, chunk_context="chunk", k=4) -> RefragEngine:
    dec, enc = tiny_dirs
    return RefragEngine.from_pretrained(
        "none", decoder=str(dec), encoder=encoder or str(enc), chunk_size=k, chunk_context=chunk_context, device="cpu"
    )


def vectors(eng: RefragEngine, text: str) -> torch.Tensor:
    with torch.no_grad():
        return eng.chunk_encoder.encode_passages([eng.chunk(text)])[0]


@pytest.fixture(scope="module", params=["text", "decoder:2"])
def encoder_kind(request):
    return request.param


def test_chunk_context_chunk_matches_encoding_each_chunk_text_alone(tiny_dirs):
    eng = engine(tiny_dirs)
    chunks = eng.chunk(PASSAGE)
    with torch.no_grad():
        flat = eng.chunk_encoder.encode([c.text for c in chunks])
    assert torch.equal(vectors(eng, PASSAGE), flat)


def test_passage_context_vectors_know_their_neighbours(tiny_dirs, encoder_kind):
    """Changing the first chunks changes a later chunk's vector only with chunk_context='passage'."""
    enc = None if encoder_kind == "text" else encoder_kind
    for ctx, should_change in (("chunk", False), ("passage", True)):
        eng = engine(tiny_dirs, encoder=enc, chunk_context=ctx)
        tok, k = eng.tokenizer, eng.k
        ids = tok(PASSAGE, add_special_tokens=False)["input_ids"]
        other = tok(OTHER_START, add_special_tokens=False)["input_ids"]
        other = other[: len(other) // k * k]  # whole chunks, so the passage's chunks stay aligned
        ca = chunks_from_token_ids(ids, tok, k)
        cb = chunks_from_token_ids(other + ids, tok, k)
        assert ca[-1].token_ids == cb[-1].token_ids and ca[-1].text == cb[-1].text
        with torch.no_grad():
            va, vb = (v[-1] for v in eng.chunk_encoder.encode_passages([ca, cb]))
        changed = not torch.allclose(va, vb, atol=1e-6)
        assert changed == should_change, (ctx, encoder_kind)


def test_decoder_encoder_is_the_decoders_first_layers(tiny_dirs):
    eng = engine(tiny_dirs)
    dec = eng.decoder
    enc = encoder_from_decoder(dec, 1)
    ids = torch.tensor([eng.tokenizer("Robert Boulter is an actor.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = dec.model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 1
        want = dec.model.layers[1].input_layernorm(want)
        got = enc(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an independent copy: training the encoder never changes the decoder
    with torch.no_grad():
        enc.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert not torch.equal(enc.layers[0].self_attn.q_proj.weight, dec.model.layers[0].self_attn.q_proj.weight)


def test_decoder_encoder_names_are_checked(tiny_dirs):
    assert decoder_encoder_layers("decoder:3") == 3 and decoder_encoder_layers("bert-base") is None
    for bad in ("decoder:0", "decoder:x", "decoder:"):
        with pytest.raises(ValueError, match="decoder:N"):
            decoder_encoder_layers(bad)
    with pytest.raises(ValueError, match="has 2"):
        engine(tiny_dirs, encoder="decoder:3")


def test_decoder_encoder_reads_chunk_tokens_after_a_sink_token(tiny_dirs):
    """Each chunk alone = the mean of its own tokens' states after the sink token (not pooled)."""
    eng = engine(tiny_dirs, encoder="decoder:2")
    ce = eng.chunk_encoder
    assert ce.reads_decoder_tokens and ce.encoder_dim == eng.decoder.config.hidden_size
    chunk = eng.chunk(PASSAGE)[1]
    ids = torch.tensor([[ce.sink_token_id, *chunk.token_ids]])
    with torch.no_grad():
        want = ce.encoder(input_ids=ids).last_hidden_state[0, 1:].mean(0)
    torch.testing.assert_close(vectors(eng, PASSAGE)[1], want, atol=1e-5, rtol=1e-5)


def test_long_passages_are_encoded_in_windows_of_whole_chunks(tiny_dirs, encoder_kind):
    enc = None if encoder_kind == "text" else encoder_kind
    eng = engine(tiny_dirs, encoder=enc, chunk_context="passage")
    ce = eng.chunk_encoder
    long_text = " ".join([PASSAGE] * 4)
    n = len(eng.chunk(long_text))
    full = vectors(eng, long_text)
    ce.passage_max_length = 24  # a few chunks per window
    windowed = vectors(eng, long_text)
    assert full.shape == windowed.shape == (n, ce.encoder_dim)
    assert torch.isfinite(windowed).all() and bool((windowed.norm(dim=-1) > 0).all())
    assert not torch.allclose(full, windowed)  # later chunks no longer see the whole passage
    # the first window's chunks see exactly what they saw before, as long as it fits the shorter limit
    torch.testing.assert_close(windowed[0], vectors(eng, long_text)[0])


def test_training_windows_and_passages_give_the_same_vectors(tiny_dirs):
    """chunks_from_token_ids (training windows) and chunk_passage (inference) agree on vectors."""
    eng = engine(tiny_dirs, encoder="decoder:2", chunk_context="passage")
    chunks = eng.chunk(PASSAGE)
    ids = [t for c in chunks for t in c.token_ids]
    rebuilt = chunks_from_token_ids(ids, eng.tokenizer, eng.k)
    assert [c.token_ids for c in rebuilt] == [c.token_ids for c in chunks]
    with torch.no_grad():
        a, b = eng.chunk_encoder.encode_passages([chunks, rebuilt])
    torch.testing.assert_close(a, b)


def test_chunk_vector_fingerprint_tracks_the_options(tiny_dirs):
    fps = {
        (enc, ctx): engine(tiny_dirs, encoder=enc, chunk_context=ctx).chunk_vector_fingerprint()
        for enc in (None, "decoder:1") for ctx in ("chunk", "passage")
    }
    assert len(set(fps.values())) == 4


def test_engine_answers_with_every_option_and_expand_all_stays_plain_rag(tiny_dirs):
    plain = engine(tiny_dirs)
    want = plain.generate("Who is Robert Boulter?", [PASSAGE], policy="all", max_new_tokens=4).text
    for enc in (None, "decoder:2"):
        for ctx in ("chunk", "passage"):
            eng = engine(tiny_dirs, encoder=enc, chunk_context=ctx)
            assert eng.generate("Who is Robert Boulter?", [PASSAGE], policy="all", max_new_tokens=4).text == want
            out = eng.generate("Who is Robert Boulter?", [PASSAGE], policy="none", max_new_tokens=4)
            assert out.stats.chunks_compressed == len(eng.chunk(PASSAGE))


def test_config_refuses_bad_chunk_context():
    with pytest.raises(ValueError, match="chunk_context"):
        RefragConfig(chunk_context="sentence")
    with pytest.raises(ValueError, match="pooling must be 'mean'"):
        RefragConfig(chunk_context="passage", pooling="cls")
    assert RefragConfig.from_dict({"chunk_size": 16}).chunk_context == "chunk"  # old checkpoints


def test_chunks_from_token_ids_tile_their_text(tiny_dirs):
    eng = engine(tiny_dirs)
    ids = eng.tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    chunks = chunks_from_token_ids(ids, eng.tokenizer, 4)
    assert all(isinstance(c, Chunk) for c in chunks)
    assert "".join(c.text for c in chunks) == eng.tokenizer.decode(ids)
    assert [c.start for c in chunks[1:]] == [c.end for c in chunks[:-1]]
    assert [len(c.token_ids) for c in chunks[:-1]] == [4] * (len(chunks) - 1)
    assert chunk_passage(PASSAGE, eng.tokenizer, 4)[0].token_ids == chunks[0].token_ids
