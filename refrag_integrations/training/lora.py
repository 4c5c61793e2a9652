"""Minimal LoRA for the decoder: train low-rank updates, ship only A and B, merge at load.

Checkpoints store ``{module}.lora_A`` (r, in) and ``{module}.lora_B`` (out, r) with a scale, and
:func:`merge_lora` adds ``scale * B @ A`` into the base weights at load time, so inference needs
no extra dependency and runs at full speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with the base frozen; B starts at zero (no change at init).

    A and B are float32 even when the base weight is bfloat16 / float16 (a half-precision frozen
    decoder): the optimizer then updates full-precision adapters, and the forward casts them to
    the input's dtype.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


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


@torch.no_grad()
def merge_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add ``scale * B @ A`` into the plain model's linear weights. Returns modules merged.

    Raises:
        ValueError: a LoRA tensor names a module the model does not have, or shapes differ.
    """
    modules = dict(model.named_modules())
    names = sorted({k.rpartition(".")[0] for k in state})
    for name in names:
        target = modules.get(name)
        if isinstance(target, LoRALinear):
            target = target.base
        if not isinstance(target, nn.Linear):
            raise ValueError(f"The checkpoint's decoder LoRA names {name!r}, which this decoder does not have.")
        A, B = state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float()
        scale = float(state[f"{name}.lora_scale"])
        delta = (B @ A) * scale  # (out, in)
        if delta.shape != target.weight.shape:
            raise ValueError(f"LoRA update for {name} has shape {tuple(delta.shape)}, weight is {tuple(target.weight.shape)}.")
        target.weight.add_(delta.to(target.weight.dtype).to(target.weight.device))
    return len(names)


def unwrap_lora(model: nn.Module) -> None:
    """Merge wrapped LoRA layers into their base layers and remove the wrappers (in place)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.add_((child.lora_B.float() @ child.lora_A.float() * child.scale).to(child.base.weight.dtype))
                setattr(module, child_name, child.base)
