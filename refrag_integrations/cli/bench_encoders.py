"""``refrag bench encoders``: index-time and query-time ("not cached") cost of each chunk-encoder
option, next to cached TTFT and full-context RAG on the same decoder, in one resumable run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_DATA_DIR
from ..evaluation.config import (
    DEFAULT_ENCODER_BENCH_DIR,
    ENCODER_BENCH_INDEX_PASSAGES,
    ENCODER_BENCH_OPTIONS,
    ENCODER_BENCH_PASSAGE_COUNTS,
    ENCODER_BENCH_QUICK,
    ENCODER_BENCH_REPEATS,
)
from .bench import load_engine, parse_list, set_threads, warn_if_busy
from .common import DECODER_DTYPE_HELP, check_decoder_dtype


def encoders(
    encoder_options: str = typer.Option(
        ",".join(ENCODER_BENCH_OPTIONS), "--encoders",
        help="Chunk-encoder options, comma-separated: ENCODER (each chunk encoded alone) or ENCODER@passage "
             "(the passage encoded once, each chunk's span pooled); ENCODER is a name, a local path or decoder:N."),
    n: Optional[str] = typer.Option(
        None, "--n", help="Passage counts N (the first NQ eval question's gold + N-1 distractors), comma-separated "
                          f"(default {','.join(map(str, ENCODER_BENCH_PASSAGE_COUNTS))})."),
    repeats: Optional[int] = typer.Option(None, help=f"Timed repeats per setting, median reported (default {ENCODER_BENCH_REPEATS})."),
    index_passages: Optional[int] = typer.Option(
        None, help=f"Passages in the timed index batch (default {ENCODER_BENCH_INDEX_PASSAGES}, one `refrag index` batch)."),
    data_dir: Path = typer.Option(Path(DEFAULT_DATA_DIR), help="The shared data directory (NQ-open eval split)."),
    decoder: Optional[str] = typer.Option(None, help="Decoder (default: the packaged checkpoint's / the default)."),
    k: Optional[int] = typer.Option(None, "--k", help="Compression rate k (default: the packaged checkpoint's, 16)."),
    checkpoint: Optional[str] = typer.Option(
        None, help="Leave out: each option uses the packaged checkpoint where it fits (else an untrained projector); "
                   "'none': every option untrained. Latency does not depend on the weights."),
    out: Path = typer.Option(Path(DEFAULT_ENCODER_BENCH_DIR), help="Results directory (encoders.json, encoders.md)."),
    limit: Optional[int] = typer.Option(None, help="Measure at most this many new settings now (rerun to continue)."),
    quick: bool = typer.Option(False, help="Small defaults: N = 1,5, 1 repeat, 8 index passages."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the decoder."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help=DECODER_DTYPE_HELP, callback=check_decoder_dtype),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    overwrite: bool = typer.Option(False, help="Discard results in --out made with other settings."),
    docs: Optional[Path] = typer.Option(
        None, help="Also rewrite this Markdown page's encoder-cost section from the results (e.g. docs/benchmarks.md)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """What each chunk-encoder option costs at index time and at query time.

    Index time per passage and chunk (compute and store the chunk vectors, as `refrag index`), and
    TTFT with the vectors computed at query time (not cached) next to precomputed (cached) and
    full-context RAG, at N passages, p = 0, on the same decoder. Resumable.
    """
    import warnings

    from ..engine import UntrainedProjectorWarning
    from ..evaluation.data import load_qa, nq_path
    from ..evaluation.encoder_cost import (
        TABLE_FILE,
        EncoderBenchSettings,
        EncoderOption,
        encoder_bench_passages,
        parse_encoder_options,
        run_encoder_bench,
        write_encoders_docs,
    )

    if checkpoint not in (None, "none"):
        raise typer.BadParameter(
            f"--checkpoint takes 'none' or is left out (each option is built from configuration), got {checkpoint!r}.")
    if k is not None and k < 1:
        raise typer.BadParameter(f"--k must be >= 1, got {k}.")
    base = ENCODER_BENCH_QUICK if quick else {
        "passage_counts": ENCODER_BENCH_PASSAGE_COUNTS, "repeats": ENCODER_BENCH_REPEATS,
        "index_passages": ENCODER_BENCH_INDEX_PASSAGES,
    }
    data = nq_path(data_dir)
    try:
        settings = EncoderBenchSettings(
            options=parse_encoder_options(encoder_options.split(",")),
            passage_counts=parse_list(n, int, "--n") or base["passage_counts"],
            repeats=repeats if repeats is not None else base["repeats"],
            index_passages=index_passages if index_passages is not None else base["index_passages"],
            extra={"data": str(data), "split": "eval", "checkpoint": checkpoint},
        )
        question, contexts, indexed = encoder_bench_passages(
            load_qa(data, "eval"), settings.passage_counts, settings.index_passages)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    warn_if_busy()
    set_threads(threads)  # before the run: its signature records the thread count

    def engine_for(option: EncoderOption):
        typer.echo(f"loading option {option.key}", err=True)
        with warnings.catch_warnings():  # the table says which options are untrained
            warnings.simplefilter("ignore", UntrainedProjectorWarning)
            return load_engine(checkpoint, bf16, threads, device, decoder_dtype, decoder=decoder,
                               encoder=option.encoder, chunk_context=option.chunk_context, chunk_size=k)

    try:
        doc = run_encoder_bench(engine_for, question, contexts, indexed, settings, out, limit=limit,
                                overwrite=overwrite, progress=progress)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo((out / TABLE_FILE).read_text(encoding="utf-8"))
    typer.echo(f"{len(doc['results'])} settings in {out}" + ("" if doc["complete"] else " (incomplete: rerun to continue)"))
    if docs is not None:
        typer.echo(f"wrote {write_encoders_docs(out, docs)}")
