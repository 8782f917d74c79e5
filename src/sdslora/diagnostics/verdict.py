"""A plain-words reading of :class:`~sdslora.diagnostics.probe.Diagnostics` (printed by ``sdslora diagnose``).

Verdict thresholds (:func:`verdict`, ``sdslora diagnose``): factors are *well conditioned* if the median over layers
of max(κ_A, κ_B) is < 3, *moderately* if < 10, *badly* otherwise; the effective gradient rank (mean of erank ∇_A and
∇_B) is *low* when below r/2; alignment cos(G, G̃) is *poor* below 0.5, *fair* below 0.8, *good* otherwise.
"""

from __future__ import annotations

import statistics

from .probe import Diagnostics, _nan


def verdict(diag: Diagnostics) -> str:
    """A plain-words reading of :class:`Diagnostics` (thresholds in the module docstring)."""
    rows = diag.rows
    parts = []
    kappas = [
        max(r["kappa_A"], r["kappa_B"])
        for r in rows
        if not _nan(r.get("kappa_A")) and not _nan(r.get("kappa_B"))
    ]
    bad = False
    if kappas:
        med = statistics.median(kappas)
        word = "well" if med < 3 else ("moderately" if med < 10 else "badly")
        if diag.isotropic:  # SDS-LoRA's gradients do not depend on the factors' singular values
            parts.append(
                f"factors are {word} conditioned (median κ {med:.3g}; this does not enter SDS-LoRA's "
                "gradients)"
            )
        else:
            bad = med >= 10
            parts.append(f"factors are {word} conditioned (median κ {med:.3g})")
    er = [v for r in rows for v in (r.get("erank_grad_A"), r.get("erank_grad_B")) if not _nan(v)]
    if er:
        mean_er = sum(er) / len(er)
        low = mean_er < diag.rank / 2
        sf = [
            v for r in rows for v in (r.get("erank_scalefree_A"), r.get("erank_scalefree_B")) if not _nan(v)
        ]
        extra = (
            f", {sum(sf) / len(sf):.2g} without the factors' scaling" if sf and not diag.isotropic else ""
        )
        parts.append(
            f"effective gradient rank {mean_er:.2g} of {diag.rank}" + (" (low)" if low else "") + extra
        )
        bad = bad or low
    cg = diag.summary.get("cos_g_geff")
    if cg is not None:
        word = "poor" if cg < 0.5 else ("fair" if cg < 0.8 else "good")
        parts.append(f"alignment cos(G, G̃) {cg:.2f} ({word})")
        bad = bad or cg < 0.5
    cs = diag.summary.get("cos_geff_gstar")
    if cs is not None:
        parts.append(f"use of the current subspaces cos(G̃, G*) {cs:.2f}")
    text = "; ".join(parts) if parts else "no metric could be computed"
    if not diag.isotropic and kappas and bad:  # a factored (LoRA-family) method
        text += " — SDS-LoRA removes this scaling (its effective gradient is isotropic within the subspaces)"
    elif diag.isotropic and cs is not None and cs > 0.9:
        text += " — the effective gradient is isotropic within the subspaces, as SDS-LoRA intends"
    return text
