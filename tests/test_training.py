"""The training pipeline on tiny random models: every stage learns, resume is exact, signals save,
the curriculum follows its schedule, exports load and reproduce the trained model, bad input fails.

Training data is a few paragraphs of real text (WikiText-2 / Wikipedia), or NQ-open examples from
the shared data for the ``sft`` stage.
"""

from __future__ import annotations

import os
import random
import shutil
import signal

import pytest
import torch

from refrag_integrations.training.config import STAGE_EXPAND_FRACTION, STAGES, TrainConfig
from refrag_integrations.training.distributed import init_distributed
from refrag_integrations.training.trainer import CHECKPOINT_DIR, STATE_FILE, Trainer, micro_batch_seed

# Real text (WikiText-2 test, CC BY-SA 3.0; the first is the tiny tokenizer's own corpus).
from tiny import CORPUS  # noqa: E402

DOCS = [
    CORPUS,
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower. Constructed from 1887 "
    "to 1889 as the centerpiece of the 1889 World's Fair, it was initially criticised by some of France's "
    "leading artists and intellectuals for its design, but it has become a global cultural icon of France.",
    "Photosynthesis is a process used by plants and other organisms to convert light energy into chemical "
    "energy that, through cellular respiration, can later be released to fuel the organism's activities. "
    "Some of this chemical energy is stored in carbohydrate molecules, such as sugars and starches, which "
    "are synthesized from carbon dioxide and water.",
]


SHARPEN = 10.0  # see overfit()


