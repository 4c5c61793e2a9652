"""``refrag bench``: TTFT, TTIT, throughput, peak memory and KV-cache size of REFRAG (cached and
not cached) against full-context RAG, on one decoder, in one resumable run. ``refrag bench`` is a
group: run alone it is that benchmark; its subcommands (``refrag bench encoders``) are registered
in :mod:`refrag_integrations.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from ..config import DEFAULT_DATA_DIR
from ..evaluation.config import (
    BENCH_CORPORA,
    BENCH_POLICY,
    DEFAULT_BENCH_DIR,
    DEFAULT_DOC,
    DEFAULT_PPL_DIR,
    DEFAULT_QA_DIR,
)
from .common import (
    BACKEND_HELP,
    BASE_URL_HELP,
    DECODER_DTYPE_HELP,
    DEPRECATED_P_HELP,
    check_backend,
    check_decoder_dtype,
    connect_backend,
    renamed_option,
)

T = TypeVar("T")


def parse_list(value: Optional[str], cast: Callable[[str], T], name: str) -> Optional[tuple[T, ...]]:
    """Parse ``"512,1024"`` into ``(512, 1024)``; None stays None."""
    if value is None:
        return None
    try:
        items = tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError as err:
        raise typer.BadParameter(f"{name} must be a comma-separated list of numbers, got {value!r}.") from err
    if not items:
        raise typer.BadParameter(f"{name} is empty.")
    return items


def set_threads(threads: Optional[int]) -> None:
    """``--threads``: fix torch's CPU thread count (None: leave torch's default)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}.")
        torch.set_num_threads(threads)


def load_engine(checkpoint: Optional[str], bf16: bool, threads: Optional[int], device: Optional[str],
                decoder_dtype: str = "float32", **models: Any):
    """Build the engine for a benchmark or evaluation, with the thread count fixed first.

    ``models``: base models and settings for ``RefragEngine.from_pretrained`` (``decoder``,
    ``encoder``, ``chunk_size``, ``chunk_context``), e.g. one option of ``refrag bench encoders``.
    """
    import torch

    from ..engine import RefragEngine

    set_threads(threads)
    return RefragEngine.from_pretrained(checkpoint, autocast_dtype=torch.bfloat16 if bf16 else None, device=device,
                                        decoder_dtype=decoder_dtype, **models)


def warn_if_busy() -> None:
    """Say so when other work is loading the machine: timings will be noisy."""
    import os

    from ..evaluation.runs import load_average

    load, cores = load_average(), os.cpu_count() or 1
    if load and load[0] > cores / 2:
        typer.echo(f"warning: 1-minute load average {load[0]:.1f} on {cores} cores: other work is running, "
                   "timings will be noisy. Benchmark on a quiet machine.", err=True)


app = typer.Typer(
    help="Measure REFRAG's speed and memory against full-context RAG on the same decoder; "
         "`refrag bench encoders`: what each chunk-encoder option costs at index and query time.",
)


