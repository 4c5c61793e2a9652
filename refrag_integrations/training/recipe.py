"""The REFRAG training recipe as one resumable run (``refrag train recipe``): the stages chained,
each stage's export the next stage's ``init_checkpoint``, the last one copied to ``final/``.

Layout of a recipe's ``output_dir``::

    recipe.json         the resolved recipe: its stages and each stage's TrainConfig
    reconstruct/        one stage run directory per stage (resume state, train_log.jsonl,
    cpt/ ...            metrics_before.json, checkpoint/), exactly as `refrag train STAGE` writes it
    final/              the last stage's checkpoint, copied once every stage has finished
    metrics.json        each stage's built-in evaluation (before / after) and where final/ is

A stage's settings are, from weakest to strongest: :data:`RECIPE_STAGE_SETTINGS` (the settings of
the measured runs in docs/training.md), the recipe's settings for every stage, and the recipe's
settings for that stage. ``fsdp`` given for every stage applies to the stages that have it (all but
policy, which trains only its small network, data-parallel).

Resuming: a stage is finished when its ``checkpoint/refrag_config.json`` exists, its resume state
has reached ``max_steps``, and the export is that final one (its metrics say ``steps``; an
``eval_every`` export does not count). Running the same recipe again skips the finished stages
(refusing one whose settings changed) and resumes the first unfinished one exactly (see
:class:`~refrag_integrations.training.trainer.Trainer`); Ctrl-C saves the running stage's state.
Every input file is checked before any model loads.

YAML layout (keys are :class:`TrainConfig` fields, a stage name holds that stage's own settings)::

    output_dir: runs/my-decoder
    stages: [reconstruct, cpt, sft, policy]
    decoder: Qwen/Qwen2.5-0.5B-Instruct
    corpus: data/corpus.jsonl.gz
    qa: data/qa.jsonl.gz
    decoder_dtype: bfloat16
    cpt:
      max_steps: 3000
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RECIPE_STAGE_SETTINGS, RECIPE_STAGES, STAGES, TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
#: Fields the recipe sets itself for every stage.
MANAGED_FIELDS = ("stage", "output_dir", "init_checkpoint")
#: Settings that may change between runs of a recipe without making a finished stage stale.
RUNTIME_FIELDS = ("threads", "device", "save_every")


class RecipeError(ValueError):
    """A recipe that cannot run as given (its settings, an input file, a stale stage directory);
    raised before any model loads."""


def trainer_class(stage: str) -> type:
    """The trainer that runs ``stage`` (imported lazily: each pulls in torch and the models)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    if stage == "sft":
        from .sft import SFTTrainer

        return SFTTrainer
    if stage == "distill":
        from .distill import DistillTrainer

        return DistillTrainer
    if stage == "policy":
        from .policy_rl import PolicyTrainer

        return PolicyTrainer
    from .trainer import Trainer

    return Trainer


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes the recipe's files


