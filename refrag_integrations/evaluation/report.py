"""Write ``docs/benchmarks.md`` from the result directories of ``refrag bench``,
``refrag bench encoders`` and ``refrag eval qa|ppl``: the machine, the exact commands, the tables
and the plots. Every number in the document is read from the results files, never typed in.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .config import DEFAULT_BENCH_DIR, DEFAULT_DOC, DEFAULT_ENCODER_BENCH_DIR, DEFAULT_PPL_DIR, DEFAULT_QA_DIR
from .runs import now_iso, read_json

DEFINITIONS = """\
## What is measured

- **Same decoder, same dtype, same threads, one run.** *rag* is ordinary full-context RAG (every
  chunk expanded, through the same engine code path); *cached* is REFRAG with chunk vectors
  precomputed (as after indexing); *not cached* is REFRAG encoding the chunks at query time.
  Passages are pre-tokenised in every mode.
- **TTFT**: request start to first token (prompt assembly, policy, any query-time encoding,
  prefill, first-token pick; device synchronised; model loading excluded). Median of the timed
  repeats after one untimed warm-up request.
- **TTIT**: median time per next token (KV cache in use). **Throughput**: output tokens / request
  time, batch 1, fixed output length (EOS ignored).
- **Peak memory**: the process's resident-memory high-water mark during the warm-up request above
  what it held before (CUDA: `max_memory_allocated`). **KV cache**: positions x layers x 2 x
  kv_heads x head_dim x bytes after prefill. **Context compression**: context tokens / positions
  the context takes (about k at p = 0); **KV reduction** also counts the instruction, passage
  labels and question, which stay tokens.
- **QA**: NQ-open eval split (lines 2001-2655), N passages = gold + N-1 other questions' gold
  passages (gold at a random position, fixed seed) unless retrieved; Match (normalised gold
  inside the normalised answer), EM, F1 (SQuAD normalisation), bootstrap 95% CIs; REFRAG TTFT with
  precomputed chunk vectors. Prompts are the engine's own (`RefragEngine.generate`).
