"""One training run on Hugging Face ``Trainer`` with :class:`~sdslora.integrations.hf.SDSLoRACallback`.

    cfg = RunConfig(model="minilm-l6", task="mrpc", method="sds", steps=100)
    result = run_train(cfg, "runs/sds-seed0")

The run folder receives ``run.json`` (the resolved config, written first), ``versions.json``, ``metrics.jsonl`` (one
record per optimizer step: loss, learning rate, grad norm, step time, SDS-LoRA events, diagnostics), optionally
``diagnostics.jsonl``, ``adapter/`` (native :func:`~sdslora.io.save_adapter`) and ``peft/``
(:func:`~sdslora.io.export_peft`) — for ``method="full"`` a ``NO_ADAPTER.md`` note instead —, ``eval.json``,
``results.json`` and last ``done.json`` (the marker that the run finished, carrying its config). While it trains,
``checkpoints/checkpoint-N/`` holds the last checkpoint (adapter-sized: :class:`~sdslora.integrations.hf.
AdapterCheckpointMixin`), from which the same call resumes; it is removed when the run finishes. A run that stops on
an error writes ``failed.json``.

A folder that holds a finished run with the same config is skipped, an unfinished one resumed, a failed one without
a checkpoint replaced; one that holds anything else raises :class:`RunDirError` and nothing in it is touched.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..methods import get_method
from ..tasks import Task
from .run_config import (  # noqa: F401  (importable from here, as before)
    ADAPTER_FIELDS,
    DEFAULT_LR,
    FALLBACK_LR,
    PRECISIONS,
    RunConfig,
    load_config_file,
    with_defaults,
)
from .run_folder import (  # noqa: F401  (importable from here, as before)
    CHECKPOINT_DIR,
    DEFAULT_CHECKPOINT_EVERY,
    RUN_FILES,
    RunDirError,
    _keep_records,
    latest_checkpoint,
    run_state,
    versions,
    write_json,
)

INIT_SAMPLES = 32  # training examples for data-driven initialisations (the SDS authors ran LoRA-GA with 32)


def _quiet_logs(trainer: Any, progress: bool) -> None:
    """Keep the Trainer's progress bar (when ``progress``) but stop it printing every per-step log dict
    (``logging_steps=1`` feeds metrics.jsonl, which has them all)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callbacks import QuietProgress

    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())


def _build_optimizer(adapted: Any, cfg: RunConfig) -> Any:
    """None for plain AdamW (the Trainer builds it) unless the method scales the adapter's learning rate (SDS-LoRA's
    ``lr_scale`` / ``rewarm:N``: then the adapter needs a param group of its own); else
    ``sdslora.optim.build_optimizer``."""
    spec = get_method(cfg.method)
    scales_lr = spec.layer_cls is not None and spec.plan_cls.scales_lr(adapted.adapter_config.method_options())
    if cfg.optimizer == "adamw" and not scales_lr:
        return None
    from ..optim import build_optimizer

    return build_optimizer(adapted, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           **cfg.optimizer_options)


# ---- memory accounting -----------------------------------------------------------------------------------------
def training_state_bytes(adapted: Any, tokens_per_step: int) -> dict[str, int]:
    """Analytic bytes a method adds on top of the frozen model's own forward/backward:

    * adapter tensors (parameters and buffers such as SDS-LoRA's Q_A, Q_B, ReLoRA's merged update and copy of W0);
    * gradients + two AdamW moments of every trainable parameter (3 copies);
    * activations the adapter path saves for backward: tokens x (r for LoRA-like layers, 2r for SDS-LoRA's
      rank-2r path) per adapted layer, in the adapter dtype.
    """
    adapter = 0
    act = 0
    # memory shared by several layers once: a tensor registered in several (LoTR's U, V) or views of one tensor
    # (VeRA's slices of its shared projections), so count storages, not tensors
    seen: set[tuple[str, int]] = set()
    for layer in adapted.adapter_layers().values():
        # the layer's own tensors, unsaved buffers too (ReLoRA's copy of W0)
        for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)):
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key not in seen:
                seen.add(key)
                adapter += st.nbytes()
        act += tokens_per_step * layer.activation_width() * 4
    trainable = sum(p.numel() * p.element_size() for p in adapted.trainable_parameters())
    return {"adapter_tensors": adapter, "grad_and_adam": 3 * trainable, "adapter_activations": act,
            "total": adapter + 3 * trainable + act}


