"""How much of a chunk can one decoder-input vector carry for this decoder? An oracle probe.

REFRAG replaces each k-token chunk by one vector in the decoder's input space. Whether trained
chunk vectors fail to carry a passage's entities because the *encoder* is under-trained, or
because the frozen decoder cannot read entities from such vectors at all, is a question about the
decoder, and it can be answered without training any encoder:

1. For each evaluation example, one free vector per chunk of its gold passage is fitted by
   gradient descent (Adam; decoder frozen, no encoder, no projector) to the REFRAG reconstruction
   task: the decoder reads ``[start] + vectors`` and must reproduce the passage's tokens
   (teacher-forced cross-entropy). No question or answer is seen while fitting.
2. The fitted vectors go exactly where the engine puts compressed chunks in the QA prompt
   (:meth:`RefragEngine.build_prompt`; the rest of the prompt as tokens), and the gold answer's
   mean NLL (incl. the end-of-turn token) and the greedy answer's Match are measured next to
   closed book, full context (every chunk as tokens) and the engine's own chunk vectors (p = 0).

The fitted vectors bound from above what any encoder + projector can give this decoder through
reconstruction alone: if they reconstruct the passage yet the answer stays at closed book, the
decoder (not the encoder) is the bottleneck, and the decoder itself must learn to read vectors
(LoRA / fine-tuning). Finished examples are appended to ``examples.jsonl``; a rerun continues.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .metrics import bootstrap_ci, match
from .runs import command_line, machine_info, now_iso, resume_log, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..chunking import Chunk
    from ..engine import RefragEngine
    from .data import QAExample

EXAMPLES_FILE = "examples.jsonl"
SIGNATURE_FILE = "run.json"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
SETTINGS = ("closed_book", "full", "encoder_p0", "fitted_p0")


@dataclass
class FittedVectors:
    """Free chunk vectors fitted to reconstruct a passage (:func:`fit_chunk_vectors`).

    Attributes:
        vectors: ``(L, d)`` float32 decoder-input vectors, one per chunk.
        token_acc: teacher-forced next-token accuracy of the reconstruction after fitting.
        nll: mean reconstruction NLL per passage token after fitting.
        nll_start: the same before fitting (from the initial vectors).
    """

    vectors: "torch.Tensor"
    token_acc: float
    nll: float
    nll_start: float


def start_ids(engine: "RefragEngine") -> list[int]:
    """The ``[start]`` prefix: the tokenizer's BOS prefix, else its BOS or EOS token."""
    ids = engine.special_prefix()
    if ids:
        return ids
    tok = engine.tokenizer
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if first is None:
        raise ValueError("the tokenizer has neither BOS nor EOS; the probe needs a start token.")
    return [first]


def initial_vectors(engine: "RefragEngine", passage: str, init: str) -> "torch.Tensor":
    """Starting point of the fit: ``"encoder"`` (the engine's projected chunk vectors) or
    ``"mean"`` (each chunk's mean token embedding). Returns ``(L, d)`` float32."""
    import torch

    embed = engine.decoder.get_input_embeddings()
    if init == "encoder":
        with torch.no_grad():
            return engine.chunk_encoder.project(engine.chunk_vectors([passage]).vectors[0]).float().cpu()
    if init == "mean":
        with torch.no_grad():
            return torch.stack([embed(torch.tensor(c.token_ids, device=engine.device)).float().mean(0).cpu()
                                for c in engine.chunk(passage)])
    raise ValueError(f"init must be 'encoder' or 'mean', got {init!r}.")


