"""Shared factorisations: float32, no grad, results cast back by the caller.

Everything here takes and returns plain tensors; no module state.
"""

from __future__ import annotations

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factorisations and other numerically delicate steps compute in: float32, except that float64 stays
    float64 (the tests check identities in double precision). The one place this rule is written."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`work_dtype` (no copy when it already is)."""
    return x.to(work_dtype(x.dtype))


@torch.no_grad()
def qr_signfixed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR ``x = Q R`` with ``diag(R) >= 0`` (the unique QR, i.e. Gram-Schmidt of the columns).

    Batched over leading dimensions. Returns ``(Q, diag(R))`` in the computation dtype (float32, or float64 for
    float64 input).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        q, r = torch.linalg.qr(to_work(x), mode="reduced")
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
        return q * sign.unsqueeze(-2), d.abs()


@torch.no_grad()
def svd_of_product(left: torch.Tensor, right: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-``r`` truncated SVD of ``M = left @ right.T`` without forming ``M``.

    ``left`` is m x k, ``right`` is n x k. QR of both factors, SVD of the small k x k core
    ``R_l R_r^T = U_c S V_c^T``; then ``U = Q_l U_c``, ``V = Q_r V_c``. Returns ``(U[:, :r], S[:r], V[:, :r])``
    with ``U`` m x r, ``V`` n x r (orthonormal columns), in float32 (float64 for float64 input).
    """
    with torch.autocast(device_type=left.device.type, enabled=False):
        ql, rl = torch.linalg.qr(to_work(left), mode="reduced")
        qr_, rr = torch.linalg.qr(to_work(right), mode="reduced")
        uc, s, vch = torch.linalg.svd(rl @ rr.T, full_matrices=False)
        u = ql @ uc[:, :r]
        v = qr_ @ vch.T[:, :r]
        return u, s[:r], v


@torch.no_grad()
def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor U Vᵀ of square matrices M = U Σ Vᵀ (batched): the rotation O maximising tr(Oᵀ M), i.e.
    the solution of the orthogonal Procrustes problem."""
    u, _s, vh = torch.linalg.svd(m)
    return u @ vh


def lowrank_fro2(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """‖left @ right.T‖_F² (batched) in O((m+n)k²) without the dense m × n product."""
    return ((left.mT @ left) * (right.mT @ right)).sum((-2, -1))

