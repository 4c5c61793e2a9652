"""How the ``refrag`` command reports errors: one line on stderr, no traceback.

A bad command-line value (a usage error, e.g. :class:`typer.BadParameter` from
:mod:`refrag_integrations.cli.validation`) prints ``Error: <message> (refrag CMD --help)`` and exits
with status 2. A library error about the input (``ValueError``, ``TypeError``, ``OSError``: a
model that cannot be found, a checkpoint that does not fit, a prompt longer than the context
window, ...) prints ``Error: <message>`` and exits with status 1. ``--debug`` anywhere on the
command line shows typer's usual output and the full traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import typer
from typer.core import TyperGroup

DEBUG_FLAG = "--debug"
INPUT_ERRORS = (ValueError, TypeError, OSError)


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (taken anywhere before a ``--`` separator), and whether it was there.

    Example:
        >>> split_debug(["ask", "--debug", "Who?", "--", "--debug"])
        (['ask', 'Who?', '--', '--debug'], True)
    """
    args, debug, rest = [], False, list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--":
            args += [token, *rest]
            break
        if token == DEBUG_FLAG:
            debug = True
        else:
            args.append(token)
    return args, debug


def one_line(err: typer.TyperException) -> str:
    """A usage error as one line: the message and where to find the command's help."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"Error: {message}{hint}"


class RefragGroup(TyperGroup):
    """The root command group: typer's, with one-line errors (see the module docstring)."""

    def main(  # type: ignore[override]
        self,
        args: Optional[Sequence[str]] = None,
        prog_name: Optional[str] = None,
        complete_var: Optional[str] = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv, debug = split_debug(sys.argv[1:] if args is None else args)
        if debug or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except typer.TyperException as err:  # typer's usage errors (BadParameter, NoSuchOption, ...)
            if type(err).__name__ == "NoArgsIsHelpError":  # `refrag train` alone: typer's help, as before
                return super().main(argv, prog_name, complete_var, True, **extra)
            typer.echo(one_line(err), err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        except INPUT_ERRORS as err:
            message = str(err).strip() or type(err).__name__
            typer.echo(f"Error: {message} (run with {DEBUG_FLAG} for the traceback)", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


__all__ = ["RefragGroup", "one_line", "split_debug"]
