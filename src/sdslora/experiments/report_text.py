"""The comparison report as text: ``report.md`` and the table printed on the terminal."""

from __future__ import annotations

from typing import Any

from .curves import DIAG_KEYS, WINDOW

TIMING_NOTE = ("Step times are not compared here: the runs were made one after another, so on a shared machine their "
               "medians reflect the load at each moment as much as the method. Time ratios measured side by side "
               "(methods interleaved in one process) come from `python benchmarks/overhead.py` (docs/overhead.md); "
               "each run's median step time is in results.json.")


def baseline_row(b: dict[str, Any] | None, primary: str, cols: list[str]) -> dict[str, Any] | None:
    """A table row for the score of a model that learned nothing (majority class / uniform guess), or None."""
    if not b or b.get("primary") is None:
        return None
    name = f"majority class (always {b['class']})" if b.get("kind") == "majority" else "chance (uniform guess)"
    row: dict[str, Any] = {c: "" for c in cols}
    row["method"] = name
    row[primary] = f"{b['primary']:.4f}"
    if b.get("metric") in cols and b.get("value") is not None:
        row[b["metric"]] = f"{b['value']:.4f}"
    return row


def _baseline_text(b: dict[str, Any] | None, n_val: int | None) -> str:
    text = ""
    if b and b.get("kind") == "majority":
        text = (f"; a model that always predicts the majority class ({b['class']}) scores {b['value']:.4f} accuracy"
                + (" and Matthews correlation 0" if b.get("primary") == 0.0 else ""))
    elif b and b.get("kind") == "chance":
        text = f"; a uniform guess among the options scores {b['value']:.4f} accuracy"
    if n_val:
        text += (f"; every run trained on the training data minus a validation split of {n_val} rows, on which the "
                 "learning rates were chosen")
    return text


def _table_baseline(s: dict[str, Any]) -> dict[str, Any] | None:
    runs = s.get("runs") or []
    primary = runs[0].get("primary_metric") if runs else None
    return baseline_row(s["setup"].get("baseline"), primary, s["table_columns"]) if primary else None