- **Drop control** (`refrag eval qa --control drop`): for every selective REFRAG row
  `refrag_<policy>_p<p>`, a row `drop_<policy>_p<p>` that keeps the same expanded chunks (the REFRAG
  row's own decisions for that question) as tokens, in order inside their passages, and deletes the
  unexpanded chunks instead of compressing them (a passage with nothing kept is left out); same
  decoder and generation. REFRAG - drop (Match, paired bootstrap 95% CI over the same questions) is
  what the compressed positions add. Rerunning an existing results directory with `--control drop`
  answers only the drop rows (REFRAG records older than the recorded decisions get them from the
  same policy and seed again, checked against their recorded counts).
- **Blank control** (`--control drop,blank`): a row `blank_<policy>_p<p>` with the REFRAG row's
  decisions and positions, every compressed chunk given the same content-free vector (the mean
  pre-projection chunk vector of the first 64 evaluated questions' gold passages). REFRAG - blank
  is what the chunk vectors' content adds beyond filling positions; blank - drop is what the
  positions alone add.
- **Perplexity**: mean NLL (nats) of o held-out continuation tokens after s context tokens given
  as nothing, as tokens, or as REFRAG chunk vectors (WikiText-2 test).
- An **untrained projector** makes compressed chunks noise: REFRAG *quality* numbers mean nothing
  until a trained checkpoint is evaluated (each section says which). Latency does not depend on
  the weights.
"""

# The target the issue sets for the CPU benchmark (checked, never assumed).
TARGET = {"mode": "cached", "k": 16, "p": 0.0, "length": 4096, "min_ttft_speedup": 10.0}


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine a run was measured on, as Markdown list items."""
    keys = ("cpu", "cpu_cores", "memory_gb", "device", "gpu", "torch", "torch_threads", "os", "python")
    return [f"- {k.replace('_', ' ')}: {machine[k]}" for k in keys if machine.get(k) is not None]


def command_block(cmds: list[str]) -> list[str]:
    """The commands of a run as a fenced bash block."""
    return ["```bash", *cmds, "```"] if cmds else ["(no command recorded)"]


def load_range(results: list[dict[str, Any]]) -> str | None:
    """The 1-minute load average range recorded around the measurements ("0.50 to 1.20"), if any."""
    loads = [x for r in results for x in (r.get("load_average_before"), r.get("load_average_after")) if x]
    if not loads:
        return None
    one = [x[0] for x in loads]
    return f"{min(one):.2f} to {max(one):.2f}"


def target_check(doc: dict[str, Any]) -> list[str]:
    """Sentences that state, from the measured numbers, whether the speed-up target is met."""
    t = TARGET
    rows = {(r["mode"], r["k"], r["p"], r["length"]): r for r in doc.get("summary", [])}
    at = rows.get((t["mode"], t["k"], t["p"], t["length"]))
    if at is None or at.get("ttft_speedup") is None:
        return [f"Target (k={t['k']}, p={t['p']:g}, cached, {t['length']} context tokens, TTFT speed-up >= "
                f"{t['min_ttft_speedup']:g}x): not measured in this run."]
    verdict = "met" if at["ttft_speedup"] >= t["min_ttft_speedup"] else "NOT met"
    series = sorted((r["length"], r["ttft_speedup"]) for (m, k, p, _), r in rows.items()
                    if (m, k, p) == (t["mode"], t["k"], t["p"]) and r.get("ttft_speedup"))
    grows = all(b[1] >= a[1] for a, b in zip(series, series[1:]))
    return [
        f"Target (k={t['k']}, p={t['p']:g}, cached, {t['length']} context tokens): TTFT speed-up "
        f"{at['ttft_speedup']:.2f}x (target >= {t['min_ttft_speedup']:g}x: {verdict}); KV cache "
        f"{at['kv_cache_reduction']:.1f}x smaller.",
        "Speed-up by context length: " + ", ".join(f"{s}: {v:.2f}x" for s, v in series)
        + (" (grows with length)." if grows else " (does not grow monotonically in this run)."),
    ]


def throughput_section(doc: dict[str, Any]) -> list[str]:
    """The benchmark page's section for ``refrag bench --concurrency`` results."""
    from .throughput import markdown_table, target_lines

    run = doc.get("run", {})
    lines = ["## Throughput under concurrent requests (`refrag bench --concurrency`)", ""]
    for backend, machine in sorted(doc.get("machines", {}).items()):
        lines += [f"Machine of the `{backend}` run (the client; a vLLM server may run elsewhere):", "",
                  *machine_lines(machine), ""]
    lines += [f"Decoder `{run.get('decoder')}`, dtype {run.get('dtype')}, {run.get('threads')} torch threads (client), "
              f"{run.get('requests_per_client')} timed requests per concurrent client after one untimed round, "
              f"{run.get('output_tokens')} output tokens per request (EOS ignored), expansion policy for p > 0: "
              f"{run.get('policy')}, contexts from {run.get('corpus', 'the given passages')}. Requests/s and output "
              "tokens/s over the wall time of all timed requests; latency from a request's start (assembly "
              "included) to its last token; rows/batch: the in-process micro-batcher's mean batch.", ""]
    load = load_range(doc.get("results", []))
    if load:
        lines += [f"1-minute load average during the run: {load}.", ""]
    lines += ["Commands:", "", *command_block(doc.get("commands", [])), ""]
    lines += ["Targets (issue 17):", "", *target_lines(doc), ""]
    lines += [markdown_table(doc), ""]
    return lines


def write_benchmarks_doc(
    bench_dir: str | Path = DEFAULT_BENCH_DIR,
    qa_dir: str | Path = DEFAULT_QA_DIR,
    ppl_dir: str | Path = DEFAULT_PPL_DIR,
    out: str | Path = DEFAULT_DOC,
    label: str | None = None,
    encoders_dir: str | Path = DEFAULT_ENCODER_BENCH_DIR,
) -> Path:
    """Assemble the benchmark document from whichever result directories exist.

    Args:
        bench_dir, qa_dir, ppl_dir: result directories of the three commands.
        encoders_dir: results of ``refrag bench encoders`` (its section follows the latency one).
        out: the Markdown file to write; plots are copied next to it into ``<stem>/``.
        label: a line put at the top (e.g. "quick runs on a loaded machine: timings are noisy").

    Example:
        >>> write_benchmarks_doc("runs/bench", "runs/eval-qa", "runs/eval-ppl", "docs/benchmarks.md")  # doctest: +SKIP
    """
    from .bench import RESULTS_FILE, write_bench_plots

    out = Path(out)
    img_dir = out.parent / out.stem
    img_dir.mkdir(parents=True, exist_ok=True)
    rel = img_dir.name
    lines = [
        "# Benchmarks and evaluation",
        "",
        f"Generated by `refrag eval report` on {now_iso()} from the result files; every number below is "
        "exactly what the commands printed and saved. Regenerate everything with `make benchmarks` "
        "(runs the benchmark and evaluation commands, then this report) or only this page with `make bench-docs`.",
        "",
    ]
    if label:
        lines += [f"**{label}**", ""]
    lines += [DEFINITIONS]
    found = False

    bench_json = Path(bench_dir) / RESULTS_FILE
    if bench_json.is_file():
        found = True
        doc = read_json(bench_json)
        from .bench import markdown_table

        lines += ["## Latency and memory (`refrag bench`)", "", "Machine:", "", *machine_lines(doc.get("machine", {})), ""]
        run = doc.get("run", {})
        lines += [f"Decoder `{run.get('decoder')}`, dtype {run.get('dtype')}, {run.get('threads')} threads, "
                  f"{run.get('repeats')} timed repeats (median) after one warm-up, {run.get('output_tokens')} output "
                  f"tokens per request, expansion policy for p > 0: {run.get('policy')}, contexts from "
                  f"{run.get('corpus', 'the given passages')}.", ""]
        load = load_range(doc.get("results", []))
        status = "complete" if doc.get("complete") else "PARTIAL (not every setting measured)"
        lines += [f"Status: {status}." + (f" 1-minute load average during the run: {load}." if load else ""), ""]
        lines += ["Commands:", "", *command_block(doc.get("commands", [])), ""]
        lines += target_check(doc) + [""]
        lines += [markdown_table(doc), ""]
        for name in write_bench_plots(doc, img_dir):
            lines += [f"![{name.stem}]({rel}/{name.name})", ""]

    from .encoder_cost import RESULTS_FILE as ENCODERS_FILE, encoders_section

    if (Path(encoders_dir) / ENCODERS_FILE).is_file():
        found = True
        lines += [encoders_section(read_json(Path(encoders_dir) / ENCODERS_FILE)), ""]

    from .throughput import RESULTS_FILE as THROUGHPUT_RESULTS_FILE

    throughput_json = Path(bench_dir) / THROUGHPUT_RESULTS_FILE
    if throughput_json.is_file():
        found = True
        lines += throughput_section(read_json(throughput_json))

    for title, sub, summary_name, table_name, plot_name in (
        ("Question answering (`refrag eval qa`)", qa_dir, "summary.json", "summary.md", "qa_tradeoff.png"),
        ("Perplexity (`refrag eval ppl`)", ppl_dir, "summary.json", "summary.md", "ppl.png"),
    ):
        d = Path(sub)
        if not (d / summary_name).is_file():
            continue
        found = True
        doc = read_json(d / summary_name)
        run = doc.get("run", {})
        lines += [f"## {title}", "", "Machine:", "", *machine_lines(doc.get("machine", {})), ""]
        lines += ["Run: " + ", ".join(f"{k} = {v}" for k, v in run.items() if k != "decoder_fingerprint"), ""]
        lines += ["Commands:", "", *command_block(doc.get("commands", [])), ""]
        lines += [(d / table_name).read_text(encoding="utf-8"), ""]
        if (d / plot_name).is_file():
            target = img_dir / f"{d.name}-{plot_name}"
            shutil.copyfile(d / plot_name, target)
            lines += [f"![{plot_name}]({rel}/{target.name})", ""]
    if not found:
        raise ValueError(
            f"no results found in {bench_dir}, {encoders_dir}, {qa_dir} or {ppl_dir}; run `refrag bench` / "
            "`refrag bench encoders` / `refrag eval qa|ppl` first."
        )
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out
