"""What each chunk-encoder option costs (``refrag bench encoders``): at index time and at query time.

For every option (an encoder and what a chunk vector sees, ``ENCODER[@CONTEXT]``, e.g.
``all-minilm-l6-v2``, ``all-minilm-l6-v2@passage``, ``decoder:8``, ``decoder:8@passage``) it measures

* **index time**: computing and storing the chunk vectors of ``index_passages`` real passages in
  one batch, as ``refrag index`` does: chunking on decoder tokens and the encoder forward
  (:meth:`ChunkEncoder.encode_passages`; stored vectors are taken before the projector, which runs
  at query time in every mode), then the write into a fresh embedded Chroma collection
  (:meth:`ChunkStore.write_chunk_vectors`). Reported per passage and per chunk; median of
  ``repeats`` timed batches after one untimed warm-up batch.
* **query time** at N = 1, 5, 10 passages (the first NQ eval question's gold passage and N - 1
  distractors, as ``refrag eval qa`` builds them), p = 0 (every chunk compressed): TTFT *cached*
  (chunk vectors precomputed, as after indexing) and *not cached* (the engine's vector cache
  emptied before every request, so the chunk vectors are computed at query time), next to
  full-context RAG on the same decoder. The measurement is :func:`~.bench.measure`'s (same
  definitions as ``refrag bench``). Cached TTFT should not depend on the encoder: the decoder reads
  one position per chunk whatever made the vector; the table shows each option's cached TTFT
  against the first option's.

Each option is built from configuration by an ``engine_factory`` (the CLI: the packaged checkpoint
where it fits the option, else base models with an untrained projector). Latency does not depend on
the projector's or the encoder's weights, so an untrained option times correctly; the output says
which options were trained. Every option's engine is loaded, measured and released in turn.
"""

from __future__ import annotations

import gc
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..config import CHUNK_CONTEXTS
from .bench import cache_dtype, measure, timed_request, weights_signature
from .config import (
    ENCODER_BENCH_INDEX_PASSAGES,
    ENCODER_BENCH_OPTIONS,
    ENCODER_BENCH_OUTPUT_TOKENS,
    ENCODER_BENCH_PASSAGE_COUNTS,
    ENCODER_BENCH_REPEATS,
    QA_SEED,
)
from .metrics import median
from .report import command_block, load_range, machine_lines
from .runs import check_signature, command_line, load_average, machine_info, now_iso, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine

RESULTS_FILE = "encoders.json"
TABLE_FILE = "encoders.md"
SIGNATURE_FILE = "run.json"
SECTION_TITLE = "## Chunk-encoder cost (`refrag bench encoders`)"
UNTRAINED_NOTE = (
    "Options marked 'untrained' have an untrained projector (and base encoder weights): their chunk vectors "
    "carry no usable information, but latency does not depend on the weights, so their timings are valid."
)


@dataclass(frozen=True)
class EncoderOption:
    """One chunk-encoder option: the encoder (a name ``load_encoder`` accepts, or ``decoder:N``) and
    what a chunk vector sees (``chunk_context``: ``"chunk"`` or ``"passage"``).

    Example:
        >>> EncoderOption.parse("decoder:8@passage")
        EncoderOption(encoder='decoder:8', chunk_context='passage')
        >>> EncoderOption.parse("all-minilm-l6-v2").key
        'all-minilm-l6-v2@chunk'
    """

    encoder: str
    chunk_context: str = "chunk"

    def __post_init__(self) -> None:
        if not self.encoder or not isinstance(self.encoder, str):
            raise ValueError(f"an encoder option needs an encoder name, got {self.encoder!r}.")
        if self.chunk_context not in CHUNK_CONTEXTS:
            raise ValueError(f"chunk context must be one of {CHUNK_CONTEXTS}, got {self.chunk_context!r} "
                             f"(option {self.encoder}@{self.chunk_context}).")

    @property
    def key(self) -> str:
        return f"{self.encoder}@{self.chunk_context}"

    @classmethod
    def parse(cls, spec: str) -> "EncoderOption":
        """``ENCODER`` (each chunk alone) or ``ENCODER@CONTEXT``."""
        spec = spec.strip()
        encoder, sep, context = spec.rpartition("@")
        if not sep:
            return cls(spec)
        return cls(encoder.strip(), context.strip())


