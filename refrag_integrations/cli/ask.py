"""``refrag ask``: answer a question with REFRAG (or ordinary RAG for comparison), from passages
retrieved from a Chroma index built by ``refrag index`` or from a passages file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..config import (
    CHROMA_SERVER_TIMEOUT_S,
    DEFAULT_COLLECTION,
    DEFAULT_EXPAND_FRACTION,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_K,
)
from .common import BACKEND_HELP, BASE_URL_HELP, DECODER_DTYPE_HELP, check_decoder_dtype
from .validation import (
    check_checkpoint,
    check_expand_fraction,
    check_index_dir,
    check_max_new_tokens,
    check_passages_file,
    check_policy,
    check_question,
    check_server_timeout,
    check_store_choice,
    check_top_k,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine
    from ..policy import ExpansionPolicy


def choose_policy(engine: "RefragEngine", name: str, opt_in: bool = True) -> "str | ExpansionPolicy":
    """``"auto"``: the checkpoint's learned policy when it has one, else ``"relevance"``; for an
    untrained projector ``"all"`` (ordinary RAG) unless ``opt_in`` (e.g. an explicit --expand-fraction)."""
    from ..policy import ExpandAll, ExpandNone

    if name != "auto":
        return name
    if not engine.trained and not opt_in:
        return "all"
    return engine.policy if not isinstance(engine.policy, (ExpandAll, ExpandNone)) else "relevance"


def policy_name(policy: Any) -> str:
    return policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)


def source_label(meta: dict[str, Any]) -> str:
    """``title · file #position`` for a stored passage's metadata."""
    parts = []
    if meta.get("title"):
        parts.append(str(meta["title"]))
    if meta.get("source"):
        parts.append(f"{Path(str(meta['source'])).name} #{meta.get('position', 0)}")
    return " · ".join(parts) or "?"


