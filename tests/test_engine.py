"""Engine equivalences and arithmetic on tiny random models (no download)."""

from __future__ import annotations

import pytest
import torch

from refrag_integrations import RefragEngine, passage_id

PASSAGES = [
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role on the television series The Bill in 2000.",
    "Gustave Eiffel designed the tower in Paris, France. The tower was performed at the Royal Court Theatre in 2001.",
]
QUESTION = "Who is the Eiffel Tower named after?"


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_chat_engine"])
def test_expand_all_matches_plain_decoder(engine_name, request):
    engine: RefragEngine = request.getfixturevalue(engine_name)
    prepared = engine.prepare_rag(QUESTION, PASSAGES, "all")
    rag = engine.build_prompt(QUESTION, PASSAGES)
    plain_ids = engine.tokenizer(rag.text, add_special_tokens=rag.add_special_tokens)["input_ids"]
    assert prepared.token_ids == plain_ids  # segment-wise tokenization == whole-text tokenization
    ours = engine.forward_logits(prepared)
    with torch.no_grad():
        ref = engine.decoder(input_ids=torch.tensor([plain_ids])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_chat_engine"])
def test_a_passage_that_also_occurs_in_the_instruction_is_found_under_its_label(engine_name, request):
    engine: RefragEngine = request.getfixturevalue(engine_name)
    passages = ["the question", PASSAGES[0]]  # "the question" is also part of the RAG instruction
    rag = engine.build_prompt(QUESTION, passages)
    prompt, spans = rag.text, rag.spans
    assert prompt.find("the question") < spans[0][0]
    for i, ((a, b), p) in enumerate(zip(spans, passages)):
        assert prompt[a:b] == p and prompt[:a].endswith(f"Passage {i + 1}:\n")
    assert engine.prepare_rag(QUESTION, passages, "none").stats.context_tokens == sum(
        len(c.token_ids) for p in passages for c in engine.chunk(p))


def test_position_arithmetic(tiny_engine):
    k = tiny_engine.k
    chunks = [tiny_engine.chunk(p) for p in PASSAGES]
    decisions = [[i % 3 == 0 for i in range(len(c))] for c in chunks]
    prepared = tiny_engine.prepare_rag(QUESTION, PASSAGES, decisions)
    s = prepared.stats
    n_chunks = sum(len(c) for c in chunks)
    assert s.chunks == n_chunks
    assert s.chunks_expanded == sum(sum(d) for d in decisions)
    assert s.chunks_compressed == n_chunks - s.chunks_expanded
    saved = sum(len(ch.token_ids) - 1 for c, d in zip(chunks, decisions) for ch, keep in zip(c, d) if not keep)
    assert s.positions == s.prompt_tokens - saved == prepared.embeds.shape[0]
    assert s.context_tokens == sum(len(ch.token_ids) for c in chunks for ch in c)
    assert s.expanded == [[i for i, keep in enumerate(d) if keep] for d in decisions]
    assert all(len(ch.token_ids) == k for c in chunks for ch in c[:-1])


def test_compressed_rows_are_projected_chunk_vectors_in_order(tiny_engine):
    decisions = [[False] * len(tiny_engine.chunk(p)) for p in PASSAGES]
    decisions[0][1] = True
    prepared = tiny_engine.prepare_rag(QUESTION, PASSAGES, decisions)
    vectors = tiny_engine.chunk_vectors(PASSAGES).vectors
    proj0 = tiny_engine.chunk_encoder.project(vectors[0]).detach()
    emb = prepared.embeds.detach()
    # locate passage 0: its first compressed chunk vector appears once, followed by k token rows
    # of chunk 1, then chunk 2's vector
    row = next(i for i in range(emb.shape[0]) if torch.allclose(emb[i], proj0[0]))
    k = tiny_engine.k
    ids1 = list(tiny_engine.chunk(PASSAGES[0])[1].token_ids)
    tok_rows = tiny_engine.decoder.get_input_embeddings()(torch.tensor(ids1)).detach()
    torch.testing.assert_close(emb[row + 1 : row + 1 + k], tok_rows)
    torch.testing.assert_close(emb[row + 1 + k], proj0[2])


def test_kv_cache_generation_matches_uncached(tiny_engine):
    decisions = [[i % 2 == 0 for i in range(len(tiny_engine.chunk(p)))] for p in PASSAGES]
    prepared = tiny_engine.prepare_rag(QUESTION, PASSAGES, decisions)
    res = tiny_engine.generate_prepared([prepared], max_new_tokens=8)[0]
    # reference: greedy decoding that re-runs the full sequence every step, no cache
    emb = prepared.embeds.detach()
    embed = tiny_engine.decoder.get_input_embeddings()
    eos = tiny_engine.eos_ids()
    ref = []
    with torch.no_grad():
        for _ in range(8):
            logits = tiny_engine.decoder(inputs_embeds=emb.unsqueeze(0), use_cache=False).logits[0, -1]
            tok = int(logits.argmax())
            if tok in eos:
                break
            ref.append(tok)
            emb = torch.cat([emb, embed(torch.tensor([tok]))], 0)
    assert res.token_ids == ref
    assert len(ref) > 0


def test_batch_equals_singles(tiny_engine):
    reqs = [
        {"question": QUESTION, "passages": PASSAGES, "expand": "none"},
        {"question": "Who starred in The Bill?", "passages": PASSAGES[:1], "expand": "all"},
    ]
    batch = tiny_engine.generate_batch(reqs, max_new_tokens=6)
    singles = [
        tiny_engine.generate(r["question"], r["passages"], policy=r["expand"], max_new_tokens=6) for r in reqs
    ]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]
    assert [b.stats.positions for b in batch] == [s.stats.positions for s in singles]
    assert batch[0].stats.positions != batch[1].stats.positions  # really left-padded