def parse_encoder_options(specs: Sequence[str]) -> tuple[EncoderOption, ...]:
    """Options from ``ENCODER[@CONTEXT]`` strings; a repeated option is refused."""
    options = tuple(EncoderOption.parse(s) for s in specs if s.strip())
    if not options:
        raise ValueError("no encoder options given.")
    keys = [o.key for o in options]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"encoder options given twice: {dup}.")
    return options


@dataclass
class EncoderBenchSettings:
    """What ``refrag bench encoders`` measures (see the module docstring).

    Example:
        >>> s = EncoderBenchSettings(passage_counts=(1,), repeats=1)
        >>> [key for key, _ in s.settings()][:3]
        ['rag|n=1', 'index|all-minilm-l6-v2@chunk', 'cached|all-minilm-l6-v2@chunk|n=1']
    """

    options: tuple[EncoderOption, ...] = field(
        default_factory=lambda: parse_encoder_options(ENCODER_BENCH_OPTIONS))
    passage_counts: tuple[int, ...] = ENCODER_BENCH_PASSAGE_COUNTS
    repeats: int = ENCODER_BENCH_REPEATS
    index_passages: int = ENCODER_BENCH_INDEX_PASSAGES
    output_tokens: int = ENCODER_BENCH_OUTPUT_TOKENS
    extra: dict[str, Any] = field(default_factory=dict)  # data source: part of the signature

    def __post_init__(self) -> None:
        self.options = parse_encoder_options([o.key for o in self.options])
        self.passage_counts = tuple(int(n) for n in self.passage_counts)
        if not self.passage_counts or min(self.passage_counts) < 1:
            raise ValueError(f"passage counts N must be >= 1, got {self.passage_counts}.")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}.")
        if self.index_passages < 1:
            raise ValueError(f"index passages must be >= 1, got {self.index_passages}.")
        if self.output_tokens < 2:
            raise ValueError(f"output_tokens must be >= 2, got {self.output_tokens}.")

    def settings(self) -> list[tuple[str, dict[str, Any]]]:
        """Every (key, setting) to measure: RAG once per N, then per option its index time and its
        cached and not-cached TTFT per N (options in the order given)."""
        out = [(f"rag|n={n}", {"mode": "rag", "option": None, "n": n}) for n in self.passage_counts]
        for opt in self.options:
            out.append((f"index|{opt.key}", {"mode": "index", "option": opt, "n": None}))
            for n in self.passage_counts:
                for mode in ("cached", "not_cached"):
                    out.append((f"{mode}|{opt.key}|n={n}", {"mode": mode, "option": opt, "n": n}))
        return out


# --------------------------------------------------------------------------- measurements


def encoder_parameters(engine: "RefragEngine") -> int:
    """Parameters of the chunk encoder's transformer (embeddings included; projector excluded)."""
    return sum(p.numel() for p in engine.chunk_encoder.encoder.parameters())


def measure_index(engine: "RefragEngine", passages: Sequence[str], repeats: int) -> dict[str, Any]:
    """Index-time cost of ``passages`` in one batch, as ``refrag index`` computes and stores them:
    chunking plus :meth:`ChunkEncoder.encode_passages` (``compute``), then
    :meth:`ChunkStore.write_chunk_vectors` into a fresh embedded Chroma collection (``store``).
    One untimed warm-up batch, then ``repeats`` timed ones (medians)."""
    import torch

    from ..chunking import chunk_passage, passage_id
    from ..store import ChunkStore

    if not passages:
        raise ValueError("index time needs at least one passage.")
    compute_runs, store_runs = [], []
    chunks_total = 0
    with tempfile.TemporaryDirectory(prefix="refrag-bench-encoders-") as tmp:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            chunks = [chunk_passage(t, engine.tokenizer, engine.k) for t in passages]
            with torch.no_grad():
                encoded = engine.chunk_encoder.encode_passages(chunks)  # [(L_i, d_enc)]
            vectors = {passage_id(t): v.float().cpu() for t, v in zip(passages, encoded)}  # .cpu() syncs
            t1 = time.perf_counter()
            # A fresh index whose chunk collection already exists (one untimed vector written
            # first), so the timed write is what each `refrag index` batch pays.
            store = ChunkStore.for_engine(engine, Path(tmp) / f"r{i}")
            try:
                store.write_chunk_vectors({"warm-up": next(v for v in encoded if len(v))[:1].float().cpu()})
                t2 = time.perf_counter()
                written = store.write_chunk_vectors(vectors)
                t3 = time.perf_counter()
            finally:
                store.close()
            chunks_total = sum(len(c) for c in chunks)
            if written != chunks_total:
                raise RuntimeError(f"the store wrote {written} chunk vectors, expected {chunks_total}.")
            if i:  # the first batch is the untimed warm-up
                compute_runs.append(t1 - t0)
                store_runs.append(t3 - t2)
    compute, store_s = median(compute_runs), median(store_runs)
    n = len(passages)
    return {
        "passages": n,
        "chunks": chunks_total,
        "compute_s": compute,
        "store_s": store_s,
        "compute_runs_s": compute_runs,
        "store_runs_s": store_runs,
        "compute_ms_per_passage": compute * 1000 / n,
        "compute_ms_per_chunk": compute * 1000 / chunks_total,
        "store_ms_per_passage": store_s * 1000 / n,
        "index_ms_per_passage": (compute + store_s) * 1000 / n,
    }


