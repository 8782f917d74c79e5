"""One memory-bounded estimator of full-weight gradients ∂L/∂W, for data-driven initialisations.

LoRA-GA (Wang, Yu, Li 2024, arXiv 2407.05000) initialises from the mean gradient over a few batches, LoRA-SB
(Ponkshe et al. 2024, arXiv 2411.19557) from the sign of the summed gradient. Both need ∂L/∂W of every adapted
weight of the *plain* model, which for a large model would double its memory if all ``.grad`` tensors were kept.
The trick both papers use ("LOMO"-style): gradients are enabled on the target weights only, and a
hook on each target weight moves its gradient off the device the moment autograd has finished it (accumulating
into a float32 name -> tensor dict, by default on the CPU) and frees ``.grad`` at once. Only about one layer's
full-size gradient is alive on the device at any time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..batches import batch_loss
from ..linalg import work_dtype
from ..methods.base import is_conv1d, supported_base
from ..utils import move_to

REDUCTIONS = ("mean", "sum")


def _acc_dtype(w: torch.Tensor) -> torch.dtype:
    return work_dtype(w.dtype)


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return batch_loss(model, batch, "init batch")


def estimate_gradients(
    model: nn.Module,
    target_names: list[str],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    reduce: str = "mean",
    *,
    accumulate_device: str | torch.device = "cpu",
    train_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """Full-weight gradients ``G = ∂L/∂W`` of the named linear layers, accumulated over ``batches``.

    For every batch: ``loss = loss_fn(model, batch)`` (default ``model(**batch).loss``, Hugging Face style),
    ``loss.backward()``. ``reduce="mean"`` returns ``(1/N) Σ_batches G_b`` (LoRA-GA's G_avg, equal to PEFT's
    ``preprocess_loraga``), ``"sum"`` returns ``Σ_batches G_b``.

    Memory: only the target weights get ``requires_grad=True`` during the pass (every other parameter is frozen, so
    no other ``.grad`` is produced); a ``register_post_accumulate_grad_hook`` on each target weight adds the finished
    gradient, in float32, to the accumulator on ``accumulate_device`` and sets ``.grad = None`` immediately, so the
    peak extra device memory is about one layer's gradient (plus activations), not the whole model's.
    ``requires_grad`` flags, pre-existing ``.grad`` tensors and the train/eval mode are restored and the hooks are
    removed afterwards, also on error.

    Args:
        model: the plain (not yet adapted) model.
        target_names: module names of ``nn.Linear`` / transformers ``Conv1D`` layers.
        batches: an iterable of batches (dicts of tensors, moved to the model's device when they are elsewhere).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        reduce: ``"mean"`` (default) or ``"sum"`` over batches.
        accumulate_device: where the float32 accumulators live (default ``"cpu"``).
        train_mode: run the passes in ``model.train()`` mode (default True, like a training step and PEFT); the
            previous mode is restored.

    Returns:
        ``{name: G}`` with ``G`` float32 (float64 for float64 weights) in ``nn.Linear`` layout ``[out, in]`` (also for ``Conv1D``, whose weight is
        stored ``[in, out]``), on ``accumulate_device``. A layer the loss does not reach gets zeros.

    Raises:
        ValueError: unknown ``reduce``, no targets, a name that is not a supported layer, no batches, a batch whose
            output carries no loss, or a non-finite gradient.
        TypeError: a non-dict batch without ``loss_fn``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if not target_names:
        raise ValueError("estimate_gradients() needs at least one target layer name")
    modules = dict(model.named_modules())
    params: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name in target_names:
        module = modules.get(name)
        if module is None or not supported_base(module):
            kind = "no such module" if module is None else type(module).__name__
            raise ValueError(
                f"estimate_gradients(): {name!r} is not an nn.Linear / Conv1D layer of the model ({kind}); pass "
                "the names of plain (not yet adapted) linear layers"
            )
        w = module.weight
        params.setdefault(id(w), (w, []))[1].append(name)
    loss_fn = loss_fn or _default_loss
    acc_device = torch.device(accumulate_device)
    acc: dict[int, torch.Tensor] = {  # float32 (float64 weights keep float64: identity tests in double)
        pid: torch.zeros(w.shape, dtype=_acc_dtype(w), device=acc_device) for pid, (w, _) in params.items()
    }

    def make_hook(pid: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            grad = p.grad
            if grad is not None:
                acc[pid].add_(grad.detach().to(device=acc_device, dtype=acc[pid].dtype))
                p.grad = None  # free the device copy at once

        return hook

    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved_grads = {pid: w.grad for pid, (w, _) in params.items()}
    was_training = model.training
    handles = []
    n_batches = 0
    try:
        for p in all_params:
            p.requires_grad_(False)
        for pid, (w, _) in params.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(pid)))
        model.train(train_mode)
        device = next(iter(params.values()))[0].device
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, move_to(batch, device))
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError("the init loss must be a scalar tensor")
                loss.backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)
        for pid, (w, _) in params.items():
            w.grad = saved_grads[pid]
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("init data yielded no batches: pass a few batches of training data")
    out: dict[str, torch.Tensor] = {}
    for pid, (_w, names) in params.items():
        g = acc[pid]
        if reduce == "mean":
            g = g / n_batches
        if not torch.isfinite(g).all():
            raise ValueError(
                f"the estimated gradient of {names[0]!r} has NaN/Inf entries: the init data's loss is not finite "
                "(NaN/Inf inputs or weights, labels the loss cannot take, or float16 overflow: use bf16 or fp32); "
                "nothing was changed"
            )
        for name in names:
            out[name] = g.T.contiguous() if is_conv1d(modules[name]) else g
    return out
