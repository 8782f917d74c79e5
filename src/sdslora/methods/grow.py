"""Rank growth during training: LoRA (``lora_grow``) and SDS-LoRA (``sds_grow``) whose rank grows from r0 = r to
r1 = ``grow_to`` (default 2r) in equal increments after the optimizer steps ``grow_steps`` (docs/algorithm.md, "Rank
growth"; in the spirit of IncreLoRA, Zhang et al. 2023, arXiv 2308.12043: rank added during training, here along the
directions the current factors cannot reach).

A growth never changes the function: the new columns of B are zero (LoRA), or the new terms cancel exactly (SDS-LoRA
once decoupled: ΔW = s(Q_B A + B Q_Aᵀ) gains u·(c vᵀ) + (−c u)·vᵀ = 0). The new directions (``directions=
"gradient"``) are the leading singular vectors (u_i, v_i) of the unreachable part R = (I − P_B) G (I − P_A) of the
layer's full gradient G = ∂L/∂W from the backward pass right before the growth (P_B, P_A: the projectors on col(B),
row(A); on col(Q_B), col(Q_A) once SDS-LoRA is decoupled): the directions in which the loss falls fastest that the
current parameterisation cannot move ΔW along. ``"random"``: random orthonormal directions of the same complement.

Capture of G: one step before a growth the plan *arms* the layers (a persistent flag ``lora_grow_armed``, so a run
resumed between arming and growth is armed again). An armed layer's forward (with grad enabled) ends in a small
autograd function whose backward adds Σ δᵀx (the weight gradient of the layer's matrix view, for every micro-batch of
that step) into the ``.grad`` of a zero-stride leaf tensor (no memory until the backward writes it). Only
``.backward()`` accumulates into it, so a probe with ``torch.autograd.grad`` (``diagnose``) between arming and growth
leaves it alone, and gradient checkpointing counts every micro-batch once. The growth consumes G and disarms. A layer
that is not armed runs the plain forward (one flag test).

Shapes: ``lora_A`` [r, in] and ``lora_B`` [out, r] are replaced by bigger parameters (and SDS's buffers ``lora_QA``,
``lora_QB``); the plan returns them in ``StepOutcome.replaced`` with the slice holding the old values, and the
Controller carries the optimizer moments of the old block over (the gradient of the old block is unchanged by the
growth: ∇A_old = s B_oldᵀ G, ∇B_old = s G A_oldᵀ, resp. s Q_B,oldᵀ G and s G Q_A,old). A saved grown adapter loads by
building the layers at r0 and resizing them to the saved rank (``resize_rank``) before the tensors are copied in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import work_dtype
from .base import sync_state_after_load
from .grow_schedule import (  # noqa: F401  (importable from here: the method's options and plans)
    DIRECTIONS,
    GrowOptions,
    GrowPlan,
    SDSGrowOptions,
    SDSGrowPlan,
    _parse_steps,
    final_rank,
    grow_step_list,
)
from .lora import LoRALayer
from .sds import SDSLayer


# ---- capture of the full gradient -------------------------------------------------------------------------------------
class _GradTap(torch.autograd.Function):
    """``y = base + adapter`` whose backward also returns, for ``tap``, the layer's weight gradient δᵀx (matrix view)."""

    @staticmethod
    def forward(
        ctx: Any,
        base: torch.Tensor,
        adapter: torch.Tensor | None,
        x: torch.Tensor,
        tap: torch.Tensor,
        layer: Any,
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.layer = layer
        return base + adapter if adapter is not None else base.clone()

    @staticmethod
    def backward(ctx: Any, d: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        g = ctx.layer._weight_gradient(x, d) if ctx.needs_input_grad[3] else None
        return d, (d if ctx.needs_input_grad[1] else None), None, g, None


# ---- the layers -----------------------------------------------------------------------------------------------------
@dataclass
class _Growth:
    """A growth computed for one layer (committed only once every layer's is computed)."""

    new_r: int
    down: torch.Tensor  # [k, in]: the new input-side directions v_iᵀ
    up: torch.Tensor  # [out, k]: the new output-side directions u_i
    info: dict[str, Any]


def _sign_fix(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of v_i is positive (deterministic signs)."""
    idx = v.abs().argmax(0)
    sign = torch.sign(v.gather(0, idx[None, :]))[0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, v * sign


def _complement(basis: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k random orthonormal columns orthogonal to the orthonormal columns of ``basis`` [m, p]."""
    m = basis.shape[0]
    x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(device=basis.device, dtype=basis.dtype)
    for _ in range(2):  # twice is enough (Kahan)
        x = x - basis @ (basis.T @ x)
    q, r = torch.linalg.qr(x, mode="reduced")
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)[None, :]


def _rms(m: torch.Tensor, dim: int) -> float:
    """Root mean square of the norms of ``m``'s rows (dim=1) or columns (dim=0)."""
    n = m.shape[1 - dim] if m.dim() == 2 else 1
    return math.sqrt(float(m.double().pow(2).sum()) / max(n, 1))


class _Growable:
    """Rank growth for a layer with ``lora_A`` [r, in] and ``lora_B`` [out, r] (mixed into LoRA and SDS-LoRA)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _init_growth(self) -> None:
        self.r0 = self.r
        self.r1 = final_rank(self.r, self.options)
        cap = min(self.in_features, self.out_features)
        if self.r1 <= self.r0:
            raise ValueError(f"grow_to={self.r1} must be larger than the rank r={self.r0} it grows from")
        if self.r1 > cap:
            raise ValueError(
                f"grow_to={self.r1} is larger than this layer allows (in={self.in_features}, out={self.out_features}, "
                f"max rank {cap}); lower grow_to or exclude the layer"
            )
        n_steps = len(_parse_steps(self.options.grow_steps))
        if self.r1 - self.r0 < n_steps:
            raise ValueError(
                f"grow_steps has {n_steps} growths but the rank grows by only {self.r1 - self.r0} "
                f"(r={self.r0} to grow_to={self.r1}); each growth adds at least one direction"
            )
        # 1 = armed: the next backward passes accumulate G (persistent: a resumed run is armed again)
        self.register_buffer(
            "lora_grow_armed", torch.zeros((), dtype=torch.uint8, device=self.base_weight.device)
        )
        self._armed = False
        self._tap: torch.Tensor | None = None
        self.growth_info: dict[str, Any] | None = None  # what the last growth did (singular values, shares)

    @classmethod
    def rank_bounds(cls, r: int, options: Any) -> tuple[int, int]:
        """The ranks a layer built at rank ``r`` can hold: [r, r1] (io checks a saved adapter's ranks against it)."""
        return int(r), final_rank(r, options)

    def rank_after(self, i: int, n: int) -> int:
        """The rank after the i-th (0-based) of n growths: r0 + ⌊(r1 − r0)(i + 1)/n⌋."""
        return self.r0 + (self.r1 - self.r0) * (i + 1) // n

    # ---- capture ------------------------------------------------------------------------------------------------
    def sync_state(self) -> None:
        super().sync_state()  # type: ignore[misc]
        self._armed = bool(self.lora_grow_armed.item())
        if not self._armed:
            self._tap = None

    def arm_capture(self) -> None:
        """Accumulate the full gradient G in the following backward passes (until :meth:`take_gradient`)."""
        self.lora_grow_armed.fill_(1)
        self._armed = True
        self._tap = None

    def disarm_capture(self) -> None:
        self.lora_grow_armed.fill_(0)
        self._armed = False
        self._tap = None

    def take_gradient(self) -> torch.Tensor | None:
        """G accumulated since arming ([out, in], float32 / float64), None if no backward pass reached the layer."""
        return None if self._tap is None else self._tap.grad

    def _capture_leaf(self) -> torch.Tensor:
        if self._tap is None:
            # zero strides: one element of storage; the first backward allocates its .grad
            dt = work_dtype(self.adapter_dtype)
            self._tap = (
                torch.empty_strided(
                    (self.out_features, self.in_features), (0, 0), dtype=dt, device=self.base_weight.device
                )
                .zero_()
                .requires_grad_(True)
            )
        return self._tap

    def _weight_gradient(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        from ..diagnostics.capture import Capture, form_gradient

        dt = work_dtype(self.adapter_dtype)
        with torch.autocast(device_type=d.device.type, enabled=False):
            return form_gradient(
                Capture(xs=[x], deltas=[d]), self.out_features, self.in_features, dt, self.base_layer
            )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._armed or not torch.is_grad_enabled():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        result = self.base_layer(x, *args, **kwargs)
        extra = None if (self.disabled or self.merged) else self.adapter_forward(x).to(result.dtype)
        return _GradTap.apply(result, extra, x.detach(), self._capture_leaf(), self)

    # ---- growth -------------------------------------------------------------------------------------------------
    def _decoupled_now(self) -> bool:
        return bool(getattr(self, "decoupled", False))

    @torch.no_grad()
    def prepare_growth(self, new_r: int, directions: str, gen: torch.Generator) -> _Growth:
        """The new directions of a growth to rank ``new_r`` (nothing changes yet; see :meth:`commit_growth`).
        ``directions="gradient"`` uses G captured since :meth:`arm_capture`; when it has fewer usable directions
        than needed (or none reached the layer), the rest are random directions of the same complement."""
        k = new_r - self.r
        ct = work_dtype(self.lora_A.dtype)
        dev = self.lora_A.device
        sub = self.gradient_subspaces()  # type: ignore[attr-defined]  # col(B), row(A) or col(Q_B), col(Q_A)
        ub, va = sub[0].to(ct), sub[1].to(ct)
        info: dict[str, Any] = {"from": self.r, "to": new_r, "random_filled": 0}
        u = torch.zeros(self.out_features, 0, dtype=ct, device=dev)
        v = torch.zeros(self.in_features, 0, dtype=ct, device=dev)
        if directions == "gradient":
            g = self.take_gradient()
            if g is not None:
                g = g.to(ct)
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(
                        f"the gradient captured for the rank growth has non-finite entries ({self!r})"
                    )
                r_mat = g - ub @ (ub.T @ g)
                r_mat = r_mat - (r_mat @ va) @ va.T
                g2, r2 = float(g.double().pow(2).sum()), float(r_mat.double().pow(2).sum())
                if r2 > 0.0:
                    uu, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
                    tol = max(r_mat.shape) * torch.finfo(ct).eps * float(s[0])
                    keep = int((s[:k] > tol).sum())
                    u, v = _sign_fix(uu[:, :keep], vh[:keep].T)
                    info["sigma"] = [float(x) for x in s[:keep]]
                    info["unreachable_share"] = r2 / g2
                    info["captured_share"] = float(s[:keep].double().pow(2).sum()) / r2
        if u.shape[1] < k:  # random directions (all, or the completion of the gradient's)
            n_fill = k - u.shape[1]
            u = torch.cat([u, _complement(torch.cat([ub, u], 1), n_fill, gen)], 1)
            v = torch.cat([v, _complement(torch.cat([va, v], 1), n_fill, gen)], 1)
            info["random_filled"] = n_fill
        return _Growth(new_r, v.T.contiguous(), u.contiguous(), info)

    @torch.no_grad()
    def commit_growth(self, growth: _Growth) -> list[tuple[nn.Parameter, nn.Parameter, tuple[slice, ...]]]:
        """Apply a prepared growth: bigger ``lora_A``, ``lora_B`` (and SDS's bases); ΔW unchanged. Returns the
        replaced parameters ``(old, new, where the old values sit)`` for ``StepOutcome.replaced``."""
        a, b, r = self.lora_A, self.lora_B, self.r
        down, up = growth.down.to(a.dtype), growth.up.to(b.dtype)
        k = down.shape[0]
        if self._decoupled_now():  # ΔW = s(Q_B A + B Q_Aᵀ) gains u (c vᵀ) + (−c u) vᵀ = 0
            c = math.sqrt(_rms(a, 1) * _rms(b, 0))
            c = c if c > 0 and math.isfinite(c) else 1 / math.sqrt(3)
            new_a, new_b = torch.cat([a, c * down], 0), torch.cat([b, -c * up], 1)
            self.lora_QA = torch.cat([self.lora_QA, down.to(self.lora_QA.dtype)], 0)  # type: ignore[attr-defined]
            self.lora_QB = torch.cat([self.lora_QB, up.to(self.lora_QB.dtype)], 1)  # type: ignore[attr-defined]
        else:  # LoRA (also SDS-LoRA's warm-up): new A rows v_iᵀ at A's row-norm scale, new B columns 0
            c = _rms(a, 1)
            # A = 0 (an embedding's start): the norm of a Kaiming-uniform (a=√5) row, ≈ 1/√3
            c = c if c > 0 and math.isfinite(c) else 1 / math.sqrt(3)
            new_a, new_b = torch.cat([a, c * down], 0), torch.cat([b, b.new_zeros(b.shape[0], k)], 1)
            if hasattr(self, "lora_QA"):  # SDS-LoRA before its re-parameterisation: bases not in use yet
                self.lora_QA = torch.cat([self.lora_QA, self.lora_QA.new_zeros(k, self.in_features)], 0)
                self.lora_QB = torch.cat([self.lora_QB, self.lora_QB.new_zeros(self.out_features, k)], 1)
        self.lora_A = nn.Parameter(new_a, requires_grad=a.requires_grad)
        self.lora_B = nn.Parameter(new_b, requires_grad=b.requires_grad)
        self.r = growth.new_r
        self.growth_info = dict(growth.info, scale=c)
        full = slice(None)
        return [(a, self.lora_A, (slice(0, r), full)), (b, self.lora_B, (full, slice(0, r)))]

    @torch.no_grad()
    def resize_rank(self, r: int) -> None:
        """Give the layer rank ``r`` in [r0, r1] with zero-filled tensors (``io`` loading a saved grown adapter: the
        saved tensors are copied in right after). Replaces the parameters: call it before building an optimizer."""
        if isinstance(r, bool) or not isinstance(r, int) or not self.r0 <= r <= self.r1:
            raise ValueError(f"rank {r!r} is outside the ranks [{self.r0}, {self.r1}] this layer can grow to")
        if r == self.r:
            return
        a, b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(a.new_zeros(r, self.in_features), requires_grad=a.requires_grad)
        self.lora_B = nn.Parameter(b.new_zeros(self.out_features, r), requires_grad=b.requires_grad)
        if hasattr(self, "lora_QA"):
            self.lora_QA = self.lora_QA.new_zeros(r, self.in_features)
            self.lora_QB = self.lora_QB.new_zeros(self.out_features, r)
        self.r = r


class GrowLoRALayer(_Growable, LoRALayer):
    """LoRA whose rank grows during training (``lora_grow``)."""

    method = "lora_grow"

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
        self._init_growth()
        self.register_load_state_dict_post_hook(sync_state_after_load)


class GrowSDSLayer(_Growable, SDSLayer):
    """SDS-LoRA whose rank grows during training (``sds_grow``)."""

    method = "sds_grow"

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
        self._init_growth()
