"""A run's curves over optimizer steps (train loss, diagnostics), from its record or its folder, and their smoothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

DIAG_KEYS = ("cos_g_geff", "cos_geff_gstar", "erank_grad_A", "erank_grad_B", "stable_rank_A")
WINDOW = 10


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
