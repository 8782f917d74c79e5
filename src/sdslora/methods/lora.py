"""LoRA (Hu et al., 2021, arXiv 2106.09685), with rsLoRA scaling (Kalajdzievski, 2023, arXiv 2312.03732).

ΔW = s · B A,  B ∈ R^{out×r} (zeros), A ∈ R^{r×in} (Kaiming-uniform with a = √5, as PEFT initialises it);
s = α/√r (``scaling="rslora"``, default) or α/r (``"standard"``).
Gradients: ∇_A = s BᵀG, ∇_B = s G Aᵀ, with G = ∂L/∂W.

Base layers: nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d (groups = 1) through their matrix
view (``methods.base``: ΔW in [out, in] with in = num_embeddings or in_channels·∏kernel). As in PEFT, an embedding's
factors start as A = 0, B ~ N(0, 1) (its input is one-hot: a Kaiming-uniform A over num_embeddings inputs would be
tiny), and dropout is not applied to an embedding's indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import work_dtype
from .base import AdapterLayer


@dataclass
class LoRAOptions:
    """LoRA has no method options."""


def kaiming_a(out_r: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ∈ R^{r×in} initialised like ``nn.Linear(in, r)`` (kaiming_uniform_, a=√5), PEFT's LoRA default."""
    a = torch.empty(out_r, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def lora_init(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default initial ``(A [r, in], B [out, r])`` of a layer, ΔW = 0: A Kaiming-uniform, B = 0; for an
    embedding A = 0, B ~ N(0, 1)."""
    dt, dev = layer.adapter_dtype, layer.base_weight.device
    if layer.view.kind == "embedding":
        b = torch.empty(layer.out_features, layer.r, dtype=dt, device=dev)
        nn.init.normal_(b)
        return torch.zeros(layer.r, layer.in_features, dtype=dt, device=dev), b
    return kaiming_a(layer.r, layer.in_features, dt, dev), torch.zeros(layer.out_features, layer.r, dtype=dt, device=dev)


class LoRALayer(AdapterLayer):
    """Plain LoRA: ``y = W0 x + s · B (A dropout(x))``."""

    method = "lora"
    layer_kinds = ("linear", "embedding", "conv")

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        a, b = lora_init(self)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., r] -> [..., out] (embedding: lookup; convolution: kernel A, then 1×1 with B)
        return self._lowrank_forward(x, self.lora_B, self.lora_A)

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.lora_B.detach().clone(), self.lora_A.detach().clone()


class RebasedLoRALayer(LoRALayer):
    """LoRA whose initialisation moves the frozen weight: W ← W0 − s·B0·A0 with (A, B) = (A0, B0) at the start, so
    the output is unchanged (PiSSA, LoRA-GA). Shared mechanics: the initial factors are kept as buffers
    ``lora_A0``/``lora_B0``; ``delta_weight()`` is relative to the ORIGINAL W0, s(BA − B0A0) (zero at the start),
    while merging adds s·B·A to the shifted weight; the PEFT export is the exact rank-2r
    B' = [sB | −sB0], A' = [A ; A0] relative to the original model; ``post_load()`` re-creates the shift on a fresh
    original model and ``restore_base()`` undoes it. Subclasses set A0, B0 and call :meth:`_shift_base` (-1)."""

    rebases_base_weight = True
    quantised_refusal = (
        "it re-bases the frozen weight (W0 − s·B0·A0), which a quantised weight cannot hold exactly: re-quantising "
        "the shifted weight would change the output at initialisation and make the PEFT export inexact"
    )

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        # AdapterLayer's __init__, not LoRALayer's: A and B are set by the subclass's initialisation, and drawing a
        # random A would move the RNG that randomised SVDs (pissa_niter) use
        AdapterLayer.__init__(self, base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        kw = {"dtype": self.adapter_dtype, "device": self.base_weight.device}
        self.lora_A = nn.Parameter(torch.zeros(self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **kw))
        self.register_buffer("lora_A0", torch.zeros(self.r, self.in_features, **kw))
        self.register_buffer("lora_B0", torch.zeros(self.out_features, self.r, **kw))
        self._rebased = False

    @torch.no_grad()
    def _shift_base(self, sign: float) -> None:
        """W ← W + sign·s·B0·A0, computed in float32 (float64 stays float64) from the stored factors, cast back."""
        w = self.base_weight
        work = work_dtype(w.dtype)
        with torch.autocast(device_type=w.device.type, enabled=False):
            offset = self.scale * (self.lora_B0.to(work) @ self.lora_A0.to(work))
            w.copy_((w.to(work) + sign * self._to_base_layout(offset)).to(w.dtype))
        self._rebased = sign < 0

    def post_load(self) -> None:
        """After a saved adapter's tensors are loaded onto the original model: re-create W0 − s·B0·A0."""
        if self._rebased:
            raise RuntimeError(
                f"{type(self).__name__}.post_load() shifts the original weight by the loaded A0, B0, but this "
                "layer's weight is already shifted: load adapters with sdslora.load_adapter onto a fresh original model"
            )
        self._shift_base(-1.0)

    def prepare_unload(self) -> None:
        if self._rebased and not self.merged:
            self._shift_base(1.0)

    def restore_base(self) -> None:
        """Undo the shift, W0 − s·B0·A0 → W0 (up to rounding), e.g. before unloading without merging.
        Raises RuntimeError if the weight is not shifted or the layer is merged."""
        if not self._rebased or self.merged:
            raise RuntimeError(f"restore_base() needs an unmerged {self.method} layer whose base weight is shifted")
        self._shift_base(1.0)

    def delta_weight(self) -> torch.Tensor:
        # relative to the original W0: s·B·A − s·B0·A0 (the frozen half carries no gradient)
        return self.scale * (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0)

    def delta_to_base(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.cat([self.scale * self.lora_B, -self.scale * self.lora_B0], dim=1)
        a = torch.cat([self.lora_A, self.lora_A0], dim=0)
        return b.detach().clone(), a.detach().clone()
