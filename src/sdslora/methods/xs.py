"""LoRA-XS and LoRA-SB: frozen orthogonal-ish factors A, B and one trainable r×r core R.

ΔW = s · B R A,  B ∈ R^{out×r}, A ∈ R^{r×in} frozen buffers (``lora_B``, ``lora_A``), R ∈ R^{r×r} the only trainable
tensor (``lora_R``): r² trainable values per layer instead of LoRA's r(out + in). Forward x → A → R → B, times s,
without a dense ΔW. Gradient: ∇_R = s BᵀGAᵀ. Export as a plain rank-r LoRA: B' = s·B·R, A' = A.

* **LoRA-XS** (Bałazy et al. 2024, arXiv 2405.17604), ``method="lora_xs"``: from the pretrained weight,
  truncated SVD W0 ≈ U_r Σ_r V_rᵀ, **B = U_r, A = Σ_r V_rᵀ, R ~ N(0, init_std²)** (init_std = 1e-5, torch's RNG);
  W0 is not modified, and ΔW starts at (almost) 0.
* **LoRA-SB** (Ponkshe et al. 2024, arXiv 2411.19557), ``method="lora_sb"``: from the approximated
  first full fine-tuning step of AdamW, ΔW₁ = −η₁ · sign(Σ ∇_W L) over a few batches
  (``attach(model, config, init_data=[...])``; Adam's first step is g/|g|), truncated SVD ΔW₁ ≈ U_r Σ_r V_rᵀ:
  **B = U_r, A = V_rᵀ, R = Σ_r / s**, so that the model starts at s·B R A = the rank-r truncation of ΔW₁
  (W0 is not corrected: the initialisation *is* the first update).
  η₁ = option ``lr_first_step``: the learning rate of the first optimizer step, for linear warm-up
  lr / warmup_steps = lr / (warmup_ratio · total_steps) (e.g. lr 1e-4, warm-up ratio 0.02 of 1000 steps: 5e-6).
  Recommended config (the authors' α = r, i.e. s = 1, "hyper-parameter free": with orthonormal B, A the optimal
  R-gradient is g_R/s²): ``AdapterConfig(method="lora_sb", r=r, alpha=r, scaling="standard")`` (or
  ``scaling="rslora", alpha=r**0.5``). Another s keeps the same initial ΔW (R = Σ_r/s) but scales R's effective
  learning rate by s²; the config is used as given.

Truncated SVDs (option ``svd``): ``"exact"`` (default; ``torch.linalg.svd``, the Eckart-Young truncation) or
``"lowrank"`` (the authors' randomised ``torch.svd_lowrank(q=r, niter=svd_niter)``), in float32 under no_grad
(float64 stays float64), cast to the adapter dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import to_work
from .base import AdapterLayer

SVD_KINDS = ("exact", "lowrank")


def _check_svd(svd: str, niter: int) -> None:
    if svd not in SVD_KINDS:
        raise ValueError(f"svd must be one of {SVD_KINDS}, got {svd!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"svd_niter must be an int >= 0, got {niter!r}")


@dataclass
class XSOptions:
    """Options of ``lora_xs``: ``init_std`` of R (1e-5), the truncated SVD kind (``"exact"``) and its iterations."""

    init_std: float = 1e-5
    svd: str = "exact"
    svd_niter: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.init_std, (int, float)) or not self.init_std >= 0:
            raise ValueError(f"lora_xs init_std must be a number >= 0, got {self.init_std!r}")
        _check_svd(self.svd, self.svd_niter)


@dataclass
class SBOptions:
    """Options of ``lora_sb``: η₁ = ``lr_first_step`` (1e-4), the truncated SVD kind (``"exact"``), iterations."""

    lr_first_step: float = 1e-4
    svd: str = "exact"
    svd_niter: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.lr_first_step, (int, float)) or not self.lr_first_step > 0:
            raise ValueError(
                f"lora_sb lr_first_step must be a positive number (the first step's learning rate, "
                f"lr / warmup_steps), got {self.lr_first_step!r}"
            )
        _check_svd(self.svd, self.svd_niter)


@torch.no_grad()
def truncated_svd(
    m: torch.Tensor, r: int, svd: str = "exact", niter: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r [rows, r], S_r [r], V_r [cols, r])`` with ``m ≈ U_r diag(S_r) V_rᵀ``, float32 (float64 kept)."""
    with torch.autocast(device_type=m.device.type, enabled=False):
        x = to_work(m)
        if svd == "exact":
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            return u[:, :r], s[:r], vh[:r].T
        u, s, v = torch.svd_lowrank(x, q=r, niter=niter)
        return u[:, :r], s[:r], v[:, :r]


class XSLayer(AdapterLayer):
    """LoRA-XS: ``y = W0 x + s · B R A dropout(x)`` with only R trainable, initialised from the SVD of W0."""

    method = "lora_xs"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev, dt = self.base_weight.device, self.adapter_dtype
        self.register_buffer("lora_A", torch.zeros(self.r, self.in_features, dtype=dt, device=dev))
        self.register_buffer("lora_B", torch.zeros(self.out_features, self.r, dtype=dt, device=dev))
        self.lora_R = nn.Parameter(torch.zeros(self.r, self.r, dtype=dt, device=dev))
        if not self.deferred:  # io.load_adapter: the saved tensors follow, no SVD needed
            self._init_core()

    @torch.no_grad()
    def _init_core(self) -> None:
        w = self.weight_matrix()  # [out, in]
        u, s, v = truncated_svd(w, self.r, self.options.svd, self.options.svd_niter)
        self.lora_B.copy_(u)
        self.lora_A.copy_(s[:, None] * v.T)
        self.lora_R.copy_(torch.randn(self.r, self.r) * float(self.options.init_std))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_R @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., r] -> [..., r] -> [..., out]
        h = F.linear(self._cast_in(x), self.lora_A)
        return F.linear(F.linear(h, self.lora_R), self.lora_B) * self.scale

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.scale * (self.lora_B @ self.lora_R)).detach().clone(), self.lora_A.detach().clone()


class SBLayer(XSLayer):
    """LoRA-SB: the LoRA-XS architecture initialised from the rank-r truncation of the approximated first step."""

    method = "lora_sb"
    needs_init_data = True
    quantised_refusal = (
        "its initialisation needs the full-weight gradient ∂L/∂W0 (init_data), which a quantised weight cannot carry"
    )

    def _init_core(self) -> None:
        """Nothing to do here: the core is set by init_from_gradient (fresh attach) or the saved tensors (load)."""

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """ΔW₁ = −η₁·sign(G) (sign(Σ G) = sign(mean G)); B = U_r, A = V_rᵀ, R = Σ_r / s."""
        delta1 = -float(self.options.lr_first_step) * torch.sign(grad.to(self.base_weight.device))
        u, s, v = truncated_svd(delta1, self.r, self.options.svd, self.options.svd_niter)
        self.lora_B.copy_(u)
        self.lora_A.copy_(v.T)
        self.lora_R.copy_(torch.diag(s) / self.scale)
