"""``refrag train STAGE``: run one stage of the REFRAG training recipe (resumable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def train(
    stage: str = typer.Argument(..., help="reconstruct, cpt, mixed, sft, distill or policy."),
    config: Optional[Path] = typer.Option(None, help="YAML file with TrainConfig fields."),
    output_dir: Optional[str] = typer.Option(None, help="Run directory (resume state + checkpoint/)."),
    init_checkpoint: Optional[str] = typer.Option(None, help="Checkpoint of the previous stage."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    data_dir: Optional[str] = typer.Option(
        None, help="Training data directory (default ../shared/data, relative to the working directory)."
    ),
    set_: List[str] = typer.Option([], "--set", help="Any other TrainConfig field, KEY=VALUE (repeatable)."),
    resume: bool = typer.Option(True, help="Continue from output_dir's saved state if present."),
) -> None:
    """Train one stage; Ctrl-C saves the state, and the same command resumes exactly."""
    import logging

    from ..training.config import STAGES, TrainConfig

    if stage not in STAGES:
        raise typer.BadParameter(f"stage must be one of {STAGES}, got {stage!r}.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        "stage": stage, "output_dir": output_dir, "init_checkpoint": init_checkpoint, "max_steps": max_steps,
        "batch_size": batch_size, "lr": lr, "data_dir": data_dir, **_parse_sets(set_),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = TrainConfig.from_yaml(config, **overrides) if config else TrainConfig.from_dict(overrides)
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    from ..training.data import missing_input

    problem = missing_input(cfg)  # before any model loads: the default data_dir is relative to the working directory
    if problem:
        typer.echo(f"Error: {problem}", err=True)
        raise typer.Exit(2)
    if stage == "sft":
        from ..training.sft import SFTTrainer as runner_cls
    elif stage == "distill":
        from ..training.distill import DistillTrainer as runner_cls
    elif stage == "policy":
        from ..training.policy_rl import PolicyTrainer as runner_cls
    else:
        from ..training.trainer import Trainer as runner_cls
    import os

    try:
        runner = runner_cls(cfg)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    metrics = runner.train(resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, print once
        typer.echo(json.dumps(metrics, indent=2))
