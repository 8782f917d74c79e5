"""The study's learning-rate choice: validation split, ranking of sweep runs, grid widening, the rate per method.

The protocol is described in :mod:`~sdslora.experiments.compare` (and ``docs/evidence.md``); the runs themselves are
trained by the comparison's runner.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .compare_config import CompareConfig, for_method

if TYPE_CHECKING:
    from .compare import _Runner

VAL_SEED = 1234


def split_validation(rows: list[dict[str, Any]], fraction: float, cap: int) -> tuple[list, list]:
    """(rest, val): a validation split of ``min(cap, fraction·n)`` rows (at least 1) drawn with a fixed seed from
    the training rows, and the rows left to train on. The two never share a row (by position)."""
    if len(rows) < 2:
        raise ValueError(f"a validation split needs at least 2 training rows, got {len(rows)}")
    g = torch.Generator().manual_seed(VAL_SEED)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_val = max(1, min(cap, int(len(rows) * fraction), len(rows) - 1))
    val = [rows[i] for i in order[:n_val]]
    rest = [rows[i] for i in sorted(order[n_val:])]
    return rest, val



def selection_key(res: dict[str, Any], metric: str | None) -> tuple[float, float]:
    """How a sweep run is ranked (higher is better): its validation ``metric`` (None: none, loss only), ties broken
    by the lower validation loss; a diverged run (no finite value) ranks last."""
    val = res.get("val") or {}
    loss = val.get("loss")
    loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
    if metric is None:
        return (-loss, 0.0)
    m = val.get(metric)
    m = float(m) if isinstance(m, (int, float)) and math.isfinite(m) else -math.inf
    return (m, -loss)


def select_lr(keys: dict[float, tuple[float, float]]) -> tuple[float, str | None]:
    """The best learning rate of a sweep (``keys``: lr -> :func:`selection_key`; exact ties go to the smaller lr)
    and where it sits: ``"low"`` / ``"high"`` when on an edge of the grid (not bracketed), else None."""
    if not keys:
        raise ValueError("select_lr needs at least one scored learning rate")
    lrs = sorted(keys)
    best = max(lrs, key=lambda lr: (keys[lr], -lr))
    if len(lrs) == 1:
        return best, "low"
    edge = "low" if best == lrs[0] else "high" if best == lrs[-1] else None
    return best, edge


def widen_grid(lrs: list[float], edge: str) -> float:
    """The next learning rate beyond ``edge`` of the grid, one step of the spacing at that edge."""
    lrs = sorted(lrs)
    if len(lrs) < 2:
        return lrs[0] / 3 if edge == "low" else lrs[0] * 3
    if edge == "low":
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}")
    return float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}")

def _choose_lrs(cc: CompareConfig, runner: _Runner) -> tuple[dict[tuple[str, int], float], dict[str, Any]]:
    """Learning rate per (method, rank), and how it was chosen (see :mod:`~sdslora.experiments.compare`)."""
    chosen: dict[tuple[str, int], float] = {}
    sweep: dict[str, Any] = {}
    ranks = cc.ranks or [cc.base.r]
    combos = list(dict.fromkeys((m, r) for m, r, _ in cc.grid()))
    multi = len(ranks) > 1
    metric = runner.task.primary_metric if runner.task.kind == "classification" else None
    for m, r in combos:
        label = m if m == "full" or not multi else f"{m} r={r}"
        if m in cc.lrs:
            chosen[(m, r)] = float(cc.lrs[m])
            sweep[label] = {"source": "given"}
        elif cc.grid_for(m):
            grid = [float(x) for x in cc.grid_for(m)]
            keys: dict[float, tuple[float, float]] = {}
            scores: dict[str, Any] = {}
            widened = 0
            while True:
                for lr in grid:
                    if lr in keys:
                        continue
                    res = runner.run(m, r, lr, cc.seeds[0])
                    keys[lr] = selection_key(res, metric)
                    val = res.get("val") or {}
                    scores[f"{lr:g}"] = val.get(metric) if metric else val.get("loss")
                best, edge = select_lr(keys)
                if edge is None or widened >= cc.widen:
                    break
                grid = [*grid, widen_grid(list(keys), edge)]
                widened += 1
            chosen[(m, r)] = best
            sweep[label] = {"source": "sweep on a validation split of the training data", "scores": scores,
                            "selected_on": f"validation {metric}" if metric else "validation loss",
                            "bracketed": edge is None, "n_val": len(runner.val_rows or [])}
        else:
            chosen[(m, r)] = for_method(cc.base, m).learning_rate
            sweep[label] = {"source": "given (--lr)" if cc.base.lr is not None else "per-method default table"}
        sweep[label]["lr"] = chosen[(m, r)]
    return chosen, sweep
