"""The evidence report's PNG plots of one study: validation curves, the primary metric vs rank, diagnostics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .evidence_analysis import DIAG, DIAG_TITLES, _name
from .stats import mean


def _plots(name: str, setting: dict[str, Any], runs: list[dict[str, Any]], an: dict[str, Any], out_dir: Path
           ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = setting["primary_metric"]
    key = primary if setting["kind"] == "classification" else "loss"
    by_run = {x["run"]: x for x in runs}
    files = []
    ranks = sorted({g["r"] for g in an["groups"] if g["r"] is not None})
    full = next((g for g in an["groups"] if g["label"] == "full"), None)
    if ranks:
        fig, axes = plt.subplots(1, len(ranks), figsize=(4.6 * len(ranks), 3.6), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], ranks):
            for g in [x for x in an["groups"] if x["r"] == r] + ([full] if full else []):
                curves = [by_run[n]["curve"] for n in g["runs"] if by_run[n].get("curve")]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                steps = [c["step"] for c in curves[0][:n]]
                vals = [[c[i].get(key) for c in curves] for i in range(n)]
                ms = [mean(v) for v in vals]
                line, = ax.plot(steps, ms, marker="o", ms=3,
                                label=f"{_name(g['label'])} (lr {g['lr']:g}, {len(curves)} seed{'s' * (len(curves) > 1)})")
                if len(curves) > 1:
                    lo = [min(x for x in v if x is not None) for v in vals]
                    hi = [max(x for x in v if x is not None) for v in vals]
                    ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
            vb = setting.get("val_baseline") or {}  # the curves are on the validation split: its own rate
            if vb.get("primary") is not None and key == primary:
                ax.axhline(vb["primary"], color="grey", ls="--", lw=1, label=f"{vb['kind']} rate (validation split)")
            ax.set_title(f"rank {r}")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"validation {key} (mean, band = seed range)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{name}: learning curves on the validation split", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_curves.png", dpi=110)
        plt.close(fig)
        files.append(f"{name}_curves.png")

        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        labels = [m for m in setting["methods"] if m != "full"]
        for j, lab in enumerate(labels):
            gs = sorted((g for g in an["groups"] if g["label"] == lab and g["mean"] is not None), key=lambda g: g["r"])
            if not gs:
                continue
            xs = [g["r"] * (1 + 0.04 * (j - len(labels) / 2)) for g in gs]
            ax.errorbar(xs, [g["mean"] for g in gs], yerr=[g["ci95"] or 0 for g in gs], marker="o", capsize=4,
                        label=_name(lab))
        if full is not None and full["mean"] is not None:
            ax.axhline(full["mean"], color="black", lw=1.2, label=f"{_name('full')} (mean)")
            if full["ci95"]:
                ax.axhspan(full["mean"] - full["ci95"], full["mean"] + full["ci95"], color="black", alpha=0.1)
        base = (setting.get("baseline") or {}).get("primary")
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=1, label=f"{setting['baseline']['kind']} rate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"evaluation {primary} (mean ± 95 % CI)")
        ax.set_title(f"{name}: {primary} vs rank", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_rank.png", dpi=110)
        plt.close(fig)
        files.append(f"{name}_rank.png")

        # the mechanism over training: diagnostics of the chosen runs, mean over seeds, one line per method/rank
        keys = [k for k in DIAG if any((by_run[n].get("diagnostics") or {}).get(k) for g in an["groups"]
                                       for n in g["runs"])]
        if keys:
            cols = min(3, len(keys))
            rows_n = math.ceil(len(keys) / cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False)
            for ax in axes.flat[len(keys):]:
                ax.set_visible(False)
            for ax, k in zip(axes.flat, keys):
                for g in an["groups"]:
                    cs = [by_run[n]["diagnostics"][k] for n in g["runs"] if (by_run[n].get("diagnostics") or {}).get(k)]
                    if not cs:
                        continue
                    n = min(len(c) for c in cs)
                    steps = [c[0] for c in cs[0][:n]]
                    line, = ax.plot(steps, [mean([c[i][1] for c in cs]) for i in range(n)], marker="o", ms=3,
                                    label=f"{_name(g['label'])} r={g['r']}")
                    if len(cs) > 1:  # the seed range
                        ax.fill_between(steps, [min(c[i][1] for c in cs) for i in range(n)],
                                        [max(c[i][1] for c in cs) for i in range(n)], alpha=0.2,
                                        color=line.get_color())
                ax.set_title(DIAG_TITLES[k], fontsize=9)
                ax.set_xlabel("optimizer step")
                if k.startswith("kappa"):
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
            for row in axes:
                row[0].set_ylabel("mean over layers, seeds (band: range)")
            axes.flat[len(keys) - 1].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}_diagnostics.png", dpi=110)
            plt.close(fig)
            files.append(f"{name}_diagnostics.png")
    return files
