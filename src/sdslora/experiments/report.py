"""The comparison report: ``report.md`` (tables), PNG plots and ``results.json`` with every number.

Table columns (per method and rank, over seeds): the primary metric (and the task's other metrics) as mean ± the
half-width of the 95 % t-interval, trainable parameters, final train loss (mean of the last 10 logged losses), steps
to reach the loss target (first step whose 10-step running mean is at or below it), and the memory ratio to LoRA at
the same rank: on CPU the *analytic adapter-side training state* (:func:`~sdslora.experiments.train.
training_state_bytes`: adapter tensors + gradients and AdamW moments of the trainable parameters + activations the
adapter path saves; not the process's memory), on CUDA the measured ``torch.cuda.max_memory_allocated``. The
majority / chance rate of the evaluation split is a row of the table and a line in the metrics plot.

Step times are not compared: the runs of a comparison are made one after another, so on a shared machine their
medians measure the load at each moment as much as the method (SDS-LoRA once read 0.08× LoRA that way).
``results.json`` keeps each run's median step time; time ratios come from ``benchmarks/overhead.py``, which
interleaves the methods in one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .run_folder import write_json
from .stats import mean as _mean
from .stats import sample_var, t_interval

TIMING_NOTE = ("Step times are not compared here: the runs were made one after another, so on a shared machine their "
               "medians reflect the load at each moment as much as the method. Time ratios measured side by side "
               "(methods interleaved in one process) come from `python benchmarks/overhead.py` (docs/overhead.md); "
               "each run's median step time is in results.json.")
DIAG_KEYS = ("cos_g_geff", "cos_geff_gstar", "erank_grad_A", "erank_grad_B", "stable_rank_A")
WINDOW = 10
DIAG_TITLES = {"cos_g_geff": "cos(G, G̃): effective vs full gradient", "cos_geff_gstar": "cos(G̃, G*): vs best in subspaces",
               "erank_grad_A": "effective rank of ∇A", "erank_grad_B": "effective rank of ∇B",
               "stable_rank_A": "stable rank of A"}


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return 0.0 if xs else None
    return math.sqrt(sample_var(xs))


def _pm(xs: list[float], digits: int = 4) -> str:
    """mean ± half-width of the 95 % t-interval over seeds (the mean alone for one seed)."""
    m, h = t_interval(xs)
    if m is None:
        return "-"
    return f"{m:.{digits}f}" if h is None else f"{m:.{digits}f} ± {h:.{digits}f}"


def _ci(xs: list[float]) -> float | None:
    return t_interval(xs)[1]


def run_loss_curve(out: Path, res: dict[str, Any]) -> tuple[list[int], list[float]]:
    """A run's train-loss curve: from its result record when it carries one, else from its folder."""
    if res.get("loss_curve"):
        return [int(s) for s, _ in res["loss_curve"]], [float(v) for _, v in res["loss_curve"]]
    return loss_curve(out / "runs" / res["run"])


def run_diag_curves(out: Path, res: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    if res.get("diagnostics"):
        return {k: ([int(s) for s, _ in v], [float(x) for _, x in v]) for k, v in res["diagnostics"].items()}
    return diag_curves(out / "runs" / res["run"])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a half-written last line of an interrupted run
    return out


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and r.get("loss") is not None]
    return [int(r["step"]) for r in recs], [float(r["loss"]) for r in recs]


def running_mean(xs: list[float], w: int = WINDOW) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def steps_to_target(steps: list[int], losses: list[float], target: float) -> int | None:
    for s, v in zip(steps, running_mean(losses)):
        if v <= target:
            return s
    return None


def diag_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Diagnostics summary keys over steps, from diagnostics.jsonl (or the diag/ keys in metrics.jsonl)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    recs = read_jsonl(run_dir / "diagnostics.jsonl")
    if recs:
        for r in recs:
            for k, v in (r.get("summary") or {}).items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    curves.setdefault(k, ([], []))
                    curves[k][0].append(int(r.get("step", 0)))
                    curves[k][1].append(float(v))
        return curves
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        for k, v in r.items():
            if k.startswith("diag/") and isinstance(v, (int, float)):
                curves.setdefault(k[5:], ([], []))
                curves[k[5:]][0].append(int(r["step"]))
                curves[k[5:]][1].append(float(v))
    return curves


def _mem_column(measured: bool) -> str:
    """The memory column's name: what it is (an analytic count of the adapter-side training state on CPU, the
    measured CUDA peak on a GPU)."""
    return "CUDA peak memory / LoRA" if measured else "adapter training state / LoRA (analytic)"


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


def _label(method: str, r: int, multi_rank: bool) -> str:
    return method if method == "full" or not multi_rank else f"{method} r={r}"