def fit_chunk_vectors(
    engine: "RefragEngine", chunks: Sequence["Chunk"], init: "torch.Tensor", *, steps: int, lr: float
) -> FittedVectors:
    """Fit one free vector per chunk so that the frozen decoder, reading ``[start] + vectors``,
    reproduces the chunks' tokens (teacher-forced cross-entropy, Adam).

    Args:
        engine: the engine (its decoder is used frozen, under :meth:`RefragEngine.autocast`).
        chunks: the passage's chunks.
        init: ``(L, d)`` starting vectors.
        steps: Adam steps.
        lr: Adam learning rate.
    """
    import torch
    import torch.nn.functional as F

    if steps < 1 or not lr > 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}.")
    if init.shape[0] != len(chunks):
        raise ValueError(f"init has {init.shape[0]} vectors for {len(chunks)} chunks.")
    dec = engine.decoder
    embed = dec.get_input_embeddings()
    dev = engine.device
    target = torch.tensor([t for c in chunks for t in c.token_ids], device=dev)  # (T,)
    with torch.no_grad():
        start = embed(torch.tensor(start_ids(engine), device=dev)).float()  # (S, d)
        tokens = embed(target[:-1]).float()  # (T-1, d)
    vec = torch.nn.Parameter(init.detach().clone().float().to(dev))
    opt = torch.optim.Adam([vec], lr=lr)
    requires = [p.requires_grad for p in dec.parameters()]
    for p in dec.parameters():
        p.requires_grad_(False)
    T = target.shape[0]

    def loss_and_acc() -> tuple[torch.Tensor, float]:
        x = torch.cat([start, vec, tokens], 0)[None]  # (1, S + L + T - 1, d)
        with engine.autocast():
            logits = engine.decoder_forward(inputs_embeds=x, use_cache=False, logits_to_keep=T).logits[0].float()
        return F.cross_entropy(logits, target), float((logits.argmax(-1) == target).float().mean())

    try:
        nll_start = None
        for _ in range(steps):
            loss, _acc = loss_and_acc()
            if nll_start is None:
                nll_start = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss, acc = loss_and_acc()
    finally:
        for p, r in zip(dec.parameters(), requires):
            p.requires_grad_(r)
    return FittedVectors(vectors=vec.detach().cpu(), token_acc=acc, nll=float(loss), nll_start=float(nll_start))


def reconstruction_baseline(engine: "RefragEngine", chunks: Sequence["Chunk"]) -> tuple[float, float]:
    """The reconstruction score with no vectors at all (``[start]`` + the passage tokens,
    teacher-forced): what the decoder predicts of the passage from its own earlier tokens. The
    fitted vectors carry the passage only as far as they beat it. Returns ``(nll, token_acc)``."""
    import torch
    import torch.nn.functional as F

    target = torch.tensor([t for c in chunks for t in c.token_ids], device=engine.device)
    ids = torch.cat([torch.tensor(start_ids(engine), device=engine.device), target[:-1]])[None]
    with torch.no_grad(), engine.autocast():
        logits = engine.decoder_forward(input_ids=ids, use_cache=False, logits_to_keep=target.shape[0]).logits[0].float()
    return float(F.cross_entropy(logits, target)), float((logits.argmax(-1) == target).float().mean())


def qa_input(engine: "RefragEngine", question: str, passage: str, vectors: "torch.Tensor") -> "torch.Tensor":
    """The engine's QA prompt for one passage with ``vectors`` (``(L, d)``, decoder input space)
    at the passage's chunk positions and everything else as tokens. Returns ``(P, d)``.

    The prompt is the engine's own (:meth:`RefragEngine.prepare_rag` with every chunk
    compressed); only its chunk rows are replaced, so chat template, tokenisation and layout are
    exactly those of generation.
    """
    import torch

    chunks = engine.chunk(passage)
    if vectors.shape[0] != len(chunks):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(chunks)} chunks.")
    compressed, (a, b) = compressed_prompt(engine, question, passage)
    return torch.cat([compressed[:a], vectors.to(compressed.device, compressed.dtype), compressed[b:]], 0)


