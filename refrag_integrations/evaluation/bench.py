"""Latency and memory of REFRAG against ordinary full-context RAG, on one decoder, in one run.

For each context length s, compression rate k and expand fraction p the benchmark measures

* **TTFT**: request start -> first generated token (prompt assembly, policy, any query-time
  chunk encoding, prefill, first-token pick; the device is synchronised; model loading is not
  included). Median of ``repeats`` timed requests after one untimed warm-up request.
* **TTIT**: time per next token (median step time of the decode loop, KV cache in use).
* **throughput**: ``output_tokens`` / (end of the last token - request start), batch 1. The
  output length is fixed (EOS is not a stop) so every setting decodes the same number of tokens.
* **peak memory**: the process's peak resident memory during the warm-up request above what it
  held before (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``;
  CUDA: ``max_memory_allocated``). Measured on the untimed warm-up request, so the measurement
  never slows a timed one.
* **KV-cache size**: positions x layers x 2 (K and V) x kv_heads x head_dim x bytes per element,
  after prefill (``kv_cache_mb``) and after the last token (``kv_cache_end_mb``).

for three modes on the same engine: ``rag`` (every chunk expanded: ordinary RAG through the same
code path), ``cached`` (REFRAG with chunk vectors precomputed, as after indexing) and
``not_cached`` (REFRAG encoding the chunks at query time). In every mode the passages are
tokenised beforehand (a RAG system can pre-tokenise its index just as REFRAG pre-encodes it).

Speed does not depend on the projector's weights, so an untrained projector measures latency
correctly; the output says whether it was trained. Engines for other k share the loaded decoder
and encoder (their projector is untrained unless it is the checkpoint's own k).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import (
    BENCH_CORPORA,
    BENCH_KS,
    BENCH_LENGTHS,
    BENCH_OUTPUT_TOKENS,
    BENCH_POLICY,
    BENCH_PS,
    BENCH_REPEATS,
    BENCH_WIKI_PASSAGE_TOKENS,
    BENCH_WIKI_QUESTION,
)
from .data import build_context, load_qa, nq_path, wiki_passages
from .metrics import median
from .runs import check_signature, command_line, load_average, machine_info, now_iso, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..engine import RefragEngine

logger = logging.getLogger(__name__)

MODES = ("rag", "cached", "not_cached")
RESULTS_FILE = "bench.json"
TABLE_FILE = "bench.md"
SIGNATURE_FILE = "run.json"
UNTRAINED_NOTE = (
    "The projector is untrained: compressed chunks carry no usable information yet, but latency "
    "and memory do not depend on projector weights, so these timings are valid."
)
_MB = 2**20


@dataclass
class BenchSettings:
    """What ``refrag bench`` measures (see the module docstring).

    Example:
        >>> BenchSettings(lengths=(512, 1024), ks=(16,), ps=(0.0,), repeats=1).settings()[:2]
        [('rag', 512, None, None), ('cached', 512, 16, 0.0)]
    """

    lengths: tuple[int, ...] = BENCH_LENGTHS
    ks: tuple[int, ...] = BENCH_KS
    ps: tuple[float, ...] = BENCH_PS
    repeats: int = BENCH_REPEATS
    output_tokens: int = BENCH_OUTPUT_TOKENS
    policy: str = BENCH_POLICY
    extra: dict[str, Any] = field(default_factory=dict)  # corpus, data source: part of the signature

    def __post_init__(self) -> None:
        self.lengths, self.ks = tuple(int(x) for x in self.lengths), tuple(int(x) for x in self.ks)
        self.ps = tuple(float(x) for x in self.ps)
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"context lengths must be positive token counts, got {self.lengths}.")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"k values must be positive integers, got {self.ks}.")
        if not self.ps or not all(0.0 <= p <= 1.0 for p in self.ps):
            raise ValueError(f"expand fractions p must lie in [0, 1], got {self.ps}.")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}.")
        if self.output_tokens < 2:
            raise ValueError(f"output_tokens must be >= 2 (TTIT needs a second token), got {self.output_tokens}.")

    def settings(self) -> list[tuple[str, int, int | None, float | None]]:
        """Every (mode, length, k, p) to measure, shortest contexts first; RAG once per length."""
        out: list[tuple[str, int, int | None, float | None]] = []
        for s in self.lengths:
            out.append(("rag", s, None, None))
            for k in self.ks:
                for p in self.ps:
                    out.extend([("cached", s, k, p), ("not_cached", s, k, p)])
        return out


def setting_key(mode: str, length: int, k: int | None, p: float | None) -> str:
    """Stable id of one measurement, e.g. ``cached|s=4096|k=16|p=0.0``."""
    return f"{mode}|s={length}" if mode == "rag" else f"{mode}|s={length}|k={k}|p={float(p)}"


# --------------------------------------------------------------------------- measurement helpers


def kv_cache_bytes(decoder: "torch.nn.Module", positions: int, dtype: "torch.dtype") -> int:
    """Bytes of a decoder's KV cache holding ``positions`` entries per layer:
    positions x layers x 2 x kv_heads x head_dim x bytes.

    Example:
        >>> kv_cache_bytes(engine.decoder, 4096, torch.float32)   # doctest: +SKIP
        94371840
    """
    import torch

    cfg = decoder.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(positions) * int(cfg.num_hidden_layers) * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def kv_bytes_per_position(engine: "RefragEngine") -> int:
    """Bytes one position adds to the KV cache over all layers, read from a real cache after a
    2-position probe under the engine's dtype settings. (Under CPU bf16 autocast the keys stay
    fp32 after RoPE while the values are bf16, so one dtype in a formula would be wrong.)"""
    import torch
    from transformers import DynamicCache

    embed = engine.decoder.get_input_embeddings()
    emb = embed(torch.zeros(1, 2, dtype=torch.long, device=embed.weight.device))  # (1, 2, d)
    cache = DynamicCache()
    with torch.no_grad():
        engine.decoder_forward(cache, inputs_embeds=emb, logits_to_keep=1)
    layers = getattr(cache, "layers", None)
    if not layers:  # an older cache layout: fall back to the formula
        return kv_cache_bytes(engine.decoder, 1, cache_dtype(engine))
    total = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    return total // 2


def cache_dtype(engine: "RefragEngine") -> "torch.dtype":
    """The dtype K and V are stored in: the autocast dtype when set, else the decoder's."""
    return engine.autocast_dtype or next(engine.decoder.parameters()).dtype