def option_info(engine: "RefragEngine") -> dict[str, Any]:
    """What describes an option's engine in the results: trained or not, sizes."""
    return {
        "projector_trained": bool(engine.trained),
        "encoder_params": encoder_parameters(engine),
        "encoder_dim": int(engine.chunk_encoder.encoder_dim),
        "reads_decoder_tokens": bool(engine.chunk_encoder.reads_decoder_tokens),
    }


def encoder_bench_passages(examples: Sequence[Any], counts: Sequence[int], index_passages: int,
                           seed: int = QA_SEED) -> tuple[str, dict[int, list[str]], list[str]]:
    """The question, its passages per N and the passages timed at index time, from QA examples
    (NQ eval split): the first question's gold passage plus N - 1 distractors, drawn as
    ``refrag eval qa`` draws them (:func:`~.data.with_distractors`, same seed), and the first
    ``index_passages`` distinct gold passages in file order."""
    from .data import with_distractors

    if not examples:
        raise ValueError("no QA examples to take passages from.")
    contexts = {n: with_distractors(examples, 0, n, seed)[0] for n in counts}
    pool = list(dict.fromkeys(e.passage for e in examples))
    if len(pool) < index_passages:
        raise ValueError(f"{index_passages} index passages asked for, the data has {len(pool)} distinct passages.")
    return examples[0].question, contexts, pool[:index_passages]


# --------------------------------------------------------------------------- the run


