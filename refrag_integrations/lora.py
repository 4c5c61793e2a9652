"""Decoder LoRA at inference: the wrapped layer and merging saved adapters into plain weights.

Checkpoints store ``{module}.lora_A`` (r, in) and ``{module}.lora_B`` (out, r) with a scale, and
:func:`merge_lora` adds ``scale * B @ A`` into the base weights at load time, so inference needs
no extra dependency and runs at full speed. Training wraps layers with :class:`LoRALinear`
(:mod:`refrag_integrations.training.lora`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
