"""Task metrics: accuracy, binary F1, Matthews correlation (GLUE), and the numeric / option answer checks of the
LLM-Adapters evaluation scripts (Hu et al. 2023, arXiv 2304.01933)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def accuracy(preds: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of ``preds[i] == labels[i]`` (raises ValueError for different lengths or no items)."""
    _check(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN) (0.0 when there is no positive prediction or label)."""
    _check(preds, labels)
    tp = sum(int(p == positive and y == positive) for p, y in zip(preds, labels))
    fp = sum(int(p == positive and y != positive) for p, y in zip(preds, labels))
    fn = sum(int(p != positive and y == positive) for p, y in zip(preds, labels))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for binary labels {0, 1};
    0.0 when a marginal is empty (as scikit-learn returns)."""
    _check(preds, labels)
    tp = sum(int(p == 1 and y == 1) for p, y in zip(preds, labels))
    tn = sum(int(p == 0 and y == 0) for p, y in zip(preds, labels))
    fp = sum(int(p == 1 and y == 0) for p, y in zip(preds, labels))
    fn = sum(int(p == 0 and y == 1) for p, y in zip(preds, labels))
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if den == 0 else (tp * tn - fp * fn) / math.sqrt(den)


def numbers_equal(pred: float, gold: float, tol: float = 1e-3) -> bool:
    """LLM-Adapters' numeric check: ``|pred − gold| <= 0.001`` (a missing prediction is ``inf``: never equal)."""
    return math.isfinite(pred) and abs(pred - gold) <= tol


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews}


def _check(preds: Sequence[Any], labels: Sequence[Any]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")