def ask(
    question: str = typer.Argument(..., help="The question to answer.", callback=check_question),
    passages: Optional[Path] = typer.Option(
        None, "--passages", "-p", help="Passages file (.jsonl with text/title, .pdf, or text separated by blank lines) "
        "instead of retrieving from an index.", callback=check_passages_file,
    ),
    index_dir: Optional[Path] = typer.Option(
        None, "--index", help="Index built by `refrag index` (default: <cache>/refrag-integrations/index).",
        callback=check_index_dir,
    ),
    host: Optional[str] = typer.Option(None, help="Chroma server host, instead of --index."),
    port: int = typer.Option(8000, help="Chroma server port."),
    server_timeout: float = typer.Option(
        CHROMA_SERVER_TIMEOUT_S, help="Seconds each call to a Chroma server (--host) may take.",
        callback=check_server_timeout,
    ),
    collection: str = typer.Option(DEFAULT_COLLECTION, help="Prefix of the Chroma collections."),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", "-k", help="Passages to retrieve from the index.",
                              callback=check_top_k),
    embedder: Optional[str] = typer.Option(None, help="Retrieval embedder (default: the one the index was built with)."),
    reencode: bool = typer.Option(
        False, "--reencode", help="If the index's chunk vectors were made by another encoder/checkpoint, encode them "
        "at query time and store the new ones, instead of stopping with an error.",
    ),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint directory (default: the packaged one, if any; 'none': base models, untrained projector).", callback=check_checkpoint),
    mode: str = typer.Option("refrag", help="'refrag' (compressed) or 'rag' (ordinary full-context RAG, same engine)."),
    policy: str = typer.Option(
        "auto", help="Expansion policy: auto (the checkpoint's, else relevance; with an untrained projector: all, "
        "unless --expand-fraction is given), relevance, random, none, all.", callback=check_policy,
    ),
    expand_fraction: Optional[float] = typer.Option(
        None, "--expand-fraction", help=f"p: fraction of chunks kept as tokens (default {DEFAULT_EXPAND_FRACTION}).",
        callback=check_expand_fraction,
    ),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, help="Generation limit.", callback=check_max_new_tokens),
    bf16: bool = typer.Option(False, help="Run the decoder under bfloat16 autocast."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help=DECODER_DTYPE_HELP, callback=check_decoder_dtype),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    backend: str = typer.Option("transformers", "--backend", help=BACKEND_HELP),
    base_url: Optional[str] = typer.Option(None, "--base-url", help=BASE_URL_HELP),
) -> None:
    """Answer QUESTION from passages retrieved from an index (or given with --passages)."""
    from .common import check_backend, connect_backend, load_engine, read_passage_texts, stats_line, untrained_note

    if mode not in ("refrag", "rag"):
        raise typer.BadParameter(f"--mode must be 'refrag' or 'rag', got {mode!r}.")
    check_store_choice(index_dir, host)
    import torch

    from ..store import EmbedderMismatchError, FingerprintMismatchError

    decoder_backend = check_backend(backend, base_url)
    texts = read_passage_texts(passages) if passages is not None else None
    engine = load_engine(checkpoint, autocast_dtype=torch.bfloat16 if bf16 else None, decoder_dtype=decoder_dtype)
    connect_backend(engine, decoder_backend)
    retrieve_s = 0.0
    if texts is not None:
        sources = [{"rank": i + 1, "source": str(passages), "text": t} for i, t in enumerate(texts)]
    else:
        from ..config import DEFAULT_EMBEDDER
        from ..index import SentenceEmbedder
        from .index import open_store

        store = open_store(engine, index_dir, host, port, collection, must_exist=True,
                           on_mismatch="encode" if reencode else "error",
                           timeout=server_timeout)
        if store.count_passages() == 0:
            raise typer.BadParameter(f"The index at {store.location} holds no passages; build it with `refrag index`.")
        emb = SentenceEmbedder(embedder or store.embedder_name() or DEFAULT_EMBEDDER)
        try:
            store.attach(engine, write_back=reencode)
            t0 = time.perf_counter()
            hits = store.search(question, top_k, embedder=emb)
            retrieve_s = time.perf_counter() - t0
        except (FingerprintMismatchError, EmbedderMismatchError) as err:
            raise typer.BadParameter(str(err)) from err
        texts = [h.text for h in hits]
        sources = [{"rank": i + 1, "id": h.id, "score": round(h.score, 4), "source": source_label(h.metadata),
                    "text": h.text} for i, h in enumerate(hits)]
    expand = "all" if mode == "rag" else choose_policy(engine, policy, opt_in=expand_fraction is not None)
    if expand in ("all", "none"):
        expand_fraction = None  # not selective: a budget would be refused, not silently ignored
    elif expand_fraction is None:
        expand_fraction = DEFAULT_EXPAND_FRACTION
    note = untrained_note(engine, policy_name(expand)) if mode == "refrag" else None
    try:
        result = engine.generate(question, texts, policy=expand, expand_fraction=expand_fraction,
                                 max_new_tokens=max_new_tokens)
    except FingerprintMismatchError as err:
        raise typer.BadParameter(str(err)) from err
    stats = result.stats.to_dict()
    if as_json:
        if note:
            typer.echo(note, err=True)
        typer.echo(json.dumps({"question": question, "answer": result.text, "mode": mode, "policy": policy_name(expand),
                               "expand_fraction": expand_fraction, "retrieve_s": round(retrieve_s, 4),
                               "sources": sources, "stats": stats}))
        return
    typer.echo(result.text)
    typer.echo("")
    typer.echo("sources:")
    for s in sources:
        score = f"{s['score']:.3f}  " if "score" in s else ""
        label = s["source"] if "id" in s else f"{Path(s['source']).name} #{s['rank'] - 1}"
        snippet = " ".join(s["text"].split())[:70]
        typer.echo(f"  [{s['rank']}] {score}{label}  \"{snippet}...\"")
    typer.echo("")
    typer.echo(f"[{mode}] " + stats_line(stats))
    if mode == "refrag" and stats["chunks_compressed"]:
        typer.echo(f"chunk vectors: {stats['cached_chunks']} precomputed, "
                   f"{stats['chunks'] - stats['cached_chunks']} encoded at query time ({stats['encode_s'] * 1000:.0f} ms)")
    if note:
        typer.echo(note)