def test_batched_prefill_logits_match_single(tiny_engine):
    a = tiny_engine.prepare_rag(QUESTION, PASSAGES, "none")
    b = tiny_engine.prepare_rag("Who?", PASSAGES[:1], "all")
    logits = {}
    steps = tiny_engine.decode_steps([a, b], 1, t_start=0.0)
    nxt, _ = next(steps)
    for i, p in enumerate([a, b]):
        single = tiny_engine.forward_logits(p)[-1].argmax()
        logits[i] = int(single)
    assert nxt.tolist() == [logits[0], logits[1]]


def test_stream_equals_generate(tiny_engine):
    full = tiny_engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=10)
    stream = tiny_engine.stream(QUESTION, PASSAGES, policy="none", max_new_tokens=10)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert stream.result is not None and stream.result.token_ids == full.token_ids


def test_stop_sequence_truncates(tiny_engine):
    full = tiny_engine.generate(QUESTION, PASSAGES, policy="all", max_new_tokens=12)
    if len(full.text) < 4:
        pytest.skip("tiny model produced too little text to cut")
    stop = full.text[2:4]
    cut = tiny_engine.generate(QUESTION, PASSAGES, policy="all", max_new_tokens=12, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(tiny_engine.stream(QUESTION, PASSAGES, policy="all", max_new_tokens=12, stop=[stop]))
    assert streamed == cut.text


def test_stats_and_ttft(tiny_engine):
    res = tiny_engine.generate(QUESTION, PASSAGES, policy="none", max_new_tokens=4)
    s = res.stats
    assert 0 < s.ttft_s <= s.total_s
    assert s.positions < s.prompt_tokens
    assert s.compression_rate > 1.0
    assert s.trained is False
    assert s.new_tokens == len(res.token_ids)


def test_registered_vectors_are_used_and_cached(tiny_engine):
    text = "A passage registered with its own vectors, precomputed elsewhere."
    n = len(tiny_engine.chunk(text))
    vecs = torch.randn(n, tiny_engine.chunk_encoder.encoder_dim)
    tiny_engine.register_passage(text, vectors=vecs)
    found = tiny_engine.chunk_vectors([text])
    torch.testing.assert_close(found.vectors[0], vecs)
    assert found.cached_chunks == n and found.encode_s == 0.0
    with pytest.raises(ValueError, match="shape"):
        tiny_engine.register_passage(text, vectors=torch.randn(n + 1, 3))


def test_vector_source_hook(tiny_dirs):
    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    text = PASSAGES[1]
    n = len(engine.chunk(text))
    stored = torch.randn(n, engine.chunk_encoder.encoder_dim)
    asked = []

    def source(ids):
        asked.append(ids)
        return {passage_id(text): stored}

    engine.vector_source = source
    found = engine.chunk_vectors([text])
    got, cached = found.vectors, found.cached_chunks
    assert asked == [[passage_id(text)]]
    torch.testing.assert_close(got[0], stored)
    assert cached == n


def test_cache_is_bounded(tiny_dirs):
    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    engine.cache_size = 3
    for i in range(6):
        engine.register_passage(f"passage number {i} about the theatre")
    assert len(engine.registered_passages()) == 3
    assert engine.registered_passages()[-1] == "passage number 5 about the theatre"


def test_prepare_prompt_compresses_only_registered(tiny_chat_engine):
    eng = tiny_chat_engine
    reg, unreg = PASSAGES
    unreg += " Nothing registers this sentence."  # the session-wide engine may hold other tests' registrations
    eng.register_passage(reg, expand=[False] * len(eng.chunk(reg)))
    prompt = f"Context:\n{reg}\n\n{unreg}\n\nAgain:\n{reg}\nQuestion: who?"
    prepared = eng.prepare_prompt(prompt)
    n = len(eng.chunk(reg))
    saved = 2 * sum(len(c.token_ids) - 1 for c in eng.chunk(reg))
    assert prepared.stats.chunks == 2 * n  # both occurrences, nothing of the unregistered one
    assert prepared.stats.positions == prepared.stats.prompt_tokens - saved
    plain = eng.prepare_prompt("no registered passage in here")
    assert plain.stats.chunks == 0 and plain.stats.positions == plain.stats.prompt_tokens


def test_budget_applies_to_policies(tiny_engine):
    res = tiny_engine.prepare_rag(QUESTION, PASSAGES, "random", expand_fraction=0.5)
    assert res.stats.chunks_expanded == int(0.5 * res.stats.chunks)
    res = tiny_engine.prepare_rag(QUESTION, PASSAGES, "random", max_expanded=2)
    assert res.stats.chunks_expanded == 2


def test_half_precision_decoder(tiny_dirs, tiny_engine):
    # decoder_dtype halves the decoder's memory; the chunk encoder and projector stay float32, the
    # mixed input is built in the decoder's dtype, and KV-cached decoding still matches a cache-free
    # re-run of the whole sequence.
    dec, enc = tiny_dirs
    engine = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu",
                                          decoder_dtype="bf16")
    assert {p.dtype for p in engine.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.chunk_encoder.parameters()} == {torch.float32}
    engine.chunk_encoder.load_state_dict(tiny_engine.chunk_encoder.state_dict())
    decisions = [[i % 2 == 0 for i in range(len(engine.chunk(p)))] for p in PASSAGES]
    prepared = engine.prepare_rag(QUESTION, PASSAGES, decisions)
    assert prepared.embeds.dtype == torch.bfloat16
    logits = engine.forward_logits(prepared)
    ref = tiny_engine.forward_logits(tiny_engine.prepare_rag(QUESTION, PASSAGES, decisions))
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert float((logits - ref).abs().max()) < 0.05 * float(ref.abs().max())  # bfloat16 rounding only

    res = engine.generate_prepared([prepared], max_new_tokens=6)[0]
    emb, embed, ref_ids = prepared.embeds, engine.decoder.get_input_embeddings(), []
    with torch.no_grad():
        for _ in range(6):
            tok = int(engine.decoder(inputs_embeds=emb.unsqueeze(0), use_cache=False).logits[0, -1].argmax())
            if tok in engine.eos_ids():
                break
            ref_ids.append(tok)
            emb = torch.cat([emb, embed(torch.tensor([tok]))], 0)
    assert res.token_ids == ref_ids and ref_ids


@pytest.mark.parametrize("bad", ["int8", "float64", torch.int32])
def test_bad_decoder_dtype_raises_before_loading(bad, monkeypatch):
    import refrag_integrations.models as models

    monkeypatch.setattr(models, "load_decoder", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        RefragEngine.from_pretrained("none", decoder_dtype=bad)