@dataclass
class Recipe:
    """Which stages to run, where, and with which settings.

    Args:
        output_dir: the recipe's directory (one subdirectory per stage, ``final/``).
        stages: stage names in the order they run; policy, if present, must be last.
        settings: TrainConfig fields for every stage (decoder, encoder, corpus, qa, ...).
        stage_settings: stage name -> TrainConfig fields for that stage only.
        init_checkpoint: checkpoint the first stage starts from (default: the untrained base models).

    Example:
        >>> r = Recipe.from_dict({"output_dir": "runs/r", "stages": "reconstruct,sft", "lora_rank": 4,
        ...                       "sft.max_steps": 20})
        >>> [(c.stage, c.max_steps, c.lora_rank) for c in r.configs()]
        [('reconstruct', 1000, 4), ('sft', 20, 4)]
    """

    output_dir: str
    stages: tuple[str, ...] = RECIPE_STAGES
    settings: dict[str, Any] = field(default_factory=dict)
    stage_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            self.stages = tuple(s.strip() for s in self.stages.split(",") if s.strip())
        self.stages = tuple(self.stages)
        if not self.stages:
            raise RecipeError(f"a recipe needs at least one stage, e.g. stages={','.join(RECIPE_STAGES)}.")
        for s in self.stages:
            if s not in STAGES:
                raise RecipeError(f"unknown stage {s!r} in stages; choose from {STAGES}.")
        if len(set(self.stages)) != len(self.stages):
            raise RecipeError(f"stages lists a stage twice: {list(self.stages)}; run each stage once.")
        if "policy" in self.stages and self.stages[-1] != "policy":
            raise RecipeError(
                f"policy must be the last stage (it learns which chunks to expand for the final model), got "
                f"{list(self.stages)}."
            )
        if not self.output_dir:
            raise RecipeError("a recipe needs an output_dir (--output-dir DIR).")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for where, values in [("", self.settings)] + [(f"{s}.", v) for s, v in self.stage_settings.items()]:
            for key in values:
                if key in MANAGED_FIELDS:
                    raise RecipeError(
                        f"{where}{key} is set by the recipe for each stage; give output_dir (the recipe's directory), "
                        "stages, or init_checkpoint (the first stage's start) instead."
                    )
                if key not in known:
                    raise RecipeError(f"unknown training setting {where}{key!r}; known settings: {sorted(known)}.")
        for s in self.stage_settings:
            if s not in STAGES:
                raise RecipeError(f"settings given for unknown stage {s!r}; stages are {STAGES}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Build a recipe from the YAML layout (see the module docstring). A key ``STAGE.FIELD``
        (as from ``--set sft.max_steps=200``) is ``FIELD`` in ``STAGE``'s own settings."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping of settings, got {type(data).__name__}.")
        top: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        per_stage: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            key = str(key).replace("-", "_")
            stage, dot, name = key.partition(".")
            if key in ("output_dir", "stages", "init_checkpoint"):
                top[key] = value
            elif dot:
                if stage not in STAGES:
                    raise RecipeError(f"{key!r}: {stage!r} is not a stage; use STAGE.SETTING with a stage of {STAGES}.")
                per_stage.setdefault(stage, {})[name] = value
            elif key in STAGES:
                if not isinstance(value, dict):
                    raise RecipeError(f"{key!r} must be a mapping of that stage's settings, got {value!r}.")
                per_stage.setdefault(key, {}).update({str(k).replace("-", "_"): v for k, v in value.items()})
            else:
                settings[key] = value
        if top.get("output_dir") is None:
            raise RecipeError("a recipe needs an output_dir (--output-dir DIR or output_dir: in the YAML file).")
        return cls(
            output_dir=str(top["output_dir"]), stages=top.get("stages") or RECIPE_STAGES, settings=settings,
            stage_settings=per_stage, init_checkpoint=top.get("init_checkpoint"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "Recipe":
        """Read a YAML recipe; ``overrides`` (None values ignored) replace its keys."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; check --config.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path} must hold a mapping of settings, got {type(data).__name__}.")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage

    def configs(self) -> list[TrainConfig]:
        """Each stage's TrainConfig, chained (every config is validated before anything runs)."""
        out, init = [], self.init_checkpoint
        for stage in self.stages:
            values = {**RECIPE_STAGE_SETTINGS.get(stage, {}), **self.settings, **self.stage_settings.get(stage, {})}
            if stage == "policy" and "fsdp" not in self.stage_settings.get(stage, {}):
                values.pop("fsdp", None)
            values.update(stage=stage, output_dir=str(self.stage_dir(stage)), init_checkpoint=init)
            try:
                out.append(TrainConfig.from_dict(values))
            except (TypeError, ValueError) as err:
                raise RecipeError(f"stage {stage}: {err}") from err
            init = str(self.stage_dir(stage) / "checkpoint")
        return out


def stage_finished(cfg: TrainConfig) -> bool:
    """True if ``cfg``'s stage has run to ``max_steps`` and exported its final checkpoint."""
    import torch

    from ..checkpoint import CONFIG_FILE
    from ..checkpoint import METRICS_FILE as CHECKPOINT_METRICS
    from .trainer import CHECKPOINT_DIR, STATE_FILE

    out = Path(cfg.output_dir)
    export, state = out / CHECKPOINT_DIR, out / STATE_FILE
    if not (export / CONFIG_FILE).is_file() or not state.is_file() or not (export / CHECKPOINT_METRICS).is_file():
        return False
    step = int(torch.load(state, weights_only=False, map_location="cpu")["step"])
    metrics = json.loads((export / CHECKPOINT_METRICS).read_text())
    return step >= cfg.max_steps and int(metrics.get("steps", -1)) >= cfg.max_steps


def _changed_settings(cfg: TrainConfig) -> list[str]:
    """Settings of ``cfg`` that differ from those its finished stage ran with (train_config.json)."""
    path = Path(cfg.output_dir) / "train_config.json"
    if not path.is_file():
        return []
    saved, now = json.loads(path.read_text()), cfg.to_dict()
    return [f"{k}={saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RUNTIME_FIELDS and saved.get(k) != now[k]]


def check_inputs(configs: list[TrainConfig]) -> None:
    """Every input file of every stage exists, and the QA files hold enough examples for
    ``num_passages`` (gold + distractors) in training and evaluation; raises RecipeError otherwise."""
    from .data import QA_STAGES, missing_input, qa_examples

    for cfg in configs:
        problem = missing_input(cfg)
        if problem:
            raise RecipeError(f"stage {cfg.stage}: {problem}")
        if cfg.stage in QA_STAGES:
            for split in ("train", "eval"):
                try:
                    n = len(qa_examples(cfg, split))
                except ValueError as err:
                    raise RecipeError(f"stage {cfg.stage}: {err}") from err
                if n < cfg.num_passages:
                    raise RecipeError(
                        f"stage {cfg.stage}: the {split} QA examples number {n}, fewer than num_passages="
                        f"{cfg.num_passages} (gold + distractors come from them); add examples or lower num_passages."
                    )


def export_final(src: Path, dst: Path) -> Path:
    """Copy checkpoint directory ``src`` to ``dst`` atomically (replacing an older copy)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe's unfinished stages in order; export and summarise when all have finished.

    Returns:
        ``{"final": path, "stages": {stage: metrics}, "skipped": [...], "trained": [...]}``, or, when
        a signal stopped a stage, ``{"stopped": stage, "stopped_at": step, ...}`` (run again to resume).

    Example:
        >>> summary = run_recipe(Recipe.from_yaml("recipe.yaml"))  # doctest: +SKIP
        >>> engine = RefragEngine.from_pretrained(summary["final"])  # doctest: +SKIP
    """
    from ..checkpoint import METRICS_FILE as CHECKPOINT_METRICS
    from .trainer import CHECKPOINT_DIR

    configs = recipe.configs()
    check_inputs(configs)
    done = [stage_finished(cfg) for cfg in configs]
    first_open = done.index(False) if False in done else len(done)
    for cfg in configs[first_open + 1 :]:
        if Path(cfg.output_dir).exists():
            raise RecipeError(
                f"{cfg.output_dir} is left from an earlier run, but the stage before it is not finished, so it would "
                f"not start from that stage's new checkpoint; remove {cfg.output_dir} or use another --output-dir."
            )
    for cfg, finished in zip(configs, done):
        changed = _changed_settings(cfg) if finished else []
        if changed:
            raise RecipeError(
                f"stage {cfg.stage} in {cfg.output_dir} finished with other settings ({'; '.join(changed)}); "
                "use another --output-dir, or remove that stage's directory (and the later ones) to train it again."
            )
    out = Path(recipe.output_dir)
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"stages": list(recipe.stages), "configs": {c.stage: c.to_dict() for c in configs}}
        (out / RECIPE_FILE).write_text(json.dumps(resolved, indent=2))
    summary: dict[str, Any] = {"stages": {}, "skipped": [], "trained": []}
    for cfg, finished in zip(configs, done):
        if finished:
            logger.info("stage %s: finished earlier (%s), skipped", cfg.stage, cfg.output_dir)
            metrics = json.loads((Path(cfg.output_dir) / CHECKPOINT_DIR / CHECKPOINT_METRICS).read_text())
            summary["skipped"].append(cfg.stage)
        else:
            logger.info("stage %s: training in %s (from %s)", cfg.stage, cfg.output_dir, cfg.init_checkpoint or "base models")
            metrics = trainer_class(cfg.stage)(cfg).train(resume=True)
            if "stopped_at" in metrics:
                summary.update(stopped=cfg.stage, stopped_at=metrics["stopped_at"])
                return summary
            summary["trained"].append(cfg.stage)
        summary["stages"][cfg.stage] = {k: v for k, v in metrics.items() if k != "init_checkpoint_metrics"}
    summary["final"] = str(out / FINAL_DIR)
    if _is_main():
        export_final(Path(configs[-1].output_dir) / CHECKPOINT_DIR, out / FINAL_DIR)
        (out / METRICS_FILE).write_text(json.dumps(summary, indent=2))
        logger.info("recipe finished: %s", out / FINAL_DIR)
    return summary


__all__ = ["Recipe", "RecipeError", "check_inputs", "export_final", "run_recipe", "stage_finished", "trainer_class"]
