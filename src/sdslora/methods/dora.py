"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv 2402.09353).

W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c, with ‖·‖_c the L2 norm of each output unit's weight row (over the input
dimension, nn.Linear layout [out, in]), m ∈ R^{out} trainable (``lora_magnitude_vector``, initialised to ‖W0‖_c),
B (zeros) and A (Kaiming-uniform) trained as in LoRA. As in the paper (§4.3) and PEFT (``use_dora=True``), the norm
is detached: treated as a constant in backward. With g = m / ‖W0 + s·B·A‖_c (per output unit) and x̃ = dropout(x):

    y = W0 x + b + (g − 1) ⊙ W0 x̃ + g ⊙ s·B·A·x̃

(when dropout is inactive, W0 x̃ is the base output minus its bias: no second base matmul). The norm needs the dense
out × in matrix W0 + s·B·A once per forward (as PEFT forms it), built without autograd in the adapter dtype.
``delta_weight()`` = W' − W0 = (g − 1) ⊙ W0 + g ⊙ s·B·A with the same detached norm (so its Jacobian is the one the
forward's gradients use). The PEFT export is a DoRA adapter: B' = s·B, A' = A, scale 1, plus
``lora_magnitude_vector`` = m and ``use_dora: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer
from .lora import kaiming_a


@dataclass
class DoRAOptions:
    """DoRA has no method options."""


class DoRALayer(AdapterLayer):
    """DoRA layer: parameters ``lora_A`` [r, in], ``lora_B`` [out, r], ``lora_magnitude_vector`` [out].

    Supports nn.Linear and transformers Conv1D (GPT-2 layout, weight [in, out]).
    """

    method = "dora"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev = self.base_weight.device
        self.lora_A = nn.Parameter(kaiming_a(self.r, self.in_features, self.adapter_dtype, dev))
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, self.r, dtype=self.adapter_dtype, device=dev)
        )
        with torch.no_grad():
            norm0 = self._weight_norm(None)
        self.lora_magnitude_vector = nn.Parameter(norm0)
        self._merged_norm: torch.Tensor | None = None  # the norm used by merge(), needed by unmerge()

    def _w0(self) -> torch.Tensor:
        """The frozen weight in nn.Linear layout [out, in], in the adapter dtype (a quantised base's dequantised
        weight: the weight it computes with, formed per call as PEFT's DoRA on bitsandbytes does)."""
        return self.weight_matrix().to(self.adapter_dtype)

    @torch.no_grad()
    def _weight_norm(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """‖W0 + s·B·A‖_c per output unit [out], detached, in the adapter dtype (autocast off)."""
        w0 = self._w0() if w0 is None else w0
        with torch.autocast(device_type=w0.device.type, enabled=False):
            w = torch.addmm(w0, self.lora_B.to(w0.dtype), self.lora_A.to(w0.dtype), alpha=self.scale)
            return torch.linalg.vector_norm(w, dim=1)

    def _gain(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """g = m / ‖W0 + s·B·A‖_c [out] (differentiable in m only)."""
        return self.lora_magnitude_vector / self._weight_norm(w0)

    def delta_weight(self) -> torch.Tensor:
        w0 = self._w0()
        g = self._gain(w0)[:, None]
        return (g - 1) * w0 + g * (self.scale * (self.lora_B @ self.lora_A))

    def adapter_forward(self, x: torch.Tensor, base_result: torch.Tensor | None = None) -> torch.Tensor:
        """The DoRA correction to ``base(x)``; ``base_result`` = W0 x (without bias) when dropout is inactive."""
        xd = self._cast_in(x)
        g = self._gain()
        if base_result is None:
            base_result = F.linear(xd, self._w0().to(xd.dtype))
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B)  # [..., in] -> [..., r] -> [..., out]
        return (g - 1) * base_result.to(lora.dtype) + g * lora * self.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        base_result = None
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_result = (result - bias if bias is not None else result).to(self.adapter_dtype)
        return result + self.adapter_forward(x, base_result).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← g ⊙ (W0 + s·B·A) (in place); the norm is kept so that ``unmerge()`` can invert it."""
        if self.merged:
            return
        self.check_mergeable()
        w0 = self._w0()
        norm = self._weight_norm(w0)
        g = (self.lora_magnitude_vector / norm)[:, None]
        delta = (g - 1) * w0 + g * (self.scale * (self.lora_B @ self.lora_A))
        if not torch.isfinite(delta).all():
            raise ValueError("DoRALayer: ΔW has non-finite entries; refusing to merge")
        w = self.base_weight
        w.add_(self._to_base_layout(delta).to(w.dtype))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W' / g − s·B·A with the norm stored at merge time. Raises ValueError if some g is 0."""
        if not self.merged:
            return
        assert self._merged_norm is not None
        g = (self.lora_magnitude_vector / self._merged_norm)[:, None]
        if not bool((g != 0).all()):
            raise ValueError("DoRALayer: a magnitude entry is 0, so the merged weight cannot be unmerged")
        w = self.base_weight
        wl = (w.T if self.fan_in_fan_out else w).to(self.adapter_dtype)
        w0 = wl / g - self.scale * (self.lora_B @ self.lora_A)
        w.copy_(self._to_base_layout(w0).to(w.dtype))
        self._merged_norm = None
        self.merged = False

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The directional LoRA part (s·B, A) of a PEFT DoRA adapter (ΔW itself is not low rank; see peft_extras)."""
        return self.scale * self.lora_B.detach().clone(), self.lora_A.detach().clone()

    def peft_extras(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"use_dora": True}, {"lora_magnitude_vector": self.lora_magnitude_vector.detach().clone()}
