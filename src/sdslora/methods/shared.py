"""LoTR (Bershatsky et al. 2024, arXiv 2402.01376): low-rank factors shared across layers, a Tucker-2 adapter.

ΔW_l = s · U C_l Vᵀ for every adapted layer l, with U ∈ R^{out×r} and V ∈ R^{in×r} ONE pair of tensors shared by the
adapted layers of one group, and a small per-layer core C_l: stacking the ΔW_l of one group along a third axis gives
the Tucker-2 decomposition [ΔW_l]_l = s · core ×₁ U ×₂ V. A group (``share_by``): the layers of one module name across
the depth (``"name"``, default, as LoTR: every ``q_proj``), or every layer of one shape (``"shape"``); always of one
shape, kind, dtype and device.

* ``core="full"`` (default): C_l ∈ R^{r×r} (``lora_C`` [r, r]), Tucker-2.
* ``core="diagonal"``: C_l = diag(c_l), c_l ∈ R^r (``lora_C`` [r]), the CP variant (a rank-r CP decomposition of the
  stacked ΔW_l with the layer factor c_l).

Trainable values per shape group of L layers: r(out + in) + L·r² (full) or + L·r (diagonal), against LoRA's
L·r(out + in). Initialisation: U, V with orthonormal columns (sign-fixed QR of a Gaussian drawn with torch's CPU
RNG, so deterministic under ``torch.manual_seed``; ``orthonormal_init=False``: plain Gaussian columns of expected unit
norm, N(0, 1/rows)), C_l = 0, so ΔW_l = 0 at the start; C_l gets gradient at once, U and V once C ≠ 0 (as LoRA's
B = 0 start). Gradients with G_l = ∂L/∂W_l (all layers l of one group):

    ∇C_l = s UᵀG_l V   (diagonal: s·diag(UᵀG_l V)),   ∇U = s Σ_l G_l V C_lᵀ,   ∇V = s Σ_l G_lᵀ U C_l.

Forward: x → Vᵀ → (U C_l), the r×r core folded into the out×r up-projection (an out·r² product per call; never an
out×in matrix), through the shared low-rank path of :mod:`.base` (linear, embedding and convolution bases).

Sharing: each layer is built complete (its own U, V, so a layer alone is a group of one); ``attach`` then calls
:meth:`LoTRLayer.tie_layers` once with every new layer, which keeps the first layer's U, V of each shape group and
registers that same ``nn.Parameter`` in the other layers of the group (``named_parameters()`` and
``model.trainable_parameters()`` list it once). Saving writes each layer's view of U, V (a copy per layer key, as the
native format stores tensors by layer; the file is LoRA-sized); loading builds deferred layers, ties them, then copies
the saved values into the shared tensors. PEFT export: B'_l = s·U·C_l, A'_l = Vᵀ (rank r, exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import qr_signfixed, work_dtype
from .base import AdapterLayer

CORES = ("full", "diagonal")
SHARE_BY = ("name", "shape")


@dataclass
class LoTROptions:
    """Options of ``lotr``: the per-layer ``core`` (``"full"`` r×r, Tucker-2; ``"diagonal"`` r values, CP),
    whether U, V start with orthonormal columns (``orthonormal_init``, True), and which layers share them
    (``share_by``: ``"name"``, default, the layers of one module name across the depth, e.g. every ``q_proj``, as
    LoTR shares them; ``"shape"``: every adapted layer of one shape, e.g. q_proj with o_proj)."""

    core: str = "full"
    orthonormal_init: bool = True
    share_by: str = "name"

    def __post_init__(self) -> None:
        if self.share_by not in SHARE_BY:
            raise ValueError(
                f"lotr share_by must be 'name' (one U, V per module name across the depth, e.g. every q_proj: LoTR's "
                f"sharing) or 'shape' (every adapted layer of one shape), got {self.share_by!r}"
            )
        if self.core not in CORES:
            raise ValueError(
                f"lotr core must be 'full' (an r×r core per layer, Tucker-2) or 'diagonal' (r values per layer, the "
                f"CP variant), got {self.core!r}; pass options={{'core': 'full'}} or {{'core': 'diagonal'}}"
            )
        if not isinstance(self.orthonormal_init, bool):
            raise ValueError(
                f"lotr orthonormal_init must be True (U, V start with orthonormal columns) or False (Gaussian "
                f"columns), got {self.orthonormal_init!r}"
            )


@torch.no_grad()
def random_columns(
    rows: int, r: int, orthonormal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A [rows, r] matrix drawn with torch's CPU RNG: orthonormal columns (sign-fixed QR of a Gaussian: Haar
    distributed), or Gaussian entries N(0, 1/rows); computed in float32 (float64 kept), cast to ``dtype``."""
    g = torch.randn(rows, r, dtype=work_dtype(dtype))
    m = qr_signfixed(g)[0] if orthonormal else g / rows**0.5
    return m.to(device=device, dtype=dtype).contiguous()  # QR's Q is column-major: a loaded tensor is not


