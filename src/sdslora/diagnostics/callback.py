"""Hugging Face ``Trainer`` callback that records gradient diagnostics every N optimizer steps.

    trainer = Trainer(..., callbacks=[SDSLoRACallback(), DiagnosticsCallback(probe_batch, every=50,
                                                                             path="out/diag.jsonl")])

List :class:`~sdslora.integrations.hf.SDSLoRACallback` first: callbacks run in list order, so at a step where
SDS-LoRA re-parameterises or refreshes its bases the probe then sees the new bases and the Controller's events of
that step. The callback fires at ``on_step_end`` (once per optimizer step, after gradient accumulation) when
``state.global_step % every == 0`` and at the last step (``state.max_steps``), so a history covers the whole run
whatever the interval (a run stopped early by another callback is probed once more at ``on_train_end``), with the
trainer's optimizer (so ``cos_g_geff_opt`` follows AdamW's actual
step), and adds the summary to the trainer's next logs with the prefix ``diag/`` (TensorBoard / W&B see them).
``path`` (optional) receives the JSONL records of :class:`~sdslora.diagnostics.DiagnosticsRecorder`; only the main
process (``state.is_world_process_zero``) writes. ``every=0`` disables it (costs nothing).

The default interval, 50 steps, costs about one extra forward + backward of the probe batch (plus per-layer SVDs of
r×n and m×r matrices) every 50 steps; measured overhead: see docs/diagnostics.md.
"""

from __future__ import annotations

from typing import Any

from ..integrations.hf import LoggingCallback
from .recorder import DiagnosticsRecorder


class DiagnosticsCallback(LoggingCallback):
    """Records :func:`~sdslora.diagnostics.diagnose` every ``every`` optimizer steps (see the module docstring).

    Args:
        probe_batch: a fixed batch (dict of tensors with ``labels``) used at every probe.
        every: probe interval in optimizer steps (default 50; 0 disables the callback).
        path: JSONL file for the records (default: none, records kept in ``self.records``).
        loss_fn: optional ``loss_fn(model, batch)``.

    Raises ``ValueError`` for a negative or non-integer ``every``.
    """

    def __init__(
        self, probe_batch: Any, every: int = 50, path: str | None = None, loss_fn: Any = None
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0 disables), got {every!r}")
        super().__init__()
        self.probe_batch = probe_batch
        self.every = every
        self.path = path
        self.loss_fn = loss_fn
        self.recorder: DiagnosticsRecorder | None = None
        self.records: list[dict[str, Any]] = []

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if not self.every or model is None:
            return
        step = int(state.global_step)
        last = 0 < int(getattr(state, "max_steps", 0) or 0) <= step
        if step <= 0 or (step % self.every and not last):
            return
        self._record(step, state, model, optimizer)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        # training stopped before max_steps (e.g. early stopping): the step it ended on closes the history
        if not self.every or model is None:
            return
        step = int(state.global_step)
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if 0 < step < max_steps and (not self.records or self.records[-1]["step"] != step):
            self._record(step, state, model, optimizer)

    def _record(self, step: int, state: Any, model: Any, optimizer: Any) -> None:
        if self.recorder is None or self.recorder.model is not model:
            main = bool(getattr(state, "is_world_process_zero", True))
            self.recorder = DiagnosticsRecorder(
                model,
                self.probe_batch,
                every=self.every,
                path=self.path if main else None,
                loss_fn=self.loss_fn,
            )
        self.recorder.optimizer = optimizer
        rec = self.recorder.record(step)
        self.records.append(rec)
        self.queue_logs({f"diag/{k}": float(v) for k, v in rec["summary"].items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
