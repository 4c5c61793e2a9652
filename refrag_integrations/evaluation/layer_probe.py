"""Can the decoder read a chunk summarised from its own residual stream? A probe, no training.

Run 17 (`refrag eval capacity`) showed that vectors at the decoder's *input*, even fitted per
passage, give the frozen decoder's answer nothing. This probe asks the same question one level
deeper, where no encoder, projector or training is involved:

1. Each gold passage is run alone through the decoder (after its start token). For every layer
   L in ``layers``, each k-token chunk is summarised as the mean of its tokens' hidden states at
   the input of layer L (``hidden_states[L]``): one vector per chunk, in the decoder's own space.
2. The engine's p = 0 QA prompt (every chunk compressed, its own chunk vectors at the input) is
   scored with the chunk rows of the residual stream *replaced* by those summaries after layer
   L - 1, so layers L.. read them (layers below L see the engine's compressed vectors).
3. A *blank* twin replaces the same rows with one content-free vector per layer: the mean chunk
   summary over the first :data:`BLANK_PASSAGES` questions' passages. Content minus blank is
   what the summaries carry beyond filling the positions (as ``refrag eval qa --control blank``).

Measured per example: the gold answer's mean NLL (incl. end of turn) and the greedy answer's
Match with no context (closed book), full context (every chunk as tokens), the engine's own
vectors (p = 0), and each layer's summaries and blank (the replacement applies to the prompt's
forward; the answer's tokens are decoded from that KV cache as usual). If mid-layer summaries close part of the closed-book -> full gap that the
blank does not, a chunk representation the decoder can read exists without training: the
decoder's own first layers as the chunk encoder, injected at that layer (a design the engine's
input-embedding path and vLLM's ``prompt_embeds`` cannot carry yet). Resumable per example.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .capacity import answer_ids, compressed_prompt, setting_rows, start_ids
from .config import QA_MAX_NEW_TOKENS
from .metrics import bootstrap_ci, match
from .runs import command_line, machine_info, now_iso, resume_log, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..engine import RefragEngine
    from .data import QAExample

EXAMPLES_FILE = "examples.jsonl"
SIGNATURE_FILE = "run.json"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
BASE_SETTINGS = ("closed_book", "full", "encoder_p0")
BLANK_PASSAGES = 16  # the blank vector of a layer: mean chunk summary over these questions' passages
DEFAULT_LAYERS = (2, 4, 8, 12, 16, 20, 24)


def decoder_layers(engine: "RefragEngine") -> Sequence[Any]:
    """The decoder's transformer blocks, in order (``decoder.get_decoder().layers``).

    Raises:
        ValueError: the decoder does not expose its blocks that way.
    """
    base = engine.decoder.get_decoder() if hasattr(engine.decoder, "get_decoder") else None
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"decoder {engine.config.decoder!r} does not expose its blocks as get_decoder().layers; "
                         f"the layer probe supports Llama-style decoders.")
    return layers


def check_layers(engine: "RefragEngine", layers: Sequence[int]) -> list[int]:
    """Layers must be in [1, number of blocks - 1] (a summary read by at least one block)."""
    n = len(decoder_layers(engine))
    bad = [L for L in layers if not 1 <= L < n]
    if not layers or bad:
        raise ValueError(f"layers must be in 1..{n - 1} for this {n}-block decoder, got {list(layers)}.")
    return sorted(set(int(L) for L in layers))


def chunk_summaries(engine: "RefragEngine", passage: str, layers: Sequence[int]) -> dict[int, "torch.Tensor"]:
    """Per layer L, ``(chunks, d)`` float32: each chunk's mean hidden state at the input of layer
    L, the passage run alone through the decoder after its start token."""
    import torch

    chunks, start = engine.chunk(passage), start_ids(engine)
    ids = torch.tensor([start + [t for c in chunks for t in c.token_ids]], device=engine.device)
    with torch.no_grad(), engine.autocast():
        states = engine.decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    offset = len(start)
    out = {}
    for L in layers:
        h = states[L][0, offset:].float().cpu()
        rows, i = [], 0
        for c in chunks:
            rows.append(h[i : i + len(c.token_ids)].mean(0))
            i += len(c.token_ids)
        out[L] = torch.stack(rows)
    return out


@contextmanager
def residual_rows_replaced(
    engine: "RefragEngine", layer: int, rows: tuple[int, int], vectors: "torch.Tensor"
) -> Iterator[None]:
    """Within the block, every decoder forward whose sequence covers ``rows`` gets those rows of
    the residual stream replaced by ``vectors`` (``(b - a, d)``) at the input of block ``layer``
    (i.e. after block ``layer - 1``), for every batch row. Decode steps (shorter) pass untouched."""
    a, b = rows
    if vectors.shape[0] != b - a:
        raise ValueError(f"{vectors.shape[0]} vectors for rows {a}..{b}.")

    def hook(module: Any, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] < b:
            return output
        h = h.clone()
        h[:, a:b] = vectors.to(device=h.device, dtype=h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = decoder_layers(engine)[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def blank_vectors(engine: "RefragEngine", passages: Sequence[str], layers: Sequence[int]) -> dict[int, "torch.Tensor"]:
    """Per layer, the mean chunk summary over ``passages`` (``(d,)``): a content-free vector."""
    import torch

    per_layer: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for p in passages:
        for L, v in chunk_summaries(engine, p, layers).items():
            per_layer[L].append(v)
    return {L: torch.cat(v).mean(0) for L, v in per_layer.items()}


def probe_example(
    engine: "RefragEngine", ex: "QAExample", layers: Sequence[int], blank: dict[int, "torch.Tensor"],
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Score one example's gold answer and answer it greedily in the base settings and, per
    layer, with its chunk summaries and with the blank vector in the chunk rows."""
    import torch

    from ..engine import GenerationStats, PreparedInput

    target = answer_ids(engine, ex.answers[0])
    compressed, rows = compressed_prompt(engine, ex.question, ex.passage)

    def answer(embeds: "torch.Tensor") -> str:
        prepared = PreparedInput(embeds=embeds, token_ids=[], stats=GenerationStats())
        return engine.generate_prepared([prepared], max_new_tokens=max_new_tokens)[0].text

    with torch.no_grad():
        base = [engine.prepare_rag(ex.question, [], "all").embeds, engine.prepare_rag(ex.question, [ex.passage], "all").embeds,
                compressed]
        nll = engine.score(base, target).tolist()
    record: dict[str, Any] = {"key": str(ex.line), "line": ex.line, "question": ex.question, "answers": list(ex.answers),
                              "chunks": rows[1] - rows[0]}
    for name, value, embeds in zip(BASE_SETTINGS, nll, base):
        text = answer(embeds)
        record.update({f"nll_{name}": value, f"answer_{name}": text, f"match_{name}": match(text, ex.answers)})
    summaries = chunk_summaries(engine, ex.passage, layers)
    for L in layers:
        for name, vectors in (("content", summaries[L]), ("blank", blank[L].expand(rows[1] - rows[0], -1))):
            with torch.no_grad(), residual_rows_replaced(engine, L, rows, vectors):
                record[f"nll_L{L}_{name}"] = float(engine.score([compressed], target)[0])
                text = answer(compressed)
            record[f"answer_L{L}_{name}"], record[f"match_L{L}_{name}"] = text, match(text, ex.answers)
    return record


