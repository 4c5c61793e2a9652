"""Throughput of concurrent requests: ordinary RAG and REFRAG through one decoder backend (the
in-process engine, or a vLLM server), at several concurrency levels, in one resumable run.

For each context length s, concurrency C, and mode (``rag``: every chunk expanded; ``cached``:
REFRAG at compression rate k and expand fraction p, chunk vectors precomputed as after
indexing), C client threads each send ``requests_per_client`` requests one after another (a
closed loop) over the same real passages. Every request goes through the engine's public API
exactly as :meth:`~refrag_integrations.engine.RefragEngine.generate` does (announce, prepare,
``generate_prepared``): in-process the requests meet in the micro-batcher and share batches; with
a vLLM backend they are concurrent HTTP requests that the server batches. Every request decodes
exactly ``output_tokens`` tokens (EOS ignored), so every setting does the same decoding work. One
untimed round (C concurrent requests) comes first.

Measured per setting:

* **requests/s**: timed requests / wall time (first request's start to last request's end);
* **output tokens/s**: tokens decoded by all timed requests / wall time;
* **latency p50 / p95**: per request, from its start (assembly, policy, chunk vectors
  included) to its last token; **TTFT p50** likewise to its first token;
* **rows per batch** (in-process only): rows the micro-batcher decoded per batch during the
  timed requests; above 1 means concurrent requests really shared batches.

Results are keyed by backend, so one results directory holds the in-process run and the vLLM
run side by side (run the command once per backend with the same settings).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .bench import UNTRAINED_NOTE, bench_policy, check_pending, engine_for_k, engine_signature
from .config import BENCH_OUTPUT_TOKENS, BENCH_POLICY, THROUGHPUT_LENGTHS, THROUGHPUT_PS, THROUGHPUT_REQUESTS_PER_CLIENT
from .metrics import median
from .runs import check_signature, command_line, load_average, machine_info, now_iso, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import GenerationResult, RefragEngine

MODES = ("rag", "cached")
RESULTS_FILE = "throughput.json"
TABLE_FILE = "throughput.md"
SIGNATURE_FILE = "throughput_run.json"
IN_PROCESS = "transformers"  # the backend name of the engine's own decoder
# Issue 17's targets, checked against the measured numbers in the report.
TARGET_VS_IN_PROCESS = 4.0  # REFRAG through vLLM at C = 16: requests/s over the in-process engine's
TARGET_VS_RAG = 2.0  # REFRAG through vLLM: requests/s over ordinary RAG through the same server
TARGET_CONCURRENCY = 16
TARGET_LENGTH = 4096


@dataclass
class ThroughputSettings:
    """What ``refrag bench --concurrency`` measures (see the module docstring).

    ``ks`` None means the engine's own k (the checkpoint's).

    Example:
        >>> ThroughputSettings(lengths=(512,), ks=(16,), ps=(0.0,), concurrency=(1, 4)).settings()[:2]
        [('rag', 512, None, None, 1), ('cached', 512, 16, 0.0, 1)]
    """

    concurrency: tuple[int, ...] = (1,)
    lengths: tuple[int, ...] = THROUGHPUT_LENGTHS
    ks: tuple[int, ...] | None = None
    ps: tuple[float, ...] = THROUGHPUT_PS
    requests_per_client: int = THROUGHPUT_REQUESTS_PER_CLIENT
    output_tokens: int = BENCH_OUTPUT_TOKENS
    policy: str = BENCH_POLICY
    extra: dict[str, Any] = field(default_factory=dict)  # corpus, data source: part of the signature

    def __post_init__(self) -> None:
        self.concurrency = tuple(int(c) for c in self.concurrency)
        self.lengths = tuple(int(x) for x in self.lengths)
        self.ks = None if self.ks is None else tuple(int(x) for x in self.ks)
        self.ps = tuple(float(x) for x in self.ps)
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be positive request counts, got {self.concurrency}.")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"context lengths must be positive token counts, got {self.lengths}.")
        if self.ks is not None and (not self.ks or min(self.ks) < 1):
            raise ValueError(f"k values must be positive integers, got {self.ks}.")
        if not self.ps or not all(0.0 <= p <= 1.0 for p in self.ps):
            raise ValueError(f"expand fractions p must lie in [0, 1], got {self.ps}.")
        if self.requests_per_client < 1:
            raise ValueError(f"requests per client must be >= 1, got {self.requests_per_client}.")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}.")

    def settings(self, default_k: int | None = None) -> list[tuple[str, int, int | None, float | None, int]]:
        """Every (mode, length, k, p, concurrency) to measure; RAG once per length and concurrency.

        Raises:
            ValueError: ``ks`` is None and no ``default_k`` is given.
        """
        ks = self.ks if self.ks is not None else (default_k,) if default_k is not None else None
        if ks is None:
            raise ValueError("give ks or the engine's k (default_k).")
        out: list[tuple[str, int, int | None, float | None, int]] = []
        for s in self.lengths:
            for c in self.concurrency:
                out.append(("rag", s, None, None, c))
                out.extend(("cached", s, k, p, c) for k in ks for p in self.ps)
        return out


def setting_key(backend: str, mode: str, length: int, k: int | None, p: float | None, concurrency: int) -> str:
    """Stable id of one measurement, e.g. ``vllm|cached|s=4096|k=16|p=0.0|c=16``."""
    what = f"{mode}|s={length}" if mode == "rag" else f"{mode}|s={length}|k={k}|p={float(p)}"
    return f"{backend}|{what}|c={concurrency}"


def backend_name(engine: "RefragEngine") -> str:
    """``"transformers"`` for the engine's own decoder, else its backend's name (``"vllm"``)."""
    return IN_PROCESS if engine.backend is None else str(engine.backend.name)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between the closest ranks.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 95)
        (2.5, 3.85)
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of an empty sequence.")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------- measurement


def fixed_length_request(
    engine: "RefragEngine", question: str, passages: Sequence[str], expand: Any, budget: float | None,
    output_tokens: int,
) -> "GenerationResult":
    """One request as :meth:`RefragEngine.generate` makes it (announced to the micro-batcher while
    it is prepared, then decoded in-process or on the engine's backend), decoding exactly
    ``output_tokens`` tokens."""
    t0 = time.perf_counter()
    with engine.batcher.preparing():
        prepared = engine.prepare_rag(question, passages, expand, expand_fraction=budget)
        return engine.generate_prepared([prepared], t_start=t0, max_new_tokens=output_tokens, ignore_eos=True)[0]


def concurrent_round(
    request: Callable[[], "GenerationResult"], concurrency: int, per_client: int
) -> tuple[list["GenerationResult"], float]:
    """``concurrency`` threads, started together, each making ``per_client`` requests one after
    another. Returns every result and the wall time (first start to last end).

    Raises:
        the first error a request raised (the other clients finish first).
    """
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(concurrency)
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def client() -> list["GenerationResult"]:
        start.wait()
        out = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            out.append(request())
            t1 = time.perf_counter()
            with lock:
                spans.append((t0, t1))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client) for _ in range(concurrency)]
        results = [r for f in futures for r in f.result()]
    return results, max(b for _, b in spans) - min(a for a, _ in spans)


def measure_throughput(
    engine: "RefragEngine", mode: str, question: str, passages: Sequence[str], p: float | None, policy: Any,
    concurrency: int, requests_per_client: int, output_tokens: int,
) -> dict[str, Any]:
    """Measure one setting: an untimed concurrent round, then the timed one (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    expand, budget = ("all", None) if mode == "rag" else ("none", None) if not p else (policy, float(p))
    for t in passages:  # pre-tokenised and (REFRAG) pre-encoded, as after indexing
        engine.chunk(t)
    if mode == "cached":
        engine.chunk_vectors(passages)

    def request() -> "GenerationResult":
        return fixed_length_request(engine, question, passages, expand, budget, output_tokens)

    concurrent_round(request, concurrency, 1)  # warm-up: batch shapes, connections
    in_process = engine.backend is None
    batches_before, rows_before = engine.batcher.totals
    results, wall = concurrent_round(request, concurrency, requests_per_client)
    batches, rows = (a - b for a, b in zip(engine.batcher.totals, (batches_before, rows_before)))
    stats = results[0].stats
    if mode == "cached" and stats.encode_s > 0:
        raise RuntimeError("cached mode encoded chunks at query time; the precomputed vectors were lost.")
    latency = [r.stats.total_s for r in results]
    tokens = sum(r.stats.new_tokens for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "ttft_p50_s": median([r.stats.ttft_s for r in results]),
        "rows_per_batch": rows / batches if in_process and batches else None,
        "context_tokens": stats.context_tokens,
        "positions": stats.positions,
        "chunks": stats.chunks,
        "chunks_expanded": stats.chunks_expanded,
        "projector_trained": bool(engine.trained) if mode != "rag" else None,
    }


# --------------------------------------------------------------------------- the run


def run_throughput(
    engine: "RefragEngine",
    question: str,
    contexts: dict[int, list[str]],
    settings: ThroughputSettings,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    policy_factory: Callable[["RefragEngine"], Any] | None = None,
) -> dict[str, Any]:
    """Measure every pending setting on the engine's backend, saving ``throughput.json`` (and
    ``throughput.md``) after each one; finished settings are skipped on a rerun.

    Args:
        engine: the engine (its ``backend`` decides where requests are decoded; engines for other
            k share its decoder, encoder and backend).
        question: the question of every request.
        contexts: passages per context length (``build_context``), one entry per length.
        settings: what to measure.
        out_dir: where ``throughput_run.json``, ``throughput.json`` and ``throughput.md`` go; runs
            of other backends with the same settings add their rows to the same files.
        limit: measure at most this many new settings now.
        overwrite: discard results of a run with other settings in ``out_dir``.
        progress: show a progress bar.
        policy_factory: builds the expansion policy for p > 0 from an engine (default: the
            policy named in ``settings``).

    Returns:
        The results document (also in ``out_dir/throughput.json``).
    """
    from tqdm.auto import tqdm

    check_pending(settings.lengths, contexts, limit)
    out = Path(out_dir)
    backend = backend_name(engine)
    signature = {
        **engine_signature(engine),
        "requests_per_client": settings.requests_per_client,
        "output_tokens": settings.output_tokens,
        "policy": settings.policy,
        "question": question,
        **settings.extra,
    }
    check_signature(out / SIGNATURE_FILE, signature, overwrite=overwrite)
    path = out / RESULTS_FILE
    doc = read_json(path) if path.is_file() and not overwrite else {}
    results: dict[str, dict[str, Any]] = {r["key"]: r for r in doc.get("results", [])}
    machines = doc.get("machines", {})
    machines[backend] = machine_info(engine.device)
    doc.update({
        "run": signature,
        "machines": machines,
        "projector_trained": bool(engine.trained),
        "note": None if engine.trained else UNTRAINED_NOTE,
    })
    doc.setdefault("commands", [])
    doc["commands"].append(command_line())

    def factory(eng: "RefragEngine") -> Any:
        return policy_factory(eng) if policy_factory is not None else bench_policy(settings.policy, eng)

    def save() -> dict[str, Any]:
        doc["results"] = sorted(results.values(), key=_order)
        doc["complete_for_backend"] = all(setting_key(backend, *s) in results for s in settings.settings(engine.k))
        write_json(path, doc)
        (out / TABLE_FILE).write_text(markdown_table(doc), encoding="utf-8")
        return doc

    todo = [s for s in settings.settings(engine.k) if setting_key(backend, *s) not in results]
    if limit is not None:
        todo = todo[:limit]
    engines: dict[int, "RefragEngine"] = {}
    bar = tqdm(todo, desc="refrag bench --concurrency", unit="setting", disable=not progress)
    for mode, length, k, p, c in bar:
        key = setting_key(backend, mode, length, k, p, c)
        bar.set_postfix_str(key)
        eng = engine if mode == "rag" else engines.setdefault(k, engine_for_k(engine, k))
        policy = factory(eng) if mode != "rag" and p else None
        load_before = load_average()
        row = measure_throughput(
            eng, mode, question, contexts[length], p, policy, c, settings.requests_per_client, settings.output_tokens
        )
        row.update({
            "key": key, "backend": backend, "mode": mode, "length": length, "k": k, "p": p, "concurrency": c,
            "load_average_before": load_before, "load_average_after": load_average(), "measured_at": now_iso(),
        })
        results[key] = row
        save()
    return save()


def _order(r: dict[str, Any]) -> tuple:
    return (r["length"], r["concurrency"], r["backend"] != IN_PROCESS, r["backend"], r["mode"] != "rag",
            r["k"] or 0, r["p"] or 0.0)


# --------------------------------------------------------------------------- ratios and table


def ratios(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per result key: ``vs_rag`` (its requests/s over ordinary RAG's on the same backend, length
    and concurrency) and ``vs_in_process`` (over the in-process engine's for the same setting)."""
    by = {(r["backend"], r["mode"], r["length"], r["k"], r["p"], r["concurrency"]): r for r in results}

    def over(r: dict[str, Any], base: dict[str, Any] | None) -> float | None:
        return r["requests_per_s"] / base["requests_per_s"] if base and base["requests_per_s"] else None

    out = {}
    for r in results:
        rag = by.get((r["backend"], "rag", r["length"], None, None, r["concurrency"]))
        local = by.get((IN_PROCESS, r["mode"], r["length"], r["k"], r["p"], r["concurrency"]))
        out[r["key"]] = {
            "vs_rag": over(r, rag) if r["mode"] != "rag" else None,
            "vs_in_process": over(r, local) if r["backend"] != IN_PROCESS else None,
        }
    return out


def target_lines(doc: dict[str, Any]) -> list[str]:
    """Sentences stating, from the measured numbers only, whether issue 17's targets are met."""
    results = doc.get("results", [])
    q = ratios(results)
    at = [r for r in results if r["backend"] == "vllm" and r["mode"] == "cached" and r["length"] == TARGET_LENGTH]
    lines = []
    local = [r for r in at if r["concurrency"] == TARGET_CONCURRENCY and q[r["key"]]["vs_in_process"] is not None]
    if local:
        for r in local:
            x = q[r["key"]]["vs_in_process"]
            lines.append(f"- REFRAG (k = {r['k']}, p = {r['p']:g}) through vLLM at {TARGET_CONCURRENCY} concurrent "
                         f"requests: {x:.2f}x the in-process engine's requests/s (target >= {TARGET_VS_IN_PROCESS:g}x: "
                         f"{'met' if x >= TARGET_VS_IN_PROCESS else 'NOT met'}).")
    else:
        lines.append(f"- REFRAG through vLLM vs the in-process engine at {TARGET_CONCURRENCY} concurrent requests and "
                     f"{TARGET_LENGTH} context tokens (target >= {TARGET_VS_IN_PROCESS:g}x requests/s): not measured.")
    rag = [r for r in at if q[r["key"]]["vs_rag"] is not None]
    if rag:
        for r in rag:
            x = q[r["key"]]["vs_rag"]
            lines.append(f"- REFRAG (k = {r['k']}, p = {r['p']:g}) vs ordinary RAG through the same vLLM server at "
                         f"{r['concurrency']} concurrent requests: {x:.2f}x requests/s (target >= {TARGET_VS_RAG:g}x: "
                         f"{'met' if x >= TARGET_VS_RAG else 'NOT met'}).")
    else:
        lines.append(f"- REFRAG vs ordinary RAG through vLLM at {TARGET_LENGTH} context tokens (target >= "
                     f"{TARGET_VS_RAG:g}x requests/s): not measured.")
    return lines


def _f(x: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, fmt) + suffix


def markdown_table(doc: dict[str, Any]) -> str:
    """The throughput results as Markdown, with each row's ratios; numbers exactly as measured,
    rounded for display."""
    results = doc.get("results", [])
    q = ratios(results)
    lines = []
    if doc.get("note"):
        lines += [f"> {doc['note']}", ""]
    lines += [
        "| backend | mode | s | k | p | concurrent | positions | requests | req/s | output tok/s | latency p50 ms | "
        "latency p95 ms | TTFT p50 ms | rows/batch | req/s vs RAG | req/s vs in-process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['length']} | {_f(r['k'], 'd')} | {_f(r['p'], 'g')} | "
            f"{r['concurrency']} | {r['positions']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['latency_p50_s'] * 1000:.0f} | {r['latency_p95_s'] * 1000:.0f} | "
            f"{r['ttft_p50_s'] * 1000:.0f} | {_f(r['rows_per_batch'], '.1f')} | "
            f"{_f(q[r['key']]['vs_rag'], '.2f', 'x')} | {_f(q[r['key']]['vs_in_process'], '.2f', 'x')} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "ThroughputSettings",
    "concurrent_round",
    "fixed_length_request",
    "markdown_table",
    "measure_throughput",
    "percentile",
    "ratios",
    "run_throughput",
    "setting_key",
    "target_lines",
]
