"""Hugging Face ``Trainer`` integration (and so TRL's trainers): a callback that drives the Controller.

    trainer = Trainer(model=adapted, args=args, ..., callbacks=[SDSLoRACallback()])

The callback builds a :class:`~sdslora.control.Controller` at ``on_train_begin`` from the trainer's model and
optimizer, with ``total_steps = state.max_steps``, and calls it at every ``on_step_end``, i.e. once per optimizer
step (the Trainer fires ``on_step_end`` only after the last micro-batch of a gradient-accumulation cycle), with
``t = state.global_step``. On resume from a Trainer checkpoint the step counter comes from the restored
``TrainerState`` and the adapter buffers (bases, phase) from the restored model state, so the schedule continues
exactly.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..control import Controller, find_adapted_model


class SDSLoRACallback(TrainerCallback):
    """Runs the attached method's per-step duties (SDS-LoRA re-parameterisation, optimizer reset, refreshes).

    Events (re-parameterisation, refresh statistics) are added to the trainer's logs, so TensorBoard / W&B see them.
    """

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self._pending_logs: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("SDSLoRACallback needs the trainer's model and optimizer at on_train_begin")
        adapted = find_adapted_model(model)
        total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        adapted._pending_controller_state = None  # the Trainer's own state is the source of truth on resume
        self.controller = Controller(adapted, optimizer, total_steps=total)
        self.controller.t = int(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller is None:
            return
        out = self.controller.step(t=int(state.global_step))
        for ev in out.events:
            kind = ev.get("event", "event")
            for k, v in ev.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._pending_logs[f"sdslora/{kind}/{k}"] = float(v)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs is not None and self._pending_logs:
            logs.update(self._pending_logs)
            self._pending_logs = {}