def run_layer_probe(
    engine: "RefragEngine",
    examples: Sequence["QAExample"],
    out_dir: str | Path,
    *,
    layers: Sequence[int] = DEFAULT_LAYERS,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    signature: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the probe on ``examples`` (gold passage only); resumable per example.

    Returns the summary (also ``summary.json`` / ``summary.md`` in ``out_dir``).

    Raises:
        ValueError: a layer out of range, or ``out_dir`` holds a run with other settings.
    """
    from tqdm.auto import tqdm

    layers = check_layers(engine, layers)
    if not examples:
        raise ValueError("no examples to probe.")
    out = Path(out_dir)
    run = {"decoder": engine.config.decoder, "k": engine.k, "layers": layers, "blank_passages": BLANK_PASSAGES,
           "max_new_tokens": max_new_tokens, **(signature or {})}
    log = resume_log(out / SIGNATURE_FILE, run, out / EXAMPLES_FILE, overwrite=overwrite)
    todo = [ex for ex in examples if str(ex.line) not in log]
    if todo:
        blank = blank_vectors(engine, [ex.passage for ex in examples[:BLANK_PASSAGES]], layers)
        for ex in tqdm(todo, desc="refrag eval layers", unit="question", disable=not progress):
            log.append(probe_example(engine, ex, layers, blank, max_new_tokens))
    lines = {ex.line for ex in examples}
    doc = summarize_layers([r for r in log.values() if r["line"] in lines], layers)
    doc.update({"run": run, "machine": machine_info(engine.device), "command": command_line(), "finished_at": now_iso()})
    write_json(out / SUMMARY_FILE, doc)
    (out / TABLE_FILE).write_text(layers_markdown(doc), encoding="utf-8")
    return doc


def summarize_layers(records: Sequence[dict[str, Any]], layers: Sequence[int]) -> dict[str, Any]:
    """Per setting: mean answer NLL with a 95% bootstrap CI and the share of the closed-book ->
    full gap it closes; per layer: content minus blank (blank NLL - content NLL, paired; > 0 means
    the summaries carry something the decoder uses)."""
    if not records:
        return {"examples": 0, "rows": [], "layers": []}
    settings = [*BASE_SETTINGS, *(f"L{L}_{n}" for L in layers for n in ("content", "blank"))]
    rows = setting_rows(records, settings)
    per_layer = []
    for L in layers:
        d = bootstrap_ci([r[f"nll_L{L}_blank"] - r[f"nll_L{L}_content"] for r in records])
        m = bootstrap_ci([r[f"match_L{L}_content"] - r[f"match_L{L}_blank"] for r in records])
        per_layer.append({"layer": L, "content_minus_blank": d.mean, "ci": [d.low, d.high],
                          "match_content_minus_blank": m.mean, "match_ci": [m.low, m.high]})
    return {"examples": len(records), "rows": rows, "layers": per_layer}


def layers_markdown(doc: dict[str, Any]) -> str:
    """The summary as two Markdown tables."""
    if not doc.get("rows"):
        return "No examples yet.\n"
    lines = [f"{doc['examples']} questions, gold passage only.", "",
             "| setting | answer NLL [95% CI] | gap closed | Match [95% CI] |", "|---|---|---:|---|"]
    for r in doc["rows"]:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:+.2f}"
        lines.append(f"| {r['setting']} | {r['answer_nll']:.3f} [{r['answer_nll_ci'][0]:.3f}, {r['answer_nll_ci'][1]:.3f}] "
                     f"| {gap} | {r['match']:.3f} [{r['match_ci'][0]:.3f}, {r['match_ci'][1]:.3f}] |")
    lines += ["", "| layer | content minus blank: answer NLL (blank - content) [95% CI] | Match (content - blank) [95% CI] |",
              "|---:|---|---|"]
    for r in doc["layers"]:
        lines.append(f"| {r['layer']} | {r['content_minus_blank']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] "
                     f"| {r['match_content_minus_blank']:+.3f} [{r['match_ci'][0]:+.3f}, {r['match_ci'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"
