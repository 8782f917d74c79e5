"""LoRA-GA: low-rank adaptation with gradient approximation (Wang, Yu, Li 2024, arXiv 2407.05000).

Initialisation (the authors' ``lora_ga_init`` in Outsider565/LoRA-GA), from the mean full-weight
gradient G_avg over a few batches (``attach(..., init_data=...)``, estimated by :func:`sdslora.init.estimate_gradients`):

* U, S, V = ``torch.svd_lowrank(G_avg, q=min(4r, m, n), niter=4)`` (m = out, n = in features);
* ``direction="ArB2r"`` (default): A0 = V[:, :r]ᵀ, B0 = U[:, r:2r], so the first step's update
  −η s²(B0B0ᵀG + G A0ᵀA0) covers the top-2r singular components of G without double counting;
  ``"A2rBr"``: A0 = V[:, r:2r]ᵀ, B0 = U[:, :r]; ``"ArBr"``: A0 = odd columns of V[:, :2r], B0 = even columns of U;
* ``scale="stable"`` (default): A0, B0 ← A0·m^{1/4}/√γ, B0·m^{1/4}/√γ with γ = ``stable_gamma`` (16); ``"gd"``: both
  divided by s; ``"unit"``: unchanged; ``"weightS"``: both times mean(√(σ_i(W0)/s), i ≤ r);
* output-preserving shift of the frozen weight: **W0 ← W0 − s·B0A0**; then ordinary LoRA training of (A, B).

``variant="peft"`` reproduces PEFT 0.21's ``init_lora_weights="lora_ga"`` instead, which differs from the authors'
code: B0 is multiplied by its singular values diag(S_B); ``"stable"`` scales B0 only; ``"weightS"`` scales B0 by
σ_1(W0)/S_B[0] (PEFT's "weight_svd", σ_1 from ``svd_lowrank(W0, q=r, niter=4)``).

Like PiSSA (``rebases_base_weight``), A0 and B0 are kept as buffers (``lora_A0``, ``lora_B0``): ``delta_weight()`` is
relative to the original weight, s·B·A − s·B0·A0 (zero at initialisation), ``merge()`` adds s·B·A to the shifted
weight, a saved adapter re-creates the shifted weight from them when loaded (``post_load``), and the PEFT export is
relative to the original base at rank 2r: B' = [s·B | −s·B0], A' = [A ; A0], like PEFT's LoRA-GA conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import work_dtype
from .lora import RebasedLoRALayer

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit", "weightS")
VARIANTS = ("authors", "peft")


@dataclass
class LoRAGAOptions:
    """Options of ``lora_ga`` (defaults: the paper's / authors' code)."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    variant: str = "authors"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"lora_ga direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"lora_ga scale must be one of {SCALES}, got {self.scale!r}")
        if not isinstance(self.stable_gamma, (int, float)) or not self.stable_gamma > 0:
            raise ValueError(f"lora_ga stable_gamma must be a positive number, got {self.stable_gamma!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"lora_ga variant must be one of {VARIANTS}, got {self.variant!r}")


def _split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, r: int, direction: str):
    """(A0 [r, in], B0 [out, r], singular values belonging to B0's columns) from G ≈ U diag(S) Vᵀ."""
    if direction == "ArB2r":
        ia, ib = slice(0, r), slice(r, 2 * r)
    elif direction == "A2rBr":
        ia, ib = slice(r, 2 * r), slice(0, r)
    else:  # "ArBr"
        ia, ib = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    return v[:, ia].T, u[:, ib], s[ib]


@torch.no_grad()
def lora_ga_factors(
    grad: torch.Tensor, weight: torch.Tensor, r: int, scale_s: float, options: LoRAGAOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's (A0, B0) for a layer with gradient ``grad`` and weight ``weight`` (both [out, in]).

    Computed in float32 (float64 stays float64); ``torch.svd_lowrank`` is randomised: seed torch's RNG for
    reproducibility. Raises ValueError when 2r > min(out, in).
    """
    m, n = grad.shape
    if 2 * r > min(m, n):
        raise ValueError(
            f"LoRA-GA needs 2r <= min(out, in) (r={r}, layer {m}x{n}): lower r or exclude the layer"
        )
    work = work_dtype(grad.dtype)
    with torch.autocast(device_type=grad.device.type, enabled=False):
        g = grad.to(work)
        u, sv, v = torch.svd_lowrank(g, q=min(4 * r, m, n), niter=4)
        a0, b0, s_b = _split(u, sv, v, r, options.direction)
        peft = options.variant == "peft"
        if peft:
            b0 = b0 * s_b[None, :]
        if options.scale == "stable":
            f = m**0.25 / float(options.stable_gamma) ** 0.5
            a0, b0 = (a0, b0 * f) if peft else (a0 * f, b0 * f)
        elif options.scale == "gd":
            a0, b0 = a0 / scale_s, b0 / scale_s
        elif options.scale == "weightS":
            w = weight.to(work)
            if peft:
                _, ws, _ = torch.svd_lowrank(w, q=r, niter=4)
                if s_b[0] > 0:
                    b0 = b0 * (ws[0] / s_b[0])
            else:
                _, ws, _ = torch.svd_lowrank(w, q=min(4 * r, m, n), niter=4)
                f = torch.sqrt(ws[:r] / scale_s).mean()
                a0, b0 = a0 * f, b0 * f
    return a0.contiguous(), b0.contiguous()


class LoRAGALayer(RebasedLoRALayer):
    """LoRA with LoRA-GA's gradient-based initialisation and output-preserving shift of the base weight."""

    method = "lora_ga"
    needs_init_data = True
    layer_kinds = ("linear",)  # the gradient estimate (init.estimate_gradients) captures linear layers only

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        if 2 * self.r > min(self.in_features, self.out_features):
            raise ValueError(
                f"LoRA-GA needs 2r <= min(in, out) (r={self.r}, in={self.in_features}, out={self.out_features}); "
                "lower r or exclude this layer"
            )

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """Set A = A0, B = B0 from the mean gradient (see the module docstring) and shift W0 ← W0 − s·B0A0."""
        w = self.weight_matrix()  # [out, in]
        a0, b0 = lora_ga_factors(grad.to(w.device), w, self.r, self.scale, self.options)
        self.lora_A.copy_(a0.to(self.adapter_dtype))
        self.lora_B.copy_(b0.to(self.adapter_dtype))
        self.lora_A0.copy_(self.lora_A)
        self.lora_B0.copy_(self.lora_B)
        self._shift_base(-1.0)
