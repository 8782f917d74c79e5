"""LoRA-Pro, light variant (Wang, Liang, et al., 2024, arXiv 2407.18242).

LoRA's equivalent full-space gradient is g̃ = s(B g_A + g_B A). LoRA-Pro chooses the factor gradients so that g̃ is
the closest achievable to the full fine-tuning gradient G, using only ∇_A = s BᵀG and ∇_B = s G Aᵀ:

    g_A = (1/s²)(BᵀB)⁻¹ ∇_A + X A
    g_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] ∇_B (AAᵀ)⁻¹ − B X

for which g̃ = P_B G + (I − P_B) G P_A = G − (I−P_B) G (I−P_A) = G* whatever X is. X is the minimiser of
‖g_A − ∇_A‖² + ‖g_B − ∇_B‖², the solution of the Sylvester equation

    BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇_A Aᵀ,

solved through eigendecompositions of the two symmetric r×r matrices (float32; float64 stays float64). Inverses are
pinv(M + δI) with δ = 1e-8. At the first step (B = 0, so BᵀB = 0): g_A = ∇_A, g_B = (1/s²) ∇_B (AAᵀ)⁻¹.

"Light" variant, as the SDS-LoRA authors re-implemented it: g_A, g_B are computed from the raw gradients each step
and fed to per-factor AdamW (bias-corrected, decoupled weight decay). The official code instead keeps full m×n Adam
moments of g̃ and projects the Adam direction back (memory of full fine-tuning for the adapted matrices); that
variant is not implemented. The scale s of each layer is read from the layer (``layer.scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import Group, LoRAPairedAdamW, adamw_update, compute_dtype, damped_pinv, solve_sylvester_sym


def lora_pro_gradients(
    A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scale: float, delta: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor]:
    """(g_A, g_B, X) of LoRA-Pro for one layer (see the module docstring); X = 0 at the B = 0 special case.

    Computed in float32 (float64 stays float64) and returned in that dtype.
    """
    cd = compute_dtype(A, grad_A)
    a, b = A.detach().to(cd), B.detach().to(cd)
    ga, gb = grad_A.to(cd), grad_B.to(cd)
    inv_s2 = 1.0 / (scale * scale)
    aat_inv = damped_pinv(a @ a.T, delta)
    if not bool(b.any()):  # B = 0: BᵀB is singular, g̃ = s g_B A = G P_A
        return ga, inv_s2 * gb @ aat_inv, torch.zeros(a.shape[0], a.shape[0], dtype=cd, device=a.device)
    btb = b.T @ b
    aat = a @ a.T
    btb_inv = damped_pinv(btb, delta)
    ga0 = inv_s2 * btb_inv @ ga
    x = solve_sylvester_sym(btb, aat, -(ga0 @ a.T))
    gb_proj = gb - b @ (btb_inv @ (b.T @ gb))  # [I − B(BᵀB)⁻¹Bᵀ] ∇_B
    g_A = ga0 + x @ a
    g_B = inv_s2 * gb_proj @ aat_inv - b @ x
    return g_A, g_B, x


@dataclass
class LoRAProOptions:
    """Options of ``lora_pro``.

    Args:
        delta: damping δ of pinv(M + δI) (1e-8, as in the official code).
    """

    delta: float = 1e-8

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or self.delta < 0:
            raise ValueError(f"lora_pro option delta must be a number >= 0, got {self.delta!r}")


class LoRAPro(LoRAPairedAdamW):
    """LoRA-Pro (light): LoRA-Pro factor gradients fed to per-factor AdamW (see the module docstring).

    ``LoRAPro(model, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=1e-8)``: AdamW
    hyper-parameters (decoupled weight decay) and the options of :class:`LoRAProOptions` (by keyword or by
    position); arguments and errors as in :class:`.common.LoRAPairedAdamW`.
    """

    method = "lora_pro"
    options_cls = LoRAProOptions

    def pair_step(self, group: Group, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
        g_A, g_B, _ = lora_pro_gradients(A, B, grad_A, grad_B, group["scale"], group["delta"])
        adamw_update(A, g_A, self.state[A], group)
        adamw_update(B, g_B, self.state[B], group)