def compressed_prompt(engine: "RefragEngine", question: str, passage: str) -> tuple["torch.Tensor", tuple[int, int]]:
    """The engine's QA prompt for one passage with every chunk compressed (``(P, d)``, as
    :meth:`RefragEngine.prepare_rag` builds it) and the rows ``[a, b)`` of its chunks.

    Raises:
        RuntimeError: the chunk rows could not be located (the prompt layout is not the engine's).
    """
    import torch

    chunks = engine.chunk(passage)
    with torch.no_grad():
        compressed = engine.prepare_rag(question, [passage], "none").embeds  # pre + L + post rows
        tokens = engine.prepare_rag(question, [passage], "all").embeds  # pre + passage tokens + post rows
    n = min(compressed.shape[0], tokens.shape[0])
    differs = (compressed[:n] != tokens[:n]).any(-1).nonzero()
    pre = int(differs[0]) if len(differs) else n  # the first chunk row
    post = compressed.shape[0] - pre - len(chunks)
    if post < 0 or tokens.shape[0] - pre - sum(len(c.token_ids) for c in chunks) != post:
        raise RuntimeError("could not locate the passage's chunk rows in the engine's prompt.")
    return compressed, (pre, pre + len(chunks))


def answer_ids(engine: "RefragEngine", answer: str) -> list[int]:
    """The scored target: the answer's tokens and the tokenizer's EOS (as the training stages)."""
    eos = engine.tokenizer.eos_token_id
    return engine.tokenize(answer.strip()) + ([eos] if eos is not None else [])


def probe_example(
    engine: "RefragEngine", ex: "QAExample", *, steps: int, lr: float, init: str, max_new_tokens: int
) -> dict[str, Any]:
    """Fit, then score and answer one example in every setting of :data:`SETTINGS`."""
    import torch

    from ..engine import GenerationStats, PreparedInput

    chunks = engine.chunk(ex.passage)
    fit = fit_chunk_vectors(engine, chunks, initial_vectors(engine, ex.passage, init), steps=steps, lr=lr)
    with torch.no_grad():
        prefixes = {
            "closed_book": engine.prepare_rag(ex.question, [], "all").embeds,
            "full": engine.prepare_rag(ex.question, [ex.passage], "all").embeds,
            "encoder_p0": engine.prepare_rag(ex.question, [ex.passage], "none").embeds,
            "fitted_p0": qa_input(engine, ex.question, ex.passage, fit.vectors),
        }
        with engine.autocast():
            nll = engine.score(list(prefixes.values()), answer_ids(engine, ex.answers[0]))
    record: dict[str, Any] = {
        "key": str(ex.line), "line": ex.line, "question": ex.question, "answers": list(ex.answers),
        "chunks": len(chunks), "passage_tokens": sum(len(c.token_ids) for c in chunks),
        "recon_acc": fit.token_acc, "recon_nll": fit.nll, "recon_nll_start": fit.nll_start,
    }
    record["recon_nll_none"], record["recon_acc_none"] = reconstruction_baseline(engine, chunks)
    answers = engine.generate_prepared(
        [PreparedInput(embeds=x, token_ids=[], stats=GenerationStats()) for x in prefixes.values()],
        max_new_tokens=max_new_tokens)
    for name, value, res in zip(prefixes, nll.tolist(), answers):
        record[f"nll_{name}"] = value
        record[f"answer_{name}"] = res.text
        record[f"match_{name}"] = float(match(res.text, ex.answers))
    return record