def weights_signature(engine: "RefragEngine") -> dict[str, str]:
    """``{"decoder_weights": dtype}`` for a decoder loaded in half precision (``decoder_dtype``),
    else nothing: results directories written with float32 weights keep their signature, and a
    bfloat16-weights run never resumes into a float32-weights run with bf16 autocast."""
    import torch

    dtype = next(engine.decoder.parameters()).dtype
    return {} if dtype == torch.float32 else {"decoder_weights": str(dtype).replace("torch.", "")}


def _proc_status(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    except (OSError, ValueError):
        return None
    return None


class PeakMemory:
    """Peak memory a block of code adds on top of what the process held when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU on Linux: glibc's free memory is
    handed back (``malloc_trim``) and the resident-set high-water mark ``VmHWM`` is reset
    (``/proc/self/clear_refs``), so the peak counts memory the block really touched. Elsewhere:
    RSS sampled by a background thread (``psutil``; coarser).

    Example:
        >>> with PeakMemory("cpu") as mem:
        ...     x = bytearray(50 * 2**20)
        >>> mem.peak_bytes > 0
        True
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = "unavailable"
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _trim() -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to hand back
            pass

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status("VmHWM") is not None
        except OSError:
            return False

    def __enter__(self) -> "PeakMemory":
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        self._trim()
        if self._reset_hwm():
            self._base = _proc_status("VmRSS") or 0
            self.method = "rss_high_water_mark"
            return self
        try:
            import psutil
        except ImportError:
            return self
        proc = psutil.Process()
        self._base = proc.memory_info().rss
        self._peak = self._base
        self.method = "rss_sampled"

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method == "rss_high_water_mark":
            self.peak_bytes = max(0, (_proc_status("VmHWM") or 0) - self._base)
        elif self.method == "rss_sampled":
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(0, self._peak - self._base)


def engine_for_k(base: "RefragEngine", k: int) -> "RefragEngine":
    """An engine with compression rate ``k`` that shares ``base``'s decoder, encoder, projector,
    dtype and default policy. Its projector counts as trained only at the checkpoint's own k."""
    from ..engine import RefragEngine

    if k == base.k:
        return base
    engine = RefragEngine(
        base.decoder, base.tokenizer, base.chunk_encoder, dataclasses.replace(base.config, chunk_size=k),
        policy=base.policy, trained=False, autocast_dtype=base.autocast_dtype,
    )
    engine.budget = base.budget
    engine.backend = base.backend
    return engine


def learned_policy(engine: "RefragEngine") -> Any:
    """The engine's learned expansion policy (loaded from its checkpoint), or None when its
    default policy is one of the built-in heuristics."""
    from ..policy import ExpandAll, ExpandNone, QueryRelevancePolicy, RandomPolicy

    builtin = (ExpandAll, ExpandNone, QueryRelevancePolicy, RandomPolicy)
    return None if isinstance(engine.policy, builtin) else engine.policy


def bench_policy(name: str, engine: "RefragEngine") -> Any:
    """The expansion policy a benchmark uses for p > 0: ``"learned"`` (the checkpoint's own) or a
    built-in one by name (``relevance``, ``random``).

    Raises:
        ValueError: ``"learned"`` on an engine whose checkpoint has no learned policy.
    """
    from ..policy import resolve_policy

    if name == "learned":
        policy = learned_policy(engine)
        if policy is None:
            raise ValueError("policy 'learned' needs a checkpoint with a learned expansion policy.")
        return policy
    return resolve_policy(name, engine=engine)


def timed_request(
    engine: "RefragEngine", question: str, passages: Sequence[str], expand: Any, budget: float | None,
    output_tokens: int,
) -> dict[str, Any]:
    """One request through the engine's own assembly and decode loop, decoding exactly
    ``output_tokens`` tokens. Returns TTFT, per-step times and the request's stats."""
    import torch

    t0 = time.perf_counter()
    prepared = engine.prepare_rag(question, passages, expand, expand_fraction=budget)
    stamps: list[float] = []
    ttft = None
    if engine.backend is not None:  # a decoder server: the same fixed-length decode, streamed back
        for step in engine.backend.stream_steps(
            engine, prepared, t_start=t0, ignore_eos=True, max_new_tokens=output_tokens, do_sample=False,
            temperature=1.0, top_p=1.0, stop=None, seed=None,
        ):
            if step["ttft"] is not None:
                ttft = step["ttft"]
            if step["text"] or step["token_ids"]:
                stamps.append(time.perf_counter())
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"ttft_s": ttft, "steps_s": steps, "total_s": stamps[-1] - t0, "stats": prepared.stats}
    with torch.no_grad():
        # The engine's decode loop (prefill from inputs_embeds, first token from the prefill
        # logits, KV cache); unlike generate() it does not stop at EOS, so the length is fixed.
        for _tok, first in engine.decode_steps([prepared], output_tokens, t_start=t0):
            stamps.append(time.perf_counter())
            if first is not None:
                ttft = first
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": ttft, "steps_s": steps, "total_s": stamps[-1] - t0, "stats": prepared.stats}


