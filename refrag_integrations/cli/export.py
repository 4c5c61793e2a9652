"""``refrag export decoder``: write a checkpoint's merged decoder for a vLLM server."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Export what a decoder server serves.", no_args_is_help=True)


@app.command("decoder")
def decoder(
    checkpoint: str = typer.Argument(..., help="REFRAG checkpoint directory, 'default' (the packaged one) or 'none' (the base decoder)."),
    out_dir: Path = typer.Argument(..., help="Model directory to write (new or empty)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
) -> None:
    """Write CHECKPOINT's decoder (LoRA and deltas merged) to OUT_DIR as a Hugging Face model
    directory with its tokenizer, chat template and decoder fingerprint, for
    `python -m vllm.entrypoints.openai.api_server --model OUT_DIR --enable-prompt-embeds`."""
    from ..export import check_out_dir, export_decoder, read_fingerprint

    try:
        check_out_dir(out_dir, overwrite)  # before loading any model
        path = export_decoder(checkpoint, out_dir, overwrite=overwrite)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    card = read_fingerprint(path)
    typer.echo(f"wrote {path} (decoder fingerprint {card['decoder_fingerprint']})")
    typer.echo("serve it with:")
    typer.echo(
        f"  python -m vllm.entrypoints.openai.api_server --model {path} --enable-prompt-embeds "
        f"--dtype float32 --max-model-len 4096 [--enforce-eager on CPU] "
        f"[--served-model-name {card['served_model_name']} when clients cannot read {path}]"
    )
