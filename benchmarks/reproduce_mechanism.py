"""The SDS-LoRA paper's mechanism figures, from the records of a study run with dense diagnostics.

    python benchmarks/reproduce_mechanism.py docs/reproduction/mechanism-sst2 --out docs/reproduction

Reads the evidence records (``RUN.json`` written by ``sdslora compare --evidence``; each holds the diagnostics every
N steps and the method's events) and draws, LoRA and SDS-LoRA on the same axes, mean over seeds with the seed range
shaded:

* ``<name>_conditioning.png``: stable rank and condition number of the factors over training (the paper: LoRA's
  stable rank falls and its condition number grows; SDS-LoRA's stay put);
* ``<name>_gradient.png``: effective rank of the factor gradients and alignment cos(G, G̃) of the method's effective
  gradient with the full fine-tuning gradient (the paper: SDS-LoRA's effective gradient rank stays near r and its
  alignment is higher);
* ``<name>_bases.png``: SDS-LoRA's basis similarity ‖Q_oldᵀ Q_new‖²/r at every refresh, mean and least similar layer,
  with the largest relative ΔW jump (the paper: the bases stop moving after the early refreshes, similarity → 1).

Prints a Markdown table of first-probe vs last-probe values (mean ± seed range) for docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean
from typing import Any

NAMES = {"lora": "LoRA", "sds": "SDS-LoRA"}


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for f in sorted((folder / "runs").glob("*.json")):
        rec = json.loads(f.read_text())
        by_method.setdefault(rec["method"], []).append(rec)
    return by_method


def band(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    n = min(len(c) for c in curves)
    steps = [c[0] for c in curves[0][:n]]
    vals = [[c[i][1] for c in curves if c[i][1] is not None] for i in range(n)]
    return steps, [mean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def panel(ax: Any, runs: dict[str, list[dict[str, Any]]], key: str, title: str, log: bool = False) -> None:
    for m, recs in runs.items():
        curves = [r["diagnostics"][key] for r in recs if (r.get("diagnostics") or {}).get(key)]
        if not curves:
            continue
        steps, mu, lo, hi = band(curves)
        line, = ax.plot(steps, mu, label=f"{NAMES.get(m, m)} ({len(curves)} seeds)")
        ax.fill_between(steps, lo, hi, alpha=0.25, color=line.get_color())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def figures(runs: dict[str, list[dict[str, Any]]], name: str, out: Path, r: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panel(axes[0], runs, "stable_rank_B", "stable rank of B (mean over layers)")
    panel(axes[1], runs, "stable_rank_A", "stable rank of A")
    panel(axes[2], runs, "kappa_B", "condition number of B", log=True)
    axes[0].axhline(r, color="grey", ls="--", lw=1, label=f"r = {r}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: the factors' conditioning over training (band: seed range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{name}_conditioning.png", dpi=110)
    plt.close(fig)
    files.append(f"{name}_conditioning.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panel(axes[0], runs, "erank_grad_B", "effective rank of ∇B")
    panel(axes[1], runs, "erank_grad_A", "effective rank of ∇A")
    panel(axes[2], runs, "cos_g_geff", "cos(G, G̃): effective vs full gradient")
    for ax in axes[:2]:
        ax.axhline(r, color="grey", ls="--", lw=1, label=f"r = {r}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: the gradient the adapter follows (band: seed range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{name}_gradient.png", dpi=110)
    plt.close(fig)
    files.append(f"{name}_gradient.png")

    sds = runs.get("sds") or []
    refreshes = [[e for e in rec.get("events", []) if e.get("event") == "refresh"] for rec in sds]
    if any(refreshes):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for evs in refreshes:
            steps = [e["step"] for e in evs]
            axes[0].plot(steps, [e.get("sim_A_mean") for e in evs], color="tab:orange", alpha=0.7, lw=1)
            axes[0].plot(steps, [e.get("sim_B_mean") for e in evs], color="tab:green", alpha=0.7, lw=1)
            axes[1].plot(steps, [e.get("sim_A_min") for e in evs], color="tab:orange", alpha=0.7, lw=1)
            axes[1].plot(steps, [e.get("sim_B_min") for e in evs], color="tab:green", alpha=0.7, lw=1)
        axes[0].plot([], [], color="tab:orange", label="row space of A (Q_A)")
        axes[0].plot([], [], color="tab:green", label="column space of B (Q_B)")
        axes[0].set_title("basis similarity ‖Q_oldᵀQ_new‖²/r at each refresh (mean over layers)", fontsize=9)
        axes[0].legend(fontsize=7)
        jump = max((e.get("jump_max") or 0.0) for evs in refreshes for e in evs)
        axes[1].set_title(f"least similar layer; ΔW jump per refresh ≤ {jump:.0e}", fontsize=9)
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{name}: SDS-LoRA's bases over training (one line per seed)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}_bases.png", dpi=110)
        plt.close(fig)
        files.append(f"{name}_bases.png")
    return files


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    keys = [("stable_rank_B", "stable rank of B"), ("kappa_B", "κ of B"), ("erank_grad_B", "erank ∇B"),
            ("erank_grad_A", "erank ∇A"), ("cos_g_geff", "cos(G, G̃)"), ("cos_geff_gstar", "cos(G̃, G*)")]
    lines = ["| metric | method | first probe | last probe |", "|---|---|---|---|"]
    for k, label in keys:
        for m, recs in runs.items():
            curves = [r["diagnostics"][k] for r in recs if (r.get("diagnostics") or {}).get(k)]
            if not curves:
                continue
            steps, mu, lo, hi = band(curves)
            lines.append(f"| {label} | {NAMES.get(m, m)} | {mu[0]:.3g} [{lo[0]:.3g}, {hi[0]:.3g}] (step {steps[0]}) | "
                         f"{mu[-1]:.3g} [{lo[-1]:.3g}, {hi[-1]:.3g}] (step {steps[-1]}) |")
    sims = [[e for e in r.get("events", []) if e.get("event") == "refresh"] for r in runs.get("sds", [])]
    sims = [s for s in sims if s]
    if sims:
        first = [s[0] for s in sims]
        last = [s[-1] for s in sims]
        lines.append(f"| basis similarity (A, B) at refreshes | SDS-LoRA | {mean(e['sim_A_mean'] for e in first):.3f}, "
                     f"{mean(e['sim_B_mean'] for e in first):.3f} (step {first[0]['step']}) | "
                     f"{mean(e['sim_A_mean'] for e in last):.4f}, {mean(e['sim_B_mean'] for e in last):.4f} "
                     f"(step {last[0]['step']}; {len(sims[0])} refreshes) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path, help="an evidence folder (setting.json + runs/)")
    ap.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    a = ap.parse_args()
    runs = load(a.records)
    if not runs:
        raise SystemExit(f"no records in {a.records / 'runs'}")
    r = next(iter(runs.values()))[0]["r"]
    a.out.mkdir(parents=True, exist_ok=True)
    for f in figures(runs, a.records.name, a.out, r):
        print("wrote", a.out / f)
    print(table(runs))


if __name__ == "__main__":
    main()
