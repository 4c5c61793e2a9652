"""``refrag eval qa|ppl|capacity|report``: answer quality with N passages, held-out log-perplexity,
the chunk-vector capacity probe, and the benchmark page built from the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..config import DEFAULT_DATA_DIR
from ..evaluation.config import (
    DEFAULT_BENCH_DIR,
    DEFAULT_CAPACITY_DIR,
    DEFAULT_DOC,
    DEFAULT_ENCODER_BENCH_DIR,
    DEFAULT_LAYER_PROBE_DIR,
    DEFAULT_PPL_DIR,
    DEFAULT_QA_DIR,
    PPL_CONTEXT_TOKENS,
    PPL_CONTINUATION_TOKENS,
    PPL_WINDOWS,
    QA_MAX_NEW_TOKENS,
    QA_SEED,
)
from .bench import load_engine, parse_list
from .common import (
    BACKEND_HELP,
    BASE_URL_HELP,
    DECODER_DTYPE_HELP,
    DEPRECATED_P_HELP,
    EXPAND_FRACTIONS_HELP,
    check_backend,
    check_decoder_dtype,
    connect_backend,
    renamed_option,
)

app = typer.Typer(help="Evaluate answer quality (qa), perplexity (ppl), chunk-vector capacity (capacity), and write the "
                       "benchmark page (report).",
                  no_args_is_help=True)


def _show(table: Path, plot: Optional[Path]) -> None:
    """Print a finished run's Markdown table and where its plot is."""
    typer.echo(table.read_text(encoding="utf-8"))
    if plot is not None:
        typer.echo(f"plot: {plot}")


