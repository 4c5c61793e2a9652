"""Export what a decoder server serves: a checkpoint's decoder, deltas and LoRA merged, as a plain
Hugging Face model directory (weights, config, generation config, tokenizer with its chat
template) plus ``refrag_decoder.json``, the fingerprint that
:class:`~refrag_integrations.backends.vllm_server.VllmBackend` checks before it sends a request.

Example:
    >>> from refrag_integrations.export import export_decoder
    >>> export_decoder("default", "/srv/refrag-decoder")                         # doctest: +SKIP
    PosixPath('/srv/refrag-decoder')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DECODER_FINGERPRINT_FILE

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RefragEngine

EXPORT_FORMAT_VERSION = 1
SERVED_NAME_PREFIX = "refrag-decoder-"  # a served model name that carries the decoder fingerprint


def decoder_fingerprint(engine: "RefragEngine") -> str:
    """The fingerprint of the engine's decoder weights as they decode (a checkpoint's deltas and
    LoRA merged): what :func:`write_decoder` records and the vLLM backend compares."""
    from .models import model_fingerprint

    return model_fingerprint(engine.decoder)


def export_decoder(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Load ``checkpoint`` on the CPU in float32 and write its merged decoder to ``out_dir``.

    Args:
        checkpoint: a checkpoint directory, ``"default"`` (the packaged one) or ``"none"`` (the
            unmodified base decoder).
        out_dir: the model directory to write (must not exist, or be empty, unless ``overwrite``).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``out_dir`` exists and is not an empty directory (without ``overwrite``).
    """
    from .engine import RefragEngine

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    engine = RefragEngine.from_pretrained(str(checkpoint), device="cpu", decoder_dtype="float32")
    return write_decoder(engine, out, checkpoint=str(checkpoint), overwrite=overwrite)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over a file, or over a non-empty directory unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a directory to export the decoder to.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new directory or pass overwrite=True (--overwrite).")


def write_decoder(engine: "RefragEngine", out_dir: str | Path, *, checkpoint: str = "", overwrite: bool = False) -> Path:
    """Write ``engine``'s decoder (as it decodes: deltas and LoRA merged) and tokenizer to
    ``out_dir`` as a Hugging Face model directory, with the fingerprint file; atomically (a
    crash never leaves half a model behind)."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        engine.decoder.save_pretrained(tmp)
        engine.tokenizer.save_pretrained(tmp)
        fp = decoder_fingerprint(engine)
        card: dict[str, Any] = {
            "format_version": EXPORT_FORMAT_VERSION,
            "decoder_fingerprint": fp,
            "served_model_name": f"{SERVED_NAME_PREFIX}{fp}",
            "base_decoder": engine.config.decoder,
            "base_decoder_fingerprint": engine.config.decoder_fingerprint,
            "checkpoint": checkpoint,
            "chunk_size": engine.k,
            "hidden_size": int(engine.config.decoder_dim or engine.decoder.config.hidden_size),
            "dtype": str(next(engine.decoder.parameters()).dtype).replace("torch.", ""),
        }
        (tmp / DECODER_FINGERPRINT_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a server often runs as another user
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """The fingerprint file of an exported decoder directory.

    Raises:
        ValueError: the directory has no readable fingerprint file (not written by the export).
    """
    card = Path(model_dir) / DECODER_FINGERPRINT_FILE
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{card} is missing or unreadable ({err}); write the directory with `refrag export decoder`.") from err


__all__ = ["SERVED_NAME_PREFIX", "decoder_fingerprint", "export_decoder", "read_fingerprint", "write_decoder"]