def make_cfg(out, tiny_dirs, **overrides) -> TrainConfig:
    dec, enc = tiny_dirs
    kw = dict(
        stage="reconstruct", output_dir=str(out), decoder=str(dec), encoder=str(enc), chunk_size=4,
        max_chunks=4, continuation_tokens=8, curriculum_stages=2, batch_size=2, max_steps=4, lr=1e-2,
        warmup_frac=0.0, bf16=False, device="cpu", encoder_trainable_layers=1, eval_examples=2, save_every=2,
        threads=1,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def make_trainer(cfg: TrainConfig, cls=Trainer) -> Trainer:
    from refrag_integrations.training.data import TokenCorpus

    trainer = cls(cfg)
    if cfg.stage != "sft":
        corpus = TokenCorpus(DOCS, trainer.engine.tokenizer)
        trainer._data = corpus
        trainer._heldout = corpus
    return trainer


def fixed_batch_loss(trainer: Trainer) -> float:
    """Loss of micro-batch 0 of step 0 with dropout off (deterministic)."""
    enc = trainer.engine.chunk_encoder
    was = enc.training
    enc.eval()
    with torch.no_grad():
        loss, _ = type(trainer).loss_for_step(trainer, 0, 0)
    enc.train(was)
    return float(loss)


def overfit(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Train ``steps`` optimizer steps on one fixed batch; return (loss before, loss after).

    The tiny decoder's embeddings (tied to its output layer) are scaled up first: at their random
    init (std 0.02) every logit is within about +-0.1, so the frozen decoder could barely move any
    loss whatever its inputs; a real LM's logits span far more.
    """
    with torch.no_grad():
        trainer.engine.decoder.get_input_embeddings().weight.mul_(SHARPEN)
    before = fixed_batch_loss(trainer)
    trainer.loss_for_step = lambda step, micro: type(trainer).loss_for_step(trainer, 0, 0)
    for _ in range(steps):
        m = trainer.train_step()
        assert torch.isfinite(torch.tensor(m["loss"]))
    return before, fixed_batch_loss(trainer)


def logits_of(engine, ctx: torch.Tensor) -> torch.Tensor:
    """Decoder logits over [compressed ctx chunks; ctx tokens]: exercises projector, encoder and decoder."""
    from refrag_integrations.training.objectives import context_blocks

    engine.chunk_encoder.eval()
    with torch.no_grad():
        prefix = context_blocks(engine, ctx)  # (B, L, d)
        emb = torch.cat([prefix, engine.decoder.get_input_embeddings()(ctx)], 1)  # (B, L + L*k, d)
        return engine.decoder(inputs_embeds=emb, use_cache=False).logits.float()


def heldout_ctx(trainer: Trainer, chunks: int = 3) -> torch.Tensor:
    k = trainer.cfg.chunk_size
    return torch.tensor(trainer._data.windows(random.Random(7), chunks * k, 2))


# ---------------------------------------------------------------------------- every stage learns


@pytest.mark.parametrize(
    "stage, extra, ratio",
    [
        # Frozen decoder: only the chunk vectors can help; the tiny random decoder's floor is ~0.87x.
        ("reconstruct", {}, 0.92),
        ("cpt", {"lora_rank": 2}, 0.7),
        ("mixed", {"lora_rank": 2, "expand_fraction": 0.5}, 0.7),
    ],
)
def test_stage_lowers_loss_on_fixed_batch(stage, extra, ratio, tmp_path, tiny_dirs):
    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, stage=stage, max_steps=20, **extra))
    before, after = overfit(trainer, 20)
    assert after < ratio * before, (before, after)


def test_sft_lowers_loss_on_fixed_batch(tmp_path, tiny_chat_dirs, shared_data):
    from refrag_integrations.training.data import NQExample, load_nq
    from refrag_integrations.training.sft import SFTTrainer

    # Real NQ train questions; passages shortened so the tiny run stays fast.
    examples = [NQExample(e.question, e.answers, e.passage[:160], e.line) for e in load_nq(shared_data, "train")[:6]]
    cfg = make_cfg(tmp_path, tiny_chat_dirs, stage="sft", lora_rank=2, num_passages=2, batch_size=1,
                   expand_fraction=0.25, max_steps=20, data_dir=str(shared_data))
    trainer = make_trainer(cfg, SFTTrainer)
    trainer._data = examples
    before, after = overfit(trainer, 20)
    assert after < 0.8 * before, (before, after)


def test_trainer_refuses_stages_it_does_not_train(tmp_path, tiny_dirs):
    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, stage="sft"))
    with pytest.raises(ValueError, match="own command"):
        trainer.loss_for_step(0, 0)


# ---------------------------------------------------------------------------- resume + signals


def test_resume_after_sigterm_reproduces_uninterrupted_run(tmp_path, tiny_dirs):
    common = dict(stage="cpt", lora_rank=2, max_steps=6, grad_accum=2, save_every=100)
    full = make_trainer(make_cfg(tmp_path / "full", tiny_dirs, **common))
    metrics = full.train()
    assert metrics["steps"] == 6 and "after" in metrics and "before" in metrics

    out = tmp_path / "interrupted"
    first = make_trainer(make_cfg(out, tiny_dirs, **common))
    handler_before = signal.getsignal(signal.SIGTERM)
    step_once = first.train_step

    def step_then_sigterm():
        m = step_once()
        if first.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to train()'s handler
        return m

    first.train_step = step_then_sigterm
    assert first.train() == {"stopped_at": 3}
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored
    state = torch.load(out / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    assert {"step", "config", "trainable", "optimizer", "scheduler", "rng"} <= set(state)
    assert not (out / CHECKPOINT_DIR).exists()  # no export for an interrupted stage

    resumed = make_trainer(make_cfg(out, tiny_dirs, **common))  # a new process would do the same
    resumed.train()
    assert resumed.step == 6
    want, got = full.trainable_state(), resumed.trainable_state()
    for part in ("projector", "encoder", "decoder"):
        assert want[part].keys() == got[part].keys() and want[part]
        for name in want[part]:
            torch.testing.assert_close(got[part][name], want[part][name], rtol=1e-5, atol=1e-6)
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 6  # steps 1-3 before the signal, 4-6 after resuming
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_signal_handler_saves_state_at_the_current_step(tmp_path, tiny_dirs):
    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, max_steps=5, save_every=100))
    step_once = trainer.train_step

    def step_then_handler():
        m = step_once()
        if trainer.step == 2:
            trainer._on_signal(signal.SIGINT, None)
        return m

    trainer.train_step = step_then_handler
    assert trainer.train() == {"stopped_at": 2}
    assert torch.load(tmp_path / STATE_FILE, weights_only=False)["step"] == 2


def test_resume_refuses_other_settings(tmp_path, tiny_dirs):
    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, grad_accum=2))
    trainer.train_step()
    trainer.save_state()
    with pytest.raises(ValueError, match="batch_size"):
        make_trainer(make_cfg(tmp_path, tiny_dirs, grad_accum=2, batch_size=3)).try_resume()
    with pytest.raises(ValueError, match="world_size \\* grad_accum"):
        make_trainer(make_cfg(tmp_path, tiny_dirs, grad_accum=1)).try_resume()
    again = make_trainer(make_cfg(tmp_path, tiny_dirs, grad_accum=2))
    assert again.try_resume() and again.step == 1


def test_micro_batches_draw_distinct_data_and_keep_the_single_process_seed():
    # The historical single-process seed, so runs started before scale-out resume on the same data.
    assert micro_batch_seed(3, 10, 5) == (3 * 1_000_003 + 10) * 64 + 5
    seeds = {micro_batch_seed(0, step, i) for step in range(4) for i in range(200)}
    assert len(seeds) == 4 * 200


# ---------------------------------------------------------------------------- curriculum


def test_curriculum_mixture_follows_the_schedule():
    from refrag_integrations.training.curriculum import chunk_sizes, sample_chunk_count, stage_at, stage_mixture

    num_stages, max_chunks = 9, 256  # the paper's Table 8 setting
    sizes = chunk_sizes(max_chunks)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    mixes = [stage_mixture(s, num_stages, max_chunks) for s in range(1, num_stages + 1)]
    for mix in mixes:
        assert list(mix) == sizes
        assert sum(mix.values()) == pytest.approx(1.0)
        assert min(mix.values()) >= 0.0
    assert 0.6 <= mixes[0][1] <= 0.72  # stage 1: about two thirds one-chunk examples
    assert mixes[0][1] == max(mixes[0].values())
    assert mixes[-1][1] == 0.0  # last stage: no one-chunk examples ...
    assert max(mixes[-1], key=mixes[-1].get) == max_chunks  # ... and the longest size is the largest share
    for prev, cur in zip(mixes, mixes[1:]):  # a monotone shift from short to long
        assert cur[1] <= prev[1] and cur[max_chunks] >= prev[max_chunks]
        assert sum(n * w for n, w in cur.items()) > sum(n * w for n, w in prev.items())

    # Equal steps per stage, and the sampler draws from the stage's mixture.
    total = 900
    assert [stage_at(s, total, num_stages) for s in (0, 99, 100, 899)] == [1, 1, 2, 9]
    rng = random.Random(0)
    draws = [sample_chunk_count(rng, 0, total, num_stages, max_chunks) for _ in range(4000)]
    for n, share in mixes[0].items():
        assert draws.count(n) / len(draws) == pytest.approx(share, abs=0.03)
    late = [sample_chunk_count(rng, total - 1, total, num_stages, max_chunks) for _ in range(500)]
    assert 1 not in late

    with pytest.raises(ValueError, match="stage"):
        stage_mixture(0, num_stages, max_chunks)
    with pytest.raises(ValueError, match="max_chunks"):
        chunk_sizes(0)


def test_curriculum_start_skips_the_early_stages():
    from refrag_integrations.training.curriculum import sample_chunk_count, stage_at, stage_mixture

    total, num_stages = 900, 9
    # Stages 5..9 share the run equally; start = num_stages holds the last stage throughout.
    assert [stage_at(s, total, num_stages, start=5) for s in (0, 179, 180, 899)] == [5, 5, 6, 9]
    assert {stage_at(s, total, num_stages, start=9) for s in range(0, total, 37)} == {9}
    assert stage_at(450, total, num_stages) == stage_at(450, total, num_stages, start=1)
    rng = random.Random(1)
    draws = [sample_chunk_count(rng, 0, total, num_stages, 8, start=9) for _ in range(3000)]
    assert 1 not in draws
    for n, share in stage_mixture(9, num_stages, 8).items():
        assert draws.count(n) / len(draws) == pytest.approx(share, abs=0.03)
    with pytest.raises(ValueError, match="start"):
        stage_at(0, total, num_stages, start=10)


def test_sft_compressed_share_trains_fully_compressed_examples(tmp_path, tiny_chat_dirs, shared_data, monkeypatch):
    from refrag_integrations.training.data import NQExample, load_nq
    from refrag_integrations.training.sft import SFTTrainer

    examples = [NQExample(e.question, e.answers, e.passage[:160], e.line) for e in load_nq(shared_data, "train")[:6]]

    def expanded_counts(share: float) -> list[int]:
        cfg = make_cfg(tmp_path / str(share), tiny_chat_dirs, stage="sft", num_passages=2, batch_size=1,
                       expand_fraction=0.5, compressed_share=share, max_steps=1, data_dir=str(shared_data))
        trainer = make_trainer(cfg, SFTTrainer)
        trainer._data = examples
        seen = []
        real = trainer.engine.prepare_rag

        def spy(question, passages, decisions, **kw):
            seen.append(sum(map(sum, decisions)))
            return real(question, passages, decisions, **kw)

        monkeypatch.setattr(trainer.engine, "prepare_rag", spy)
        for step in range(24):
            trainer.loss_for_step(step, 0)
        return seen

    never, always, half = expanded_counts(0.0), expanded_counts(1.0), expanded_counts(0.5)
    assert min(never) > 0  # p = expand_fraction on every example
    assert set(always) == {0}  # every example fully compressed
    assert 0 in half and max(half) > 0  # a mixture of both


# ---------------------------------------------------------------------------- export


def test_lora_stage_export_loads_and_reproduces_the_trained_model(tmp_path, tiny_dirs):
    from refrag_integrations import RefragEngine
    from refrag_integrations.checkpoint import (
        DECODER_LORA_FILE, CorruptCheckpointError, load_checkpoint, save_checkpoint,
    )

    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, stage="cpt", lora_rank=2, max_steps=3))
    metrics = trainer.train()
    path = tmp_path / CHECKPOINT_DIR
    ckpt = load_checkpoint(path)
    assert ckpt.trained_stages == ["cpt"] and ckpt.metrics == metrics
    assert len(ckpt.decoder_lora) == 1 and ckpt.encoder_delta and not ckpt.decoder_delta
    assert any(v.abs().sum() > 0 for k, v in ckpt.decoder_lora[0].items() if k.endswith("lora_B"))  # it trained

    dec, enc = tiny_dirs
    loaded = RefragEngine.from_pretrained(path, decoder=str(dec), encoder=str(enc), device="cpu")
    assert loaded.trained
    ctx = heldout_ctx(trainer)
    want = logits_of(trainer.engine, ctx)  # LoRA wrapped around the decoder's linears
    torch.testing.assert_close(logits_of(loaded, ctx), want, rtol=1e-4, atol=1e-4)  # LoRA merged at load

    incomplete = tmp_path / "incomplete"
    shutil.copytree(path, incomplete)
    (incomplete / DECODER_LORA_FILE).unlink()  # a deleted part is refused, never loaded as another model
    with pytest.raises(CorruptCheckpointError, match=f"{DECODER_LORA_FILE} is missing although"):
        load_checkpoint(incomplete)
    no_lora = save_checkpoint(  # dropping a part on purpose = saving again without it
        tmp_path / "no_lora", ckpt.config, ckpt.projector, encoder_delta=ckpt.encoder_delta,
        trained_stages=ckpt.trained_stages, metrics=ckpt.metrics,
    )
    without = RefragEngine.from_pretrained(no_lora, decoder=str(dec), encoder=str(enc), device="cpu")
    assert (logits_of(without, ctx) - want).abs().max() > 1e-3  # the adapters matter


def test_bfloat16_decoder_trains_float32_adapters_and_exports_them(tmp_path, tiny_dirs):
    # A half-precision frozen decoder (large decoders on GPUs): the base weights stay bfloat16 and
    # untouched, the LoRA adapters are float32 and learn, and the export loads into either dtype.
    from refrag_integrations import RefragEngine
    from refrag_integrations.training.lora import LoRALinear

    assert TrainConfig(decoder_dtype="bf16").decoder_dtype == "bfloat16"
    trainer = make_trainer(make_cfg(tmp_path, tiny_dirs, stage="cpt", lora_rank=2, max_steps=20,
                                    decoder_dtype="bfloat16"))
    dec = trainer.engine.decoder
    wrapped = [m for m in dec.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(m.base.weight.dtype == torch.bfloat16 for m in wrapped)
    assert all(m.lora_A.dtype == torch.float32 and m.lora_B.dtype == torch.float32 for m in wrapped)
    assert {p.dtype for p in trainer.params} == {torch.float32}  # what the optimizer updates
    base_before = wrapped[0].base.weight.detach().clone()
    before, after = overfit(trainer, 20)
    assert after < 0.7 * before, (before, after)
    assert torch.equal(wrapped[0].base.weight, base_before)  # frozen
    assert any(float(m.lora_B.detach().abs().sum()) > 0 for m in wrapped)

    trainer.save_checkpoint()
    d, e = tiny_dirs
    ctx = heldout_ctx(trainer)
    path = tmp_path / CHECKPOINT_DIR
    half = RefragEngine.from_pretrained(path, decoder=str(d), encoder=str(e), device="cpu", decoder_dtype="bfloat16")
    assert next(half.decoder.parameters()).dtype == torch.bfloat16
    assert next(half.chunk_encoder.parameters()).dtype == torch.float32
    full = RefragEngine.from_pretrained(path, decoder=str(d), encoder=str(e), device="cpu")
    base = RefragEngine.from_pretrained("none", decoder=str(d), encoder=str(e), chunk_size=4, device="cpu")
    base.chunk_encoder.load_state_dict(full.chunk_encoder.state_dict())  # same vectors, no LoRA
    want = logits_of(full, ctx)
    lora_effect = float((logits_of(base, ctx) - want).abs().max())
    rounding = float((logits_of(half, ctx) - want).abs().max())
    assert rounding < 0.1 * lora_effect, (rounding, lora_effect)  # the merged LoRA survives bfloat16


def test_next_stage_carries_encoder_delta_and_adapters(tmp_path, tiny_dirs):
    from refrag_integrations import RefragEngine
    from refrag_integrations.checkpoint import load_checkpoint

    first = make_trainer(make_cfg(tmp_path / "cpt", tiny_dirs, stage="cpt", lora_rank=2, max_steps=2))
    first.train()
    ck1 = load_checkpoint(tmp_path / "cpt" / CHECKPOINT_DIR)

    cfg2 = make_cfg(tmp_path / "mixed", tiny_dirs, stage="mixed", lora_rank=2, expand_fraction=0.5, max_steps=2,
                    encoder_trainable_layers=0, init_checkpoint=str(tmp_path / "cpt" / CHECKPOINT_DIR))
    second = make_trainer(cfg2)
    second.train()
    ck2 = load_checkpoint(tmp_path / "mixed" / CHECKPOINT_DIR)

    assert ck2.trained_stages == ["cpt", "mixed"]
    assert ck2.encoder_delta.keys() == ck1.encoder_delta.keys() and ck1.encoder_delta
    for name, value in ck1.encoder_delta.items():
        assert torch.equal(ck2.encoder_delta[name], value)
    assert len(ck2.decoder_lora) == 2
    for name, value in ck1.decoder_lora[0].items():
        assert torch.equal(ck2.decoder_lora[0][name], value)
    assert not all(torch.equal(ck2.projector[n], ck1.projector[n]) for n in ck1.projector)  # stage 2 trained

    dec, enc = tiny_dirs
    loaded = RefragEngine.from_pretrained(tmp_path / "mixed" / CHECKPOINT_DIR, decoder=str(dec), encoder=str(enc),
                                          device="cpu")
    ctx = heldout_ctx(second)
    torch.testing.assert_close(logits_of(loaded, ctx), logits_of(second.engine, ctx), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"stage": "pretrain"}, "stage"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"max_steps": 0}, "max_steps"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"max_chunks": 0}, "max_chunks"),
        ({"curriculum_stages": 0}, "curriculum_stages"),
        ({"curriculum_stages": 3, "curriculum_start": 4}, "curriculum_start"),
        ({"curriculum_start": 0}, "curriculum_start"),
        ({"compressed_share": -0.1}, "compressed_share"),
        ({"stage": "sft", "expand_fraction": 1.5}, "expand_fraction"),
        ({"stage": "cpt", "expand_fraction": 0.1}, "mixed stage"),
        ({"stage": "reconstruct", "expand_fraction": 0.25}, "mixed stage"),
        ({"stage": "mixed", "expand_fraction": 0.0}, "is the cpt stage"),
        ({"threads": "two"}, "threads must be a number"),
        ({"lr": 0.0}, "lr"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"max_steps": 2.5}, "max_steps must be a number"),
        ({"decoder_dtype": "float16"}, "decoder_dtype must be float32 or bfloat16"),
        ({"decoder_dtype": "int8"}, "decoder_dtype"),
    ],
)
def test_bad_config_values_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_expand_fraction_defaults_per_stage():
    # mixed without an explicit p is not silently the cpt stage; sft and policy train at p = 0.25.
    assert {stage: TrainConfig(stage=stage).expand_fraction for stage in STAGES} == STAGE_EXPAND_FRACTION
    assert STAGE_EXPAND_FRACTION["mixed"] == 0.1 and STAGE_EXPAND_FRACTION["cpt"] == 0.0
    assert TrainConfig(stage="mixed", expand_fraction=0.3).expand_fraction == 0.3
    assert TrainConfig(stage="sft", expand_fraction=0.0).expand_fraction == 0.0  # all compressed: allowed
    # A saved config (train_config.json) keeps the value it was resolved to.
    assert TrainConfig.from_dict(TrainConfig(stage="mixed").to_dict()).expand_fraction == 0.1


def test_numbers_written_as_text_are_read_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-4" as a string, in a config file and in `--set lr=1e-4`.
    from refrag_integrations.cli.train import _parse_sets

    sets = _parse_sets(["stage=sft", "lr=1e-4", "max_steps=7", "expand_fraction=1", "threads=2"])
    assert sets["lr"] == "1e-4"
    cfg = TrainConfig(**sets)
    assert cfg.lr == pytest.approx(1e-4) and cfg.max_steps == 7 and cfg.expand_fraction == 1.0
    assert TrainConfig(threads="2").threads == 2 and TrainConfig(threads=None).threads is None
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nweight_decay: 1e-2\n")
    cfg = TrainConfig.from_yaml(path)
    assert isinstance(cfg.lr, float) and cfg.weight_decay == pytest.approx(0.01)


def test_bad_config_keys_and_engine_mismatch_raise(tmp_path, tiny_dirs, tiny_engine):
    with pytest.raises(ValueError, match="Unknown training config keys"):
        TrainConfig.from_dict({"stage": "cpt", "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="k=4"):
        Trainer(make_cfg(tmp_path, tiny_dirs, chunk_size=8), engine=tiny_engine)


def test_bad_launcher_environment_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not init_distributed("cpu").enabled