def no_options_before_subcommand(ctx: typer.Context) -> None:
    """Refuse ``refrag bench --opt encoders``: the group's own options do not reach a subcommand."""
    # By name: typer may bring its own copy of click, whose ParameterSource is another enum.
    sources = {p.opts[0]: ctx.get_parameter_source(p.name) for p in ctx.command.params}
    given = [opt for opt, src in sources.items() if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of `refrag bench` itself, not of "
            f"`refrag bench {ctx.invoked_subcommand}`; give the subcommand's options after its name."
        )


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    lengths: Optional[str] = typer.Option(None, help="Context lengths in tokens, comma-separated (default 512,1024,2048,4096,8192)."),
    k: Optional[str] = typer.Option(None, "--k", help="Compression rates k, comma-separated (default 8,16,32)."),
    expand_fraction: Optional[str] = typer.Option(None, "--expand-fraction", help="Expand fractions p, comma-separated (default 0,0.1,0.25)."),
    p: Optional[str] = typer.Option(None, "--p", hidden=True, help=DEPRECATED_P_HELP),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats per setting, median reported (default 3)."),
    output_tokens: Optional[int] = typer.Option(None, help="Tokens decoded per request for TTIT/throughput (default 32)."),
    policy: str = typer.Option(BENCH_POLICY, help="Expansion policy for p > 0: relevance, random, or learned (checkpoint's)."),
    corpus: str = typer.Option("nq", help=f"Context text: {' or '.join(BENCH_CORPORA)} (NQ gold passages / Wikipedia)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint (default: the packaged one, if any; 'none': base models, untrained projector)."),
    out: Path = typer.Option(Path(DEFAULT_BENCH_DIR), help="Results directory (bench.json, bench.md, PNGs)."),
    limit: Optional[int] = typer.Option(None, help="Measure at most this many new settings now (rerun to continue)."),
    quick: bool = typer.Option(False, help="Small defaults: lengths 512,1024, k=16, p=0, 1 repeat, 8 output tokens."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder (both RAG and REFRAG)."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help=DECODER_DTYPE_HELP, callback=check_decoder_dtype),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    overwrite: bool = typer.Option(False, help="Discard results in --out made with other settings."),
    docs: Optional[Path] = typer.Option(None, help=f"Also rewrite this Markdown page from the results (e.g. {DEFAULT_DOC})."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    backend: str = typer.Option("transformers", "--backend", help=BACKEND_HELP + " Memory columns are this process's."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    concurrency: Optional[str] = typer.Option(
        None, help="Measure throughput instead: requests/s, output tokens/s and latency percentiles with this many "
        "concurrent requests, comma-separated (e.g. 1,4,16). Defaults then: lengths 4096, the checkpoint's k, "
        "p 0,0.25, 4 requests per concurrent client (--repeats). Writes throughput.json / throughput.md in --out; "
        "run once per --backend into the same --out to compare them.",
    ),
) -> None:
    """Measure REFRAG's speed and memory against full-context RAG on the same decoder
    (with --concurrency: throughput under concurrent requests)."""
    if ctx.invoked_subcommand is not None:
        no_options_before_subcommand(ctx)
        return
    from ..evaluation.bench import BenchSettings, bench_contexts, run_bench
    from ..evaluation.config import (
        BENCH_KS,
        BENCH_LENGTHS,
        BENCH_OUTPUT_TOKENS,
        BENCH_PS,
        BENCH_QUICK,
        BENCH_REPEATS,
    )

    if corpus not in BENCH_CORPORA:
        raise typer.BadParameter(f"--corpus must be one of {BENCH_CORPORA}, got {corpus!r}.")
    if policy not in ("relevance", "random", "learned"):
        raise typer.BadParameter(f"--policy must be relevance, random or learned, got {policy!r}.")
    if concurrency is not None:
        return bench_throughput(
            parse_list(concurrency, int, "--concurrency"), lengths=parse_list(lengths, int, "--lengths"),
            ks=parse_list(k, int, "--k"),
            ps=parse_list(renamed_option(expand_fraction, p, "--expand-fraction", "--p", None), float, "--expand-fraction"),
            repeats=repeats, output_tokens=output_tokens, policy=policy, corpus=corpus, data_dir=data_dir,
            checkpoint=checkpoint, out=out, limit=limit, quick=quick, bf16=bf16, decoder_dtype=decoder_dtype,
            threads=threads, device=device, overwrite=overwrite, docs=docs, progress=progress, backend=backend,
            base_url=base_url,
        )
    base = BENCH_QUICK if quick else {
        "lengths": BENCH_LENGTHS, "ks": BENCH_KS, "ps": BENCH_PS, "repeats": BENCH_REPEATS,
        "output_tokens": BENCH_OUTPUT_TOKENS,
    }
    try:
        settings = BenchSettings(
            lengths=parse_list(lengths, int, "--lengths") or base["lengths"],
            ks=parse_list(k, int, "--k") or base["ks"],
            ps=parse_list(renamed_option(expand_fraction, p, "--expand-fraction", "--p", None), float,
                          "--expand-fraction") or base["ps"],
            repeats=repeats if repeats is not None else base["repeats"],
            output_tokens=output_tokens if output_tokens is not None else base["output_tokens"],
            policy=policy,
            # The backend joins the signature only when it is not the default (older results stay valid).
            extra={"corpus": corpus, **({"backend": backend, "base_url": base_url} if backend != "transformers" else {})},
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    decoder_backend = check_backend(backend, base_url)
    warn_if_busy()
    engine = load_engine(checkpoint, bf16, threads, device, decoder_dtype)
    connect_backend(engine, decoder_backend)
    from ..evaluation.bench import learned_policy

    if policy == "learned" and learned_policy(engine) is None:
        raise typer.BadParameter("--policy learned needs a checkpoint with a learned expansion policy.")
    question, contexts = bench_contexts(engine.tokenizer, settings.lengths, corpus, data_dir)
    try:
        doc = run_bench(engine, question, contexts, settings, out, limit=limit, overwrite=overwrite, progress=progress)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo((out / "bench.md").read_text(encoding="utf-8"))
    done = len(doc["results"])
    typer.echo(f"{done} settings in {out / 'bench.json'}" + ("" if doc["complete"] else " (incomplete: rerun to continue)"))
    if docs is not None:
        from ..evaluation.report import write_benchmarks_doc

        typer.echo(f"wrote {write_benchmarks_doc(out, DEFAULT_QA_DIR, DEFAULT_PPL_DIR, docs)}")


def bench_throughput(
    concurrency: tuple[int, ...], *, lengths: Optional[tuple[int, ...]], ks: Optional[tuple[int, ...]],
    ps: Optional[tuple[float, ...]], repeats: Optional[int], output_tokens: Optional[int], policy: str, corpus: str,
    data_dir: Path, checkpoint: Optional[str], out: Path, limit: Optional[int], quick: bool, bf16: bool,
    decoder_dtype: str, threads: Optional[int], device: Optional[str], overwrite: bool, docs: Optional[Path],
    progress: bool, backend: str, base_url: Optional[str],
) -> None:
    """``refrag bench --concurrency``: throughput of concurrent requests on one backend
    (:mod:`refrag_integrations.evaluation.throughput`)."""
    from ..evaluation.bench import bench_contexts
    from ..evaluation.config import (
        BENCH_OUTPUT_TOKENS,
        THROUGHPUT_LENGTHS,
        THROUGHPUT_PS,
        THROUGHPUT_QUICK,
        THROUGHPUT_REQUESTS_PER_CLIENT,
    )
    from ..evaluation.throughput import RESULTS_FILE, TABLE_FILE, ThroughputSettings, run_throughput

    base = THROUGHPUT_QUICK if quick else {
        "lengths": THROUGHPUT_LENGTHS, "ps": THROUGHPUT_PS, "repeats": THROUGHPUT_REQUESTS_PER_CLIENT,
        "output_tokens": BENCH_OUTPUT_TOKENS,
    }
    try:
        settings = ThroughputSettings(
            concurrency=concurrency, lengths=lengths or base["lengths"], ks=ks, ps=ps or base["ps"],
            requests_per_client=repeats if repeats is not None else base["repeats"],
            output_tokens=output_tokens if output_tokens is not None else base["output_tokens"],
            policy=policy, extra={"corpus": corpus},
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    decoder_backend = check_backend(backend, base_url)
    warn_if_busy()
    engine = load_engine(checkpoint, bf16, threads, device, decoder_dtype)
    connect_backend(engine, decoder_backend)
    question, contexts = bench_contexts(engine.tokenizer, settings.lengths, corpus, data_dir)
    try:
        doc = run_throughput(engine, question, contexts, settings, out, limit=limit, overwrite=overwrite,
                             progress=progress)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo((out / TABLE_FILE).read_text(encoding="utf-8"))
    typer.echo(f"{len(doc['results'])} settings in {out / RESULTS_FILE}"
               + ("" if doc["complete_for_backend"] else " (incomplete for this backend: rerun to continue)"))
    if docs is not None:
        from ..evaluation.config import DEFAULT_PPL_DIR, DEFAULT_QA_DIR
        from ..evaluation.report import write_benchmarks_doc

        typer.echo(f"wrote {write_benchmarks_doc(out, DEFAULT_QA_DIR, DEFAULT_PPL_DIR, docs)}")
