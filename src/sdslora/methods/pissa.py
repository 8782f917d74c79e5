"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng, Wang, Zhang, 2024, arXiv 2404.02948).

W0 = U S Vᵀ (SVD of the base weight, nn.Linear layout [out, in]);
A0 = diag(√(S_r/s)) V_rᵀ ∈ R^{r×in},  B0 = U_r diag(√(S_r/s)) ∈ R^{out×r},  so s·B0·A0 = U_r S_r V_rᵀ;
the frozen base weight becomes the residual W_res = W0 − s·B0·A0 (the output is unchanged at initialisation), and
A, B (starting at A0, B0) are trained as in LoRA: y = W_res x + s·B·A·x. Same as PEFT ``init_lora_weights="pissa"``;
``pissa_niter=k`` uses the randomised SVD ``torch.svd_lowrank(W0, q=r, niter=k)`` (PEFT ``"pissa_niter_k"``; the
SDS-LoRA authors used k = 4).
Base layers as LoRA's (nn.Embedding, nn.Conv1d/2d/3d too): the SVD is of W0's [out, in] matrix view (see
``methods.base``; a convolution's kernel as out × in_ch·∏k).

Relative to the ORIGINAL weight the update is ΔW = s·B·A − s·B0·A0 (``delta_weight()``; zero at initialisation), so
the layer keeps A0, B0 as buffers ``lora_A0``, ``lora_B0``. ``merge()`` adds s·B·A to W_res (= W0 + ΔW). The PEFT
export is an exact rank-2r LoRA of ΔW relative to W0: B' = [s·B | −s·B0], A' = [A ; A0] (what PEFT's own
PiSSA-to-LoRA conversion writes), so ``PeftModel.from_pretrained(original_base, dir)`` reproduces the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import to_work
from .lora import RebasedLoRALayer


@dataclass
class PiSSAOptions:
    """Options of ``pissa``.

    Args:
        pissa_niter: ``None`` (default) for the exact SVD (``torch.linalg.svd``), or k >= 0 for a randomised SVD with
            k subspace iterations (``torch.svd_lowrank``; seed torch's RNG for a reproducible initialisation).
    """

    pissa_niter: int | None = None

    def __post_init__(self) -> None:
        k = self.pissa_niter
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"pissa_niter must be None (exact SVD) or an int >= 0, got {k!r}")


@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor, r: int, scale: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's initial factors ``(A0 [r, in], B0 [out, r])`` of ``weight`` ([out, in]) with ``s·B0·A0`` = its
    principal rank-r part. Computed in float32 (float64 stays float64); raises ValueError for r > min(out, in)."""
    if not 1 <= r <= min(weight.shape):
        raise ValueError(f"PiSSA rank r={r} must be between 1 and min(out, in) = {min(weight.shape)}")
    w = to_work(weight)
    with torch.autocast(device_type=w.device.type, enabled=False):
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / scale)
        return root[:, None] * vh, u * root[None, :]


class PiSSALayer(RebasedLoRALayer):
    """PiSSA layer: LoRA on the residual weight. Buffers ``lora_A0`` [r, in], ``lora_B0`` [out, r] (the initial
    factors); the base layer's weight holds W_res = W0 − s·B0·A0 once initialised.

    Built with ``deferred=True`` (``io.load_adapter``) the SVD is skipped and W0 is left untouched until
    ``post_load()`` re-bases it with the loaded A0, B0. Raises ValueError for an integer base weight.
    """

    method = "pissa"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        if not self.base_weight.is_floating_point():
            raise ValueError(
                f"PiSSA needs a floating-point base weight (got {self.base_weight.dtype}); dequantise the model first"
            )
        if self.deferred:
            return
        with torch.no_grad():
            a0, b0 = pissa_factors(self._linear_weight(), self.r, self.scale, options.pissa_niter)
            self.lora_A0.copy_(a0)
            self.lora_B0.copy_(b0)
            self.lora_A.copy_(self.lora_A0)
            self.lora_B.copy_(self.lora_B0)
        self._shift_base(-1.0)

    def _linear_weight(self) -> torch.Tensor:
        return self.weight_matrix()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", niter={self.options.pissa_niter}"
