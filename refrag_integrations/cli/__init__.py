"""The ``refrag`` command line: a typer app that only registers commands (one module each)."""

from __future__ import annotations

import typer

from . import ask, train
from . import bench as bench_cmd
from . import bench_encoders as bench_encoders_cmd
from . import eval as eval_cmd
from . import demo as demo_cmd
from . import download_defaults as download_defaults_cmd
from . import export as export_cmd
from . import serve as serve_cmd
from . import index as index_cmd
from .errors import RefragGroup

app = typer.Typer(
    name="refrag",
    help="REFRAG compressed RAG decoding: index, ask, demo, bench, eval, train, export, serve, download-defaults.",
    no_args_is_help=True,
    add_completion=False,
    cls=RefragGroup,  # one-line errors, exit 2 for bad values; --debug shows tracebacks
)
app.command("ask")(ask.ask)
app.command("index")(index_cmd.index)
app.command("demo")(demo_cmd.demo)
app.add_typer(train.app, name="train")
bench_cmd.app.command("encoders")(bench_encoders_cmd.encoders)
app.add_typer(bench_cmd.app, name="bench")
app.add_typer(eval_cmd.app, name="eval")
app.command("download-defaults")(download_defaults_cmd.download_defaults)
app.add_typer(export_cmd.app, name="export")
app.command("serve")(serve_cmd.serve)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks instead of one-line errors (also accepted after the command)."
    ),
) -> None:
    """REFRAG compressed RAG decoding: index, ask, demo, bench, eval, train, export, serve, download-defaults."""


def main() -> None:
    """Entry point of the ``refrag`` script."""
    app()


__all__ = ["app", "main"]