def run_encoder_bench(
    engine_factory: Callable[[EncoderOption], "RefragEngine"],
    question: str,
    contexts: dict[int, list[str]],
    index_passages: Sequence[str],
    settings: EncoderBenchSettings,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every pending setting, saving ``encoders.json`` and ``encoders.md`` after each one.

    Finished settings are kept and skipped on a rerun with the same signature (decoder, device,
    dtype, threads, repeats, question, index passages); more options or passage counts can be added
    by a rerun. ``limit`` measures at most that many new settings.

    Args:
        engine_factory: builds the engine of one option; called once per option with pending work,
            and the engine is released before the next option's is built. RAG rows use the first
            engine built (the decoder is the same for every option).
        question: the question of every request.
        contexts: passages per N (one entry per passage count).
        index_passages: passages timed at index time.
        settings: what to measure.
        out_dir: where ``run.json``, ``encoders.json`` and ``encoders.md`` go.
        limit: measure at most this many settings now.
        overwrite: discard results of a run with other settings in ``out_dir``.
        progress: show a progress bar.

    Returns:
        The results document (also in ``out_dir/encoders.json``).
    """
    import torch
    from tqdm.auto import tqdm

    from ..models import decoder_encoder_layers

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    missing = [n for n in settings.passage_counts if n not in contexts]
    if missing:
        raise ValueError(f"no passages given for N = {missing}.")
    if len(index_passages) != settings.index_passages:
        raise ValueError(f"{len(index_passages)} index passages given, settings say {settings.index_passages}.")
    out = Path(out_dir)
    # What the signature holds besides the engine's part (decoder, k, dtype, device: known once the
    # first engine is built); checked now too, so a rerun with nothing left to measure is checked.
    run_settings = {
        "threads": torch.get_num_threads(),
        "repeats": settings.repeats,
        "output_tokens": settings.output_tokens,
        "question": question,
        "index_passages": settings.index_passages,
        **settings.extra,
    }
    if (out / SIGNATURE_FILE).is_file() and not overwrite:
        old = read_json(out / SIGNATURE_FILE)
        check_signature(out / SIGNATURE_FILE, {**old, **run_settings})
    path = out / RESULTS_FILE
    if overwrite and path.is_file():
        path.unlink()
    doc = read_json(path) if path.is_file() else {}
    results: dict[str, dict[str, Any]] = {r["key"]: r for r in doc.get("results", [])}
    doc.setdefault("commands", [])
    doc["commands"].append(command_line())
    doc.setdefault("options", {})
    todo = [(key, s) for key, s in settings.settings() if key not in results]
    if limit is not None:
        todo = todo[:limit]
    rag_todo = [(key, s) for key, s in todo if s["mode"] == "rag"]
    by_option: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, s in todo:
        if s["option"] is not None:
            by_option.setdefault(s["option"].key, []).append((key, s))
    order = [o for o in settings.options if o.key in by_option]
    if rag_todo and not order:
        order = [settings.options[0]]
    signed = False
    bar = tqdm(total=len(todo), desc="refrag bench encoders", unit="setting", disable=not progress)
    for opt in order:
        engine = engine_factory(opt)
        if (engine.config.chunk_context != opt.chunk_context
                or engine.chunk_encoder.reads_decoder_tokens != (decoder_encoder_layers(opt.encoder) is not None)):
            raise ValueError(f"the engine built for option {opt.key} has encoder {engine.config.encoder!r} and "
                             f"chunk context {engine.config.chunk_context!r}.")
        if not signed:  # the first engine decides the signature; every later one must match it
            signature = {
                "decoder": engine.config.decoder,
                "decoder_fingerprint": engine.config.decoder_fingerprint,
                "k": engine.k,
                "dtype": str(cache_dtype(engine)).replace("torch.", ""),
                **weights_signature(engine),
                "device": str(engine.device),
                **run_settings,
            }
            check_signature(out / SIGNATURE_FILE, signature, overwrite=overwrite)
            doc.update({"run": signature, "machine": machine_info(engine.device), "note": UNTRAINED_NOTE})
            signed = True
        elif engine.config.decoder_fingerprint != doc["run"]["decoder_fingerprint"] or engine.k != doc["run"]["k"]:
            raise ValueError(f"option {opt.key}'s engine has another decoder or k than the run's first engine.")
        doc["options"][opt.key] = {"encoder": opt.encoder, "chunk_context": opt.chunk_context, **option_info(engine)}
        # Process-wide warm-up (kernels, lazy buffers) so the first setting carries no one-time costs.
        warm = contexts[min(settings.passage_counts)]
        timed_request(engine, question, warm, "all", None, 2)
        timed_request(engine, question, warm, "none", None, 2)
        engine.forget_vectors(warm)
        work = (rag_todo if opt == order[0] else []) + by_option.get(opt.key, [])
        for key, s in work:
            bar.set_postfix_str(key)
            load_before = load_average()
            if s["mode"] == "index":
                row = measure_index(engine, index_passages, settings.repeats)
            else:
                row = measure(engine, s["mode"], question, contexts[s["n"]], 0.0 if s["mode"] != "rag" else None,
                              None, settings.repeats, settings.output_tokens)
            row.update({
                "key": key, "mode": s["mode"], "option": None if s["option"] is None else s["option"].key,
                "n": s["n"], "load_average_before": load_before, "load_average_after": load_average(),
                "measured_at": now_iso(),
            })
            results[key] = row
            _save(doc, results, settings, out)
            bar.update(1)
        del engine
        gc.collect()
    bar.close()
    return _save(doc, results, settings, out)


def _save(doc: dict[str, Any], results: dict[str, dict[str, Any]], settings: EncoderBenchSettings,
          out: Path) -> dict[str, Any]:
    keys = [key for key, _ in settings.settings()]
    rank = {key: i for i, key in enumerate(keys)}
    doc["results"] = sorted(results.values(), key=lambda r: (rank.get(r["key"], len(rank)), r["key"]))
    doc["summary"] = summarize_encoders(doc["results"])
    doc["complete"] = all(key in results for key in keys)
    write_json(out / RESULTS_FILE, doc)
    (out / TABLE_FILE).write_text(encoders_markdown(doc), encoding="utf-8")
    return doc


# --------------------------------------------------------------------------- summary and table


def summarize_encoders(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (option, N) with both TTFTs: cached and not-cached TTFT, the query-time encoding
    seconds, their speed-ups over RAG at the same N, and the option's cached TTFT over the first
    option's (in result order) at the same N."""
    rag = {r["n"]: r for r in results if r["mode"] == "rag"}
    cells = {(r["option"], r["n"], r["mode"]): r for r in results if r["mode"] in ("cached", "not_cached")}
    options = list(dict.fromkeys(r["option"] for r in results if r["option"] is not None))
    ns = sorted({r["n"] for r in results if r["n"] is not None})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows = []
    for n in ns:
        reference = next((cells[(o, n, "cached")]["ttft_s"] for o in options if (o, n, "cached") in cells), None)
        for o in options:
            c, nc, base = cells.get((o, n, "cached")), cells.get((o, n, "not_cached")), rag.get(n)
            if c is None and nc is None:
                continue
            pick = c or nc
            rows.append({
                "option": o, "n": n, "context_tokens": pick["context_tokens"], "chunks": pick["chunks"],
                "rag_ttft_s": base["ttft_s"] if base else None,
                "cached_ttft_s": c["ttft_s"] if c else None,
                "not_cached_ttft_s": nc["ttft_s"] if nc else None,
                "encode_s": nc["encode_s"] if nc else None,
                "cached_speedup": ratio(base["ttft_s"] if base else None, c["ttft_s"] if c else None),
                "not_cached_speedup": ratio(base["ttft_s"] if base else None, nc["ttft_s"] if nc else None),
                "cached_vs_first": ratio(c["ttft_s"] if c else None, reference),
                "not_cached_peak_memory_mb": nc.get("peak_memory_mb") if nc else None,
            })
    return rows


def cached_spread(summary: Sequence[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Per N, the smallest and largest cached TTFT (seconds) over the options measured."""
    out: dict[int, tuple[float, float]] = {}
    for r in summary:
        t = r.get("cached_ttft_s")
        if t is None:
            continue
        lo, hi = out.get(r["n"], (t, t))
        out[r["n"]] = (min(lo, t), max(hi, t))
    return out


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def encoders_markdown(doc: dict[str, Any]) -> str:
    """The two tables (index time per option; TTFT per N and option) and the cached-TTFT spread.
    Every number is read from the results, rounded for display."""
    results = doc.get("results", [])
    options = doc.get("options", {})
    lines = [f"> {doc['note']}", ""] if doc.get("note") else []
    index_rows = [r for r in results if r["mode"] == "index"]
    if index_rows:
        first = index_rows[0]
        lines += [
            f"Index time: the chunk vectors of {first['passages']} NQ passages in one batch, as `refrag index` "
            "computes them (chunking + encoder forward; vectors are stored before the projector, which runs at "
            "query time in every mode) and writes them (a fresh embedded Chroma collection). Median of the "
            "timed batches.",
            "",
            "| encoder | chunk context | projector | encoder params (M) | d_enc | chunks | compute ms/passage | "
            "compute ms/chunk | store ms/passage | index ms/passage |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in index_rows:
            o = options.get(r["option"], {})
            lines.append(
                f"| {o.get('encoder', r['option'])} | {o.get('chunk_context', '?')} | "
                f"{'trained' if o.get('projector_trained') else 'untrained'} | "
                f"{o.get('encoder_params', 0) / 1e6:.1f} | {o.get('encoder_dim', '?')} | {r['chunks']} | "
                f"{r['compute_ms_per_passage']:.2f} | {r['compute_ms_per_chunk']:.3f} | "
                f"{r['store_ms_per_passage']:.2f} | {r['index_ms_per_passage']:.2f} |"
            )
        lines.append("")
    summary = doc.get("summary") or summarize_encoders(results)
    if summary or any(r["mode"] == "rag" for r in results):
        lines += [
            "Query time, p = 0 (every chunk compressed): question + N passages to the first token. *Cached*: chunk "
            "vectors precomputed; *not cached*: computed at query time (the engine's vector cache emptied before "
            "every request); *encode*: the query-time encoding inside not-cached TTFT. Speed-ups are RAG TTFT / "
            "REFRAG TTFT at the same N; *cached / first* is the option's cached TTFT over the first option's.",
            "",
            "| N | context tokens | chunks | encoder | chunk context | RAG TTFT ms | cached TTFT ms | not-cached TTFT ms | "
            "encode ms | cached speed-up | not-cached speed-up | cached / first | not-cached peak mem MB |",
            "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in summary:
            o = options.get(r["option"], {})
            peak = r.get("not_cached_peak_memory_mb")
            lines.append(
                f"| {r['n']} | {r['context_tokens']} | {r['chunks']} | {o.get('encoder', r['option'])} | "
                f"{o.get('chunk_context', '?')} | {_ms(r['rag_ttft_s'])} | {_ms(r['cached_ttft_s'])} | "
                f"{_ms(r['not_cached_ttft_s'])} | {_ms(r['encode_s'])} | {_x(r['cached_speedup'])} | "
                f"{_x(r['not_cached_speedup'])} | {_x(r['cached_vs_first'])} | "
                f"{'n/a' if peak is None else f'{peak:.0f}'} |"
            )
        rag_only = sorted(r["n"] for r in results if r["mode"] == "rag" and r["n"] not in {s["n"] for s in summary})
        for n in rag_only:
            r = next(x for x in results if x["mode"] == "rag" and x["n"] == n)
            lines.append(f"| {n} | {r['context_tokens']} | {r['chunks']} | (RAG only) | - | {_ms(r['ttft_s'])} | "
                         "n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
        lines.append("")
        spread = cached_spread(summary)
        if spread:
            lines.append("Cached TTFT over the encoder options: " + "; ".join(
                f"N = {n}: {lo * 1000:.1f}-{hi * 1000:.1f} ms (largest / smallest {hi / lo:.2f}x)"
                for n, (lo, hi) in sorted(spread.items())) + ".")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def encoders_section(doc: dict[str, Any]) -> str:
    """The docs section for ``docs/benchmarks.md``: title, machine, run, status, commands, tables."""
    run = doc.get("run", {})
    load = load_range(doc.get("results", []))
    lines = [SECTION_TITLE, "", "Machine:", "", *machine_lines(doc.get("machine", {})), ""]
    lines += [f"Decoder `{run.get('decoder')}`, k = {run.get('k')}, dtype {run.get('dtype')}, {run.get('threads')} "
              f"threads, {run.get('repeats')} timed repeats (median) after one warm-up. Passages from "
              f"{run.get('data', 'the given data')} ({run.get('split', 'all')} split): at query time the first "
              "question's gold passage + N - 1 distractors (as `refrag eval qa` draws them), at index time the "
              "first distinct gold passages.", ""]
    status = "complete" if doc.get("complete") else "PARTIAL (not every setting measured)"
    lines += [f"Status: {status}." + (f" 1-minute load average during the run: {load}." if load else ""), ""]
    lines += ["Commands:", "", *command_block(doc.get("commands", [])), ""]
    lines += [encoders_markdown(doc)]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(page: str, section: str, title: str = SECTION_TITLE) -> str:
    """``page`` with the level-2 section that starts with ``title`` replaced by ``section`` (up to
    the next level-2 heading), or with ``section`` appended when the page has none."""
    lines = page.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(title)), None)
    if start is None:
        return page.rstrip() + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"## ", lines[i])), len(lines))
    tail = "\n".join(lines[end:])
    return "\n".join(lines[:start]).rstrip() + "\n\n" + section + ("\n" + tail.rstrip() + "\n" if tail else "")


def write_encoders_docs(out_dir: str | Path, page: str | Path) -> Path:
    """Rewrite (or add) the encoder-cost section of a Markdown page from the results in ``out_dir``."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"no results in {out_dir}; run `refrag bench encoders` first.")
    page = Path(page)
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    page.write_text(replace_section(text, encoders_section(read_json(path))), encoding="utf-8")
    return page
