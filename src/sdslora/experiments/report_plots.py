"""The comparison report's PNG plots: train loss, the primary metric, diagnostics, the synthetic κ sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .curves import DIAG_KEYS, WINDOW, run_diag_curves, running_mean
from .stats import t_interval

DIAG_TITLES = {"cos_g_geff": "cos(G, G̃): effective vs full gradient", "cos_geff_gstar": "cos(G̃, G*): vs best in subspaces",
               "erank_grad_A": "effective rank of ∇A", "erank_grad_B": "effective rank of ∇B",
               "stable_rank_A": "stable rank of A"}


def _plots(out: Path, groups: dict[str, list[dict[str, Any]]], curves: dict[str, tuple[list[int], list[float]]],
           metric_names: list[str], primary: str, synthetic: dict[str, Any] | None,
           baseline: dict[str, Any] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    # train loss with seed bands (min..max over seeds of the running mean)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for g, rs in groups.items():
        per = [curves[x["run"]] for x in rs if curves[x["run"]][0]]
        if not per:
            continue
        n = min(len(p[0]) for p in per)
        steps = per[0][0][:n]
        sm = [running_mean(p[1][:n]) for p in per]
        mean = [sum(v[i] for v in sm) / len(sm) for i in range(n)]
        ax.plot(steps, mean, label=f"{g} ({len(per)} seed{'s' if len(per) > 1 else ''})")
        if len(sm) > 1:
            ax.fill_between(steps, [min(v[i] for v in sm) for i in range(n)], [max(v[i] for v in sm) for i in range(n)],
                            alpha=0.25)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss ({WINDOW}-step running mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    files.append("loss_curves.png")

    # primary metric per method: mean with its 95 % t-interval over seeds, the majority / chance rate as a line,
    # the axis zoomed to the data (differences of a few points are what matters)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    names = list(groups)
    stats = [t_interval([x["eval"].get(primary) for x in groups[g]]) for g in names]
    ms = [m if m is not None else float("nan") for m, _ in stats]
    hs = [h or 0.0 for _, h in stats]
    if any(hs):
        ax.errorbar(range(len(names)), ms, yerr=hs, fmt="o", capsize=6, ms=7)
    else:  # one seed: no interval to draw
        ax.plot(range(len(names)), ms, "o", ms=7)
    for i, (m, _h) in enumerate(stats):
        if m is not None:
            ax.annotate(f"{m:.3f}", (i, m), textcoords="offset points", xytext=(8, 4), fontsize=8)
    lo = [m - h for m, h in zip(ms, hs) if math.isfinite(m)]
    hi = [m + h for m, h in zip(ms, hs) if math.isfinite(m)]
    base = (baseline or {}).get("primary")
    if base is not None:
        ax.axhline(base, color="grey", ls="--", lw=1, label=f"{baseline['kind']} rate {base:.3f}")
        lo.append(base)
        hi.append(base)
    if lo and hi:
        pad = max(0.01, 0.15 * (max(hi) - min(lo)))
        ax.set_ylim(min(lo) - pad, max(hi) + pad)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    n_seeds = max(len(rs) for rs in groups.values())
    ax.set_ylabel(f"evaluation {primary}" + (" (mean ± 95 % CI over seeds)" if n_seeds > 1 else " (one seed)"))
    if base is not None:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    files.append("metrics.png")

    # diagnostics curves (alignment, effective rank, stable rank)
    diags = {g: [run_diag_curves(out, x) for x in rs] for g, rs in groups.items()}
    keys = [k for k in DIAG_KEYS if any(k in c for cs in diags.values() for c in cs)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for g, cs in diags.items():
                have = [c[k] for c in cs if k in c]
                if not have:
                    continue
                n = min(len(h[0]) for h in have)
                ax.plot(have[0][0][:n], [sum(h[1][i] for h in have) / len(have) for i in range(n)], marker="o",
                        ms=3, label=g)
            ax.set_title(DIAG_TITLES.get(k, k), fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("mean over adapted layers" + (" and seeds" if max(map(len, diags.values())) > 1 else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "diagnostics.png", dpi=110)
        plt.close(fig)
        files.append("diagnostics.png")

    if synthetic:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
        cap = synthetic["setup"]["max_steps"]
        for ax, opt in zip(axes[0], ("sgd", "adam")):
            for m in sorted({r["method"] for r in synthetic["rows"]}):
                rows = [r for r in synthetic["rows"] if r["optimizer"] == opt and r["method"] == m]
                ks = [r["kappa"] for r in rows]
                ys = [r["steps"] if r["steps"] is not None else cap for r in rows]
                ax.plot(ks, ys, marker="o", label=m)
                for k, r in zip(ks, rows):
                    if r["steps"] is None:
                        ax.annotate(f">{cap}", (k, cap), textcoords="offset points", xytext=(-34, -12), fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(plain if axis is ax.yaxis and ax.get_ylim()[1] / ax.get_ylim()[0] < 10
                                         else matplotlib.ticker.NullFormatter())
            ax.set_xlabel("κ (condition number of each factor)")
            ax.set_ylabel("steps to relative error 1e-2")
            ax.set_title(f"{opt.upper()}, best lr per method")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "synthetic_kappa.png", dpi=110)
        plt.close(fig)
        files.append("synthetic_kappa.png")
    return files