def measure(
    engine: "RefragEngine", mode: str, question: str, passages: Sequence[str], p: float | None,
    policy: Any, repeats: int, output_tokens: int,
) -> dict[str, Any]:
    """Measure one setting: an untimed warm-up request (which also gives peak memory), then
    ``repeats`` timed requests. See the module docstring for the definitions."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "rag":
        expand, budget = "all", None
    else:
        expand, budget = ("none", None) if not p else (policy, float(p))
    for t in passages:  # pre-tokenise, in every mode
        engine.chunk(t)
    if mode == "cached":
        engine.chunk_vectors(passages)  # precomputed, as at indexing time
    runs = []
    peak = None
    for i in range(repeats + 1):
        if mode == "not_cached":
            engine.forget_vectors(passages)
        if i == 0:
            with PeakMemory(engine.device) as mem:
                first = timed_request(engine, question, passages, expand, budget, output_tokens)
            peak = mem
            continue
        runs.append(timed_request(engine, question, passages, expand, budget, output_tokens))
    stats = first["stats"]
    every = [first["stats"], *(r["stats"] for r in runs)]  # the warm-up and every timed request
    if mode == "cached" and any(s.encode_s > 0 for s in every):
        raise RuntimeError("cached mode encoded chunks at query time; the precomputed vectors were lost.")
    if mode == "not_cached" and any(s.chunks and s.cached_chunks for s in every):
        raise RuntimeError("not-cached mode found precomputed chunk vectors; query-time encoding was skipped.")
    per_position = kv_bytes_per_position(engine)
    ttft = median([r["ttft_s"] for r in runs])
    total = median([r["total_s"] for r in runs])
    return {
        "context_tokens": stats.context_tokens,
        "prompt_tokens": stats.prompt_tokens,
        "positions": stats.positions,
        # Positions the context itself takes (the prompt minus instruction, labels and question):
        # context_tokens / context_positions is the compression of the passages alone (~k at p=0).
        "context_positions": stats.positions - (stats.prompt_tokens - stats.context_tokens),
        "passages": len(passages),
        "chunks": stats.chunks,
        "chunks_expanded": stats.chunks_expanded,
        "ttft_s": ttft,
        "ttft_runs_s": [r["ttft_s"] for r in runs],
        "ttit_s": median([s for r in runs for s in r["steps_s"]]),
        "total_s": total,
        "throughput_tok_s": output_tokens / total,
        "encode_s": median([r["stats"].encode_s for r in runs]),
        "encode_runs_s": [r["stats"].encode_s for r in runs],
        # Chunks whose vectors a timed request found precomputed (0 in every not-cached run).
        "cached_chunks_runs": [r["stats"].cached_chunks for r in runs],
        "peak_memory_mb": None if peak.peak_bytes is None else peak.peak_bytes / _MB,
        "peak_memory_method": peak.method,
        "kv_cache_mb": stats.positions * per_position / _MB,
        "kv_cache_end_mb": (stats.positions + output_tokens) * per_position / _MB,
        "projector_trained": bool(engine.trained) if mode != "rag" else None,
    }


# --------------------------------------------------------------------------- the run


def bench_contexts(
    tokenizer: Any, lengths: Sequence[int], corpus: str, data_dir: str | Path
) -> tuple[str, dict[int, list[str]]]:
    """The question and, per context length, the passages of real text that fill it.

    ``corpus="nq"``: NQ-open gold passages (~100 words each, the retrieved-passage case) in file
    order; the question is the first passage's own. ``corpus="wiki"``: the Wikipedia sample cut
    into passages of ``BENCH_WIKI_PASSAGE_TOKENS`` tokens, with a generic question.
    """
    if corpus == "nq":
        examples = load_qa(nq_path(data_dir), "all")
        passages, question = [e.passage for e in examples], examples[0].question
    elif corpus == "wiki":
        passages, question = wiki_passages(data_dir, tokenizer, BENCH_WIKI_PASSAGE_TOKENS), BENCH_WIKI_QUESTION
    else:
        raise ValueError(f"corpus must be one of {BENCH_CORPORA}, got {corpus!r}.")
    return question, {s: build_context(passages, tokenizer, s) for s in lengths}


def check_pending(lengths: Sequence[int], contexts: dict[int, list[str]], limit: int | None) -> None:
    """Refuse a negative ``limit`` or a context length with no passages (before measuring)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    missing = [s for s in lengths if s not in contexts]
    if missing:
        raise ValueError(f"no context given for lengths {missing}.")


