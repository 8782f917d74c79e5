"""Matrix metrics of docs/diagnostics.md and the generic effective gradient of any adapter layer.

All functions take plain tensors and return Python floats (``nan`` where a metric is undefined, e.g. the condition
number of a zero matrix) or tensors; factorisations run under ``torch.no_grad()`` in float32 (float64 stays
float64).

* Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality", EUSIPCO):
  p_i = σ_i / Σ_j σ_j, erank(M) = exp(−Σ p_i log p_i) ∈ [1, rank M].
* Stable rank: ‖M‖_F² / ‖M‖_2² ∈ [1, rank M]; condition number κ = σ_max / σ_min over the min(m, n) singular values
  (``inf`` when σ_min = 0 < σ_max).
* Cosine alignment cos(X, Y) = ⟨X, Y⟩_F / (‖X‖_F ‖Y‖_F).
* Tangent-space projection G* = G − (I − P_B) G (I − P_A) = P_B G + G P_A − P_B G P_A, with P_B, P_A the orthogonal
  projectors on the column space of B and the row space of A; ‖G*‖_F / ‖G‖_F = cos(G, G*).
* Eckart–Young: the best rank-k approximation G_k of G satisfies cos(G, G_k) = ‖G_k‖_F / ‖G‖_F
  = sqrt(Σ_{i≤k} σ_i² / Σ_i σ_i²).
* Effective gradient (generic, any method): G̃ = −(d/dε) ΔW(θ − ε·d) = J_θ ΔW · d, the directional
  derivative of ``layer.delta_weight()`` along the update direction d of the layer's trainable tensors (d = their
  gradients for SGD, or the optimizer's would-be step), computed by forward-mode AD (``torch.func.jvp``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..linalg import to_work


def _f(x: torch.Tensor) -> torch.Tensor:
    return to_work(x)


@torch.no_grad()
def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a 2-D tensor, in float32 (float64 for float64 input)."""
    if m.dim() != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got shape {tuple(m.shape)}")
    with torch.autocast(device_type=m.device.type, enabled=False):
        return torch.linalg.svdvals(_f(m))


def effective_rank_from_sv(s: torch.Tensor) -> float:
    """Roy–Vetterli effective rank from singular values (``nan`` if all are zero or any is non-finite)."""
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if not math.isfinite(total) or total <= 0.0:
        return float("nan")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(m: torch.Tensor) -> float:
    """exp of the Shannon entropy of the L1-normalised singular values of ``m`` (Roy & Vetterli 2007)."""
    return effective_rank_from_sv(singular_values(m))


def stable_rank_from_sv(s: torch.Tensor) -> float:
    s = s.double()
    top = float(s.max()) if s.numel() else 0.0
    if top <= 0.0 or not math.isfinite(top):
        return float("nan")
    return float((s**2).sum() / top**2)


def stable_rank(m: torch.Tensor) -> float:
    """‖M‖_F² / ‖M‖_2² (``nan`` for a zero matrix)."""
    return stable_rank_from_sv(singular_values(m))


def condition_from_sv(s: torch.Tensor) -> float:
    """σ_max / σ_min; a σ_min at round-off level (≤ 1000·eps·σ_max of ``s``'s dtype) counts as 0 (κ = inf)."""
    if not s.numel():
        return float("nan")
    tol = 1e3 * torch.finfo(s.dtype).eps if s.is_floating_point() else 0.0
    s = s.double()
    top, low = float(s.max()), float(s.min())
    if top <= 0.0 or not math.isfinite(top):
        return float("nan")
    return top / low if low > tol * top else float("inf")


def condition_number(m: torch.Tensor) -> float:
    """κ = σ_max / σ_min over the min(rows, cols) singular values (``inf`` if σ_min = 0 up to round-off, ``nan``
    if M = 0)."""
    return condition_from_sv(singular_values(m))