def _peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024.0 if sys.platform != "darwin" else ru / 2**20


# ---- the run -----------------------------------------------------------------------------------------------
def _shuffled(rows: list[Any], seed: int) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


def prepare_data(cfg: RunConfig, task: Task) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ..data import resolve_data_dir

    data_dir = resolve_data_dir(cfg.data_dir)
    train = task.load("train", data_dir)
    evals = task.load("eval", data_dir)
    if cfg.train_limit:
        train = _shuffled(train, 0)[: cfg.train_limit]
    if cfg.eval_limit:
        evals = evals[: cfg.eval_limit]
    return train, evals


def run_train(cfg: RunConfig, out: str | Path, *, progress: bool = True, train_rows: list[dict[str, Any]] | None = None,
              eval_rows: list[dict[str, Any]] | None = None, val_rows: list[dict[str, Any]] | None = None,
              checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> dict[str, Any]:
    """Train one run into ``out`` and return its results (see the module docstring for the files).

    ``train_rows`` / ``eval_rows`` override the task's splits (``compare`` uses them for its validation split).
    ``val_rows``: a validation split (carved from the training data by the caller, disjoint from ``train_rows``):
    the learning curve (``cfg.eval_every``) is measured on it, and the final model is scored on it as well as on
    the evaluation split (``results["val"]``, with its held-out loss).
    A finished run with the same config in ``out`` is not re-run: its ``results.json`` is returned.

    Every ``checkpoint_every`` optimizer steps (0: never) the adapter (or, for full fine-tuning, the model), the
    optimizer, the LR scheduler, the RNG states and the data position are checkpointed to ``out/checkpoints/``
    (the last one kept); an unfinished run with the same config continues from its last complete checkpoint, and
    ends with the numbers an uninterrupted run gives. The checkpoints are removed when the run finishes. A run that
    stops on an error leaves ``failed.json`` (the error); without a checkpoint the folder is then free for any
    config.
    Raises :class:`RunDirError` (folder holds another run), ValueError (bad config, data or model).
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: no checkpoints), got {checkpoint_every!r}")
    from transformers import set_seed

    from .models import load_model

    out = Path(out)
    config = cfg.to_dict()
    state = run_state(out, config)
    if state == "done" and (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    resume = latest_checkpoint(out) if state == "partial" else None
    if state == "failed" or (state == "partial" and resume is None):  # nothing to resume: clear only our files
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    task = cfg.get_task()
    if train_rows is None or eval_rows is None:
        tr, ev = prepare_data(cfg, task)
        train_rows = tr if train_rows is None else train_rows
        eval_rows = ev if eval_rows is None else eval_rows
    set_seed(cfg.seed)
    dtype = torch.float32
    model, tok, folder = load_model(cfg.model, task.kind, max(task.num_labels, 2), dtype)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {"config": config})
    if resume is None:
        write_json(out / "versions.json", versions())
    try:
        return _train_and_evaluate(cfg, out, config, task, model, tok, folder, train_rows, eval_rows, val_rows,
                                   progress=progress, resume=resume, checkpoint_every=checkpoint_every)
    except Exception as e:  # leave a record; without a checkpoint the folder can be reused for a corrected config
        write_json(out / "failed.json", {"config": config, "error": f"{type(e).__name__}: {e}",
                                         "checkpoint": None if latest_checkpoint(out) is None
                                         else latest_checkpoint(out).name,  # type: ignore[union-attr]
                                         "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        raise


def _train_and_evaluate(cfg: RunConfig, out: Path, config: dict[str, Any], task: Task, model: Any, tok: Any,
                        folder: Path, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
                        val_rows: list[dict[str, Any]] | None, *, progress: bool, resume: Path | None,
                        checkpoint_every: int) -> dict[str, Any]:
    from transformers import TrainingArguments

    from ..diagnostics import DiagnosticsCallback
    from ..integrations.hf import SDSLoRACallback
    from ..model import attach
    from .callbacks import CurveLogger, HarnessTrainer, MetricsLogger
    from .data import Collator, ListDataset, encode, evaluate
    from .models import head_modules
    from .report import diag_curves

    resume_step = None
    if resume is not None:
        resume_step = int(json.loads((resume / "trainer_state.json").read_text())["global_step"])
        (out / "failed.json").unlink(missing_ok=True)
        for name in ("diagnostics.jsonl",):
            _keep_records(out / name, resume_step)

    save = cfg.modules_to_save
    if save is None and task.kind == "classification":
        save = head_modules(model)
    acfg = cfg.adapter_config(save or None)
    train_enc = encode(task, tok, train_rows, cfg.max_length)
    if not train_enc:
        raise ValueError("no training example fits max_length; raise --max-length")
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    layer_cls = get_method(cfg.method).layer_cls
    init_data = None
    if layer_cls is not None and layer_cls.needs_init_data:  # LoRA-GA, LoRA-SB: a gradient pass over a subset
        n, bs = min(len(train_enc), INIT_SAMPLES), max(1, min(cfg.batch_size, len(train_enc), INIT_SAMPLES))
        init_data = [collate(train_enc[i : i + bs]) for i in range(0, n, bs)]
    adapted = attach(model, acfg, init_data=init_data)
    summary = adapted.trainable_summary()
    probe = collate(train_enc[: min(len(train_enc), cfg.batch_size)])

    use_cuda = torch.cuda.is_available()
    if cfg.precision == "fp16" and not use_cuda:
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if use_cuda:
        adapted.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    steps = cfg.steps if cfg.steps is not None else -1
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    per_epoch = math.ceil(len(train_enc) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(per_epoch * epochs))
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR), max_steps=steps, num_train_epochs=epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * total)), weight_decay=cfg.weight_decay,
        logging_steps=1, logging_nan_inf_filter=False, report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps" if checkpoint_every else "no", save_steps=checkpoint_every or 500, save_total_limit=1,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", use_cpu=not use_cuda,
        disable_tqdm=not progress, dataloader_num_workers=0, remove_unused_columns=False,
    )
    metrics_cb = MetricsLogger(out / "metrics.jsonl", resume_step)
    duties = SDSLoRACallback()
    callbacks: list[Any] = [duties]
    if cfg.diagnostics_every > 0:
        callbacks.append(DiagnosticsCallback({k: v.to(adapted.device if use_cuda else "cpu") for k, v in probe.items()},
                                             every=cfg.diagnostics_every, path=str(out / "diagnostics.jsonl")))
    curve_cb = None
    if val_rows and cfg.eval_every > 0:
        curve_cb = CurveLogger(out / "curve.jsonl", task, tok, val_rows, max_length=cfg.max_length,
                               batch_size=cfg.eval_batch_size, every=cfg.eval_every, resume_step=resume_step)
        callbacks.append(curve_cb)
    callbacks.append(metrics_cb)
    optimizer = _build_optimizer(adapted, cfg)
    trainer = HarnessTrainer(model=adapted, args=args, train_dataset=ListDataset(train_enc), data_collator=collate,
                              callbacks=callbacks, optimizers=(optimizer, None))
    _quiet_logs(trainer, progress)
    rss0 = _peak_rss_mb()
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    wall = time.perf_counter() - t0

    adapted.eval()
    if summary["layers"]:
        adapted.save_adapter(out / "adapter")
        try:
            adapted.export_peft(out / "peft")
        except (ValueError, TypeError) as e:  # a method without an exact plain-LoRA export
            (out / "peft_export_error.txt").write_text(str(e) + "\n")
    else:
        (out / "NO_ADAPTER.md").write_text(
            f"Method {cfg.method!r} trains the whole model: there is no adapter to save or export. The metrics in "
            "eval.json were measured on the trained model at the end of the run.\n"
        )
    ev = evaluate(adapted, tok, task, eval_rows, max_length=cfg.max_length, eval_mode=cfg.eval_mode,
                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    write_json(out / "eval.json", ev)
    val = None
    if val_rows:
        from .data import validation_scores

        if task.kind == "classification":
            val = validation_scores(adapted, tok, task, val_rows, max_length=cfg.max_length,
                                    batch_size=cfg.eval_batch_size)
        else:  # generation: the teacher-forced loss (what a study selects on); option scoring is cheap enough to
            # add its accuracy, greedy decoding of the whole split is not (the evaluation split gets it)
            val = validation_scores(adapted, tok, task, val_rows, max_length=cfg.max_length,
                                    batch_size=cfg.eval_batch_size)
            if cfg.eval_mode == "loglik":
                ev_val = evaluate(adapted, tok, task, val_rows, max_length=cfg.max_length, eval_mode="loglik",
                                  batch_size=cfg.eval_batch_size)
                val.update({k: v for k, v in ev_val.items() if k not in ("n", "examples")})
        val["n"] = len(val_rows)
    curve = list(curve_cb.points) if curve_cb is not None else []
    if curve_cb is not None and val is not None:
        curve.append({"step": int(trainer.state.global_step), **{k: v for k, v in val.items() if k != "n"}})

    losses = [r["loss"] for r in metrics_cb.records if "loss" in r]
    step_times = sorted(r["step_time"] for r in metrics_cb.records if "step_time" in r)
    tokens = cfg.batch_size * cfg.max_length
    mem = training_state_bytes(adapted, tokens)
    results = {
        "config": config, "method": cfg.method, "seed": cfg.seed, "r": cfg.r, "lr": cfg.learning_rate,
        "task": task.name, "model": cfg.model, "model_folder": Path(folder).name,
        "trainable_parameters": summary["trainable"], "adapter_parameters": summary["adapter"],
        # at the end of the run (a method whose rank grows trains more than it started with)
        "trainable_parameters_end": adapted.trainable_summary()["trainable"],
        "total_parameters": summary["total"], "adapted_layers": summary["layers"], "modules_to_save": save,
        "steps": int(trainer.state.global_step), "final_train_loss": _tail_mean(losses, 10),
        "step_time_median_s": step_times[len(step_times) // 2] if step_times else None,
        "train_wall_s": wall, "memory_bytes_analytic": mem,
        "peak_rss_growth_mb": max(0.0, _peak_rss_mb() - rss0),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if use_cuda else None,
        "eval": ev, "primary_metric": task.primary_metric, "val": val, "curve": curve,
        "loss_curve": [[int(r["step"]), round(float(r["loss"]), 5)] for r in metrics_cb.records
                       if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])],
        "diagnostics": {k: [[s, v] for s, v in zip(*c)] for k, c in diag_curves(out).items()},
        # the method's own events (SDS-LoRA: the re-parameterisation, every refresh with its ΔW jump and basis
        # similarities), compact
        "events": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in ev.items()}
                   for ev in (duties.controller.events if duties.controller is not None else [])],
    }
    write_json(out / "results.json", results)
    write_json(out / "done.json", {"config": config, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # finished: the adapter and results are what remains
    return results


def _nonfinite_loss(step: int, loss: float, out: Path) -> Exception:
    """The error that stops a run whose training loss went NaN/Inf, naming the step."""
    from ..control import NONFINITE_CAUSES, NonFiniteError

    ckpt = latest_checkpoint(out)
    return NonFiniteError(
        f"the training loss became {loss} at optimizer step {step}; training stopped and nothing was saved as the "
        f"result. {NONFINITE_CAUSES}. Run again with a lower --lr in a new --output folder"
        + (f" (the last checkpoint, from before the divergence, is {ckpt})" if ckpt is not None else "") + "."
    )


def _tail_mean(xs: list[float], n: int) -> float | None:
    tail = [x for x in xs[-n:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else None