def engine_signature(engine: "RefragEngine") -> dict[str, Any]:
    """What a timing depends on in the engine: models, weights, dtype, device and threads (the
    part of a benchmark run's ``run.json`` signature every benchmark shares)."""
    import torch

    return {
        "decoder": engine.config.decoder,
        "decoder_fingerprint": engine.config.decoder_fingerprint,
        "encoder": engine.config.encoder,
        "dtype": str(cache_dtype(engine)).replace("torch.", ""),
        **weights_signature(engine),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
    }


def run_bench(
    engine: "RefragEngine",
    question: str,
    contexts: dict[int, list[str]],
    settings: BenchSettings,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    policy_factory: Callable[["RefragEngine"], Any] | None = None,
) -> dict[str, Any]:
    """Measure every pending setting, saving ``bench.json`` (and ``bench.md``) after each one.

    Finished settings are kept and skipped on a rerun with the same settings; ``limit`` measures
    at most that many new settings (a quick, resumable slice).

    Args:
        engine: the base engine (its decoder, encoder and dtype are used for every mode and k).
        question: the question of every request.
        contexts: passages per context length (``build_context``), one entry per length.
        settings: what to measure.
        out_dir: where ``run.json``, ``bench.json`` and ``bench.md`` go.
        limit: measure at most this many settings now.
        overwrite: discard results of a run with other settings in ``out_dir``.
        progress: show a progress bar.
        policy_factory: builds the expansion policy for p > 0 from an engine (default: the
            policy named in ``settings``, or the checkpoint's learned one for ``"learned"``).

    Returns:
        The results document (also in ``out_dir/bench.json``).

    Example:
        >>> ctx = {s: build_context(passages, engine.tokenizer, s) for s in (512, 1024)}   # doctest: +SKIP
        >>> doc = run_bench(engine, question, ctx, BenchSettings(lengths=(512, 1024)), "runs/bench")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    check_pending(settings.lengths, contexts, limit)
    out = Path(out_dir)
    signature = {
        **engine_signature(engine),
        "repeats": settings.repeats,
        "output_tokens": settings.output_tokens,
        "policy": settings.policy,
        "question": question,
        **settings.extra,
    }
    check_signature(out / SIGNATURE_FILE, signature, overwrite=overwrite)
    path = out / RESULTS_FILE
    doc = read_json(path) if path.is_file() and not overwrite else {}
    results: dict[str, dict[str, Any]] = {r["key"]: r for r in doc.get("results", [])}
    doc.update({
        "run": signature,
        "machine": machine_info(engine.device),
        "projector_trained": bool(engine.trained),
        "note": None if engine.trained else UNTRAINED_NOTE,
    })
    doc.setdefault("commands", [])
    doc["commands"].append(command_line())

    def factory(eng: "RefragEngine") -> Any:
        return policy_factory(eng) if policy_factory is not None else bench_policy(settings.policy, eng)

    todo = [s for s in settings.settings() if setting_key(*s) not in results]
    if limit is not None:
        todo = todo[:limit]
    engines: dict[int, "RefragEngine"] = {}
    if todo:
        # Process-wide warm-up (kernel selection, lazy buffers of decoder and encoder), so the
        # first setting measured does not carry one-time costs in its time or peak memory.
        warm = contexts[min(settings.lengths)]
        timed_request(engine, question, warm, "all", None, 2)
        timed_request(engine, question, warm, "none", None, 2)
        engine.forget_vectors(warm)
    bar = tqdm(todo, desc="refrag bench", unit="setting", disable=not progress)
    for mode, length, k, p in bar:
        key = setting_key(mode, length, k, p)
        bar.set_postfix_str(key)
        eng = engine if mode == "rag" else engines.setdefault(k, engine_for_k(engine, k))
        policy = factory(eng) if mode != "rag" and p else None
        load_before = load_average()
        row = measure(eng, mode, question, contexts[length], p, policy, settings.repeats, settings.output_tokens)
        row.update({
            "key": key, "mode": mode, "length": length, "k": k, "p": p,
            "load_average_before": load_before, "load_average_after": load_average(), "measured_at": now_iso(),
        })
        results[key] = row
        _save(doc, results, settings, out)
    doc = _save(doc, results, settings, out)
    write_bench_plots(doc, out)
    return doc


def write_bench_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``bench_speedup.png`` (at p = 0, else the smallest p measured) and ``bench_memory.png``,
    for whatever the results hold; returns the files written."""
    from .plots import plot_bench_memory, plot_bench_speedups

    out, written = Path(out_dir), []
    ps = sorted({r["p"] for r in doc.get("summary", [])})
    if ps:
        written.append(plot_bench_speedups(doc, out / "bench_speedup.png", p=ps[0]))
    if any(r["mode"] == "rag" for r in doc.get("results", [])):
        written.append(plot_bench_memory(doc, out / "bench_memory.png", p=ps[0] if ps else 0.0))
    return written


