"""The mechanism in its clearest form: a synthetic least-squares layer where only the factors' conditioning differs.

Setup (docs/algorithm.md): a frozen ``nn.Linear(n, n)`` (n = 128) adapted at rank r = 8 by our real layer classes
(``attach`` + ``Controller``), scale s = 1. Loss L = ½‖ΔW − M*‖²_F, computed through the layer's forward on the
identity batch (``layer(I) − W0ᵀ = ΔWᵀ``). Both methods start from the same product ΔW₀ = U Vᵀ (rank r, unit
singular values), split between the factors with condition number κ:

    B₀ = U diag(g) R,   A₀ = Rᵀ diag(1/g) Vᵀ,   g_i = κ^{i/(r−1) − ½}  (i = 0..r−1),

so each factor has condition number κ (their spectra skewed in opposite directions) while the product is the same
for every κ,

with R a random r×r rotation. SDS-LoRA's re-parameterisation (warm-up length 1) turns that start into
Q_B = U, Q_A = V, A = ½Vᵀ, B = ½U whatever κ is. The target M* = U* S* V*ᵀ is rank r with U*, V* the
orthonormalised U + ½N, V + ½N' and singular values in [1, 2]. Reported: full-batch steps until
‖ΔW − M*‖_F / ‖M*‖_F ≤ 1e-2 with SGD and with Adam, each at the method's best learning rate from a grid (the same
grid for both methods), ``None`` when the budget runs out.

LoRA's effective gradient is G AᵀA + BBᵀG (docs/algorithm.md): a skewed split slows the directions with small factor
singular values by κ-dependent factors; SDS-LoRA's is G P_A + P_B G, independent of the split.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

SGD_LRS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class _Net(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layer = nn.Linear(n, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _orth(x: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r))[None, :]


def problem(n: int = 128, r: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The fixed parts of the problem: W0, U, V (start subspaces), R (rotation), M* (target)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731  (float64 draws)
    u, v = _orth(randn(n, r)), _orth(randn(n, r))
    rot = _orth(randn(r, r))
    us, vs = _orth(u + 0.5 * randn(n, r) / math.sqrt(n / r)), _orth(v + 0.5 * randn(n, r) / math.sqrt(n / r))
    s_star = torch.linspace(1.0, 2.0, r, dtype=torch.float64)
    out = {"W0": randn(n, n) / math.sqrt(n), "U": u, "V": v, "R": rot, "M": us @ torch.diag(s_star) @ vs.T}
    return {k: t.to(dtype) for k, t in out.items()}


def run_one(method: str, kappa: float, opt_name: str, lr: float, max_steps: int = 2000, tol: float = 1e-2,
            prob: dict[str, torch.Tensor] | None = None) -> int | None:
    """Steps until the relative error reaches ``tol`` (None: not within ``max_steps`` or diverged)."""
    from ..config import AdapterConfig
    from ..control import Controller
    from ..model import attach

    prob = prob or problem()
    n, r = prob["U"].shape
    net = _Net(n).to(prob["W0"].dtype)
    with torch.no_grad():
        net.layer.weight.copy_(prob["W0"])
    opts = {"warmup_steps": 1} if method == "sds" else {}
    adapted = attach(net, AdapterConfig(method=method, r=r, alpha=float(r), scaling="standard", options=opts,
                                        target_modules=["layer"]))
    layer = adapted.adapter_layers()["layer"]
    gsplit = torch.tensor([kappa ** (i / max(r - 1, 1) - 0.5) for i in range(r)], dtype=prob["U"].dtype)
    with torch.no_grad():
        layer.lora_B.copy_(prob["U"] @ torch.diag(gsplit) @ prob["R"])
        layer.lora_A.copy_(prob["R"].T @ torch.diag(1 / gsplit) @ prob["V"].T)
    params = adapted.trainable_parameters()
    opt = torch.optim.SGD(params, lr=lr) if opt_name == "sgd" else torch.optim.Adam(params, lr=lr)
    ctl = Controller(adapted, opt, total_steps=max_steps + 1)
    if method == "sds":
        ctl.step()  # t = 1 = warm-up length: the SVD re-parameterisation of the shared start
    eye = torch.eye(n, dtype=prob["U"].dtype)
    target = (prob["W0"] + prob["M"]).T
    m_norm = float(prob["M"].norm())
    for step in range(max_steps + 1):
        out = adapted(eye)
        err = float((out.detach() - target).norm()) / m_norm
        if err <= tol:
            return step
        if not math.isfinite(err) or err > 1e3:
            return None
        if step == max_steps:
            return None
        loss = 0.5 * (out - target).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctl.step()
    return None


def kappa_sweep(kappas: tuple[float, ...] = (1.0, 10.0, 100.0), methods: tuple[str, ...] = ("lora", "sds"),
                max_steps: int = 2000, sgd_lrs: tuple[float, ...] = SGD_LRS, adam_lrs: tuple[float, ...] = ADAM_LRS,
                seed: int = 0) -> dict[str, Any]:
    """Steps to target for every (optimizer, method, κ) at the best learning rate of the grid.

    Returns ``{"rows": [{"optimizer", "method", "kappa", "steps", "best_lr", "by_lr": {lr: steps}}], "setup": ...}``.
    """
    t0 = time.perf_counter()
    prob = problem(seed=seed)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 128x128 problems: one thread is fastest and leaves the other cores alone
    try:
        for opt_name, lrs in (("sgd", sgd_lrs), ("adam", adam_lrs)):
            for method in methods:
                for kappa in kappas:
                    rows.append(_best_over_grid(method, kappa, opt_name, lrs, max_steps, prob))
    finally:
        torch.set_num_threads(threads)
    setup = {"n": int(prob["U"].shape[0]), "r": int(prob["U"].shape[1]), "tol": 1e-2, "max_steps": max_steps,
             "sgd_lrs": list(sgd_lrs), "adam_lrs": list(adam_lrs), "seed": seed, "dtype": "float32",
             "seconds": time.perf_counter() - t0}
    return {"rows": rows, "setup": setup}


def _best_over_grid(method: str, kappa: float, opt_name: str, lrs: tuple[float, ...], max_steps: int,
                    prob: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each learning rate runs at most as long as the best one so far (it cannot win after that): the grid's
    minimum is exact, and a learning rate marked None did not beat it within that budget."""
    by_lr: dict[float, int | None] = {}
    cap = max_steps
    for lr in lrs:
        s = run_one(method, kappa, opt_name, lr, cap, prob=prob)
        by_lr[lr] = s
        if s is not None:
            cap = min(cap, s)
    ok = {lr: s for lr, s in by_lr.items() if s is not None}
    best = min(ok, key=ok.__getitem__) if ok else None
    return {"optimizer": opt_name, "method": method, "kappa": kappa,
            "steps": ok[best] if best is not None else None, "best_lr": best,
            "by_lr": {str(k): v for k, v in by_lr.items()}}
