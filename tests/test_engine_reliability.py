"""Hostile inputs the engine refuses (issue 18): explicit decisions, non-finite chunk vectors,
corrupted checkpoints, prompts longer than the decoder's context window."""

from __future__ import annotations

import pytest
import torch

from refrag_integrations import RefragEngine

TEXT = (
    "Gustave Eiffel designed the tower in Paris, France. Robert Boulter is an English film, "
    "television and theatre actor. He had a guest starring role on the television series The Bill."
)
OTHER = "Robert Boulter landed a role as Craig in the episode Teddy's Story of the television series."


# ------------------------------------------------------------------ explicit decisions


def test_explicit_decisions_accept_bools_and_0_1(tiny_engine):
    n, m = len(tiny_engine.chunk(TEXT)), len(tiny_engine.chunk(OTHER))
    p = tiny_engine.prepare_rag("q?", [TEXT, OTHER], [[1] + [0] * (n - 1), [True] * m])
    assert p.stats.chunks == n + m and p.stats.chunks_expanded == 1 + m
    assert p.stats.expanded[0] == [0]


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda n, m: [[2] * n, [0] * m], ValueError, r"policy\[0\]\[0\] is 2"),
        (lambda n, m: [[True] * n, [0] * (m - 1) + [-1]], ValueError, rf"policy\[1\]\[{{m1}}\] is -1"),
        (lambda n, m: [True] * n, TypeError, r"policy\[0\] is True .*not a list"),
        (lambda n, m: [[True] * n, "0" * m], TypeError, r"policy\[1\] is '0+' \(str\)"),
        (lambda n, m: [["yes"] * n, [0] * m], TypeError, r"policy\[0\]\[0\] is 'yes'"),
        (lambda n, m: [[0.5] * n, [0] * m], TypeError, r"policy\[0\]\[0\] is 0.5"),
        (lambda n, m: [[True] * n], ValueError, "decisions for 1 passages but 2"),
    ],
)
def test_bad_explicit_decisions_name_the_entry(tiny_engine, bad, error, match):
    n, m = len(tiny_engine.chunk(TEXT)), len(tiny_engine.chunk(OTHER))
    with pytest.raises(error, match=match.replace("{m1}", str(m - 1))):
        tiny_engine.prepare_rag("q?", [TEXT, OTHER], bad(n, m))
    with pytest.raises(error, match=match.replace("{m1}", str(m - 1))):
        tiny_engine.generate("q?", [TEXT, OTHER], policy=bad(n, m), max_new_tokens=1)


def test_registered_decisions_are_checked(tiny_engine):
    n = len(tiny_engine.chunk(TEXT))
    with pytest.raises(ValueError, match=r"expand\[1\] is 2"):
        tiny_engine.register_passage(TEXT, expand=[0, 2] + [0] * (n - 2))
    with pytest.raises(TypeError, match="expand is True"):
        tiny_engine.register_passage(TEXT, expand=True)
    with pytest.raises(ValueError, match=f"the passage has {n} chunks"):
        tiny_engine.register_passage(TEXT, expand=[1] * (n + 1))


# ------------------------------------------------------------------ non-finite chunk vectors


@pytest.fixture()
def fresh_engine(tiny_dirs):
    """A private engine (these tests change its hooks and weights)."""
    dec, enc = tiny_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_registered_non_finite_vectors_are_refused(fresh_engine, bad):
    from refrag_integrations import passage_id

    n = len(fresh_engine.chunk(TEXT))
    vecs = torch.randn(n, fresh_engine.chunk_encoder.encoder_dim)
    vecs[1, 3] = bad
    with pytest.raises(ValueError, match=f"passage {passage_id(TEXT)} contain 1 NaN or infinite"):
        fresh_engine.register_passage(TEXT, vectors=vecs)
    assert TEXT not in fresh_engine.registered_passages()  # nothing half-registered
    assert fresh_engine.chunk_vectors([TEXT]).cached_chunks == 0  # encoded, not the bad vectors
    assert bool(torch.isfinite(fresh_engine.chunk_vectors([TEXT]).vectors[0]).all())


