"""Diagnostics: is the attached method bending the gradient? (docs/diagnostics.md)

    from sdslora.diagnostics import diagnose, DiagnosticsRecorder
    d = diagnose(model, probe_batch, optimizer=opt)        # d.rows (per layer), d.summary (means over layers)
    rec = DiagnosticsRecorder(model, probe_batch, every=50, path="diag.jsonl", optimizer=opt)
    rec.maybe_record(step)                                 # in a plain loop, after ctl.step()

Hugging Face Trainer: ``DiagnosticsCallback(probe_batch, every=50, path=...)`` (imported lazily: this package
works without transformers). Plots: :func:`sdslora.diagnostics.plots.plot_history` (needs matplotlib).
"""

from __future__ import annotations

from typing import Any

from .capture import capture_gradients, form_gradient
from .metrics import (
    condition_number,
    cosine,
    effective_gradient,
    effective_rank,
    optimizer_direction,
    orthonormal_basis,
    stable_rank,
    tangent_projection,
    truncation_alignment,
    truncation_alignment_of,
)
from .probe import SUMMARY_KEYS, Diagnostics, diagnose
from .recorder import DiagnosticsRecorder, read_history
from .verdict import verdict

__all__ = [
    "Diagnostics",
    "DiagnosticsCallback",
    "DiagnosticsRecorder",
    "SUMMARY_KEYS",
    "capture_gradients",
    "condition_number",
    "cosine",
    "diagnose",
    "effective_gradient",
    "effective_rank",
    "form_gradient",
    "optimizer_direction",
    "orthonormal_basis",
    "plot_history",
    "read_history",
    "stable_rank",
    "tangent_projection",
    "truncation_alignment",
    "truncation_alignment_of",
    "verdict",
]


def __getattr__(name: str) -> Any:  # lazy: transformers / matplotlib only when asked for
    if name == "DiagnosticsCallback":
        from .callback import DiagnosticsCallback

        return DiagnosticsCallback
    if name == "plot_history":
        from .plots import plot_history

        return plot_history
    raise AttributeError(f"module 'sdslora.diagnostics' has no attribute {name!r}")
