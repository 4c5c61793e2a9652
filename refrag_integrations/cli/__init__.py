"""The ``refrag`` command line: a typer app that only registers commands (one module each)."""

from __future__ import annotations

import typer

from . import ask, train

app = typer.Typer(
    name="refrag",
    help="REFRAG compressed RAG decoding: index, ask, demo, bench, eval, train.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("ask")(ask.ask)
app.command("train")(train.train)


@app.callback()
def _root() -> None:
    """REFRAG compressed RAG decoding: index, ask, demo, bench, eval, train."""


def main() -> None:
    """Entry point of the ``refrag`` script."""
    app()


__all__ = ["app", "main"]