def _order(r: dict[str, Any]) -> tuple:
    return (r["length"], r["mode"] != "rag", r["k"] or 0, r["p"] or 0.0, MODES.index(r["mode"]))


def _save(doc: dict[str, Any], results: dict[str, dict[str, Any]], settings: BenchSettings, out: Path) -> dict[str, Any]:
    doc["results"] = sorted(results.values(), key=_order)
    doc["summary"] = summarize(doc["results"])
    doc["complete"] = all(setting_key(*s) in results for s in settings.settings())
    write_json(out / RESULTS_FILE, doc)
    (out / TABLE_FILE).write_text(markdown_table(doc), encoding="utf-8")
    return doc


# --------------------------------------------------------------------------- summary and table


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """REFRAG rows with their ratios against RAG at the same context length:
    TTFT / TTIT speed-up (RAG time / REFRAG time), throughput gain (REFRAG / RAG), KV-cache and
    peak-memory reduction (RAG / REFRAG)."""
    rag = {r["length"]: r for r in results if r["mode"] == "rag"}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows = []
    for r in results:
        base = rag.get(r["length"])
        if r["mode"] == "rag" or base is None:
            continue
        rows.append({
            "key": r["key"], "mode": r["mode"], "length": r["length"], "k": r["k"], "p": r["p"],
            "ttft_speedup": ratio(base["ttft_s"], r["ttft_s"]),
            "ttit_speedup": ratio(base["ttit_s"], r["ttit_s"]),
            "throughput_gain": ratio(r["throughput_tok_s"], base["throughput_tok_s"]),
            "kv_cache_reduction": ratio(base["kv_cache_mb"], r["kv_cache_mb"]),
            "peak_memory_reduction": ratio(base["peak_memory_mb"], r["peak_memory_mb"]),
        })
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown_table(doc: dict[str, Any]) -> str:
    """The benchmark as Markdown: the RAG baseline per length, then every REFRAG setting with its
    ratios to RAG. Numbers are exactly the measured ones, rounded for display."""
    results = doc.get("results", [])
    lines = []
    if doc.get("note"):
        lines += [f"> {doc['note']}", ""]
    lines += [
        "| mode | s | k | p | positions | context compression | TTFT ms | TTFT speed-up | TTIT ms | TTIT speed-up | "
        "tok/s | throughput gain | KV cache MB | KV reduction | peak mem MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {r["key"]: r for r in doc.get("summary") or summarize(results)}
    for r in results:
        q = ratios.get(r["key"], {})
        lines.append(
            f"| {r['mode']} | {r['length']} | {r['k'] if r['k'] is not None else '-'} | "
            f"{r['p'] if r['p'] is not None else '-'} | {r['positions']} | "
            f"{r['context_tokens'] / max(r['context_positions'], 1):.1f}x | {r['ttft_s'] * 1000:.1f} | "
            f"{_f(q.get('ttft_speedup'), '.2f')}{'x' if q.get('ttft_speedup') else ''} | "
            f"{r['ttit_s'] * 1000:.1f} | {_f(q.get('ttit_speedup'), '.2f')}{'x' if q.get('ttit_speedup') else ''} | "
            f"{r['throughput_tok_s']:.1f} | {_f(q.get('throughput_gain'), '.2f')}{'x' if q.get('throughput_gain') else ''} | "
            f"{r['kv_cache_mb']:.2f} | {_f(q.get('kv_cache_reduction'), '.1f')}{'x' if q.get('kv_cache_reduction') else ''} | "
            f"{_f(r.get('peak_memory_mb'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"
