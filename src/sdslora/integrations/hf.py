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

import os
from typing import Any

from transformers import TrainerCallback

from ..control import Controller, find_adapted_model

ADAPTER_CHECKPOINT_DIR = "sdslora_adapter"


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
        saved = adapted._pending_controller_state or {}
        adapted._pending_controller_state = None  # the Trainer's own state is the source of truth on resume
        self.controller = Controller(adapted, optimizer, total_steps=total)
        self.controller.t = int(state.global_step)
        # a checkpoint's adapter brings the events logged before it (re-parameterisation, refreshes)
        self.controller.events = [e for e in saved.get("events", []) if e.get("step", 0) <= self.controller.t]

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


class AdapterCheckpointMixin:
    """Mix into a ``transformers.Trainer`` (before it: ``class T(AdapterCheckpointMixin, Trainer)``) so that its
    checkpoints hold the adapter in sdslora's native format (with its buffers, layer state and Controller state) in
    ``checkpoint-N/sdslora_adapter/`` instead of the whole model's state dict, and ``resume_from_checkpoint`` copies
    it back into the attached model (:func:`sdslora.io.load_adapter_state`). The optimizer, scheduler, RNG and
    data position are the Trainer's own, so a resumed run continues exactly. Full fine-tuning (no adapter layers)
    keeps the Trainer's behaviour."""

    def _adapted(self) -> Any:
        try:
            adapted = find_adapted_model(self.model)  # type: ignore[attr-defined]
        except TypeError:
            return None
        return adapted if adapted.adapter_layers() else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        adapted = self._adapted()
        if adapted is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        from ..io import save_adapter

        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        if self.args.should_save:  # type: ignore[attr-defined]
            os.makedirs(output_dir, exist_ok=True)
        save_adapter(adapted, os.path.join(output_dir, ADAPTER_CHECKPOINT_DIR))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        folder = os.path.join(resume_from_checkpoint, ADAPTER_CHECKPOINT_DIR)
        adapted = self._adapted()
        if adapted is None or not os.path.isdir(folder):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        from ..io import load_adapter_state

        load_adapter_state(adapted, folder)
