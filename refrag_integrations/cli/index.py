"""``refrag index``: files -> passages -> Chroma, with precomputed REFRAG chunk vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from ..config import (
    CHROMA_SERVER_TIMEOUT_S,
    DEFAULT_COLLECTION,
    DEFAULT_EMBEDDER,
    DEFAULT_INDEX_BATCH_SIZE,
    INDEX_LOCK_TIMEOUT_S,
    PASSAGE_MAX_WORDS,
    PASSAGE_MIN_WORDS,
)
from .validation import check_checkpoint, check_index_dir, check_server_timeout, check_store_choice

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine
    from ..store import ChunkStore


def open_store(
    engine: "RefragEngine | None",
    index_dir: Path | None,
    host: str | None,
    port: int,
    collection: str,
    *,
    must_exist: bool = False,
    **kwargs: Any,
) -> "ChunkStore":
    """Open the embedded index at ``index_dir`` (default dir if None) or the server at ``host``,
    bound to ``engine``'s chunk-vector fingerprint when an engine is given."""
    from ..config import default_index_dir
    from ..store import ChunkStore, CorruptIndexError

    if host is not None and index_dir is not None:
        raise typer.BadParameter("Give either --index DIR (embedded Chroma) or --host (a Chroma server), not both.")
    where: dict[str, Any] = {"host": host, "port": port} if host is not None else {"path": index_dir or default_index_dir()}
    if must_exist and host is None and not Path(where["path"]).is_dir():
        raise typer.BadParameter(
            f"No index at {where['path']}. Build one with `refrag index PATH... --index {where['path']}`, "
            "or give --passages FILE."
        )
    try:
        if engine is None:
            return ChunkStore(collection=collection, **where, **kwargs)
        return ChunkStore.for_engine(engine, collection=collection, **where, **kwargs)
    except (ConnectionError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    except CorruptIndexError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None


def check_embedder_name(value: str) -> str:
    """``--embedder``: a local directory, the offline default, or a hub id that is cached (or, when
    downloads are allowed, one that may be downloaded); checked before any model loads."""
    import os

    from huggingface_hub import try_to_load_from_cache

    from ..models import resolve_encoder_path

    path = resolve_encoder_path(value)
    if Path(path).is_dir():
        return value
    try:
        cached = try_to_load_from_cache(path, "config.json")
    except ValueError as err:  # huggingface_hub's HFValidationError: not a valid hub id either
        raise typer.BadParameter(
            f"{value!r} is neither a local directory nor a valid hub id ({err}). Use the offline default "
            f"{DEFAULT_EMBEDDER!r} or a local sentence-transformers directory."
        ) from None
    if not isinstance(cached, str) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise typer.BadParameter(
            f"{value!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it. Use the offline default {DEFAULT_EMBEDDER!r}, a local sentence-transformers "
            "directory, or a cached hub id."
        )
    return value


def index(
    paths: Optional[List[Path]] = typer.Argument(
        None, help="Files or directories (.txt, .md, .jsonl, .jsonl.gz, .pdf). With none, the chunk vectors of "
        "the passages already in the index are computed for the current encoder/checkpoint.",
    ),
    index_dir: Optional[Path] = typer.Option(
        None, "--index", help="Embedded Chroma directory (default: <cache>/refrag-integrations/index).",
        callback=check_index_dir,
    ),
    host: Optional[str] = typer.Option(None, help="Chroma server host, instead of --index."),
    port: int = typer.Option(8000, help="Chroma server port."),
    collection: str = typer.Option(DEFAULT_COLLECTION, help="Prefix of the Chroma collections."),
    checkpoint: Optional[str] = typer.Option(
        None, help="REFRAG checkpoint whose encoder makes the chunk vectors.", callback=check_checkpoint
    ),
    embedder: str = typer.Option(
        DEFAULT_EMBEDDER, callback=lambda v: check_embedder_name(v), help="Retrieval embedder (sentence-transformers)."
    ),
    chunk_vectors: bool = typer.Option(True, "--chunk-vectors/--no-chunk-vectors", help="Precompute REFRAG chunk vectors."),
    batch_size: int = typer.Option(DEFAULT_INDEX_BATCH_SIZE, min=1, help="Passages per batch."),
    min_words: int = typer.Option(
        PASSAGE_MIN_WORDS, min=1, help="A passage ends at a paragraph boundary past this many words."
    ),
    max_words: int = typer.Option(PASSAGE_MAX_WORDS, min=1, help="Passages never grow past this many words."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show a progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    verify: bool = typer.Option(
        False, "--verify", help="Then check every stored passage and repair the chunk and retrieval vectors that are "
        "missing or cannot be read back.",
    ),
    lock_timeout: float = typer.Option(
        INDEX_LOCK_TIMEOUT_S, min=0, help="Seconds to wait while another process writes the same embedded index."
    ),
    server_timeout: float = typer.Option(
        CHROMA_SERVER_TIMEOUT_S, help="Seconds each call to a Chroma server (--host) may take.",
        callback=check_server_timeout,
    ),
) -> None:
    """Index PATHS into a Chroma index: passages, retrieval vectors and REFRAG chunk vectors.

    Idempotent and resumable: run it again after an interruption (or on the same files) and it
    adds exactly what is missing. One process writes an embedded index at a time: a second one
    waits up to --lock-timeout seconds.
    """
    from ..engine import RefragEngine
    from ..embedder import SentenceEmbedder
    from ..index import index_paths, refresh_chunk_vectors, verify_index
    from ..index_lock import IndexLockedError, StaleIndexError
    from ..store import ChromaTimeoutError, CorruptIndexError

    check_store_choice(index_dir, host)
    if not paths and not chunk_vectors and not verify:
        raise typer.BadParameter("Nothing to do: give PATHS, or let the chunk vectors be computed.")
    if min_words > max_words:
        raise typer.BadParameter(
            f"--min-words ({min_words}) must not exceed --max-words ({max_words}).", param_hint="'--min-words'"
        )
    engine = RefragEngine.from_pretrained(checkpoint) if chunk_vectors else None
    try:
        store = open_store(engine, index_dir, host, port, collection, must_exist=not paths, writer=True,
                           lock_timeout=lock_timeout, timeout=server_timeout)
    except (IndexLockedError, StaleIndexError, ChromaTimeoutError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1)
    reports = []
    try:
        emb = None
        if paths or verify:
            try:
                emb = SentenceEmbedder(embedder)
                store.check_embedder(emb)
            except ValueError as err:  # ModelNotFoundError, EmbedderMismatchError
                raise typer.BadParameter(str(err), param_hint="'--embedder'") from err
        if paths:
            reports.append(index_paths(paths, store, engine, emb, batch_size=batch_size, min_words=min_words,
                                       max_words=max_words, progress=progress))
        elif not verify:
            reports.append(refresh_chunk_vectors(store, engine, batch_size=batch_size, progress=progress))
        if verify:
            reports.append(verify_index(store, engine, emb, batch_size=batch_size, progress=progress))
    except KeyboardInterrupt:
        typer.echo("interrupted: everything written so far is kept; run the same command again to resume.", err=True)
        raise typer.Exit(130)
    except (ChromaTimeoutError, StaleIndexError) as err:
        typer.echo(f"Error: {err} Everything written so far is kept; run the same command again to resume.", err=True)
        raise typer.Exit(1)
    except CorruptIndexError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1)
    report = reports[0]
    if as_json:
        out = {**report.to_dict(), "index": store.location, "fingerprint": store.fingerprint,
               "total_passages": store.count_passages()}
        if verify:
            out["verify"] = reports[-1].to_dict()
        typer.echo(json.dumps(out))
    else:
        for r in reports:
            typer.echo(r.summary() if r is not reports[-1] or not verify else _verify_summary(r))
        typer.echo(f"index: {store.location} ({store.count_passages()} passages; chunk-vector fingerprint "
                   f"{store.fingerprint or 'none'})")
    if paths and report.files == 0:
        raise typer.Exit(1)


def _verify_summary(report: Any) -> str:
    return (f"verified {report.passages} stored passage(s): {report.added} lacked chunk vectors, {report.repaired} "
            f"had vectors that could not be read back; {report.chunks} chunk vectors written, in {report.seconds:.1f} s")