def _md_table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(s: dict[str, Any]) -> str:
    st, mc = s["setup"], s["machine"]
    lines = [f"# sdslora compare: {st['task']} on {st['model']}", ""]
    lines += [f"Command: `{st['command'] or 'sdslora compare ...'}`  ",
              f"Machine: {mc.get('processor')} ({mc.get('cpu_count')} CPUs visible, torch threads "
              f"{mc.get('torch_threads')}{', GPU ' + mc['gpu'] if mc.get('gpu') else ''}), {mc.get('platform')}; "
              f"torch {mc.get('torch')}, transformers {mc.get('transformers')}, sdslora {mc.get('sdslora')}  ",
              f"Date (UTC): {mc.get('time_utc')}; wall time of this command: {st['wall_s']:.0f} s "
              "(runs already finished in the output folder are not re-run and not counted)", ""]
    syn = s.get("synthetic")
    if syn:
        su = syn["setup"]
        lines += ["## The mechanism: a synthetic κ sweep", "",
                  f"A frozen {su['n']}×{su['n']} linear layer adapted at rank {su['r']} by the real LoRA and SDS-LoRA "
                  "layer classes, loss ½‖ΔW − M*‖²_F (M* a rank-r target whose subspaces are tilted away from the "
                  "start). Both methods start from the same product ΔW₀ = UVᵀ, split as B₀ = U·diag(g)·R, "
                  "A₀ = Rᵀ·diag(1/g)·Vᵀ with each factor's condition number κ and a random r×r rotation R; SDS-LoRA "
                  "re-parameterises that start (warm-up length 1). Full-batch steps until ‖ΔW − M*‖_F/‖M*‖_F ≤ "
                  f"{su['tol']:g}, at each method's best learning rate from the grid (SGD {su['sgd_lrs']}, Adam "
                  f"{su['adam_lrs']}); budget {su['max_steps']} steps; {su['dtype']}; {su['seconds']:.0f} s.", ""]
        kappas = sorted({r["kappa"] for r in syn["rows"]})
        cols = ["optimizer", "method"] + [f"κ={k:g}" for k in kappas]
        rows = []
        for opt in ("sgd", "adam"):
            for m in sorted({r["method"] for r in syn["rows"]}):
                row = {"optimizer": opt.upper(), "method": m}
                for r in syn["rows"]:
                    if r["optimizer"] == opt and r["method"] == m:
                        row[f"κ={r['kappa']:g}"] = (f"{r['steps']} (lr {r['best_lr']:g})" if r["steps"] is not None
                                                    else f">{su['max_steps']}")
                rows.append(row)
        lines += [_md_table(cols, rows), "", "![steps to target vs κ](synthetic_kappa.png)", "",
                  "LoRA's effective full-space gradient is G·AᵀA + BBᵀ·G: the factors' squared singular values "
                  "reweight the directions, so a skewed split slows the directions with small factor singular values. "
                  "SDS-LoRA's is G·P_A + P_B·G, which does not depend on how the product is split. Adam's per-"
                  "coordinate normalisation hides part of the effect.", ""]
    lines += [f"## {st['task']}: {', '.join(st['methods'])}", "",
              f"Model `{st['model']}`; targets {st['targets']} (excluding {st['exclude']}) = {st['adapted_layers']} "
              f"layers at rank {st['ranks']}, α = {st['alpha']} ({st['scaling']}); trained in full in every method: "
              f"{st['modules_to_save']}. {st['steps']} optimizer steps of batch {st['batch_size']}×{st['grad_accum']} "
              f"(max length {st['max_length']}), AdamW, {st['scheduler']} schedule; seeds {st['seeds']}; evaluation "
              f"on {st['n_eval']} examples (the task's evaluation split)"
              + _baseline_text(st.get("baseline"), st.get("n_val")) + ". Metrics are mean ± half-width of the 95 % "
              "t-interval over seeds (the mean alone with one seed). Learning rates: "
              + "; ".join(f"{m} {v['lr']:g} ({v['source']})" for m, v in s["learning_rates"].items()) + ".", "",
              _md_table(s["table_columns"], s["table"] + [r for r in [_table_baseline(s)] if r]), "",
              f"Loss target: {st['loss_target']:.4f} ({st['loss_target_rule']}); steps = first step whose "
              f"{WINDOW}-step running-mean train loss is at or below it. "
              + ("CUDA peak memory / LoRA: measured peak allocation (torch.cuda.max_memory_allocated) of each run "
                 "over LoRA's at the same rank." if any(g["memory_kind"] == "cuda_max_allocated"
                                                        for g in s["groups"].values()) else
                 "Adapter training state / LoRA (analytic): bytes counted from tensor sizes, not measured — adapter "
                 "tensors (incl. SDS-LoRA's Q buffers) + gradients and two AdamW moments of every trainable parameter "
                 "+ activations the adapter path saves (tokens × r, or 2r for SDS-LoRA), over LoRA's at the same "
                 "rank. The frozen model's weights and activations, common to every method, are left out, so this "
                 "ratio is far larger than that of the whole training state (docs/overhead.md, frozen model "
                 "included: 1.009 for SDS-LoRA / LoRA)."), "",
              TIMING_NOTE, "",
              "![train loss](loss_curves.png)", "", "![metrics](metrics.png)", ""]
    diag_rows = []
    for g, v in s["groups"].items():
        d = v["diagnostics_mean_over_probes"]
        if d:
            row = {"method": g}
            for k in DIAG_KEYS:
                row[k] = f"{d[k]['mean']:.3f}" if k in d and d[k]["mean"] is not None else "-"
            diag_rows.append(row)
    if diag_rows:
        lines += ["## Diagnostics (mean over probes during training)", "",
                  "cos_g_geff = cos(G, G̃) (full gradient vs the method's effective gradient), cos_geff_gstar = "
                  "cos(G̃, G*) (vs the best gradient realisable in the current subspaces), erank = effective rank of "
                  "the factor gradients, stable_rank_A of the A factor (docs/diagnostics.md). Full fine-tuning has no factors.", "",
                  _md_table(["method", *DIAG_KEYS], diag_rows), "", "![diagnostics](diagnostics.png)", ""]
    lines += ["Every number above is in `results.json`; per-run files (config, metrics.jsonl, adapter, PEFT export, "
              "eval.json) are under `runs/`.", ""]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    """The comparison table on the terminal (rich if installed, plain text otherwise)."""
    rows = list(summary["table"])
    cols = summary["table_columns"]
    runs = summary.get("runs") or []
    base = baseline_row(summary["setup"].get("baseline"), runs[0].get("primary_metric"), cols) if runs else None
    if base is not None:
        rows.append(base)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"sdslora compare: {summary['setup']['task']} ({summary['setup']['model']})")
        for c in cols:
            t.add_column(c, justify="right" if c not in ("method",) else "left")
        for row in rows:
            t.add_row(*[str(row.get(c, "")) for c in cols])
        import sys

        # not a terminal (a log file, CI): a wide console so that the table is not cut at 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(t)
    except ImportError:
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in cols))
    print(TIMING_NOTE.replace("`", ""))