class LoTRLayer(AdapterLayer):
    """LoTR: ``y = W0 x + s · U C_l Vᵀ dropout(x)``, U and V shared by the layers of one shape group."""

    method = "lotr"
    layer_kinds = ("linear", "embedding", "conv")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        dropout: float,
        dtype: str,
        options: Any,
        *,
        deferred: bool = False,
    ):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev, dt = self.base_weight.device, self.adapter_dtype
        if self.deferred:  # io.load_adapter: the saved tensors follow
            u = torch.zeros(self.out_features, self.r, dtype=dt, device=dev)
            v = torch.zeros(self.in_features, self.r, dtype=dt, device=dev)
        else:
            u = random_columns(self.out_features, self.r, options.orthonormal_init, dt, dev)
            v = random_columns(self.in_features, self.r, options.orthonormal_init, dt, dev)
        self.lora_U = nn.Parameter(u)
        self.lora_V = nn.Parameter(v)
        core = (self.r, self.r) if options.core == "full" else (self.r,)
        self.lora_C = nn.Parameter(torch.zeros(*core, dtype=dt, device=dev))
        self.group_size = 1  # layers sharing this U, V (set by tie_layers)

    # ---- cross-layer sharing ----------------------------------------------------------------------------------
    def share_key(self) -> tuple[Any, ...]:
        """Layers with equal keys share U, V: the matrix-view kind and shape (a convolution's kernel geometry too),
        and the adapter tensors' dtype and device."""
        view = self.view
        geometry = tuple(view.weight_shape[1:]) if view.kind == "conv" else ()
        return (
            view.kind,
            self.out_features,
            self.in_features,
            geometry,
            self.lora_U.dtype,
            self.lora_U.device,
        )

    @classmethod
    def tie_layers(cls, layers: Mapping[str, AdapterLayer]) -> None:
        """Register the first layer's U, V of each group in the other layers of the group: layers of one
        :meth:`share_key` (shape), and with ``share_by="name"`` of one module name (the last part of its path)."""
        groups: dict[tuple[Any, ...], list[LoTRLayer]] = {}
        for name, layer in layers.items():
            if isinstance(layer, LoTRLayer):
                leaf = (name.rsplit(".", 1)[-1],) if layer.options.share_by == "name" else ()
                groups.setdefault((*layer.share_key(), *leaf), []).append(layer)
        for members in groups.values():
            first = members[0]
            for layer in members[1:]:
                layer.lora_U = first.lora_U
                layer.lora_V = first.lora_V
            for layer in members:
                layer.group_size = len(members)

    # ---- the contract -------------------------------------------------------------------------------------------
    def _up_core(self) -> torch.Tensor:
        """U C_l [out, r] (diagonal core: U diag(c_l))."""
        if self.lora_C.dim() == 1:
            return self.lora_U * self.lora_C
        return self.lora_U @ self.lora_C

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self._up_core() @ self.lora_V.T)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> Vᵀ -> [..., r] -> U C_l -> [..., out] (embedding: lookup of V's rows; convolution: kernel Vᵀ)
        return self._lowrank_forward(x, self._up_core(), self.lora_V.T)

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = self.lora_V.detach().T.clone(memory_format=torch.contiguous_format)  # Vᵀ [r, in]
        return (self.scale * self._up_core()).detach().clone(), down

    def gradient_subspaces(self) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """col(U), col(V): ΔW_l and its updates (dU C Vᵀ + U dC Vᵀ + U C dVᵀ) live in their tangent space."""
        from ..diagnostics.metrics import orthonormal_basis

        return orthonormal_basis(self.lora_U.detach()), orthonormal_basis(self.lora_V.detach()), "U,V"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, core={self.options.core}, U/V shared by {self.group_size} layer(s)"
