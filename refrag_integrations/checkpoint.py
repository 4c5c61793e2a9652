"""Save and load REFRAG checkpoint directories (RefragEngine.from_pretrained builds engines from them).

A checkpoint holds only what training changed, and references the base models:

```
refrag_config.json        RefragConfig (base model names + weight fingerprints, k, pooling,
                          projector shape) plus format version, trained stages
projector.safetensors     the 2-layer MLP projector
encoder_delta.safetensors encoder parameters that training changed (optional)
decoder_delta.safetensors decoder parameters that training changed (optional)
decoder_lora.safetensors  low-rank decoder updates ``adapter{i}.{module}.lora_A/B/scale``,
                          merged into the decoder weights at load (optional)
policy.safetensors        learned expansion policy weights (optional) + policy_config.json
metrics.json              the evaluation the checkpoint was trained to (optional)
```

A checkpoint built for one decoder refuses another (weights fingerprint mismatch).

Integrity: ``refrag_config.json`` records the sha256 of every other file (``files``) and of the
config's training settings (``settings_sha256``: k, pooling, chunk context, dimensions, weight
fingerprints); :func:`load_checkpoint` checks both when present (checkpoints written before they
existed still load), refuses any tensor with a NaN or infinite value, and names the damaged file.
A file the manifest lists but the directory lacks is refused too (an incomplete copy would
otherwise load as a different model, e.g. without its decoder LoRA); to drop a part on purpose,
save the checkpoint again without it. Editing a training setting (k, pooling, chunk context,
dimensions, weight fingerprints) changes ``settings_sha256`` and is refused; editing the base
model names is refused at engine construction, where the named models' weight fingerprints
differ from the recorded ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import RefragConfig

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RefragEngine

FORMAT_VERSION = 1
CONFIG_FILE = "refrag_config.json"
PROJECTOR_FILE = "projector.safetensors"
ENCODER_DELTA_FILE = "encoder_delta.safetensors"
DECODER_DELTA_FILE = "decoder_delta.safetensors"
DECODER_LORA_FILE = "decoder_lora.safetensors"
POLICY_FILE = "policy.safetensors"
POLICY_CONFIG_FILE = "policy_config.json"
METRICS_FILE = "metrics.json"

PACKAGED_DEFAULT = Path(__file__).resolve().parent / "checkpoints" / "default"

# The config fields the weights were trained for: editing one afterwards is refused.
TRAINING_SETTINGS = (
    "chunk_size", "pooling", "chunk_context", "projector_hidden", "encoder_dim", "decoder_dim",
    "decoder_fingerprint", "encoder_fingerprint",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint was loaded onto base models it was not trained for."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is damaged: unreadable, changed since it was saved, or holding NaN/Inf."""


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_sha256(config: dict[str, Any]) -> str:
    """The sha256 of a checkpoint config's :data:`TRAINING_SETTINGS` (a dict as in
    ``refrag_config.json``); it changes when k, pooling, ... are edited.

    Example:
        >>> settings_sha256({"chunk_size": 16, "pooling": "mean"}) != settings_sha256({"chunk_size": 8, "pooling": "mean"})
        True
    """
    settings = {name: config.get(name) for name in TRAINING_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory, as tensors."""

    config: RefragConfig
    projector: dict[str, torch.Tensor]
    encoder_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    decoder_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    decoder_lora: list[dict[str, torch.Tensor]] = field(default_factory=list)
    policy: dict[str, torch.Tensor] | None = None
    policy_config: dict[str, Any] | None = None
    trained_stages: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None


def _atomic_dir(path: Path):
    """Write into a temp dir next to ``path`` and swap it in, so a crash never leaves half a
    checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def save_checkpoint(
    path: str | Path,
    config: RefragConfig,
    projector: dict[str, torch.Tensor],
    *,
    encoder_delta: dict[str, torch.Tensor] | None = None,
    decoder_delta: dict[str, torch.Tensor] | None = None,
    decoder_lora: list[dict[str, torch.Tensor]] | None = None,
    policy: dict[str, torch.Tensor] | None = None,
    policy_config: dict[str, Any] | None = None,
    trained_stages: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one at ``path``).

    Args:
        path: target directory.
        config: the RefragConfig, with ``decoder_fingerprint`` / ``encoder_fingerprint`` filled.
        projector: the projector's state dict.
        encoder_delta / decoder_delta: parameters that training changed (name -> tensor).
        decoder_lora: LoRA adapters (one dict per stage that trained one), applied in order.
        policy, policy_config: a learned expansion policy's weights and its config
            (``LearnedPolicy.policy_config()``: ``{"policy": "learned", ...}``, a name in
            :data:`refrag_integrations.policy.POLICIES`).
        trained_stages: e.g. ``["reconstruct", "cpt"]``; empty means untrained.
        metrics: evaluation numbers to keep with the weights.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _atomic_dir(path)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        def dump(tensors: dict[str, torch.Tensor], name: str) -> None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))

        dump(projector, PROJECTOR_FILE)
        if encoder_delta:
            dump(encoder_delta, ENCODER_DELTA_FILE)
        if decoder_delta:
            dump(decoder_delta, DECODER_DELTA_FILE)
        if decoder_lora:
            dump({f"adapter{i}.{k}": v for i, a in enumerate(decoder_lora) for k, v in a.items()}, DECODER_LORA_FILE)
        if policy is not None:
            dump(policy, POLICY_FILE)
            (tmp / POLICY_CONFIG_FILE).write_text(json.dumps(policy_config or {}, indent=2))
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        # Written last: it records the hash of every other file and of the training settings.
        cfg = config.to_dict()
        meta = {
            "format_version": FORMAT_VERSION, "config": cfg, "trained_stages": trained_stages or [],
            "files": {f.name: file_sha256(f) for f in sorted(tmp.iterdir())},
            "settings_sha256": settings_sha256(cfg),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():  # safetensors writes private files; a checkpoint is meant to be shared
            os.chmod(f, 0o644)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint directory written by :func:`save_checkpoint`.

    Raises:
        ValueError: the directory is missing, incomplete, or of an unknown format version.
        CorruptCheckpointError: a file cannot be read, differs from the sha256 recorded at save,
            is listed in the manifest but missing, holds a NaN or infinite value, or the config's
            training settings were edited.
    """
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a REFRAG checkpoint: {CONFIG_FILE} is missing.")
    meta = _read_json(cfg_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CorruptCheckpointError(f"{cfg_file} is damaged: it has no \"config\" object.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}."
        )
    if not (path / PROJECTOR_FILE).is_file():
        raise ValueError(f"{path} is incomplete: {PROJECTOR_FILE} is missing.")
    _verify_files(path, meta)

    def opt(name: str) -> dict[str, torch.Tensor]:
        return _read_tensors(path / name) if (path / name).is_file() else {}

    policy = opt(POLICY_FILE) or None
    adapters: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt(DECODER_LORA_FILE).items():
        head, _, rest = key.partition(".")
        adapters.setdefault(int(head.removeprefix("adapter")), {})[rest] = value
    try:
        config = RefragConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{cfg_file} is damaged: its config cannot be read ({err}).") from err
    return Checkpoint(
        config=config,
        projector=_read_tensors(path / PROJECTOR_FILE),
        encoder_delta=opt(ENCODER_DELTA_FILE),
        decoder_delta=opt(DECODER_DELTA_FILE),
        decoder_lora=[adapters[i] for i in sorted(adapters)],
        policy=policy,
        policy_config=_read_json(path / POLICY_CONFIG_FILE) if policy is not None else None,
        trained_stages=list(meta.get("trained_stages", [])),
        metrics=_read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else None,
    )


def _verify_files(path: Path, meta: dict[str, Any]) -> None:
    """Check the file hashes and the training-settings hash recorded at save (when present)."""
    cfg_file = path / CONFIG_FILE
    want = meta.get("settings_sha256")
    if want is not None and want != settings_sha256(meta["config"]):
        settings = ", ".join(f"{n}={meta['config'].get(n)!r}" for n in TRAINING_SETTINGS[:3])
        raise CorruptCheckpointError(
            f"{cfg_file} was edited after training: its training settings ({settings}, ...) no longer match "
            "the ones the weights were trained for. Restore the original file, or train a checkpoint "
            "with the settings you want."
        )
    for name, digest in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpointError(
                f"{f} is missing although {cfg_file} lists it: the checkpoint is incomplete. Copy the whole "
                "checkpoint directory again (to drop a part on purpose, save the checkpoint again without it)."
            )
        if file_sha256(f) != digest:
            raise CorruptCheckpointError(
                f"{f} is damaged: its sha256 differs from the one recorded when the checkpoint was saved. "
                "Copy the checkpoint again or re-export it."
            )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{file} is damaged: not valid JSON ({err}).") from err
    except OSError as err:  # e.g. policy_config.json missing next to policy.safetensors
        raise CorruptCheckpointError(f"{file} cannot be read ({err.strerror}): the checkpoint is incomplete.") from err


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, widened to float32, refusing unreadable files and NaN/Inf values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptCheckpointError(f"{file} is damaged: safetensors cannot read it ({err}).") from err
    for name, value in tensors.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CorruptCheckpointError(
                f"{file} is damaged: tensor {name!r} holds {bad} NaN or infinite value(s) of {value.numel()}."
            )
    return _float32(tensors)


def _float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision storage (see :func:`compact_checkpoint`) is widened to float32 on load."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}


def compact_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite checkpoint ``src`` at ``dst`` with its float tensors stored in ``dtype`` (half the
    size; what the packaged default ships). Loading widens them back to float32, so only storage
    rounding changes (float16 keeps 11 significant bits, ~3e-4 relative); a tensor with values
    that ``dtype`` cannot hold stays float32. ``dst`` may equal ``src``.

    Example:
        >>> compact_checkpoint("runs/policy/checkpoint", "refrag_integrations/checkpoints/default")  # doctest: +SKIP
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}.")
    ck = load_checkpoint(src)
    limit = torch.finfo(dtype).max

    def small(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in tensors.items():
            fits = v.numel() == 0 or (bool(torch.isfinite(v).all()) and float(v.abs().max()) < limit)
            out[k] = v.to(dtype) if v.is_floating_point() and fits else v
        return out

    return save_checkpoint(
        dst, ck.config, small(ck.projector),
        encoder_delta=small(ck.encoder_delta) or None, decoder_delta=small(ck.decoder_delta) or None,
        decoder_lora=[small(a) for a in ck.decoder_lora] or None,
        policy=small(ck.policy) if ck.policy is not None else None, policy_config=ck.policy_config,
        trained_stages=ck.trained_stages, metrics=ck.metrics,
    )


def default_checkpoint() -> Path | None:
    """The trained default checkpoint shipped in the package, if this build has one."""
    return PACKAGED_DEFAULT if (PACKAGED_DEFAULT / CONFIG_FILE).is_file() else None


def is_base_model(config: RefragConfig, what: str, name: str | None, fingerprint: str) -> bool:
    """Whether a loaded base model is the ``what`` (``"decoder"`` or ``"encoder"``) a checkpoint
    was trained on: none was named (the checkpoint's own is loaded), it is named as in the
    checkpoint, or it is a copy under another name or path with the same weight fingerprint
    (:func:`~refrag_integrations.models.model_fingerprint`, computed from the loaded model anyway).

    Example:
        >>> cfg = RefragConfig(decoder="smollm2-135m-instruct", decoder_fingerprint="8265719af23137ad")
        >>> is_base_model(cfg, "decoder", "/models/SmolLM2-135M-Instruct", "8265719af23137ad")
        True
        >>> is_base_model(cfg, "decoder", "/models/Qwen2.5-0.5B", "0123456789abcdef")
        False
    """
    if what not in ("decoder", "encoder"):
        raise ValueError(f"what must be 'decoder' or 'encoder', got {what!r}.")
    return name is None or name == getattr(config, what) or fingerprint == getattr(config, f"{what}_fingerprint")


def apply_delta(module: torch.nn.Module, delta: dict[str, torch.Tensor], what: str) -> None:
    """Load a checkpoint's ``delta`` (parameters training changed) into ``module`` (the ``what``
    named in errors: "encoder" or "decoder").

    Raises:
        CheckpointMismatchError: a delta names a parameter the module lacks, or its shape differs.
    """
    if not delta:
        return
    missing, unexpected = [], []
    params = dict(module.state_dict())
    for name, value in delta.items():
        if name not in params:
            unexpected.append(name)
        elif params[name].shape != value.shape:
            missing.append(f"{name} {tuple(value.shape)} != {tuple(params[name].shape)}")
    if unexpected or missing:
        raise CheckpointMismatchError(
            f"The checkpoint's {what} delta does not fit the loaded {what}: "
            f"unknown parameters {unexpected[:5]}, shape mismatches {missing[:5]}."
        )
    module.load_state_dict(delta, strict=False)


def save_engine(engine: "RefragEngine", path: str | Path, *, trained_stages: list[str] | None = None,
                metrics: dict[str, Any] | None = None, encoder_delta: dict[str, torch.Tensor] | None = None,
                decoder_delta: dict[str, torch.Tensor] | None = None) -> Path:
    """Save an engine's projector (and any given deltas) as a checkpoint directory."""
    return save_checkpoint(
        path, engine.config, engine.chunk_encoder.projector.state_dict(),
        encoder_delta=encoder_delta, decoder_delta=decoder_delta,
        trained_stages=trained_stages, metrics=metrics,
    )