def run_capacity(
    engine: "RefragEngine",
    examples: Sequence["QAExample"],
    out_dir: str | Path,
    *,
    steps: int = 150,
    lr: float = 0.05,
    init: str = "mean",
    max_new_tokens: int = 24,
    signature: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the probe on ``examples`` (gold passage only); resumable per example.

    Returns the summary (also ``summary.json`` / ``summary.md`` in ``out_dir``): per setting the
    mean answer NLL and Match with 95% bootstrap CIs, the fitted vectors' reconstruction accuracy
    and NLL, and the share of the closed-book -> full NLL gap each setting closes.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    run = {"decoder": engine.config.decoder, "k": engine.k, "projector_trained": bool(engine.trained),
           "steps": steps, "lr": lr, "init": init, "max_new_tokens": max_new_tokens, **(signature or {})}
    log = resume_log(out / SIGNATURE_FILE, run, out / EXAMPLES_FILE, overwrite=overwrite)
    todo = [ex for ex in examples if str(ex.line) not in log]
    for ex in tqdm(todo, desc="refrag eval capacity", unit="question", disable=not progress):
        log.append(probe_example(engine, ex, steps=steps, lr=lr, init=init, max_new_tokens=max_new_tokens))
    lines = {ex.line for ex in examples}
    records = [r for r in log.values() if r["line"] in lines]
    doc = summarize_capacity(records)
    doc.update({"run": run, "machine": machine_info(engine.device), "command": command_line(),
                "finished_at": now_iso()})
    write_json(out / SUMMARY_FILE, doc)
    (out / TABLE_FILE).write_text(capacity_markdown(doc), encoding="utf-8")
    return doc


def setting_rows(records: Sequence[dict[str, Any]], settings: Sequence[str]) -> list[dict[str, Any]]:
    """Per setting: mean answer NLL (``nll_<setting>``) and Match (``match_<setting>``) with 95%
    bootstrap CIs, and the share of the closed-book -> full gap closed, ``(closed - x) / (closed -
    full)`` of the mean NLLs (``settings`` must include ``closed_book`` and ``full``)."""
    mean = {s: statistics.fmean(r[f"nll_{s}"] for r in records) for s in settings}
    gap = mean["closed_book"] - mean["full"]
    rows = []
    for s in settings:
        m = bootstrap_ci([r[f"match_{s}"] for r in records])
        n = bootstrap_ci([r[f"nll_{s}"] for r in records])
        rows.append({"setting": s, "answer_nll": mean[s], "answer_nll_ci": [n.low, n.high], "match": m.mean,
                     "match_ci": [m.low, m.high], "gap_closed": (mean["closed_book"] - mean[s]) / gap if gap else None})
    return rows


def summarize_capacity(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means and 95% bootstrap CIs per setting, and the gap closed: ``(closed - x) / (closed - full)``
    of the mean answer NLLs."""
    if not records:
        return {"examples": 0, "rows": []}
    return {
        "examples": len(records),
        "recon_acc": statistics.fmean(r["recon_acc"] for r in records),
        "recon_nll": statistics.fmean(r["recon_nll"] for r in records),
        "recon_nll_start": statistics.fmean(r["recon_nll_start"] for r in records),
        "recon_nll_none": _mean_of(records, "recon_nll_none"),
        "recon_acc_none": _mean_of(records, "recon_acc_none"),
        "rows": setting_rows(records, SETTINGS),
    }


def _mean_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the records that have it (older runs lack the no-vector baseline)."""
    values = [r[key] for r in records if key in r]
    return statistics.fmean(values) if values else None


def capacity_markdown(doc: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    if not doc.get("rows"):
        return "No examples yet.\n"
    run = doc.get("run", {})
    head = (f"{doc['examples']} questions, gold passage only; fitted vectors: {run.get('steps')} Adam steps, "
            f"lr {run.get('lr')}, init {run.get('init')}; reconstruction token acc "
            f"{doc['recon_acc']:.3f}, NLL {doc['recon_nll_start']:.3f} -> {doc['recon_nll']:.3f}"
            + ("" if doc.get("recon_nll_none") is None else
               f" (no vectors: token acc {doc['recon_acc_none']:.3f}, NLL {doc['recon_nll_none']:.3f})")
            + "\n\n")
    lines = ["| setting | answer NLL [95% CI] | gap closed | Match [95% CI] |", "|---|---|---:|---|"]
    for r in doc["rows"]:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        lines.append(f"| {r['setting']} | {r['answer_nll']:.3f} [{r['answer_nll_ci'][0]:.3f}, {r['answer_nll_ci'][1]:.3f}] "
                     f"| {gap} | {r['match']:.3f} [{r['match_ci'][0]:.3f}, {r['match_ci'][1]:.3f}] |")
    return head + "\n".join(lines) + "\n"