@app.command("qa")
def qa(
    data: Optional[Path] = typer.Option(None, help="QA JSONL(.gz) in NQ-open shape (default: the shared NQ-open file)."),
    split: Optional[str] = typer.Option(None, help="train, eval or all (default: eval for the shared NQ file, else all)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory."),
    n: str = typer.Option("1,5,10,20", "--n", help="Passage counts N, comma-separated."),
    policies: str = typer.Option("relevance,random", help="Selective expansion policies for p > 0: relevance, random, perplexity-desc (a checkpoint's learned policy is added)."),
    learned_policy_opt: Optional[list[str]] = typer.Option(
        None, "--learned-policy",
        help="NAME=CHECKPOINT: also evaluate another checkpoint's learned policy (same encoder weights, e.g. "
             "a policy run's checkpoint-chunks) as setting refrag_learned-NAME_pP. Repeatable."),
    expand_fraction: Optional[str] = typer.Option(None, "--expand-fraction", help=f"{EXPAND_FRACTIONS_HELP} [default: 0,0.1,0.25]"),
    p: Optional[str] = typer.Option(None, "--p", hidden=True, help=DEPRECATED_P_HELP),
    control: Optional[str] = typer.Option(
        None, help="Controls, comma-separated. 'drop': add a drop_<policy>_pP row per selective REFRAG row, with the "
                   "same expanded chunks as tokens and the unexpanded chunks deleted instead of compressed; 'blank': a "
                   "blank_<policy>_pP row with the same decisions and positions, every compressed chunk given one "
                   "content-free vector (REFRAG minus each control is reported)."),
    retrieval: str = typer.Option("distractors", help="'distractors' (gold + other questions' gold passages) or 'chroma' (top-N retrieved)."),
    index_dir: Optional[Path] = typer.Option(None, help="Chroma directory for --retrieval chroma (default: <out>/chroma)."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint to evaluate (default: the packaged one, if any; 'none': base models, untrained projector)."),
    limit: Optional[int] = typer.Option(None, help="Answer only the first N questions (rerun with a larger limit to extend)."),
    max_new_tokens: int = typer.Option(QA_MAX_NEW_TOKENS, help="Answer length limit (greedy)."),
    seed: int = typer.Option(QA_SEED, help="Seed of distractors, gold position and the random policy."),
    out: Path = typer.Option(Path(DEFAULT_QA_DIR), help="Results directory."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help=DECODER_DTYPE_HELP, callback=check_decoder_dtype),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Start over even if --out holds a run with other settings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    backend: str = typer.Option("transformers", "--backend", help=BACKEND_HELP),
    base_url: Optional[str] = typer.Option(None, "--base-url", help=BASE_URL_HELP),
) -> None:
    """QA with N passages: closed-book, full-context RAG, REFRAG per policy and p.

    Match, EM, F1 with bootstrap 95% CIs, TTFT per setting, an accuracy-vs-TTFT plot and the
    equal-latency comparison; with --control drop,blank, REFRAG minus each control. Resumable per
    answer.
    """
    from ..evaluation.bench import learned_policy
    from ..evaluation.data import load_qa, nq_path
    from ..evaluation.qa import (
        EXTRA_POLICY_PREFIX, PLOT_FILE, TABLE_FILE, check_controls, load_extra_policy, qa_settings, run_qa,
    )

    if retrieval not in ("distractors", "chroma"):
        raise typer.BadParameter(f"--retrieval must be 'distractors' or 'chroma', got {retrieval!r}.")
    decoder_backend = check_backend(backend, base_url)
    try:  # before any model loads
        controls = check_controls([c.strip() for c in control.split(",") if c.strip()] if control is not None else [])
    except ValueError as err:
        raise typer.BadParameter(f"--control: {err}") from err
    path = data if data is not None else nq_path(data_dir)
    split = split or ("eval" if data is None else "all")
    try:
        examples = load_qa(path, split)
        ns = parse_list(n, int, "--n")
        names = [x.strip() for x in policies.split(",") if x.strip()]
        engine = load_engine(checkpoint, bf16, threads, device, decoder_dtype)
        connect_backend(engine, decoder_backend)
        if learned_policy(engine) is not None and "learned" not in names:
            names.append("learned")
        extra = {}
        for spec in learned_policy_opt or []:
            name, sep, path_ = spec.partition("=")
            if not sep or not name.strip() or not path_.strip():
                raise ValueError(f"--learned-policy takes NAME=CHECKPOINT, got {spec!r}.")
            extra[name.strip()] = load_extra_policy(engine, path_.strip())
            names.append(EXTRA_POLICY_PREFIX + name.strip())
        fractions = renamed_option(expand_fraction, p, "--expand-fraction", "--p", "0,0.1,0.25")
        settings = qa_settings(names, parse_list(fractions, float, "--expand-fraction"), controls)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    retrieve = None
    if retrieval == "chroma":
        from ..evaluation.retrieval import ChromaRetriever

        # The retrieval corpus is every gold passage of the file (train and eval), as agreed.
        corpus = [e.passage for e in load_qa(path, "all")]
        retriever = ChromaRetriever(corpus, index_dir or out / "chroma", progress=progress)
        retrieve = retriever.search
    try:
        doc = run_qa(
            engine, examples, out, ns=ns, settings=settings, limit=limit, max_new_tokens=max_new_tokens, seed=seed,
            retrieve=retrieve, overwrite=overwrite, progress=progress, extra_policies=extra,
            signature={"data": str(path), "split": split, "checkpoint": checkpoint,
                       **({"learned_policies": sorted(learned_policy_opt)} if learned_policy_opt else {})},
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    _show(out / TABLE_FILE, out / PLOT_FILE if doc["rows"] else None)


@app.command("ppl")
def ppl(
    data: Optional[Path] = typer.Option(None, help="Held-out text file (default: the shared wikitext2-test.txt)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory."),
    context_tokens: int = typer.Option(PPL_CONTEXT_TOKENS, help="s: context tokens per window."),
    continuation_tokens: int = typer.Option(PPL_CONTINUATION_TOKENS, help="o: continuation tokens scored per window."),
    k: str = typer.Option("8,16,32", "--k", help="Compression rates k, comma-separated."),
    expand_fraction: Optional[str] = typer.Option(None, "--expand-fraction", help="Expand fractions p (random chunks expanded), comma-separated. [default: 0]"),
    p: Optional[str] = typer.Option(None, "--p", hidden=True, help=DEPRECATED_P_HELP),
    limit: int = typer.Option(PPL_WINDOWS, help="Windows scored (rerun with a larger limit to extend)."),
    seed: int = typer.Option(0, help="Seed of the random expansion for p > 0."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint to evaluate (default: the packaged one, if any; 'none': base models, untrained projector)."),
    out: Path = typer.Option(Path(DEFAULT_PPL_DIR), help="Results directory."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help=DECODER_DTYPE_HELP, callback=check_decoder_dtype),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Start over even if --out holds a run with other settings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Held-out log-perplexity: no context, full context, REFRAG-compressed context per k.

    Resumable per window.
    """
    from ..evaluation.config import WIKITEXT_TEST
    from ..evaluation.data import heldout_windows
    from ..evaluation.ppl import PLOT_FILE, TABLE_FILE, run_ppl

    path = data if data is not None else data_dir / WIKITEXT_TEST
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist; pass --data or --data-dir.")
    try:
        engine = load_engine(checkpoint, bf16, threads, device, decoder_dtype)
        windows = heldout_windows(path.read_text(encoding="utf-8"), engine.tokenizer, context_tokens,
                                  continuation_tokens, limit=limit)
        doc = run_ppl(
            engine, windows, out, ks=parse_list(k, int, "--k"),
            ps=parse_list(renamed_option(expand_fraction, p, "--expand-fraction", "--p", "0"), float, "--expand-fraction"),
            seed=seed,
            signature={"data": str(path), "context_tokens": context_tokens,
                       "continuation_tokens": continuation_tokens, "checkpoint": checkpoint},
            overwrite=overwrite, progress=progress,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    _show(out / TABLE_FILE, out / PLOT_FILE if doc["rows"] else None)


def probe_inputs(
    data: Optional[Path], data_dir: Path, split: Optional[str], limit: int, checkpoint: Optional[str], bf16: bool,
    threads: Optional[int], device: Optional[str],
) -> tuple[list, Any, dict[str, Any]]:
    """What `refrag eval capacity` and `refrag eval layers` start from: the first ``limit`` QA
    examples (the shared NQ file's eval split by default), the engine, and the signature part
    naming them.

    Raises:
        ValueError / FileNotFoundError: bad data file or split, or a checkpoint that cannot load.
    """
    from ..evaluation.data import load_qa, nq_path

    path = data if data is not None else nq_path(data_dir)
    split = split or ("eval" if data is None else "all")
    examples = load_qa(path, split)[:limit]
    engine = load_engine(checkpoint, bf16, threads, device)
    return examples, engine, {"data": str(path), "split": split, "checkpoint": checkpoint, "bf16": bf16}


@app.command("capacity")
def capacity(
    data: Optional[Path] = typer.Option(None, help="QA JSONL(.gz) in NQ-open shape (default: the shared NQ-open file)."),
    split: Optional[str] = typer.Option(None, help="train, eval or all (default: eval for the shared NQ file, else all)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory."),
    limit: int = typer.Option(20, help="Probe the first N questions (rerun with a larger limit to extend)."),
    steps: int = typer.Option(150, help="Adam steps fitting each passage's chunk vectors."),
    lr: float = typer.Option(0.05, help="Adam learning rate of the fit."),
    init: str = typer.Option("mean", help="Start of the fit: 'mean' (each chunk's mean token embedding) or 'encoder' (the checkpoint's chunk vectors)."),
    max_new_tokens: int = typer.Option(24, help="Answer length limit (greedy)."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint (default: the packaged one; 'none': base models). Only its decoder and chunking matter, and 'encoder_p0' shows its own vectors."),
    out: Path = typer.Option(Path(DEFAULT_CAPACITY_DIR), help="Results directory."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Start over even if --out holds a run with other settings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Oracle probe: fit free chunk vectors to reconstruct each gold passage, then answer from them.

    Tells whether this decoder can read a passage's entities from one vector per chunk at all
    (the bound on any encoder trained by reconstruction), next to closed book, full context and
    the checkpoint's own vectors. Resumable per question. See docs/training.md.
    """
    from ..evaluation.capacity import TABLE_FILE, run_capacity

    if limit < 1 or steps < 1 or not lr > 0 or max_new_tokens < 1:
        raise typer.BadParameter(f"--limit, --steps and --max-new-tokens must be >= 1 and --lr > 0 "
                                 f"(got {limit}, {steps}, {max_new_tokens}, {lr}).")
    if init not in ("mean", "encoder"):
        raise typer.BadParameter(f"--init must be 'mean' or 'encoder', got {init!r}.")
    try:
        examples, engine, signature = probe_inputs(data, data_dir, split, limit, checkpoint, bf16, threads, device)
        run_capacity(engine, examples, out, steps=steps, lr=lr, init=init, max_new_tokens=max_new_tokens,
                     signature=signature, overwrite=overwrite, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    _show(out / TABLE_FILE, None)


@app.command("layers")
def layers(
    data: Optional[Path] = typer.Option(None, help="QA JSONL(.gz) in NQ-open shape (default: the shared NQ-open file)."),
    split: Optional[str] = typer.Option(None, help="train, eval or all (default: eval for the shared NQ file, else all)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory."),
    limit: int = typer.Option(40, help="Probe the first N questions (rerun with a larger limit to extend)."),
    layer: Optional[str] = typer.Option(None, "--layers", help="Decoder layers L whose hidden states summarise each chunk and receive it, comma-separated (default 2,4,8,12,16,20,24)."),
    max_new_tokens: int = typer.Option(QA_MAX_NEW_TOKENS, help="Answer length limit (greedy)."),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint (default: the packaged one; 'none': base models). Its decoder and chunking are probed; 'encoder_p0' shows its own vectors."),
    out: Path = typer.Option(Path(DEFAULT_LAYER_PROBE_DIR), help="Results directory."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Start over even if --out holds a run with other settings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Probe, no training: can the decoder read chunks summarised from its own hidden states?

    Each chunk of the gold passage becomes the mean of its tokens' states at layer L, put into the
    compressed prompt's residual stream at layer L; answer NLL and Match next to closed book, full context,
    the checkpoint's own vectors and a content-free blank per layer. Resumable per question. See
    docs/training.md (run 21).
    """
    from ..evaluation.layer_probe import DEFAULT_LAYERS, TABLE_FILE, run_layer_probe

    if limit < 1 or max_new_tokens < 1:
        raise typer.BadParameter(f"--limit and --max-new-tokens must be >= 1, got {limit} and {max_new_tokens}.")
    chosen = parse_list(layer, int, "--layers") or list(DEFAULT_LAYERS)
    try:
        examples, engine, signature = probe_inputs(data, data_dir, split, limit, checkpoint, bf16, threads, device)
        run_layer_probe(engine, examples, out, layers=chosen, max_new_tokens=max_new_tokens, signature=signature,
                        overwrite=overwrite, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    _show(out / TABLE_FILE, None)


@app.command("report")
def report(
    bench_dir: Path = typer.Option(Path(DEFAULT_BENCH_DIR), help="Results of `refrag bench`."),
    encoders_dir: Path = typer.Option(Path(DEFAULT_ENCODER_BENCH_DIR), help="Results of `refrag bench encoders`."),
    qa_dir: Path = typer.Option(Path(DEFAULT_QA_DIR), help="Results of `refrag eval qa`."),
    ppl_dir: Path = typer.Option(Path(DEFAULT_PPL_DIR), help="Results of `refrag eval ppl`."),
    out: Path = typer.Option(Path(DEFAULT_DOC), help="The Markdown page to write (plots go to <stem>/ beside it)."),
    label: Optional[str] = typer.Option(None, help="A line shown at the top, e.g. 'quick runs on a loaded machine'."),
) -> None:
    """Write the benchmark page (machine, commands, tables, plots) from the result directories."""
    from ..evaluation.report import write_benchmarks_doc

    try:
        path = write_benchmarks_doc(bench_dir, qa_dir, ppl_dir, out, label=label, encoders_dir=encoders_dir)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"wrote {path}")
