"""Float64 checks of the diagnostics metrics (SPEC.md §2) against direct computations with known answers, and of
the generic effective gradient (JVP through delta_weight) against the closed forms of SPEC.md §1.2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sdslora
from sdslora.diagnostics import (
    condition_number,
    cosine,
    effective_gradient,
    effective_rank,
    optimizer_direction,
    orthonormal_basis,
    stable_rank,
    tangent_projection,
    truncation_alignment,
    truncation_alignment_of,
)

D = torch.float64


def _orth(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=D))
    return q


def _with_sv(m: int, n: int, sv: list[float], seed: int = 0) -> torch.Tensor:
    k = len(sv)
    return _orth(m, k, seed) @ torch.diag(torch.tensor(sv, dtype=D)) @ _orth(n, k, seed + 1).T


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale


def test_effective_rank_known_values() -> None:
    assert effective_rank(_with_sv(10, 7, [2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0, rel=1e-12)
    assert effective_rank(_with_sv(6, 9, [5.0])) == pytest.approx(1.0, rel=1e-12)
    p = torch.tensor([0.75, 0.25], dtype=D)
    assert effective_rank(_with_sv(8, 8, [3.0, 1.0])) == pytest.approx(
        math.exp(float(-(p * p.log()).sum())), rel=1e-12
    )
    assert math.isnan(effective_rank(torch.zeros(3, 4, dtype=D)))


def test_stable_rank_and_condition_number() -> None:
    q = _orth(12, 5, 3)
    assert condition_number(q) == pytest.approx(1.0, rel=1e-12)
    assert condition_number(q.T) == pytest.approx(1.0, rel=1e-12)
    assert stable_rank(q) == pytest.approx(5.0, rel=1e-12)
    m = _with_sv(9, 7, [5.0, 2.0, 1.0])
    assert condition_number(m[:, :]) == float("inf")  # rank 3 < 7 columns: σ_min = 0 (up to round-off)
    m3 = _with_sv(3, 7, [5.0, 2.0, 1.0])
    assert condition_number(m3) == pytest.approx(5.0, rel=1e-12)
    assert stable_rank(m3) == pytest.approx((25 + 4 + 1) / 25, rel=1e-12)
    assert math.isnan(condition_number(torch.zeros(2, 3, dtype=D)))


def test_condition_number_of_rank_deficient_is_inf() -> None:
    m = torch.zeros(4, 3, dtype=D)
    m[0, 0], m[1, 1] = 2.0, 1.0
    assert condition_number(m) == float("inf")


def test_cosine_identities() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D)
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-14)
    assert cosine(x, -3 * x) == pytest.approx(-1.0, abs=1e-14)
    assert cosine(x, y) == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), rel=1e-13)
    y_perp = y - (x * y).sum() / (x * x).sum() * x
    assert cosine(x, y_perp) == pytest.approx(0.0, abs=1e-14)
    assert math.isnan(cosine(x, torch.zeros_like(x)))
    with pytest.raises(ValueError, match="shapes differ"):
        cosine(x, y.T)


def test_tangent_projection_against_projectors() -> None:
    g = torch.Generator().manual_seed(1)
    G = torch.randn(11, 8, generator=g, dtype=D)
    B = torch.randn(11, 3, generator=g, dtype=D)
    A = torch.randn(3, 8, generator=g, dtype=D)
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    ref = G - (torch.eye(11, dtype=D) - PB) @ G @ (torch.eye(8, dtype=D) - PA)
    gstar = tangent_projection(G, orthonormal_basis(B), orthonormal_basis(A.T))
    _close(gstar, ref)
    # G* is an orthogonal projection of G: ‖G*‖/‖G‖ = cos(G, G*), and projecting twice changes nothing
    assert cosine(G, gstar) == pytest.approx(float(gstar.norm() / G.norm()), rel=1e-12)
    _close(tangent_projection(gstar, orthonormal_basis(B), orthonormal_basis(A.T)), gstar)
    # a zero factor has an empty basis: G* = G P_A
    _close(
        tangent_projection(G, orthonormal_basis(torch.zeros(11, 3, dtype=D)), orthonormal_basis(A.T)), G @ PA
    )


def test_truncation_alignment_eckart_young() -> None:
    g = torch.Generator().manual_seed(2)
    G = torch.randn(10, 7, generator=g, dtype=D)
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    for k in (1, 3, 7):
        gk = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert truncation_alignment(s, k) == pytest.approx(cosine(G, gk), rel=1e-12)
        assert truncation_alignment(s, k) == pytest.approx(float(gk.norm() / G.norm()), rel=1e-12)
        assert truncation_alignment_of(G, k) == pytest.approx(cosine(G, gk), rel=1e-12)  # Gram route, exact
        assert truncation_alignment_of(G.T, k) == pytest.approx(cosine(G, gk), rel=1e-12)
    # randomized route (large layers): a close under-estimate for a matrix with a decaying spectrum
    Gd = _with_sv(60, 40, [0.7**i for i in range(40)], seed=4)
    exact = truncation_alignment(torch.linalg.svdvals(Gd), 3)
    approx = truncation_alignment_of(Gd, 3, exact_max=0)
    assert approx == pytest.approx(exact, rel=1e-6) and approx <= exact + 1e-12


def _layer(method: str, seed: int = 0) -> sdslora.methods.AdapterLayer:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(9, 12)).double()
    cfg = sdslora.AdapterConfig(method=method, r=3, alpha=4, target_modules=["0"], adapter_dtype="base")
    layer = sdslora.attach(base, cfg).adapter_layers()["0"]
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(3, 9, generator=g, dtype=D))
        layer.lora_B.copy_(torch.randn(12, 3, generator=g, dtype=D) * torch.tensor([3.0, 1.0, 0.1], dtype=D))
    return layer


def test_generic_jvp_equals_lora_closed_form() -> None:
    layer = _layer("lora")
    s, A, B = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
    G = torch.randn(12, 9, generator=torch.Generator().manual_seed(5), dtype=D)
    geff = effective_gradient(layer, {"lora_A": s * B.T @ G, "lora_B": s * G @ A.T})
    _close(geff, s**2 * (G @ A.T @ A + B @ B.T @ G))
    assert geff.dtype == D


def test_generic_jvp_equals_sds_closed_form() -> None:
    layer = _layer("sds")
    layer.reparameterise(False)
    s = layer.scale
    qb, qa = layer.lora_QB, layer.lora_QA.T  # Q_B [out, r], Q_A [in, r]
    G = torch.randn(12, 9, generator=torch.Generator().manual_seed(6), dtype=D)
    geff = effective_gradient(layer, {"lora_A": s * qb.T @ G, "lora_B": s * G @ qa})
    _close(geff, s**2 * (G @ qa @ qa.T + qb @ qb.T @ G))


def test_generic_jvp_matches_finite_difference_and_checks_names() -> None:
    layer = _layer("lora", seed=3)
    d = {"lora_A": torch.randn(3, 9, dtype=D), "lora_B": torch.randn(12, 3, dtype=D)}
    eps = 1e-6
    with torch.no_grad():
        w0 = layer.delta_weight().clone()
        layer.lora_A.add_(eps * d["lora_A"])
        layer.lora_B.add_(eps * d["lora_B"])
        w1 = layer.delta_weight().clone()
        layer.lora_A.sub_(eps * d["lora_A"])
        layer.lora_B.sub_(eps * d["lora_B"])
    _close(effective_gradient(layer, d), (w1 - w0) / eps, rtol=1e-5)
    with pytest.raises(ValueError, match="not trainable tensors"):
        effective_gradient(layer, {"lora_QA": torch.zeros(3, 9, dtype=D)})
    with pytest.raises(ValueError, match="shape"):
        effective_gradient(layer, {"lora_A": torch.zeros(9, 3, dtype=D)})


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW([p], lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.Adam([p], lr=0.02, weight_decay=0.05, amsgrad=True),
        lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.SGD([p], lr=0.1),
    ],
)
def test_optimizer_direction_is_the_step_taken(make) -> None:
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(4, 5, generator=g, dtype=D))
    opt = make(p)
    for _ in range(3):  # a fresh state first, then with history
        grad = torch.randn(4, 5, generator=g, dtype=D)
        d = optimizer_direction(opt, p, grad)
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        _close(d, before - p.detach(), rtol=1e-12)


def test_optimizer_direction_unsupported_is_none() -> None:
    p = nn.Parameter(torch.randn(3, 3, dtype=D))
    assert optimizer_direction(torch.optim.RMSprop([p]), p, torch.ones(3, 3, dtype=D)) is None
    other = nn.Parameter(torch.randn(3, 3, dtype=D))
    assert optimizer_direction(torch.optim.AdamW([p]), other, torch.ones(3, 3, dtype=D)) is None
