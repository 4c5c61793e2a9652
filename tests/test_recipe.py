"""`refrag train recipe` on tiny random models: the stages chain and export a final checkpoint that
loads, a rerun skips finished stages, an interrupted stage resumes exactly, and bad recipes fail
before any model loads. Data: a few paragraphs of real text, and QA examples cut from it, given as
files (the corpus and qa arguments), not taken from a data directory."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from typer.testing import CliRunner

from refrag_integrations import RefragEngine
from refrag_integrations.checkpoint import load_checkpoint
from refrag_integrations.cli import app
from refrag_integrations.training import recipe as recipe_mod
from refrag_integrations.training.recipe import Recipe, RecipeError, run_recipe
from refrag_integrations.training.trainer import Trainer

from test_training import DOCS  # noqa: E402  (tests/ is on sys.path via conftest)

# Tiny-model settings for every stage: 2 steps, k = 4, 2 evaluation examples.
TINY = dict(
    chunk_size=4, max_chunks=4, continuation_tokens=8, curriculum_stages=2, batch_size=1, max_steps=2, lr=1e-2,
    warmup_frac=0.0, bf16=False, device="cpu", encoder_trainable_layers=1, eval_examples=2, save_every=1, threads=1,
    num_passages=2,
)


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


@pytest.fixture()
def qa(tmp_path):
    """20 QA examples in the NQ-open shape, cut from the real text: each passage is 12 words of it,
    the question its first 4 words, the answer the 5th."""
    words = " ".join(DOCS).split()
    path = tmp_path / "qa.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20):
            span = words[12 * i : 12 * i + 12]
            ex = {"question": f"What comes after '{' '.join(span[:4])}'?", "answers": [span[4]],
                  "ctxs": [{"title": f"Passage {i}", "text": " ".join(span)}]}
            f.write(json.dumps(ex) + "\n")
    return path


def _sets(settings: dict) -> list[str]:
    return [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]


def test_recipe_command_trains_two_stages_exports_final_and_a_rerun_skips_them(
    tmp_path, tiny_chat_dirs, corpus, qa, monkeypatch
):
    dec, enc = tiny_chat_dirs
    out = tmp_path / "run"
    args = ["train", "recipe", "--decoder", str(dec), "--encoder", str(enc), "--data", str(corpus), "--qa", str(qa),
            "--output-dir", str(out), "--stages", "reconstruct,sft", *_sets(TINY), "--set", "sft.max_steps=3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["trained"] == ["reconstruct", "sft"] and summary["skipped"] == []
    assert summary["stages"]["reconstruct"]["steps"] == 2 and summary["stages"]["sft"]["steps"] == 3
    assert "1" in summary["stages"]["reconstruct"]["after"]["reconstruction"]
    assert summary["stages"]["sft"]["after"]["examples"] == 2  # the qa file's held-out 10%
    # Chained: sft started from reconstruct's export; final/ is sft's export.
    sft_cfg = json.loads((out / "sft" / "train_config.json").read_text())
    assert sft_cfg["init_checkpoint"] == str(out / "reconstruct" / "checkpoint")
    assert sft_cfg["corpus"] == str(corpus) and sft_cfg["qa"] == str(qa)
    final = load_checkpoint(out / "final")
    assert final.trained_stages == ["reconstruct", "sft"] and len(final.decoder_lora) == 1  # sft's LoRA (recipe default)
    sft_export = load_checkpoint(out / "sft" / "checkpoint")
    for name, value in final.projector.items():
        assert torch.equal(value, sft_export.projector[name])
    assert not torch.equal(final.projector[name], load_checkpoint(out / "reconstruct" / "checkpoint").projector[name])
    engine = RefragEngine.from_pretrained(str(out / "final"), device="cpu")
    assert engine.trained and engine.config.chunk_size == 4
    answer = engine.generate("Who designed the Eiffel Tower?", [DOCS[1][:120]], expand="none", max_new_tokens=3)
    assert answer.stats.trained and answer.stats.chunks_compressed == answer.stats.chunks > 0

    # A rerun builds no trainer: both stages are finished.
    def no_trainer(stage):
        raise AssertionError(f"stage {stage} was trained again")

    monkeypatch.setattr(recipe_mod, "trainer_class", no_trainer)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["skipped"] == ["reconstruct", "sft"] and summary["trained"] == []
    assert summary["stages"]["sft"]["steps"] == 3
    # A finished stage with other settings is refused, not silently reused.
    res = CliRunner().invoke(app, args + ["--set", "sft.lr=0.5"])
    assert res.exit_code == 2 and "finished with other settings (lr=0.01 -> 0.5)" in res.output


def test_an_interrupted_stage_resumes_and_the_finished_one_is_skipped(tmp_path, tiny_dirs, corpus, monkeypatch):
    dec, enc = tiny_dirs
    plan = Recipe.from_dict({"output_dir": str(tmp_path / "run"), "stages": "reconstruct,cpt", "decoder": str(dec),
                             "encoder": str(enc), "corpus": str(corpus), **TINY})
    original = Trainer.train_step

    def stop_after_first_cpt_step(self):
        m = original(self)
        if self.cfg.stage == "cpt" and self.step == 1:
            self._stop = True  # what SIGINT / SIGTERM do
        return m

    monkeypatch.setattr(Trainer, "train_step", stop_after_first_cpt_step)
    first = run_recipe(plan)
    assert first["stopped"] == "cpt" and first["stopped_at"] == 1 and first["trained"] == ["reconstruct"]
    assert not (tmp_path / "run" / "final").exists()

    monkeypatch.setattr(Trainer, "train_step", original)
    built = []
    real_class = recipe_mod.trainer_class
    monkeypatch.setattr(recipe_mod, "trainer_class", lambda stage: built.append(stage) or real_class(stage))
    second = run_recipe(plan)
    assert built == ["cpt"] and second["skipped"] == ["reconstruct"] and second["trained"] == ["cpt"]
    log = [json.loads(line) for line in (tmp_path / "run" / "cpt" / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log if "loss" in m] == [1, 2]  # step 1 kept, only step 2 trained again
    assert load_checkpoint(tmp_path / "run" / "final").trained_stages == ["reconstruct", "cpt"]


def test_settings_layers_and_per_stage_overrides():
    plan = Recipe.from_dict({
        "output_dir": "runs/r", "stages": ["reconstruct", "cpt", "sft", "policy"], "lora_rank": 4, "fsdp": True,
        "cpt": {"max_steps": 7}, "cpt.lr": "1e-5", "sft.max-steps": 9,
    })
    cfgs = {c.stage: c for c in plan.configs()}
    assert cfgs["reconstruct"].max_steps == 1000 and cfgs["reconstruct"].lr == 3e-4  # the recipe's stage defaults
    assert cfgs["cpt"].max_steps == 7 and cfgs["cpt"].lr == 1e-5 and cfgs["sft"].max_steps == 9
    assert all(c.lora_rank == 4 for c in cfgs.values())
    assert cfgs["cpt"].fsdp and not cfgs["policy"].fsdp  # fsdp for every stage skips policy, which has none
    assert cfgs["cpt"].init_checkpoint == "runs/r/reconstruct/checkpoint" and cfgs["reconstruct"].init_checkpoint is None
    assert cfgs["policy"].output_dir == "runs/r/policy"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stages": "reconstruct,sfft"}, "unknown stage 'sfft'"),
        ({"stages": "policy,sft"}, "policy must be the last stage"),
        ({"stages": "sft,sft"}, "twice"),
        ({"max_stepz": 3}, "unknown training setting 'max_stepz'"),
        ({"sft.output_dir": "x"}, "set by the recipe"),
        ({"stage": "sft"}, "set by the recipe"),
        ({"sfft.lr": 1e-5}, "'sfft' is not a stage"),
        ({"cpt": 3}, "must be a mapping"),
        ({"reconstruct.expand_fraction": 0.5}, "stage reconstruct: the reconstruct stage keeps every chunk"),
    ],
)
def test_bad_recipes_raise_before_any_model_loads(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"output_dir": "runs/r", **data}).configs()


def test_missing_or_too_small_inputs_and_stale_stages_are_refused(tmp_path, corpus, qa):
    missing = Recipe.from_dict({"output_dir": str(tmp_path / "a"), "stages": "reconstruct", "corpus": str(tmp_path / "nope.jsonl")})
    with pytest.raises(RecipeError, match="corpus file .*nope.jsonl does not exist"):
        run_recipe(missing)
    few = Recipe.from_dict({"output_dir": str(tmp_path / "b"), "stages": "sft", "qa": str(qa), "num_passages": 5})
    with pytest.raises(RecipeError, match="the eval QA examples number 2, fewer than num_passages=5"):
        run_recipe(few)
    (tmp_path / "c" / "cpt").mkdir(parents=True)  # a later stage left from an earlier run
    stale = Recipe.from_dict({"output_dir": str(tmp_path / "c"), "stages": "reconstruct,cpt", "corpus": str(corpus)})
    with pytest.raises(RecipeError, match="left from an earlier run"):
        run_recipe(stale)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "reconstruct").exists()


def test_recipe_command_reports_a_missing_file_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["train", "recipe", "--output-dir", str(tmp_path / "r"), "--stages", "sft",
                                   "--qa", str(tmp_path / "qa.jsonl")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == f"Error: stage sft: qa file {tmp_path / 'qa.jsonl'} does not exist; check the path."
