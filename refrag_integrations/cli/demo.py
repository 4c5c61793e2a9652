"""``refrag demo``: the main job. Index a small real corpus shipped in the package (NQ-open gold
passages, CC BY-SA 3.0), then ask a few of its questions twice, with ordinary RAG and with REFRAG,
and show answers, time to first token, positions saved and the chunks kept as tokens."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import DEFAULT_EXPAND_FRACTION, DEFAULT_TOP_K, DEMO_MAX_NEW_TOKENS, DEMO_QUESTIONS
from .validation import (
    check_checkpoint,
    check_expand_fraction,
    check_index_dir,
    check_max_new_tokens,
    check_policy,
    check_top_k,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_PASSAGES = DATA_DIR / "nq_demo_passages.jsonl"
DEMO_QUESTIONS_FILE = DATA_DIR / "nq_demo_questions.jsonl"

UNTRAINED_NOTE = (
    "NOTE: no trained REFRAG checkpoint is installed, so the chunk projector is UNTRAINED: compressed chunks "
    "carry no usable information yet. The REFRAG answers below show the speed of the compressed path, NOT "
    "REFRAG's answer quality. A trained checkpoint is picked up automatically once it exists (`refrag train`)."
)


def load_demo_questions() -> list[dict[str, Any]]:
    """The shipped demo questions: ``question``, ``answers``, ``nq_line``."""
    with open(DEMO_QUESTIONS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gold_passage_ids() -> dict[int, str]:
    """``nq_line -> passage id`` of each question's gold passage in the shipped corpus."""
    from ..chunking import passage_id

    out = {}
    with open(DEMO_PASSAGES, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[int(rec["nq_line"])] = passage_id(f"{rec['title']}\n{rec['text'].strip()}")
    return out


def answer_chunks(chunks: Any, passage: str, answers: list[str]) -> set[int]:
    """Indices of the chunks that overlap an occurrence of a gold answer in the passage."""
    low = passage.lower()
    hit: set[int] = set()
    for ans in answers:
        a = ans.lower().strip()
        start = low.find(a) if a else -1
        while start >= 0:
            end = start + len(a)
            hit.update(c.index for c in chunks if c.start < end and c.end > start)
            start = low.find(a, end)
    return hit


def _short(text: str, width: int = 90) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def demo(
    index_dir: Optional[Path] = typer.Option(
        None, "--index", help="Where to keep the demo index (default: <cache>/refrag-integrations/demo-index).",
        callback=check_index_dir,
    ),
    questions: int = typer.Option(DEMO_QUESTIONS, help="How many of the shipped questions to ask."),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", "-k", help="Passages retrieved per question.", callback=check_top_k),
    policy: str = typer.Option("auto", help="Expansion policy: auto (the checkpoint's, else relevance), relevance, random, none.", callback=check_policy),
    expand_fraction: float = typer.Option(DEFAULT_EXPAND_FRACTION, "--expand-fraction", help="p: fraction of chunks kept as tokens.", callback=check_expand_fraction),
    max_new_tokens: int = typer.Option(DEMO_MAX_NEW_TOKENS, help="Answer length limit.", callback=check_max_new_tokens),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint directory (default: the packaged one, if any; 'none': base models, untrained projector).", callback=check_checkpoint),
    rebuild: bool = typer.Option(False, "--rebuild", help="Delete the demo index first and index the corpus again."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object at the end."),
    threads: Optional[int] = typer.Option(
        None, help="torch CPU threads (default: torch's choice). On a CPU shared with other work, 1 avoids "
        "thread oversubscription, which can slow decoding many times over.",
    ),
) -> None:
    """Index the shipped demo corpus, then compare ordinary RAG and REFRAG on a few questions."""
    from ..config import demo_index_dir
    from ..evaluation.metrics import match
    from ..index import SentenceEmbedder, index_paths
    from ..store import ChunkStore
    from .ask import choose_policy, policy_name, source_label
    from .common import load_engine

    qs = load_demo_questions()
    if not 1 <= questions <= len(qs):
        raise typer.BadParameter(f"--questions must be between 1 and {len(qs)} (the shipped questions), got {questions}.")
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be at least 1, got {threads}.")
        import torch

        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    echo = typer.echo
    echo("REFRAG demo: ordinary RAG vs REFRAG on the same decoder, over a Chroma index of 300 Wikipedia passages")
    echo("(NQ-open gold passages, CC BY-SA 3.0; see refrag_integrations/data/README.md).\n")

    engine = load_engine(checkpoint)  # demo prints its own UNTRAINED_NOTE
    cfg = engine.config
    echo(f"decoder {cfg.decoder}, encoder {cfg.encoder}, k = {engine.k}, "
         f"projector {'TRAINED' if engine.trained else 'UNTRAINED'}")
    if not engine.trained:
        echo(UNTRAINED_NOTE)
    echo("")

    where = Path(index_dir) if index_dir is not None else demo_index_dir()
    if rebuild and where.exists():
        shutil.rmtree(where)
    store = ChunkStore.for_engine(engine, where)
    embedder = SentenceEmbedder()
    report = index_paths([DEMO_PASSAGES], store, engine, embedder, progress=True)
    if report.problems:
        raise typer.BadParameter("The shipped demo corpus could not be read: " + "; ".join(w for w, _ in report.problems))
    state = "reused" if report.added == 0 else "built"
    echo(f"index {state}: {where}  ({report.passages} passages, {report.added} added, {report.present} already "
         f"indexed, {report.chunks} chunk vectors written, {report.seconds:.1f} s)")
    store.attach(engine)

    chosen = choose_policy(engine, policy)
    gold = gold_passage_ids()
    echo(f"REFRAG setting: policy {policy_name(chosen)}, p = {expand_fraction} of chunks kept as tokens; "
         f"top-{top_k} passages; chunk vectors read from the index (precomputed)\n")

    # One untimed request per path first: the first forward pass pays one-off allocation costs.
    warm = [h.text for h in store.search(qs[0]["question"], top_k, embedder=embedder)]
    engine.generate(qs[0]["question"], warm, policy="all", max_new_tokens=1)
    engine.generate(qs[0]["question"], warm, policy=chosen, expand_fraction=expand_fraction, max_new_tokens=1)

    results = []
    for n, q in enumerate(qs[:questions], 1):
        hits = store.search(q["question"], top_k, embedder=embedder)
        texts = [h.text for h in hits]
        rank = next((i + 1 for i, h in enumerate(hits) if h.id == gold.get(int(q["nq_line"]))), None)
        rag = engine.generate(q["question"], texts, policy="all", max_new_tokens=max_new_tokens)
        ref = engine.generate(q["question"], texts, policy=chosen, expand_fraction=expand_fraction,
                              max_new_tokens=max_new_tokens)
        rs, fs = rag.stats, ref.stats
        with_answer = [answer_chunks(engine.chunk(t), t, q["answers"]) for t in texts]
        n_answer = sum(len(s) for s in with_answer)
        n_answer_kept = sum(len(s & set(e)) for s, e in zip(with_answer, fs.expanded))
        speedup = rs.ttft_s / max(fs.ttft_s, 1e-9)
        echo(f"Q{n}. {q['question']}?   gold: {' | '.join(q['answers'])}")
        echo(f"    retrieved {len(hits)} passages, {rs.context_tokens} context tokens; the question's own passage is "
             + (f"rank {rank} ({_short(source_label(hits[rank - 1].metadata), 40)})" if rank else "not in the top-k"))
        echo(f"    RAG     TTFT {rs.ttft_s * 1000:7.0f} ms  {rs.positions:5d} positions  "
             f"answer: {_short(rag.text, 70)!r}{'  [contains gold]' if match(rag.text, q['answers']) else ''}")
        tag = "  [untrained projector: not REFRAG quality]" if not engine.trained else (
            "  [contains gold]" if match(ref.text, q["answers"]) else "")
        echo(f"    REFRAG  TTFT {fs.ttft_s * 1000:7.0f} ms  {fs.positions:5d} positions  answer: {_short(ref.text, 70)!r}{tag}")
        kept = "  ".join(f"P{j + 1}:{','.join(map(str, e))}" for j, e in enumerate(fs.expanded) if e) or "none"
        echo(f"    speed-up {speedup:.1f}x TTFT; {fs.positions_saved} of {fs.prompt_tokens} positions saved "
             f"({fs.compression_rate:.1f}x fewer); chunk vectors {fs.cached_chunks}/{fs.chunks} precomputed")
        echo(f"    expanded {fs.chunks_expanded}/{fs.chunks} chunks (passage:chunk indices) {kept}")
        if n_answer:
            echo(f"    chunks holding a gold answer: {n_answer}, of them expanded: {n_answer_kept}")
        echo("")
        results.append({
            "question": q["question"], "answers": q["answers"], "gold_rank": rank,
            "rag": {"answer": rag.text, **rs.to_dict()}, "refrag": {"answer": ref.text, **fs.to_dict()},
            "ttft_speedup": round(speedup, 3), "answer_chunks": n_answer, "answer_chunks_expanded": n_answer_kept,
        })

    rag_ttft = statistics.median(r["rag"]["ttft_s"] for r in results)
    ref_ttft = statistics.median(r["refrag"]["ttft_s"] for r in results)
    rag_pos = statistics.mean(r["rag"]["positions"] for r in results)
    ref_pos = statistics.mean(r["refrag"]["positions"] for r in results)
    rag_match = sum(match(r["rag"]["answer"], r["answers"]) for r in results)
    echo(f"median TTFT: RAG {rag_ttft * 1000:.0f} ms, REFRAG {ref_ttft * 1000:.0f} ms "
         f"({rag_ttft / max(ref_ttft, 1e-9):.1f}x faster); mean decoder positions {rag_pos:.0f} -> {ref_pos:.0f}")
    if engine.trained:
        ref_match = sum(match(r["refrag"]["answer"], r["answers"]) for r in results)
        echo(f"answers containing a gold answer: RAG {rag_match:.0f}/{len(results)}, REFRAG {ref_match:.0f}/{len(results)}")
    else:
        echo(f"answers containing a gold answer: RAG {rag_match:.0f}/{len(results)}; REFRAG not scored (untrained projector)")
        echo("The speed-up is real (fewer decoder positions); the REFRAG answers are not meaningful until the projector is trained.")
    echo(f"TTFT is one run per question on this machine (noisy where other work shares the CPU). "
         f"Demo took {time.perf_counter() - t_start:.0f} s; run it again to reuse the index.")
    if as_json:
        echo(json.dumps({"index": str(where), "index_state": state, "index_report": report.to_dict(),
                         "trained": engine.trained, "policy": policy_name(chosen), "expand_fraction": expand_fraction,
                         "top_k": top_k, "results": results}))
