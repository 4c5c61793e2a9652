"""``refrag ask``: answer a question from passages with REFRAG (or ordinary RAG for comparison)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_EXPAND_FRACTION, DEFAULT_MAX_NEW_TOKENS


def ask(
    question: str = typer.Argument(..., help="The question to answer."),
    passages: Path = typer.Option(..., "--passages", "-p", help="Passages: .jsonl (text, title) or text separated by blank lines."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint directory (default: the packaged one, if any)."),
    mode: str = typer.Option("refrag", help="'refrag' (compressed) or 'rag' (ordinary full-context RAG, same engine)."),
    policy: str = typer.Option("relevance", help="Expansion policy: relevance, random, none, all."),
    expand_fraction: float = typer.Option(DEFAULT_EXPAND_FRACTION, "--expand-fraction", help="p: fraction of chunks kept as tokens."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, help="Generation limit."),
    bf16: bool = typer.Option(False, help="Run the decoder under bfloat16 autocast."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Answer QUESTION from the passages in --passages."""
    from .common import read_passages, stats_line

    if mode not in ("refrag", "rag"):
        raise typer.BadParameter(f"--mode must be 'refrag' or 'rag', got {mode!r}.")
    texts = read_passages(passages)
    import torch

    from ..engine import RefragEngine

    engine = RefragEngine.from_pretrained(checkpoint, autocast_dtype=torch.bfloat16 if bf16 else None)
    expand = "all" if mode == "rag" else policy
    result = engine.generate(question, texts, expand=expand, budget=expand_fraction, max_new_tokens=max_new_tokens)
    stats = result.stats.to_dict()
    if as_json:
        typer.echo(json.dumps({"question": question, "answer": result.text, "mode": mode, "policy": expand,
                               "expand_fraction": expand_fraction, "stats": stats}))
        return
    typer.echo(result.text)
    typer.echo("")
    typer.echo(f"[{mode}] " + stats_line(stats))
    if mode == "refrag" and not engine.trained:
        typer.echo("note: this projector is untrained; compressed chunks carry no usable information yet.")
