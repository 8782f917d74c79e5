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

import gc
import os
from typing import Any

from transformers import TrainerCallback

from ..control import Controller, find_adapted_model

ADAPTER_CHECKPOINT_DIR = "sdslora_adapter"


class LoggingCallback(TrainerCallback):
    """A callback whose values (queued with :meth:`queue_logs`) reach every logger of the Trainer.

    The Trainer copies a log dict into ``state.log_history`` and then hands it to the callbacks in order, the
    reporting integrations (TensorBoard, W&B, ...) first; a callback that adds to the dict in its own ``on_log``
    comes too late for all of them. So at ``on_train_begin`` this callback moves itself to the front of the
    Trainer's callback list (so its ``on_log`` runs before the reporters'; all callbacks of this kind move together,
    in their order) and also writes the values into the ``log_history`` entry just made."""

    def __init__(self) -> None:
        self._pending_logs: dict[str, float] = {}

    def queue_logs(self, values: dict[str, float]) -> None:
        """Values to add to the next log of the Trainer."""
        self._pending_logs.update(values)

    def _move_to_front(self) -> None:
        # the Trainer's CallbackHandler holds its callbacks in a plain list that refers to this object
        # (all such callbacks move as one block, keeping their order: SDSLoRACallback's duties before the probes)
        for holder in gc.get_referrers(self):
            if isinstance(holder, list) and any(type(c).__name__ == "DefaultFlowCallback" for c in holder):
                ours = [c for c in holder if isinstance(c, LoggingCallback)]
                holder[:] = ours + [c for c in holder if not isinstance(c, LoggingCallback)]
                return

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._move_to_front()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs is None or not self._pending_logs:
            return
        logs.update(self._pending_logs)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._pending_logs)
        self._pending_logs = {}


class SDSLoRACallback(LoggingCallback):
    """Runs the attached method's per-step duties (SDS-LoRA re-parameterisation, optimizer reset, refreshes).

    Events (re-parameterisation, refresh statistics) are added to the trainer's logs as ``sdslora/<event>/<key>``:
    they reach ``state.log_history`` and every ``report_to`` logger (TensorBoard, W&B, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.controller: Controller | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        if model is None or optimizer is None:
            raise ValueError("SDSLoRACallback needs the trainer's model and optimizer at on_train_begin")
        adapted = find_adapted_model(model)
        total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        saved = adapted.schedule_state or {}
        adapted.schedule_state = None  # the Trainer's own state is the source of truth on resume
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
            self.queue_logs({f"sdslora/{kind}/{k}": float(v) for k, v in ev.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})


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
