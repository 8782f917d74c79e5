"""What a recorded study shows: per method and rank the chosen learning rate, its seeds' statistics, the gap closed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .lr_sweep import select_lr, selection_key
from .stats import diff_interval, gap_closed, mean, paired_interval, t_interval

NAMES = {"lora": "LoRA", "sds": "SDS-LoRA", "sds:faithful": "SDS-LoRA (faithful)", "full": "full fine-tuning",
         "dora": "DoRA", "pissa": "PiSSA"}
DIAG = ("cos_g_geff", "cos_geff_gstar", "stable_rank_A", "stable_rank_B", "kappa_B", "erank_grad_B")
DIAG_TITLES = {"cos_g_geff": "cos(G, G̃)", "cos_geff_gstar": "cos(G̃, G*)", "stable_rank_A": "stable rank of A",
               "stable_rank_B": "stable rank of B", "kappa_B": "condition number of B",
               "erank_grad_B": "effective rank of ∇B"}


def _name(label: str) -> str:
    return NAMES.get(label, label)


def load_setting(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(setting.json, the run summaries) of one study folder; unreadable run files raise ValueError naming them."""
    setting = json.loads((folder / "setting.json").read_text())
    runs = []
    for f in sorted((folder / "runs").glob("*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"evidence file {f} is not valid JSON ({e}); delete it and re-run the study to redo it") \
                from e
    return setting, runs


def analyse(setting: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method label, rank): the sweep, the chosen learning rate, the seeds at it and their statistics; then
    the gap closed by every method relative to LoRA and full fine-tuning at each rank."""
    primary = setting["primary_metric"]
    metric = primary if setting["kind"] == "classification" else None
    sweep_seed = setting["seeds"][0]
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for run in runs:
        label = run["method"]
        r = None if label == "full" else int(run["r"])
        groups.setdefault((label, r), []).append(run)
    order = {m: i for i, m in enumerate(setting["methods"])}
    out_groups = []
    for (label, r), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, order.get(kv[0][0], 99))):
        sweep = {float(x["lr"]): x for x in rs if x["seed"] == sweep_seed}
        if not sweep:
            continue
        best, edge = select_lr({lr: selection_key(x, metric) for lr, x in sweep.items()})
        at = sorted((x for x in rs if float(x["lr"]) == best), key=lambda x: x["seed"])
        ev = [x["eval"].get(primary) for x in at]
        m, h = t_interval(ev)
        other = {k: t_interval([x["eval"].get(k) for x in at]) for k in at[0]["eval"]
                 if k not in ("n", primary, "examples") and isinstance(at[0]["eval"].get(k), (int, float))}
        diag = {}
        for k in DIAG:
            last = [x["diagnostics"][k][-1][1] for x in at if (x.get("diagnostics") or {}).get(k)]
            if last:
                diag[k] = mean(last)
        losses = {lr: _val_score(x, None) for lr, x in sweep.items()}
        losses = {lr: v for lr, v in losses.items() if v is not None}
        out_groups.append({
            "label": label, "r": r, "lr": best, "bracketed": edge is None, "edge": edge,
            # the rate the validation loss would have chosen (a robustness check of the choice by the metric)
            "lr_by_loss": min(losses, key=lambda lr: losses[lr]) if losses else None,
            "grid": {f"{lr:g}": _val_score(x, metric) for lr, x in sorted(sweep.items())},
            "seeds": [x["seed"] for x in at], "values": ev, "mean": m, "ci95": h,
            "other": {k: {"mean": v[0], "ci95": v[1]} for k, v in other.items()},
            "val": mean([(x.get("val") or {}).get(primary if metric else "loss") for x in at]),
            "val_loss": mean([(x.get("val") or {}).get("loss") for x in at]),
            "final_train_loss": mean([x.get("final_train_loss") for x in at]),
            "trainable_parameters": at[0].get("trainable_parameters"), "steps": at[0].get("steps"),
            "diagnostics_last": diag, "runs": [x["run"] for x in at],
        })
    gaps = []
    full = next((g for g in out_groups if g["label"] == "full"), None)
    for g in out_groups:
        if g["label"] in ("lora", "full") or full is None:
            continue
        lora = next((x for x in out_groups if x["label"] == "lora" and x["r"] == g["r"]), None)
        if lora is None:
            continue
        gc = gap_closed(lora["values"], g["values"], full["values"])
        gc["method_minus_lora"] = diff_interval(lora["values"], g["values"])
        gc["method_minus_lora_paired"] = paired_interval(_by_seed(lora), _by_seed(g))
        gaps.append({"label": g["label"], "r": g["r"], **gc})
    lora_gaps = []
    if full is not None:
        for lora in (x for x in out_groups if x["label"] == "lora"):
            di = diff_interval(lora["values"], full["values"])
            lora_gaps.append({"r": lora["r"], "full_minus_lora": (full["mean"] or 0) - (lora["mean"] or 0),
                              "interval": di, "significant": di is not None and di[0] > 0,
                              "paired": paired_interval(_by_seed(lora), _by_seed(full))})
    wall = sum(x.get("train_wall_s") or 0.0 for x in runs)
    machines = sorted({f"{m.get('processor')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')}"
                       + (f", GPU {m['gpu']}" if m.get("gpu") else "") for m in (x.get("machine") for x in runs) if m})
    by_run = {x["run"]: x for x in runs}
    key = primary if metric else "loss"
    convergence = {}
    for g in out_groups:
        c = mean_curve([by_run[n] for n in g["runs"]], key)
        if len(c) >= 3:
            last = c[-1]
            q = min(c, key=lambda p: abs(p[0] - 0.75 * last[0]))
            best = (max if metric else min)(c, key=lambda p: p[1])
            convergence[f"{g['label']}|{g['r']}"] = {"key": key, "at_three_quarters": q, "final": last, "best": best}
    return {"groups": out_groups, "gaps": gaps, "lora_gaps": lora_gaps, "n_runs": len(runs), "train_wall_s": wall,
            "convergence": convergence, "machines": machines}


def mean_curve(runs: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """The validation curve of ``key`` averaged over runs, on the steps all of them measured."""
    curves = [{p["step"]: p.get(key) for p in x.get("curve") or []} for x in runs]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for s in steps:
        m = mean([c[s] for c in curves])
        if m is not None:
            out.append((s, m))
    return out


def _by_seed(g: dict[str, Any]) -> dict[int, float]:
    return dict(zip(g["seeds"], g["values"]))


def _val_score(run: dict[str, Any], metric: str | None) -> float | None:
    v = (run.get("val") or {}).get(metric if metric else "loss")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
