"""``refrag train STAGE`` (one stage of the REFRAG training recipe) and ``refrag train recipe``
(the stages chained); both resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ..training.config import RECIPE_STAGES, STAGES
from .validation import check_yaml_file

app = typer.Typer(
    help="Train REFRAG: one stage (reconstruct, cpt, mixed, sft, distill, policy), or the whole recipe.",
    no_args_is_help=True,
    add_completion=False,
)


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _print_once(result: dict) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, print once
        typer.echo(json.dumps(result, indent=2))


def _stage_command(stage: str) -> Callable[..., None]:
    def command(
        config: Optional[Path] = typer.Option(None, help="YAML file with TrainConfig fields.", callback=check_yaml_file),
        output_dir: Optional[str] = typer.Option(None, help="Run directory (resume state + checkpoint/)."),
        init_checkpoint: Optional[str] = typer.Option(None, help="Checkpoint of the previous stage."),
        max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
        batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
        data_dir: Optional[str] = typer.Option(
            None, help="Training data directory (default ../shared/data, relative to the working directory)."
        ),
        set_: List[str] = typer.Option(
            [], "--set", help="Any other TrainConfig field, KEY=VALUE (repeatable), e.g. corpus=FILE, qa=FILE."
        ),
        resume: bool = typer.Option(True, help="Continue from output_dir's saved state if present."),
    ) -> None:
        import logging

        from ..training.config import TrainConfig
        from ..training.data import missing_input
        from ..training.recipe import trainer_class

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
        problem = missing_input(cfg)  # before any model loads: the default data_dir is relative to the working directory
        if problem:
            typer.echo(f"Error: {problem}", err=True)
            raise typer.Exit(2)
        try:
            runner = trainer_class(stage)(cfg)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        _print_once(runner.train(resume=resume))

    command.__doc__ = f"Train the {stage} stage; Ctrl-C saves the state, and the same command resumes exactly."
    return command


for _stage in STAGES:
    app.command(_stage)(_stage_command(_stage))


@app.command("recipe")
def recipe(
    output_dir: Optional[str] = typer.Option(None, help="The recipe's directory: one folder per stage, and final/."),
    decoder: Optional[str] = typer.Option(None, help="Decoder: hub id or local path (default: the packaged one)."),
    encoder: Optional[str] = typer.Option(None, help="Chunk encoder: hub id, local path, or decoder:N."),
    corpus: Optional[str] = typer.Option(
        None, "--corpus", "--data",
        help="Text corpus (reconstruct, cpt, mixed, distill): .jsonl(.gz) with a 'text' field, or .txt(.gz).",
    ),
    heldout: Optional[str] = typer.Option(None, help="Held-out text (default: the corpus's last 10%)."),
    qa: Optional[str] = typer.Option(
        None, help="QA examples (sft, distill, policy): .jsonl(.gz), {question, answers, ctxs} per line."
    ),
    qa_eval: Optional[str] = typer.Option(None, help="QA examples for evaluation (default: the qa file's last 10%)."),
    stages: Optional[str] = typer.Option(
        None, help=f"Comma-separated stages in order (default {','.join(RECIPE_STAGES)}; add mixed or distill)."
    ),
    init_checkpoint: Optional[str] = typer.Option(None, help="Checkpoint the first stage starts from."),
    data_dir: Optional[str] = typer.Option(None, help="Shared data directory, for the files not given above."),
    config: Optional[Path] = typer.Option(
        None, help="YAML recipe (see docs/train-your-own.md); flags override it.", callback=check_yaml_file
    ),
    set_: List[str] = typer.Option(
        [], "--set",
        help="A TrainConfig field for every stage, KEY=VALUE, or for one stage, STAGE.KEY=VALUE (repeatable).",
    ),
) -> None:
    """Run the training recipe: the stages chained, each resumable, the result in OUTPUT_DIR/final.

    Rerun the same command to continue: finished stages are skipped, the unfinished one resumes.
    The last stage's evaluation and each stage's metrics go to OUTPUT_DIR/metrics.json.
    """
    import logging

    from ..training.recipe import Recipe, RecipeError, run_recipe

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = {
        "output_dir": output_dir, "decoder": decoder, "encoder": encoder, "corpus": corpus, "heldout": heldout,
        "qa": qa, "qa_eval": qa_eval, "stages": stages, "init_checkpoint": init_checkpoint, "data_dir": data_dir,
    }
    overrides = {**{k: v for k, v in flags.items() if v is not None}, **_parse_sets(set_)}
    try:
        plan = Recipe.from_yaml(config, **overrides) if config else Recipe.from_dict(overrides)
        summary = run_recipe(plan)
    except RecipeError as err:  # raised before any model loads: one line, no traceback
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(2) from err
    _print_once(summary)
    if "stopped" in summary:
        typer.echo(f"Stopped in stage {summary['stopped']}; run the same command again to resume.", err=True)


__all__ = ["app", "recipe"]
