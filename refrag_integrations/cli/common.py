"""Helpers shared by CLI commands: reading passage files, building engines, printing stats."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from .validation import check_passage_sizes

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine


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


def load_engine(checkpoint: Optional[str], **kwargs: Any) -> "RefragEngine":
    """``RefragEngine.from_pretrained(checkpoint, **kwargs)`` for a command that reports an untrained
    projector itself (:func:`untrained_note`), so the library's warning is not printed twice."""
    from ..engine import RefragEngine, UntrainedProjectorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedProjectorWarning)
        return RefragEngine.from_pretrained(checkpoint, **kwargs)


def untrained_note(engine: "RefragEngine", policy: str) -> Optional[str]:
    """The line a command prints when the engine's projector is untrained (None when trained)."""
    if engine.trained:
        return None
    head = (f"warning: no trained REFRAG checkpoint for decoder {engine.config.decoder!r}: the chunk projector is "
            "UNTRAINED, so")
    train = "Train one with `refrag train recipe` (docs/train-your-own.md)."
    if policy == "all":
        return (f"{head} this answer is ordinary RAG (every chunk kept as tokens). Compress anyway with --policy "
                f"relevance or --expand-fraction P. {train}")
    return f"{head} compressed chunks carry no usable information: this answer is NOT REFRAG quality. {train}"


PASSAGES_HINT = "'--passages'"


def read_passage_texts(path: Path) -> list[str]:
    """Read passages from a file: ``.jsonl`` (one object per line with ``text`` and optional
    ``title``), ``.pdf`` (split as `refrag index` splits it), or plain text (passages separated
    by blank lines). Passages too long to tokenise at once are refused, counted in characters."""
    if not path.is_file():
        raise typer.BadParameter(f"passages file {path} does not exist.", param_hint=PASSAGES_HINT)
    passages: list[str] = []
    if path.suffix.lower() == ".pdf":
        from ..config import MAX_CONTEXT_CHARS
        from ..readers import BadInputError, read_passages

        total = 0
        try:
            for record in read_passages(path):  # stop reading once there is more text than ask may use
                passages.append(record.text)
                total += len(record.text)
                if total > MAX_CONTEXT_CHARS:
                    break
        except BadInputError as err:
            raise typer.BadParameter(str(err), param_hint=PASSAGES_HINT) from None
        if not passages:
            raise typer.BadParameter(f"{path} holds no passages (no extractable text).", param_hint=PASSAGES_HINT)
        return check_passage_sizes(passages, path, param_hint=PASSAGES_HINT)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise typer.BadParameter(f"{path} is not UTF-8 text ({err}).", param_hint=PASSAGES_HINT) from err
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise typer.BadParameter(f"{path}:{n} is not valid JSON ({err}).", param_hint=PASSAGES_HINT) from err
            body = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(body, str) or not body.strip():
                raise typer.BadParameter(f"{path}:{n} has no non-empty 'text' field.", param_hint=PASSAGES_HINT)
            title = obj.get("title")
            passages.append(f"{title}\n{body.strip()}" if title else body.strip())
    else:
        passages = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not passages:
        raise typer.BadParameter(f"{path} holds no passages.", param_hint=PASSAGES_HINT)
    return check_passage_sizes(passages, path, param_hint=PASSAGES_HINT)


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
