"""The distillation stage on tiny random models: the loss is a KL that vanishes only when the
student matches the teacher, batched forwards equal one-row forwards, the teacher is the base
decoder even while a LoRA trains, the stage learns, and its export loads as trained."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from refrag_integrations import RefragEngine
from refrag_integrations.training.config import TrainConfig
from refrag_integrations.training.distill import DistillTrainer, distill_loss, lora_disabled, target_logits

from test_training import make_cfg, overfit  # noqa: E402  (tests/ is on sys.path via conftest)


@pytest.fixture()
def data_dir(tmp_path, shared_data):
    """NQ-open from the shared data plus three real Wikipedia articles as the distillation text."""
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(shared_data / "nq-open-oracle.jsonl.gz", d)
    with open(shared_data / "enwiki-sample-articles.jsonl", encoding="utf-8") as src, \
            gzip.open(d / "enwiki-2015-articles.jsonl.gz", "wt", encoding="utf-8") as dst:
        for _, line in zip(range(3), src):
            dst.write(line)
    return d


def test_distill_loss_is_zero_only_when_the_student_matches():
    torch.manual_seed(0)
    teacher = [torch.randn(3, 11), torch.randn(5, 11)]
    targets = [torch.randint(0, 11, (3,)), torch.randint(0, 11, (5,))]
    same, m = distill_loss([t.clone() for t in teacher], teacher, targets, 2.0, 0.0)
    assert abs(float(same)) < 1e-6 and m["agree"] == 1.0
    student = [torch.randn(3, 11, requires_grad=True), torch.randn(5, 11, requires_grad=True)]
    loss, m = distill_loss(student, teacher, targets, 1.0, 0.0)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert all(s.grad is not None and bool(s.grad.abs().sum() > 0) for s in student)
    with_ce, m2 = distill_loss(student, teacher, targets, 1.0, 0.5)
    assert float(with_ce) == pytest.approx(float(loss) + 0.5 * m2["ce"], rel=1e-5)


def test_batched_target_logits_equal_one_row_at_a_time(tiny_engine):
    eng = tiny_engine
    embed = eng.decoder.get_input_embeddings()
    torch.manual_seed(1)
    prefixes = [embed(torch.randint(0, 50, (n,))).detach() for n in (3, 9, 5)]
    targets = [torch.randint(0, 50, (n,)) for n in (4, 2, 6)]
    with torch.no_grad():
        batched = target_logits(eng, prefixes, targets)
        single = [target_logits(eng, [p], [t])[0] for p, t in zip(prefixes, targets)]
    for b, s, t in zip(batched, single, targets):
        assert b.shape == (t.shape[0], eng.decoder.config.vocab_size)
        torch.testing.assert_close(b, s, atol=1e-4, rtol=1e-4)


def test_teacher_is_the_base_decoder_while_a_lora_trains(tmp_path, tiny_dirs):
    from refrag_integrations.training.lora import LoRALinear

    cfg = make_cfg(tmp_path, tiny_dirs, stage="distill", lora_rank=2)
    trainer = DistillTrainer(cfg)
    dec = trainer.engine.decoder
    mods = [m for m in dec.modules() if isinstance(m, LoRALinear)]
    assert mods
    x = torch.randn(1, 4, dec.config.hidden_size)
    with torch.no_grad():
        base = dec.get_decoder()(inputs_embeds=x).last_hidden_state
        for m in mods:
            m.lora_B.add_(0.5)
        changed = dec.get_decoder()(inputs_embeds=x).last_hidden_state
        with lora_disabled(dec):
            as_teacher = dec.get_decoder()(inputs_embeds=x).last_hidden_state
    assert not torch.allclose(base, changed)
    torch.testing.assert_close(as_teacher, base)
    assert all(m.scale > 0 for m in mods)  # restored


@pytest.mark.parametrize("encoder, context", [("decoder:2", "passage"), (None, "chunk")])
def test_distill_lowers_the_kl_on_a_fixed_batch(tmp_path, tiny_chat_dirs, data_dir, encoder, context):
    from refrag_integrations.training.data import NQExample, load_nq

    extra = {"encoder": encoder} if encoder else {}
    cfg = make_cfg(tmp_path, tiny_chat_dirs, stage="distill", chunk_context=context, num_passages=2, batch_size=3,
                   qa_share=0.5, max_chunks=3, max_steps=15, data_dir=str(data_dir), encoder_trainable_layers=1,
                   **extra)
    trainer = DistillTrainer(cfg)
    # Real NQ train questions; passages shortened so the tiny run stays fast.
    trainer._data = [NQExample(e.question, e.answers, e.passage[:160], e.line) for e in load_nq(data_dir, "train")[:6]]
    before, after = overfit(trainer, 15)
    assert after < 0.7 * before, (before, after)


def test_distill_stage_exports_a_checkpoint_that_reproduces_the_student(tmp_path, tiny_chat_dirs, data_dir):
    dec, _ = tiny_chat_dirs
    cfg = make_cfg(tmp_path / "run", tiny_chat_dirs, stage="distill", encoder="decoder:2", chunk_context="passage",
                   num_passages=2, batch_size=2, qa_share=0.5, max_chunks=3, max_steps=2, eval_examples=2,
                   data_dir=str(data_dir), encoder_trainable_layers=1)
    trainer = DistillTrainer(cfg)
    metrics = trainer.train()
    after = metrics["after"]
    assert {"kl_p0", "match_p0", "nll_closed_book", "nll_full", "nll_compressed_p0"} <= set(after)
    assert json.loads((tmp_path / "run" / "metrics_before.json").read_text())["examples"] == 2
    loaded = RefragEngine.from_pretrained(str(tmp_path / "run" / "checkpoint"), decoder=str(dec), device="cpu")
    assert loaded.trained and loaded.config.encoder == "decoder:2" and loaded.config.chunk_context == "passage"
    assert loaded.chunk_encoder.reads_decoder_tokens
    passages = ["Gustave Eiffel designed the tower in Paris, France.", "Robert Boulter is an English actor."]
    trainer.engine.chunk_encoder.eval()
    with torch.no_grad():
        want = trainer.engine.chunk_encoder.encode_passages([trainer.engine.chunk(p) for p in passages])
        got = loaded.chunk_encoder.encode_passages([loaded.chunk(p) for p in passages])
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded.chunk_encoder.project(g), trainer.engine.chunk_encoder.project(w))
    # a different chunk_context is refused rather than loaded with the wrong vectors
    with pytest.raises(ValueError, match="chunk_context"):
        RefragEngine.from_pretrained(str(tmp_path / "run" / "checkpoint"), decoder=str(dec), chunk_context="chunk")


def test_distill_resume_reproduces_the_uninterrupted_run_and_keeps_the_file_formats(tmp_path, tiny_chat_dirs, data_dir):
    """2 steps, SIGINT, resume to 4 == 4 uninterrupted steps; and the resume state, log and config
    keep the fields a long run resumes from (a refactor of the loop must not change them)."""
    import os
    import signal

    from refrag_integrations.training.data import NQExample, load_nq
    from refrag_integrations.training.trainer import STATE_FILE

    train = [NQExample(e.question, e.answers, e.passage[:160], e.line) for e in load_nq(data_dir, "train")[:6]]

    def make(out) -> DistillTrainer:
        cfg = make_cfg(out, tiny_chat_dirs, stage="distill", num_passages=2, batch_size=2, qa_share=0.5, max_chunks=3,
                       max_steps=4, save_every=100, eval_examples=1, eval_before=False, lora_rank=2,
                       data_dir=str(data_dir))
        trainer = DistillTrainer(cfg)
        trainer._data = train
        return trainer

    full = make(tmp_path / "full")
    assert full.train()["steps"] == 4
    cut = make(tmp_path / "cut")
    step = cut.train_step

    def step_then_interrupt():
        m = step()
        if cut.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: save and stop after this step
        return m

    cut.train_step = step_then_interrupt
    assert cut.train() == {"stopped_at": 2}
    state = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=False)
    assert set(state) == {"step", "config", "trainable", "optimizer", "scheduler", "rng", "world_size"}
    assert set(state["trainable"]) == {"projector", "encoder", "decoder"} and set(state["rng"]) == {"torch", "python"}
    assert state["step"] == 2 and state["config"] == cut.cfg.to_dict()
    resumed = make(tmp_path / "cut")
    assert resumed.train()["steps"] == 4
    want, got = full.trainable_state(), resumed.trainable_state()
    for part in ("projector", "encoder", "decoder"):
        assert want[part].keys() == got[part].keys() and want[part]
        for name in want[part]:
            torch.testing.assert_close(got[part][name], want[part][name], rtol=1e-5, atol=1e-6)

    def log(path):
        return [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]

    rows = log(tmp_path / "cut")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == {"loss", "kl", "ce", "acc", "agree", "step", "lr", "sec"} for r in rows)
    for a, b in zip(rows, log(tmp_path / "full")):
        assert {k: v for k, v in a.items() if k != "sec"} == pytest.approx({k: v for k, v in b.items() if k != "sec"})
    assert json.loads((tmp_path / "cut" / "train_config.json").read_text()) == resumed.cfg.to_dict()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"distill_temperature": 0}, "distill_temperature"),
        ({"distill_ce_weight": -1}, "distill_ce_weight"),
        ({"qa_share": 1.5}, "qa_share"),
        ({"chunk_context": "sentence"}, "chunk_context"),
        ({"eval_before": "maybe"}, "eval_before"),
    ],
)
def test_bad_distill_settings_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(stage="distill", **bad)


def test_evaluation_during_training_reads_the_current_encoder_not_cached_vectors(tmp_path, tiny_chat_dirs, data_dir):
    """The engine caches chunk vectors per passage; an evaluation after the encoder changed must not
    reuse the vectors an earlier evaluation encoded (it once did: in-run evaluations were stale)."""
    cfg = make_cfg(tmp_path / "run", tiny_chat_dirs, stage="distill", num_passages=1, batch_size=2, max_chunks=3,
                   max_steps=2, eval_examples=2, data_dir=str(data_dir), encoder_trainable_layers=1)
    trainer = DistillTrainer(cfg)
    first = trainer.evaluate_fresh()
    with torch.no_grad():
        for p in trainer.engine.chunk_encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    second = trainer.evaluate_fresh()
    assert second["kl_p0"] != first["kl_p0"] and second["nll_compressed_p0"] != first["nll_compressed_p0"]
    assert second["nll_closed_book"] == pytest.approx(first["nll_closed_book"])  # no chunk vectors involved
    assert trainer.evaluate_fresh()["kl_p0"] == pytest.approx(second["kl_p0"])  # same weights, same result