def test_non_finite_vectors_from_a_vector_source_are_refused(fresh_engine):
    from refrag_integrations import passage_id

    n = len(fresh_engine.chunk(OTHER))
    stored = torch.full((n, fresh_engine.chunk_encoder.encoder_dim), float("nan"))

    def source(ids):
        return {passage_id(OTHER): stored}

    fresh_engine.vector_source = source
    with pytest.raises(ValueError, match=f"passage {passage_id(OTHER)} from the vector source .*source"):
        fresh_engine.generate("q?", [OTHER], policy="none", max_new_tokens=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fresh_engine.chunk_vectors([OTHER])


def test_a_projector_that_yields_non_finite_embeddings_is_refused(fresh_engine):
    with torch.no_grad():
        next(fresh_engine.chunk_encoder.projector.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"projected chunk embeddings of passage 0 .*projector"):
        fresh_engine.generate("q?", [TEXT], policy="none", max_new_tokens=2)
    assert fresh_engine.generate("q?", [TEXT], policy="all", max_new_tokens=2).stats.chunks_compressed == 0


def test_an_encoder_that_yields_non_finite_vectors_is_refused(fresh_engine):
    with torch.no_grad():
        for p in fresh_engine.chunk_encoder.encoder.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="the chunk encoder produced for passage .*encoder_delta"):
        fresh_engine.generate("q?", [TEXT], policy="none", max_new_tokens=2)


# ------------------------------------------------------------------ damaged checkpoints


@pytest.fixture()
def saved(tiny_dirs, tmp_path):
    """A tiny checkpoint with a policy file, saved by this version (with file hashes)."""
    from refrag_integrations.checkpoint import save_checkpoint

    dec, enc = tiny_dirs
    eng = RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu")
    return save_checkpoint(
        tmp_path / "ckpt", eng.config, eng.chunk_encoder.projector.state_dict(),
        policy={"w": torch.randn(8, 4)}, policy_config={"policy": "learned"}, trained_stages=["policy"],
        metrics={"x": 1.0},
    )