@torch.no_grad()
def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frobenius cosine ⟨X, Y⟩ / (‖X‖‖Y‖) (``nan`` if either is zero). Shapes must agree."""
    if x.shape != y.shape:
        raise ValueError(f"cosine(): shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    x, y = _f(x), _f(y)
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0.0 or ny == 0.0:
        return float("nan")
    return float((x * y).sum()) / (nx * ny)


@torch.no_grad()
def orthonormal_basis(m: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the column space of ``m`` (m×k, k small): QR, then the SVD of the k×k factor R
    (rank-revealing: directions with singular value ≤ rtol·σ_max are dropped; a zero matrix gives 0 columns)."""
    with torch.autocast(device_type=m.device.type, enabled=False):
        x = _f(m)
        if x.shape[1] > x.shape[0]:
            u, s, _ = torch.linalg.svd(x, full_matrices=False)
        else:
            q, r = torch.linalg.qr(x, mode="reduced")
            ur, s, _ = torch.linalg.svd(r)
            u = q @ ur
    if not s.numel() or float(s[0]) <= 0.0:
        return u[:, :0]
    keep = int((s > rtol * s[0]).sum())
    return u[:, :keep]


@torch.no_grad()
def tangent_projection(g: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """G* = P_U G + G P_V − P_U G P_V for orthonormal ``u`` (m×k, column space) and ``v`` (n×l, row space):
    the orthogonal projection of G on the tangent space of the rank-r manifold at the current factors (equal to
    LoRA-Pro's equivalent gradient); G* = G − (I−P_U) G (I−P_V)."""
    g = _f(g)
    u, v = u.to(g.dtype), v.to(g.dtype)
    utg = u.T @ g  # k×n
    gv = g @ v  # m×l
    return u @ utg + gv @ v.T - u @ ((utg @ v) @ v.T)


@torch.no_grad()
def truncation_alignment(s: torch.Tensor, k: int) -> float:
    """cos(G, G_k) = ‖G_k‖_F / ‖G‖_F for the rank-k truncation (Eckart–Young), from G's singular values ``s``."""
    s2 = s.double() ** 2
    total = float(s2.sum())
    if total <= 0.0:
        return float("nan")
    return math.sqrt(float(torch.sort(s2, descending=True).values[:k].sum()) / total)


@torch.no_grad()
def truncation_alignment_of(g: torch.Tensor, k: int, exact_max: int = 2048) -> float:
    """cos(G, G_k) = sqrt(Σ_{i≤k} σ_i² / ‖G‖_F²) computed from G directly, cheaper than a full SVD: when
    min(m, n) ≤ ``exact_max`` (default 2048), exactly from the eigenvalues of the smaller Gram matrix (G Gᵀ or GᵀG,
    float64); beyond that from a randomized rank-(k+10) SVD (``torch.svd_lowrank``, 4 power iterations), which
    gives a slight under-estimate. ``nan`` for G = 0."""
    m, n = g.shape
    small = min(m, n)
    total = float(_f(g).double().pow(2).sum())
    if total <= 0.0 or not math.isfinite(total):
        return float("nan")
    if k >= small:
        return 1.0
    with torch.autocast(device_type=g.device.type, enabled=False):
        if small <= exact_max:
            gd = g.double()
            gram = gd @ gd.T if m <= n else gd.T @ gd
            top = float(torch.linalg.eigvalsh(gram)[-k:].clamp_min(0).sum())
        else:
            _, s, _ = torch.svd_lowrank(_f(g), q=min(k + 10, small), niter=4)
            top = float(s[:k].double().pow(2).sum())
    return math.sqrt(min(top / total, 1.0))


@torch.no_grad()
def product_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right.T`` (m×k, n×k) without forming the m×n product when k is small:
    QR of both factors and the SVD of the k×k core (O((m+n)k²))."""
    left, right = _f(left), _f(right)
    with torch.autocast(device_type=left.device.type, enabled=False):
        _, rl = torch.linalg.qr(left, mode="reduced")
        _, rr = torch.linalg.qr(right, mode="reduced")
        return torch.linalg.svdvals(rl @ rr.T)


class _DeltaCall(nn.Module):
    """``forward()`` = ``layer.delta_weight()``, so torch.func.functional_call can substitute its parameters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.delta_weight()


def trainable_tensors(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The layer's own trainable parameters (not the frozen base layer's), by local name."""
    return {n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad}


def effective_gradient(layer: nn.Module, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Generic effective full-space gradient of any adapter layer: G̃ = J·d, the directional derivative of
    ``layer.delta_weight()`` (m×n, ``nn.Linear`` layout) with respect to the layer's trainable tensors along
    ``direction`` (local parameter name -> tensor of the parameter's shape; missing names count as zero).

    With d = the SGD direction (the parameters' gradients), ΔW moves by −η G̃ per step to first order; for LoRA this
    gives s²(G AᵀA + BBᵀG), for SDS-LoRA s²(G Q_A Q_Aᵀ + Q_B Q_Bᵀ G) (docs/algorithm.md). Computed with
    ``torch.func.jvp`` in the adapter dtype (falls back to the double-backward JVP of ``torch.autograd.functional``
    when a layer's ``delta_weight`` uses an operation without a forward-mode rule); returned in float32 (float64
    stays float64) and detached.

    Raises:
        ValueError: a direction name that is not a trainable tensor of the layer, or a shape mismatch.
    """
    params = trainable_tensors(layer)
    unknown = sorted(set(direction) - set(params))
    if unknown:
        raise ValueError(
            f"effective_gradient(): {unknown} are not trainable tensors of {type(layer).__name__} "
            f"(trainable: {sorted(params)})"
        )
    names = list(params)
    if not names:
        with torch.no_grad():
            return torch.zeros_like(_f(layer.delta_weight()))
    primals = tuple(params[n].detach() for n in names)
    tangents = []
    for n, p in zip(names, primals):
        d = direction.get(n)
        if d is None:
            d = torch.zeros_like(p)
        if d.shape != p.shape:
            raise ValueError(
                f"effective_gradient(): direction {n!r} has shape {tuple(d.shape)}, parameter has "
                f"{tuple(p.shape)}"
            )
        tangents.append(d.detach().to(p.dtype))
    wrapper = _DeltaCall(layer)
    keys = [f"layer.{n}" for n in names]

    def delta(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, dict(zip(keys, ps)), ())

    try:
        _, out = jvp(delta, primals, tuple(tangents))
    except (RuntimeError, NotImplementedError) as e:  # no forward-mode rule for some op: double-backward JVP
        warnings.warn(
            f"forward-mode JVP failed for {type(layer).__name__} ({e}); using the double-backward JVP",
            stacklevel=2,
        )
        with torch.enable_grad():
            _, out = torch.autograd.functional.jvp(delta, primals, tuple(tangents))
    return _f(out.detach())


def optimizer_direction(
    optimizer: torch.optim.Optimizer, param: nn.Parameter, grad: torch.Tensor, *, lr: float | None = None
) -> torch.Tensor | None:
    """The step the optimizer would take for ``param`` given gradient ``grad``, without stepping: the returned d
    satisfies p_new = p − d (to the optimizer's arithmetic). Supported: ``AdamW`` and ``Adam`` (bias-corrected
    moments from the current state, or a fresh state; ``amsgrad``, ``maximize``, decoupled / L2 weight decay) and
    ``SGD`` (momentum, dampening, Nesterov, weight decay). Returns ``None`` for other optimizers (callers then fall
    back to the SGD direction only) and for a parameter the optimizer does not hold. ``lr``: use this learning
    rate instead of the parameter group's (d is proportional to it).
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return None
    p = param.detach()
    g = grad.detach().to(p.dtype)
    lr = float(group["lr"]) if lr is None else float(lr)
    state = optimizer.state.get(param, {})
    if group.get("maximize", False):
        g = -g
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        beta1, beta2 = group["betas"]
        eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            group.get("decoupled_weight_decay", False)
        )
        if wd and not decoupled:
            g = g + wd * p
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        t = float(state.get("step", 0)) + 1.0
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if group.get("amsgrad", False):
            v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        d = lr * (m / bc1) / ((v / bc2).sqrt() + eps)
        if wd and decoupled:
            d = d + lr * wd * p
        return d
    if type(optimizer) is torch.optim.SGD:
        wd, mu = float(group.get("weight_decay", 0.0)), float(group.get("momentum", 0.0))
        if wd:
            g = g + wd * p
        if mu:
            buf = state.get("momentum_buffer")
            buf = g.clone() if buf is None else mu * buf + (1 - float(group.get("dampening", 0.0))) * g
            g = g + mu * buf if group.get("nesterov", False) else buf
        return lr * g
    return None