def write_report(out: Path, cc: Any, results: list[dict[str, Any]], *, synthetic: dict[str, Any] | None,
                 sweep: dict[str, Any], machine: dict[str, Any], wall_s: float,
                 baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.md, the PNGs and results.json into ``out``; return the results.json content."""
    base = cc.base
    ranks = sorted({r["r"] for r in results})
    multi = len(ranks) > 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault(_label(res["method"], res["r"], multi), []).append(res)
    curves = {res["run"]: run_loss_curve(out, res) for res in results}
    finals = {g: _mean([x["final_train_loss"] for x in rs]) for g, rs in groups.items()}
    target = cc.loss_target if cc.loss_target is not None else max(v for v in finals.values() if v is not None)
    metric_names = [k for k, v in results[0]["eval"].items() if isinstance(v, (int, float)) and k != "n"]
    primary = results[0]["primary_metric"]
    metric_names.sort(key=lambda k: k != primary)

    def ref_for(res_group: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        r = res_group[0]["r"]
        return groups.get(_label("lora", r, multi)) or groups.get("lora")

    table, summary_groups = [], {}
    for g, rs in groups.items():
        ref = ref_for(rs)
        st = _mean([x["step_time_median_s"] for x in rs])
        mem_key = "cuda_peak_bytes" if rs[0].get("cuda_peak_bytes") else None
        mem = _mean([x[mem_key] if mem_key else x["memory_bytes_analytic"]["total"] for x in rs])
        st_ref = _mean([x["step_time_median_s"] for x in ref]) if ref else None
        mem_ref = _mean([x[mem_key] if mem_key else x["memory_bytes_analytic"]["total"] for x in ref]) if ref else None
        reach = [steps_to_target(*curves[x["run"]], target) for x in rs]
        diag = {}
        for x in rs:
            for k, (_, vs) in run_diag_curves(out, x).items():
                diag.setdefault(k, []).append(_mean(vs))
        row = {"method": g}
        for k in metric_names:
            row[k] = _pm([x["eval"].get(k) for x in rs])
        row.update({
            "trainable params": f"{rs[0]['trainable_parameters']:,}",
            "final train loss": _pm([x["final_train_loss"] for x in rs]),
            "steps to loss target": (_pm([float(s) for s in reach if s is not None], 0)
                                     + ("" if all(s is not None for s in reach) else f" ({reach.count(None)} not)")),
            _mem_column(bool(mem_key)): f"{mem / mem_ref:.2f}" if mem and mem_ref else "-",
            "lr": f"{rs[0]['lr']:g}",
        })
        table.append(row)
        summary_groups[g] = {
            "runs": [x["run"] for x in rs], "seeds": [x["seed"] for x in rs], "r": rs[0]["r"], "lr": rs[0]["lr"],
            "metrics": {k: {"mean": _mean([x["eval"].get(k) for x in rs]), "std": _std([x["eval"].get(k) for x in rs]),
                            "ci95": _ci([x["eval"].get(k) for x in rs]),
                            "values": [x["eval"].get(k) for x in rs]} for k in metric_names},
            "trainable_parameters": rs[0]["trainable_parameters"],
            "final_train_loss": {"mean": finals[g], "values": [x["final_train_loss"] for x in rs]},
            # kept for readers of results.json; NOT a side-by-side measurement (see TIMING_NOTE), not in the report
            "steps_to_target": reach, "step_time_median_s": st, "step_time_ratio_to_lora": st / st_ref if st and st_ref else None,
            "memory_bytes": mem, "memory_kind": "cuda_max_allocated" if mem_key else "analytic_training_state",
            "memory_ratio_to_lora": mem / mem_ref if mem and mem_ref else None,
            "peak_rss_growth_mb": [x.get("peak_rss_growth_mb") for x in rs],
            "diagnostics_mean_over_probes": {k: {"mean": _mean(v), "values": v} for k, v in diag.items()},
        }
    measured = any(x.get("cuda_peak_bytes") for x in results)
    cols = (["method"] + metric_names + ["trainable params", "final train loss", "steps to loss target",
                                         _mem_column(measured), "lr"])
    plots = _plots(out, groups, curves, metric_names, primary, synthetic, baseline)
    setup = {"task": results[0]["task"], "model": base.model, "methods": cc.methods, "seeds": cc.seeds,
             "ranks": ranks, "steps": results[0]["steps"], "batch_size": base.batch_size,
             "grad_accum": base.grad_accum, "max_length": base.max_length, "scheduler": base.scheduler,
             "alpha": base.alpha, "scaling": base.scaling, "targets": base.targets, "exclude": base.exclude,
             "modules_to_save": results[0].get("modules_to_save"), "adapted_layers": max(x["adapted_layers"] for x in results),
             "diagnostics_every": base.diagnostics_every, "n_eval": results[0]["eval"].get("n"),
             "baseline": baseline, "n_val": (results[0].get("val") or {}).get("n"),
             "loss_target": target, "loss_target_rule": "given" if cc.loss_target is not None else
             "highest final train loss among the methods", "command": cc.command, "wall_s": wall_s}
    summary = {"setup": setup, "machine": machine, "learning_rates": sweep, "table_columns": cols, "table": table,
               "groups": summary_groups, "runs": results, "synthetic": synthetic, "plots": plots}
    write_json(out / "results.json", summary)
    (out / "report.md").write_text(_markdown(summary))
    return summary


def rebuild_report(out: str | Path) -> dict[str, Any]:
    """Rewrite ``report.md``, the PNGs and ``results.json`` of a finished comparison from its ``results.json`` alone
    (the runs' records carry their curves; nothing is trained), e.g. after a change of the report's format."""
    from types import SimpleNamespace

    out = Path(out)
    old = json.loads((out / "results.json").read_text())
    st = old["setup"]
    base = SimpleNamespace(model=st["model"], batch_size=st["batch_size"], grad_accum=st["grad_accum"],
                           max_length=st["max_length"], scheduler=st["scheduler"], alpha=st["alpha"],
                           scaling=st["scaling"], targets=st["targets"], exclude=st["exclude"],
                           diagnostics_every=st["diagnostics_every"])
    cc = SimpleNamespace(base=base, methods=st["methods"], seeds=st["seeds"], command=st["command"],
                         loss_target=st["loss_target"] if st.get("loss_target_rule") == "given" else None)
    return write_report(out, cc, old["runs"], synthetic=old.get("synthetic"), sweep=old["learning_rates"],
                        machine=old["machine"], wall_s=st["wall_s"], baseline=st.get("baseline"))


# ---- plots ---------------------------------------------------------------------------------------------------
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


# ---- markdown ------------------------------------------------------------------------------------------------
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
