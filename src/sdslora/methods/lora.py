"""LoRA (Hu et al., 2021, arXiv 2106.09685), with rsLoRA scaling (Kalajdzievski, 2023, arXiv 2312.03732).

ΔW = s · B A,  B ∈ R^{out×r} (zeros), A ∈ R^{r×in} (Kaiming-uniform with a = √5, as PEFT initialises it);
s = α/√r (``scaling="rslora"``, default) or α/r (``"standard"``).
Gradients: ∇_A = s BᵀG, ∇_B = s G Aᵀ, with G = ∂L/∂W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer


@dataclass
class LoRAOptions:
    """LoRA has no method options."""


def kaiming_a(out_r: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ∈ R^{r×in} initialised like ``nn.Linear(in, r)`` (kaiming_uniform_, a=√5), PEFT's LoRA default."""
    a = torch.empty(out_r, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


class LoRALayer(AdapterLayer):
    """Plain LoRA: ``y = W0 x + s · B (A dropout(x))``."""

    method = "lora"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any):
        super().__init__(base_layer, r, scale, dropout, dtype, options)
        dev = self.base_weight.device
        self.lora_A = nn.Parameter(kaiming_a(self.r, self.in_features, self.adapter_dtype, dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=self.adapter_dtype, device=dev))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., r] -> [..., out]
        return F.linear(F.linear(self._cast_in(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.lora_B.detach().clone(), self.lora_A.detach().clone()