def _nan_into(file):
    """Overwrite the first float32 value of a safetensors file's data with NaN bytes."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start : start + 4] = b"\x00\x00\xc0\x7f"
    file.write_bytes(bytes(raw))


def _drop_hashes(path):
    """Make ``path`` look like a checkpoint written before file hashes existed."""
    import json

    meta = json.loads((path / "refrag_config.json").read_text())
    meta.pop("files"), meta.pop("settings_sha256")
    (path / "refrag_config.json").write_text(json.dumps(meta))


def test_saved_checkpoint_records_hashes_and_loads(saved):
    import json

    from refrag_integrations.checkpoint import file_sha256, load_checkpoint

    meta = json.loads((saved / "refrag_config.json").read_text())
    assert meta["files"]["policy.safetensors"] == file_sha256(saved / "policy.safetensors")
    assert set(meta["files"]) == {"projector.safetensors", "policy.safetensors", "policy_config.json", "metrics.json"}
    assert load_checkpoint(saved).policy["w"].shape == (8, 4)


@pytest.mark.parametrize("name", ["policy.safetensors", "policy_config.json", "metrics.json"])
def test_a_file_the_manifest_lists_but_the_directory_lacks_is_refused(saved, name):
    from refrag_integrations.checkpoint import CorruptCheckpointError, load_checkpoint

    (saved / name).unlink()  # an incomplete copy must not load as another model (e.g. without its policy)
    with pytest.raises(CorruptCheckpointError, match=rf"{name} is missing although .*refrag_config.json lists it"):
        load_checkpoint(saved)


def test_an_old_checkpoint_without_its_policy_config_names_the_file(saved):
    from refrag_integrations.checkpoint import CorruptCheckpointError, load_checkpoint

    _drop_hashes(saved)
    (saved / "metrics.json").unlink()  # without a manifest, optional parts may be absent
    assert load_checkpoint(saved).metrics is None
    (saved / "policy_config.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="policy_config.json cannot be read .*incomplete"):
        load_checkpoint(saved)


@pytest.mark.parametrize("hashes", [True, False])
@pytest.mark.parametrize("name", ["policy.safetensors", "projector.safetensors"])
def test_nan_bytes_in_a_checkpoint_are_refused(saved, hashes, name):
    from refrag_integrations.checkpoint import CorruptCheckpointError, load_checkpoint

    if not hashes:
        _drop_hashes(saved)
    _nan_into(saved / name)
    match = "sha256 differs" if hashes else "NaN or infinite"
    with pytest.raises(CorruptCheckpointError, match=rf"{name} is damaged: .*{match}"):
        load_checkpoint(saved)


def test_nan_projector_is_not_loaded_as_trained(saved, tiny_dirs):
    from refrag_integrations.checkpoint import CorruptCheckpointError

    _drop_hashes(saved)
    _nan_into(saved / "projector.safetensors")
    dec, enc = tiny_dirs
    with pytest.raises(CorruptCheckpointError, match="projector.safetensors is damaged"):
        RefragEngine.from_pretrained(saved, decoder=str(dec), encoder=str(enc), device="cpu")


@pytest.mark.parametrize("field, value", [("chunk_size", 8), ("pooling", "max"), ("chunk_context", "passage")])
def test_edited_training_settings_are_refused(saved, tiny_dirs, field, value):
    import json

    from refrag_integrations.checkpoint import CorruptCheckpointError

    meta = json.loads((saved / "refrag_config.json").read_text())
    meta["config"][field] = value
    (saved / "refrag_config.json").write_text(json.dumps(meta))
    dec, enc = tiny_dirs
    with pytest.raises(CorruptCheckpointError, match="refrag_config.json was edited after training"):
        RefragEngine.from_pretrained(saved, decoder=str(dec), encoder=str(enc), device="cpu")


@pytest.mark.parametrize("field, value", [("projector_hidden", 64), ("encoder_fingerprint", "0" * 16)])
def test_edited_dimensions_and_fingerprints_are_refused_at_load(saved, field, value):
    import json

    from refrag_integrations.checkpoint import CorruptCheckpointError, load_checkpoint

    meta = json.loads((saved / "refrag_config.json").read_text())
    meta["config"][field] = value
    (saved / "refrag_config.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="refrag_config.json was edited after training"):
        load_checkpoint(saved)


@pytest.mark.parametrize("what", ["encoder", "decoder"])
def test_an_edited_base_model_name_is_refused(saved, tiny_dirs, tmp_path, what):
    """The names are not in the settings hash (a model may move); the weights fingerprint is."""
    import json

    from refrag_integrations.checkpoint import CheckpointMismatchError
    from tiny import make_tiny_models

    other = dict(zip(("decoder", "encoder"), make_tiny_models(tmp_path / "other", seed=1)))
    meta = json.loads((saved / "refrag_config.json").read_text())
    meta["config"][what] = str(other[what])
    (saved / "refrag_config.json").write_text(json.dumps(meta))
    dec, enc = tiny_dirs
    kept = {"encoder": str(enc)} if what == "decoder" else {"decoder": str(dec)}
    with pytest.raises(CheckpointMismatchError, match=rf"trained for {what} .*fingerprint .*has fingerprint"):
        RefragEngine.from_pretrained(saved, device="cpu", **kept)


@pytest.mark.parametrize("hashes", [True, False])
def test_truncated_files_and_broken_json_name_the_file(saved, hashes):
    from refrag_integrations.checkpoint import CorruptCheckpointError, load_checkpoint

    if not hashes:
        _drop_hashes(saved)
    policy = saved / "policy.safetensors"
    good = policy.read_bytes()
    policy.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match="policy.safetensors is damaged"):
        load_checkpoint(saved)
    policy.write_bytes(good)
    (saved / "policy_config.json").write_text('{"policy": "learn')
    with pytest.raises(CorruptCheckpointError, match="policy_config.json is damaged"):
        load_checkpoint(saved)
    (saved / "refrag_config.json").write_text('{"format_version": 1, "conf')
    with pytest.raises(CorruptCheckpointError, match="refrag_config.json is damaged: not valid JSON"):
        load_checkpoint(saved)


def test_packaged_default_has_a_manifest_loads_and_refuses_an_edited_k(tmp_path):
    import json
    import shutil

    from refrag_integrations.checkpoint import CorruptCheckpointError, default_checkpoint, load_checkpoint

    path = default_checkpoint()
    if path is None:
        pytest.skip("this build ships no default checkpoint")
    meta = json.loads((path / "refrag_config.json").read_text())
    assert set(meta["files"]) >= {"projector.safetensors", "policy.safetensors", "decoder_lora.safetensors"}
    assert load_checkpoint(path).trained_stages
    copy = shutil.copytree(path, tmp_path / "default")
    meta["config"]["chunk_size"] = 8
    (copy / "refrag_config.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="was edited after training: .*chunk_size=8"):
        load_checkpoint(copy)


# ------------------------------------------------------------------ context window


def test_inputs_longer_than_the_context_window_are_refused(fresh_engine):
    tiny_engine = fresh_engine
    window = tiny_engine.decoder.config.max_position_embeddings = 512  # a small window (RoPE: same weights)
    passages = [f"{TEXT} Passage number {i}." for i in range(14)]
    full = tiny_engine.prepare_rag("q?", passages, "all").stats.positions
    assert full + 8 > window  # as ordinary RAG it does not fit ...
    match = rf"needs {full} decoder positions .* = {full + 8}, more than the decoder's context window of {window}"
    with pytest.raises(ValueError, match=match):
        tiny_engine.generate("q?", passages, policy="all", max_new_tokens=8)
    with pytest.raises(ValueError, match="fewer or shorter passages, a smaller expand fraction"):
        tiny_engine.stream("q?", passages, policy="all", max_new_tokens=8)  # at the call, before iterating
    with pytest.raises(ValueError, match=r"request 1 needs"):
        tiny_engine.generate_batch(
            [{"question": "q?", "passages": passages[:1]}, {"question": "q?", "passages": passages, "policy": "all"}],
            max_new_tokens=8,
        )
    # ... compressed it does; the window counts the new tokens too.
    assert tiny_engine.generate("q?", passages, policy="none", max_new_tokens=2).stats.positions < window
    with pytest.raises(ValueError, match=f"max_new_tokens={window}"):
        tiny_engine.generate("q?", passages, policy="none", max_new_tokens=window)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        tiny_engine.generate("q?", passages[:1], max_new_tokens=0)


def test_passages_that_cannot_fit_even_compressed_are_refused_before_encoding(fresh_engine, monkeypatch):
    """A huge passage is refused right after chunking, before its chunks are encoded (a 1 MB passage
    took minutes to encode on a CPU, only to be refused before prefill)."""
    eng = fresh_engine
    window = eng.decoder.config.max_position_embeddings = 512
    huge = "word " * 4 * (window + 100)  # about 4 * window chunks of k=4 tokens
    encoded = []
    real = eng.chunk_encoder.encode_passages
    monkeypatch.setattr(eng.chunk_encoder, "encode_passages", lambda chunk_lists: encoded.append(1) or real(chunk_lists))
    n = len(eng.chunk(huge))
    assert n > window
    match = rf"the passages hold {len(eng.chunk(TEXT)) + n} chunks of k=4 tokens \(the longest, passage 1, {n}\); .* context window of {window}"
    for call in (
        lambda: eng.generate("q?", [TEXT, huge], policy="none", max_new_tokens=2),
        lambda: eng.stream("q?", [TEXT, huge], policy="none", max_new_tokens=2),
        lambda: eng.prepare_rag("q?", [TEXT, huge], "relevance", expand_fraction=0.1),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    assert encoded == []  # refused before any chunk was encoded
    assert eng.generate("q?", [TEXT], policy="none", max_new_tokens=2).stats.chunks_compressed > 0
    assert encoded  # an input that fits is encoded as usual
