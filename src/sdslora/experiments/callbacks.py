"""The harness's Trainer parts (:func:`~sdslora.experiments.train.run_train`): per-step metrics, the validation
learning curve, adapter-sized checkpoints, and a progress bar that does not print every log dict."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..integrations.hf import AdapterCheckpointMixin
from ..tasks import Task
from ..utils import json_safe
from .run_folder import _keep_records
from .train import _nonfinite_loss


class HarnessTrainer(AdapterCheckpointMixin, Trainer):
    """The Trainer with checkpoints that hold the adapter, not the whole model."""


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without the per-step log dicts (``metrics.jsonl`` has them all)."""

    def on_log(self, *args: Any, **kwargs: Any) -> None:
        return None


class MetricsLogger(TrainerCallback):
    """Appends one JSON record per logged step to ``path`` (loss, lr, grad norm, step time, the method's events) and
    stops the run, naming the step, when the training loss is NaN/Inf. A resumed run (``resume_step``) keeps the
    records up to its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.t0 = 0.0
        self.step_time: float | None = None
        self.records: list[dict[str, Any]] = [] if resume_step is None else _keep_records(path, resume_step)
        if resume_step is None:
            path.write_text("")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.t0:
            self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.perf_counter()
        self.step_time = now - self.t0
        self.t0 = now

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not logs:
            return
        rec = {"step": int(state.global_step)}
        rec.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()})
        if "loss" in logs and self.step_time is not None:
            rec["step_time"] = self.step_time
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(rec)) + "\n")
        loss = logs.get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            raise _nonfinite_loss(rec["step"], float(loss), self.path.parent)


class CurveLogger(TrainerCallback):
    """Evaluates on the validation ``rows`` at step 0 and every ``every`` optimizer steps (the last step is measured
    after training, with the final evaluation): held-out loss, and the task's metrics for classification. Each point
    is appended to ``path`` as it is measured; a resumed run keeps the points up to its checkpoint."""

    def __init__(self, path: Path, task: Task, tok: Any, rows: list[dict[str, Any]], *, max_length: int,
                 batch_size: int, every: int, resume_step: int | None = None) -> None:
        self.path, self.task, self.tok, self.rows = path, task, tok, rows
        self.max_length, self.batch_size, self.every = max_length, batch_size, every
        self.points: list[dict[str, Any]] = [] if resume_step is None else _keep_records(path, resume_step)
        if resume_step is None:
            path.write_text("")

    def measure(self, model: Any, step: int) -> dict[str, Any]:
        from .data import validation_scores

        point: dict[str, Any] = {"step": step, **validation_scores(model, self.tok, self.task, self.rows,
                                                                    max_length=self.max_length,
                                                                    batch_size=self.batch_size)}
        self.points.append(point)
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(point)) + "\n")
        return point

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if model is not None and not self.points:
            self.measure(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        step = int(state.global_step)
        if model is not None and step % self.every == 0 and step < state.max_steps:
            self.measure(model, step)
