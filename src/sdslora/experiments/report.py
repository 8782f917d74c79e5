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

from .curves import (  # noqa: F401  (read_jsonl, loss_curve, diag_curves, running_mean, ...: importable from here)
    DIAG_KEYS,
    WINDOW,
    diag_curves,
    loss_curve,
    read_jsonl,
    run_diag_curves,
    run_loss_curve,
    running_mean,
    steps_to_target,
)
from .report_plots import DIAG_TITLES, _plots  # noqa: F401  (DIAG_TITLES: importable from here)
from .report_text import (  # noqa: F401  (TIMING_NOTE, baseline_row, ...: importable from here)
    TIMING_NOTE,
    _baseline_text,
    _markdown,
    _md_table,
    _table_baseline,
    baseline_row,
)
from .run_folder import write_json
from .stats import mean as _mean
from .stats import sample_var, t_interval


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



def _mem_column(measured: bool) -> str:
    """The memory column's name: what it is (an analytic count of the adapter-side training state on CPU, the
    measured CUDA peak on a GPU)."""
    return "CUDA peak memory / LoRA" if measured else "adapter training state / LoRA (analytic)"



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
