"""Minimal LoRA for the decoder, training half: wrap layers, read and restore their adapters.

Checkpoints ship only A and B; :func:`refrag_integrations.lora.merge_lora` adds them into the
base weights at load time (inference never imports this module).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora import LoRALinear

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "add_lora", "load_lora_into_wrapped", "lora_state", "unwrap_lora"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends with one of ``targets``. Returns wrapped names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    alpha = float(alpha if alpha is not None else 2 * rank)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"No linear layers named {targets} found for LoRA.")
    return wrapped


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors, keyed ``{module}.lora_A`` / ``{module}.lora_B``, plus ``{module}.lora_scale``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_A"] = module.lora_A.detach().float().cpu()
            out[f"{name}.lora_B"] = module.lora_B.detach().float().cpu()
            out[f"{name}.lora_scale"] = torch.tensor(module.scale)
    return out


def load_lora_into_wrapped(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA tensors into an already wrapped model (resume / continue training)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        name, _, what = key.rpartition(".")
        mod = modules.get(name)
        if not isinstance(mod, LoRALinear):
            raise ValueError(f"LoRA tensor {key} has no wrapped module {name!r} in this model.")
        if what in ("lora_A", "lora_B"):
            getattr(mod, what).data.copy_(value.to(getattr(mod, what).dtype))


def unwrap_lora(model: nn.Module) -> None:
    """Merge wrapped LoRA layers into their base layers and remove the wrappers (in place)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.add_((child.lora_B.float() @ child.lora_A.float() * child.scale).to(child.base.weight.dtype))
                setattr(module, child_name, child.base)
