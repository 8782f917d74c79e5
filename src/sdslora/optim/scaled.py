"""ScaledAdamW: Riemannian preconditioned LoRA (Zhang & Pilanci, 2024, arXiv 2402.02347).

Each step the factor gradients are preconditioned by the r×r Gram matrix of the *other* factor,

    ĝ_A = (BᵀB + δI)⁻¹ ∇_A,      ĝ_B = ∇_B (AAᵀ + δI)⁻¹,      δ = 1e-6,

and AdamW moments are kept on ĝ (decoupled weight decay). With plain SGD and δ → 0 the induced full-space step is
s(B ĝ_A + ĝ_B A) = s²(P_B G + G P_A) (scaled gradient descent): the same isotropic form as SDS-LoRA's G̃.

Conventions (as in the paper). The authors' code (``AdamWr``) uses ``correct_bias=False`` and updates A first, so that
B's preconditioner sees the updated A. The SDS-LoRA authors' re-implementation (their baseline runs) uses
bias-corrected AdamW and the pre-update A for both preconditioners; that is our default
(``correct_bias=True, sequential=False``). PEFT's ``create_riemannian_optimizer(model, torch.optim.AdamW, reg=δ)``
computes the same update as the default (it preconditions ``.grad`` in place with pinv(M + δI) and calls AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .common import Group, LoRAPairedAdamW, adamw_update, precondition_A, precondition_B


def riemannian_gradients(
    A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, delta: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(ĝ_A, ĝ_B) = ((BᵀB + δI)⁻¹∇_A, ∇_B(AAᵀ + δI)⁻¹), computed in float32 (float64 stays float64)."""
    return precondition_A(B, grad_A, delta), precondition_B(A, grad_B, delta)


@dataclass
class ScaledAdamWOptions:
    """Options of ``scaled_adamw``.

    Args:
        delta: damping δ of the r×r Gram matrices (1e-6, as the authors and the SDS-LoRA authors use).
        correct_bias: Adam bias correction (True: SDS-LoRA authors' re-implementation; the original code: False).
        sequential: update A first and precondition B's gradient with the updated A (the original code's order);
            False (default): both preconditioners use the pre-update factors.
    """

    delta: float = 1e-6
    correct_bias: bool = True
    sequential: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or self.delta < 0:
            raise ValueError(f"scaled_adamw option delta must be a number >= 0, got {self.delta!r}")
        for name in ("correct_bias", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"scaled_adamw option {name} must be a bool, got {getattr(self, name)!r}")


class ScaledAdamW(LoRAPairedAdamW):
    """Riemannian preconditioned AdamW over the (A, B) pairs of a LoRA model (see the module docstring).

    ``ScaledAdamW(model, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=1e-6, correct_bias=True,
    sequential=False)``: AdamW hyper-parameters (decoupled weight decay) and the options of
    :class:`ScaledAdamWOptions` (by keyword or by position); arguments and errors as in
    :class:`.common.LoRAPairedAdamW`.
    """

    method = "scaled_adamw"
    options_cls = ScaledAdamWOptions

    def pair_step(self, group: Group, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
        delta, cb = group["delta"], group["correct_bias"]
        gA = precondition_A(B, grad_A, delta)
        if group["sequential"]:
            adamw_update(A, gA, self.state[A], group, correct_bias=cb)
            gB = precondition_B(A, grad_B, delta)  # the already updated A
        else:
            gB = precondition_B(A, grad_B, delta)
            adamw_update(A, gA, self.state[A], group, correct_bias=cb)
        adamw_update(B, gB, self.state[B], group, correct_bias=cb)
