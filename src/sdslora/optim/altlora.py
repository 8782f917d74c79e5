"""AltLoRA (arXiv 2505.12455): alternating projected-gradient updates with momentum transport.

Per optimizer step and layer, with the gradients ∇_A, ∇_B of the same backward pass (at A_t, B_t):

1. A-step with B = B_t fixed:  ĝ_A = (BᵀB + δI)⁻¹ ∇_A,
   m_A ← β1 · (BᵀB + δI)⁻¹ Bᵀ B_prev · m_A + (1−β1) ĝ_A,   v_A ← β2 v_A + (1−β2) ĝ_A²,
   A_{t+1} = A_t − lr · m̂_A / (√v̂_A + ε)   (B_prev: the B used at A's previous step).
2. B-step with the *new* A = A_{t+1} fixed (the gradient ∇_B is the one computed before A changed, only its
   projection uses the new A):  ĝ_B = ∇_B (AAᵀ + δI)⁻¹,
   m_B ← β1 · m_B · A_prev Aᵀ (AAᵀ + δI)⁻¹ + (1−β1) ĝ_B,   v_B likewise,   B_{t+1} = B_t − lr · m̂_B / (√v̂_B + ε)
   (A_prev: the A used at B's previous step).

The transport maps the first moment, which lives in the coordinates of the old other factor, into the current
ones (the least-squares map between the two row / column spaces). Adam second moments on ĝ and bias correction as
in the SDS-LoRA authors' re-implementation (the paper's ``altlora`` has no second moment, ``altlora_plus`` adds it),
with their δ = 1e-6 (AltLoRA's file uses 1e-3); decoupled weight decay. The previous factors are kept in the
optimizer state (``other_prev``; memory of one extra copy of the adapter), so ``state_dict`` round trips and a state
popped by the Controller restarts without transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .common import Group, LoRAPairedAdamW, adamw_update, damped_solve, precondition_A, precondition_B


@dataclass
class AltLoRAOptions:
    """Options of ``altlora``.

    Args:
        delta: damping δ of the r×r Gram matrices (1e-6).
        transport: transport the first moments when the other factor changed (True, the method); False gives
            alternating ScaledAdamW-like updates.
    """

    delta: float = 1e-6
    transport: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or self.delta < 0:
            raise ValueError(f"altlora option delta must be a number >= 0, got {self.delta!r}")
        if not isinstance(self.transport, bool):
            raise TypeError(f"altlora option transport must be a bool, got {self.transport!r}")


class AltLoRA(LoRAPairedAdamW):
    """AltLoRA over the (A, B) pairs of a LoRA model (see the module docstring).

    ``AltLoRA(model, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=1e-6, transport=True)``:
    Adam hyper-parameters (decoupled weight decay) and the options of :class:`AltLoRAOptions` (by keyword or by
    position); arguments and errors as in :class:`.common.LoRAPairedAdamW`.
    """

    method = "altlora"
    options_cls = AltLoRAOptions

    def pair_step(self, group: Group, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
        delta, use_t = group["delta"], group["transport"]
        st_A, st_B = self.state[A], self.state[B]

        # 1. A with B fixed
        gA = precondition_A(B, grad_A, delta)
        b_prev = st_A.get("other_prev")

        def transport_A(m: Tensor) -> Tensor:
            b = B.detach().to(m.dtype)
            return damped_solve(b.T @ b, b.T @ (b_prev.to(m.dtype) @ m), delta)

        adamw_update(A, gA, st_A, group, transport=transport_A if (use_t and b_prev is not None) else None)
        st_A["other_prev"] = B.detach().clone()

        # 2. B with the new A fixed (gradient from the same backward)
        gB = precondition_B(A, grad_B, delta)
        a_prev = st_B.get("other_prev")

        def transport_B(m: Tensor) -> Tensor:
            a = A.detach().to(m.dtype)
            return damped_solve(a @ a.T, (m @ (a_prev.to(m.dtype) @ a.T)).T, delta).T

        adamw_update(B, gB, st_B, group, transport=transport_B if (use_t and a_prev is not None) else None)
        st_B["other_prev"] = A.detach().clone()
