"""Diagnostics over a training run: :class:`DiagnosticsRecorder` (plain loops; the Trainer callback wraps it) writes
one JSONL record per probe, :func:`read_history` reads them back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..control import find_adapted_model
from ..utils import json_safe
from .probe import diagnose


class DiagnosticsRecorder:
    """Runs :func:`diagnose` every ``every`` optimizer steps in a plain training loop and writes JSONL.

        rec = DiagnosticsRecorder(model, probe_batch, every=50, path="diag.jsonl", optimizer=opt)
        for step in range(1, T + 1):
            ...; opt.step(); ctl.step(); rec.maybe_record(step)

    Each probe appends one line ``{"step", "summary", "layers", "events"}`` (``events``: the Controller's events
    since the previous probe, e.g. SDS-LoRA refreshes with ``jump_mean`` and ``sim_A_mean``; non-finite numbers are
    written as ``null``) and keeps the record in ``.records``. ``maybe_record`` costs one modulo when
    ``step % every != 0``. ``path=None`` keeps records in memory only.

    Raises ``ValueError`` for ``every < 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: Any,
        every: int = 50,
        path: str | Path | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        optimizer: Any = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.model = model
        self.probe_batch = probe_batch
        self.every = every
        self.path = None if path is None else Path(path)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.records: list[dict[str, Any]] = []
        self._events_seen = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _new_events(self) -> list[dict[str, Any]]:
        try:
            ctl = find_adapted_model(self.model).controller
        except TypeError:
            return []
        events = list(getattr(ctl, "events", []) or [])
        if len(events) < self._events_seen:  # a new Controller: start over
            self._events_seen = 0
        new = events[self._events_seen :]
        self._events_seen = len(events)
        return new

    def record(self, step: int) -> dict[str, Any]:
        """Diagnose now and write the record (regardless of ``every``)."""
        diag = diagnose(self.model, self.probe_batch, loss_fn=self.loss_fn, optimizer=self.optimizer)
        rec = json_safe(
            {"step": int(step), "summary": diag.summary, "layers": diag.rows, "events": self._new_events()}
        )
        self.records.append(rec)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        return rec

    def maybe_record(self, step: int) -> dict[str, Any] | None:
        """Record if ``step % every == 0`` (and step > 0); returns the record or ``None``."""
        if step % self.every or step <= 0:
            return None
        return self.record(step)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a recorder / callback JSONL file (ValueError naming the line for a malformed one)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{i} is not valid JSON ({e}); is this a diagnostics history file?"
            ) from e
        if not isinstance(rec, dict) or "step" not in rec or "summary" not in rec:
            raise ValueError(f"{path}:{i} is not a diagnostics record (needs 'step' and 'summary')")
        out.append(rec)
    return out
