"""Statistics of a study: t-intervals over seeds, the interval of a difference, the share of the LoRA -> full
fine-tuning gap a method closes (bootstrap interval), and the majority / chance rate of an evaluation split.

    mean, half = t_interval([0.41, 0.44, 0.43])            # 95 % t-interval: mean ± half
    lo, hi = diff_interval(lora, full)                       # Welch interval of mean(full) − mean(lora)
    g = gap_closed(lora, sds, full)                          # {"point", "lo", "hi", "gap_significant", ...}

Intervals are over seeds (each seed one independent training run); with n seeds the t quantile has n − 1 degrees
of freedom (Welch–Satterthwaite for a difference). scipy is used for the t quantile when it is installed; otherwise
a table of the two-sided 95 % quantiles (exact to the 3 decimals printed in every statistics textbook) is used and
the degrees of freedom of a Welch interval are rounded down (a slightly wider, conservative interval).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

# two-sided 95 % quantiles t_{0.975, df}, df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: float, conf: float = 0.95) -> float:
    """Two-sided ``conf`` quantile of Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + conf / 2, df))
    except ImportError:
        pass
    if conf != 0.95:
        raise ValueError("without scipy only 95 % intervals are available (pip install scipy)")
    d = int(math.floor(df))
    if d < 1:
        return T975[0]
    if d <= 30:
        return T975[d - 1]
    return 1.960 + 2.4 / d  # within 0.002 of the exact quantile for df > 30


def _finite(xs: list[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def mean(xs: list[Any]) -> float | None:
    v = _finite(xs)
    return sum(v) / len(v) if v else None


def sample_var(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def t_interval(xs: list[Any], conf: float = 0.95) -> tuple[float | None, float | None]:
    """(mean, half-width) of the t-interval over the finite values of ``xs`` (half-width None below 2 values)."""
    v = _finite(xs)
    if not v:
        return None, None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, t_quantile(len(v) - 1, conf) * math.sqrt(sample_var(v) / len(v))


def diff_interval(xs: list[Any], ys: list[Any], conf: float = 0.95) -> tuple[float, float] | None:
    """Welch t-interval of mean(ys) − mean(xs); None when a group has fewer than 2 values."""
    a, b = _finite(xs), _finite(ys)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = sample_var(a) / len(a), sample_var(b) / len(b)
    d = sum(b) / len(b) - sum(a) / len(a)
    se2 = va + vb
    if se2 == 0:
        return d, d
    df = se2**2 / ((va**2 / (len(a) - 1)) + (vb**2 / (len(b) - 1)))
    h = t_quantile(df, conf) * math.sqrt(se2)
    return d - h, d + h


def paired_interval(xs: dict[Any, Any], ys: dict[Any, Any], conf: float = 0.95) -> tuple[float, float, int] | None:
    """t-interval of the mean per-seed difference ys[seed] − xs[seed] over the seeds both have (runs that share a
    seed share their data order, so the difference removes the seed's own luck); (lo, hi, n) or None below 2."""
    common = [k for k in xs if k in ys]
    d = _finite([ys[k] - xs[k] for k in common if isinstance(xs[k], (int, float)) and isinstance(ys[k], (int, float))])
    if len(d) < 2:
        return None
    m, h = t_interval(d, conf)
    assert m is not None and h is not None
    return m - h, m + h, len(d)


def gap_closed(lora: list[Any], method: list[Any], full: list[Any], *, n_boot: int = 10000, seed: int = 0,
               conf: float = 0.95) -> dict[str, Any]:
    """Share of the LoRA -> full fine-tuning gap that ``method`` closes, (m − l) / (f − l) on the seed means, with
    a percentile bootstrap interval (seeds resampled with replacement within each group, resamples whose gap is 0
    dropped). ``gap_significant``: the Welch interval of full − LoRA lies above 0; when it does not, the share is
    not defined by the data and ``point`` is None (the interval of the gap is still returned). A group with a single
    value gives the point without an interval (``lo``, ``hi`` None)."""
    lv, mv, fv = _finite(lora), _finite(method), _finite(full)
    out: dict[str, Any] = {"point": None, "lo": None, "hi": None, "gap": None, "gap_interval": None,
                           "gap_significant": False, "n": [len(lv), len(mv), len(fv)]}
    if not lv or not mv or not fv:
        return out
    ml, mm, mf = sum(lv) / len(lv), sum(mv) / len(mv), sum(fv) / len(fv)
    out["gap"] = mf - ml
    gi = diff_interval(lv, fv, conf)
    out["gap_interval"] = gi
    out["gap_significant"] = gi is not None and gi[0] > 0
    if not out["gap_significant"]:
        return out
    out["point"] = (mm - ml) / (mf - ml)
    if min(len(lv), len(mv), len(fv)) < 2:  # one seed of a group has no spread to resample: no interval
        return out
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_boot):
        bl = sum(rng.choice(lv) for _ in lv) / len(lv)
        bm = sum(rng.choice(mv) for _ in mv) / len(mv)
        bf = sum(rng.choice(fv) for _ in fv) / len(fv)
        if bf != bl:
            ratios.append((bm - bl) / (bf - bl))
    if ratios:
        ratios.sort()
        a = (1 - conf) / 2
        out["lo"] = ratios[int(math.floor(a * (len(ratios) - 1)))]
        out["hi"] = ratios[int(math.ceil((1 - a) * (len(ratios) - 1)))]
    return out


def baseline_rate(task: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a model that learned nothing scores on ``rows``: the majority-class share (classification, with the
    class; Matthews correlation 0 for CoLA-style metrics) or, for multiple-choice generation tasks, the expected
    accuracy of a uniform guess among each row's options; None for open answers (math)."""
    if not rows:
        return {"kind": None, "value": None}
    if task.kind == "classification":
        counts = Counter(int(r["label"]) for r in rows)
        label, n = counts.most_common(1)[0]
        out: dict[str, Any] = {"kind": "majority", "value": n / len(rows), "class": label, "metric": "accuracy"}
        if task.primary_metric == "matthews":
            out["primary"] = 0.0
        elif task.primary_metric == "accuracy":
            out["primary"] = n / len(rows)
        return out
    if task.answer == "choice":
        from ..tasks import choice_labels

        p = [1 / max(1, len(choice_labels(r["instruction"]))) for r in rows]
        return {"kind": "chance", "value": sum(p) / len(p), "metric": "accuracy", "primary": sum(p) / len(p)}
    if task.answer == "letter":
        return {"kind": "chance", "value": 0.2, "metric": "accuracy", "primary": 0.2}
    return {"kind": None, "value": None}
