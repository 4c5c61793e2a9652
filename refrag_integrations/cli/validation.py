"""Checks of command-line values that run while the command line is parsed, before any model loads.

Each ``check_*`` function is a typer callback (or is called first thing in a command body): it
returns the value, or raises :class:`typer.BadParameter` naming the value and the fix, which the
CLI prints as one line and exit status 2 (see :mod:`refrag_integrations.cli.errors`). Nothing here
loads a model.

Example:
    >>> check_expand_fraction(0.25)
    0.25
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import MAX_CONTEXT_CHARS, MAX_TOP_K

CHECKPOINT_FILE = "refrag_config.json"  # checkpoint.CONFIG_FILE, without importing torch to check it
# A passages file this large holds more characters than MAX_CONTEXT_CHARS whatever its encoding
# (UTF-8 takes at most 4 bytes a character), so it is refused without being read.
MAX_PASSAGES_FILE_BYTES = 4 * MAX_CONTEXT_CHARS


def check_expand_fraction(value: Optional[float]) -> Optional[float]:
    """``--expand-fraction``: a finite number in [0, 1] (or not given)."""
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise typer.BadParameter(
            f"the expand fraction p must be a number from 0 to 1 (the fraction of chunks kept as tokens), got {value}."
        )
    return value


def check_max_new_tokens(value: int) -> int:
    """``--max-new-tokens``: at least one token."""
    if value < 1:
        raise typer.BadParameter(f"must be at least 1 (tokens to generate), got {value}.")
    return value


def check_top_k(value: int) -> int:
    """``--top-k``: between 1 and :data:`~refrag_integrations.config.MAX_TOP_K` passages."""
    if not 1 <= value <= MAX_TOP_K:
        raise typer.BadParameter(
            f"must be between 1 and {MAX_TOP_K} passages, got {value}; more passages than that cannot fit a "
            "decoder's context window, even compressed."
        )
    return value


def check_server_timeout(value: float) -> float:
    """``--server-timeout``: a positive, finite number of seconds for each call to a Chroma server."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive number of seconds, got {value}.")
    return value


def check_policy(value: str) -> str:
    """``--policy``: ``auto`` (the checkpoint's learned policy, else the command's default) or the
    name of a built-in expansion policy."""
    from ..policy import POLICY_NAMES

    names = ("auto", *POLICY_NAMES)
    if value not in names:
        raise typer.BadParameter(f"unknown expansion policy {value!r}; choose one of {', '.join(names)}.")
    return value


def check_question(value: str) -> str:
    """The QUESTION argument: some text."""
    if not value.strip():
        raise typer.BadParameter("the question is empty; give the question to answer, e.g. refrag ask \"Who ...?\".")
    return value


def check_checkpoint(value: Optional[str]) -> Optional[str]:
    """``--checkpoint``: not given, ``none``, ``default``, or a checkpoint directory."""
    if value is None or value in ("none", "default"):
        return value
    path = Path(value)
    if not path.is_dir():
        raise typer.BadParameter(
            f"{value} is not a directory; give a REFRAG checkpoint directory (written by `refrag train`), "
            "'default' (the packaged one) or 'none' (base models, untrained projector)."
        )
    if not (path / CHECKPOINT_FILE).is_file():
        raise typer.BadParameter(f"{value} is not a REFRAG checkpoint: it has no {CHECKPOINT_FILE}.")
    return value


def check_index_dir(value: Optional[Path]) -> Optional[Path]:
    """``--index``: a directory, or a path where one can be made (never an existing file)."""
    if value is not None and value.exists() and not value.is_dir():
        raise typer.BadParameter(f"{value} is a file; --index takes the directory of a Chroma index.")
    return value


def check_passages_file(value: Optional[Path]) -> Optional[Path]:
    """``--passages``: an existing file, small enough to read (its passages are checked when read)."""
    if value is None:
        return value
    if value.is_dir():
        raise typer.BadParameter(
            f"{value} is a directory; --passages takes one file (.jsonl, .pdf, or text with passages separated by "
            f"blank lines). To use a directory, index it (`refrag index {value}`) and ask with --index."
        )
    if not value.is_file():
        raise typer.BadParameter(f"passages file {value} does not exist.")
    size = value.stat().st_size
    if size > MAX_PASSAGES_FILE_BYTES:
        raise typer.BadParameter(
            f"{value} has {size:,} bytes, more than `refrag ask` reads ({MAX_CONTEXT_CHARS:,} characters of "
            f"passages); index it (`refrag index {value}`) and ask with --index, which retrieves the relevant passages."
        )
    return value


def check_store_choice(index_dir: Optional[Path], host: Optional[str]) -> None:
    """``--index`` and ``--host`` exclude each other."""
    if index_dir is not None and host is not None:
        raise typer.BadParameter("give either --index DIR (embedded Chroma) or --host (a Chroma server), not both.")


def check_yaml_file(value: Optional[Path]) -> Optional[Path]:
    """``--config``: an existing YAML file holding a mapping of settings."""
    if value is None:
        return value
    import yaml

    if not value.is_file():
        raise typer.BadParameter(f"config file {value} does not exist.")
    try:
        data: Any = yaml.safe_load(value.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise typer.BadParameter(f"{value} is not UTF-8 text ({err}).") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise typer.BadParameter(f"{value} is not valid YAML{where}: {problem}.") from None
    if data is not None and not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of settings (KEY: VALUE lines), got {type(data).__name__}.")
    return value


def check_passage_sizes(passages: list[str], source: Path, param_hint: Optional[str] = None) -> list[str]:
    """Refuse a passage (or passages) too long to tokenise at once, counted in characters first.

    Raises:
        typer.BadParameter: a passage longer than :data:`~refrag_integrations.config.MAX_PASSAGE_CHARS`,
            or more than :data:`~refrag_integrations.config.MAX_CONTEXT_CHARS` in all.
    """
    from ..config import MAX_PASSAGE_CHARS

    for n, text in enumerate(passages, 1):
        if len(text) > MAX_PASSAGE_CHARS:
            raise typer.BadParameter(
                f"passage {n} of {source} has {len(text):,} characters, more than one passage may hold "
                f"({MAX_PASSAGE_CHARS:,}); separate its paragraphs with blank lines, or index the file "
                f"(`refrag index {source}` splits it) and ask with --index.", param_hint=param_hint
            )
    total = sum(len(t) for t in passages)
    if total > MAX_CONTEXT_CHARS:
        raise typer.BadParameter(
            f"{source} holds {total:,} characters of passages, more than one question may read "
            f"({MAX_CONTEXT_CHARS:,}); index it (`refrag index {source}`) and ask with --index.", param_hint=param_hint
        )
    return passages
