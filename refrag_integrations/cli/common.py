"""Helpers shared by CLI commands: reading passage files, building engines, printing stats."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import typer


DECODER_DTYPE_HELP = "Decoder weights: float32, bfloat16 or float16 (half the memory; GPUs)."


def check_decoder_dtype(value: str) -> str:
    """``--decoder-dtype``: a clear usage error for an unknown dtype, before any model loads."""
    from ..models import resolve_dtype

    try:
        resolve_dtype(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    return value


EXPAND_FRACTIONS_HELP = "Expand fractions p, comma-separated (0 = compress every chunk)."
DEPRECATED_P_HELP = "Deprecated name of --expand-fraction."


def renamed_option(value: Optional[str], old_value: Optional[str], new: str, old: str, default: Optional[str]) -> Optional[str]:
    """The value of option ``new``, also given under its deprecated name ``old`` (which warns)."""
    if old_value is None:
        return default if value is None else value
    if value is not None:
        raise typer.BadParameter(f"give {new} only; {old} is its deprecated name.")
    message = f"{old} is deprecated; use {new}."
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    typer.echo(f"warning: {message}", err=True)
    return old_value


def read_passage_texts(path: Path) -> list[str]:
    """Read passages from a file: ``.jsonl`` (one object per line with ``text`` and optional
    ``title``) or plain text (passages separated by blank lines)."""
    if not path.is_file():
        raise typer.BadParameter(f"passages file {path} does not exist.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise typer.BadParameter(f"{path} is not UTF-8 text ({err}).") from err
    passages: list[str] = []
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise typer.BadParameter(f"{path}:{n} is not valid JSON ({err}).") from err
            body = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(body, str) or not body.strip():
                raise typer.BadParameter(f"{path}:{n} has no non-empty 'text' field.")
            title = obj.get("title")
            passages.append(f"{title}\n{body.strip()}" if title else body.strip())
    else:
        passages = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not passages:
        raise typer.BadParameter(f"{path} holds no passages.")
    return passages


def stats_line(stats: dict[str, Any]) -> str:
    return (
        f"context tokens {stats['context_tokens']}, decoder positions {stats['positions']} "
        f"(of {stats['prompt_tokens']} prompt tokens, {stats['compression_rate']:.2f}x), "
        f"chunks expanded {stats['chunks_expanded']}/{stats['chunks']}, "
        f"TTFT {stats['ttft_s'] * 1000:.0f} ms, total {stats['total_s']:.2f} s"
    )


BACKEND_HELP = "Decoder backend: transformers (in-process) or vllm (a vLLM server at --base-url)."
BASE_URL_HELP = "The vLLM server's API root, e.g. http://localhost:8000/v1 (with --backend vllm)."


def check_backend(backend: str, base_url: Optional[str]) -> Any:
    """``--backend`` / ``--base-url`` as a decoder backend (None: in-process), checked before any
    model loads; a usage error names the bad value."""
    from ..backends import resolve_backend

    try:
        return resolve_backend(backend, base_url)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def connect_backend(engine: Any, backend: Any) -> None:
    """Make ``backend`` the engine's decoder and check the server now (reachable, serving this
    engine's decoder), so a run stops with the server's problem before any work is done."""
    from ..backends.vllm_server import VllmBackendError

    engine.backend = backend
    if backend is None:
        return
    try:
        backend.served_model(engine)
    except VllmBackendError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
