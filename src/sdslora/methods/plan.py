"""A method's step plan: what it does over the optimizer steps of a run, asked by the Controller once per step.

Layers keep only tensor operations; the plan decides *when* they run and what the optimizer must do about it. The
Controller builds one plan per run (``MethodSpec.plan_cls(options, total_steps)``) and, after every optimizer step t,
asks ``due(t)`` (cheap; only then does it gather FSDP2 shards, snapshot and sync) and ``run(layers, t)``, whose
:class:`StepOutcome` it carries out (it alone touches the optimizer). Around every ``optimizer.step()`` it scales the
adapter's learning rate by ``lr_factor(t)`` when ``scales_lr(options)``. Methods without duties use
:class:`StepPlan` itself: nothing is ever due.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class StepOutcome:
    """What a method asks of the Controller after an optimizer step."""

    reset_params: list[nn.Parameter] = field(default_factory=list)  # clear these parameters' optimizer state
    # zero this share of the entries of each of these parameters' moment tensors, smallest magnitudes first (ReLoRA's
    # partial reset); step counters kept
    prune_params: list[tuple[nn.Parameter, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # logged records (e.g. refresh jumps)
    # carry these parameters' optimizer state into new coordinates: (param, left, right) means the parameter's
    # gradient now reads g' = left @ g @ right (left/right None = identity); the Controller maps first moments the
    # same way and second moments by the element-wise squares, (left∘left) v (right∘right) (see Controller)
    state_maps: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    # parameters the duty replaced by new ones, possibly of another shape (rank growth): (old, new, where) means the
    # layer now holds ``new``; the optimizer holds ``new`` in old's place, and old's per-element state is carried into
    # ``new[where]`` with zeros elsewhere (``where=None``: the state starts afresh); step counters are kept
    replaced: list[tuple[nn.Parameter, nn.Parameter, tuple[slice, ...] | None]] = field(default_factory=list)


class StepPlan:
    """The plan of a method without per-step duties (and the base class of those with them)."""

    acts: ClassVar[bool] = False  # True: run() may change adapter tensors and optimizer state at some steps
    observes_gradients: ClassVar[bool] = False  # True: observe() reads every optimizer step's gradients
    # True: the duties run correctly under FSDP2 (the Controller gathers A and B around them); a plan that acts on
    # anything else (the frozen weight, gradient statistics, parameter shapes) is refused on a sharded model
    fsdp2_ready: ClassVar[bool] = False

    def __init__(self, options: Any, total_steps: int | None) -> None:
        self.options = options
        self.total_steps = total_steps

    @classmethod
    def needs_total_steps(cls, options: Any) -> bool:
        """Whether the schedule depends on the run's length T (then the Controller requires ``total_steps``)."""
        return False

    @classmethod
    def scales_lr(cls, options: Any) -> bool:
        """Whether :meth:`lr_factor` can differ from 1 (then the adapter needs param groups of its own)."""
        return False

    def due(self, t: int) -> bool:
        """Whether :meth:`run` may change tensors after optimizer step ``t`` (1-based)."""
        return False

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        """The duties after optimizer step ``t`` on the method's layers."""
        return StepOutcome()

    def lr_factor(self, t: int) -> float:
        """Multiplier on the adapter's learning rate for optimizer step ``t``, on top of any LR scheduler."""
        return 1.0

    def observe(self, layers: list[Any], t: int) -> None:
        """Called by the Controller right after optimizer step ``t`` (from the optimizer's step hook, while the
        step's gradients are still there) when ``observes_gradients``: read them (AdaLoRA's importance scores)."""

    def atomic(self, layers: list[Any], t: int) -> bool:
        """Whether the duty of step ``t`` is all-or-nothing by itself: it checks that its inputs and results are
        finite (raising :class:`~sdslora.nonfinite.NonFiniteError` before writing anything) and writes every
        result in one final step. The Controller then skips its snapshot and its own checks (SDS-LoRA's refresh,
        due at almost every other step early in a run). Default: False (the Controller snapshots and checks)."""
        return False

    def first_duty(self) -> int | None:
        """The first step with a duty within ``total_steps`` (None: none falls in the run)."""
        if not self.acts or self.total_steps is None:
            return None
        return next((t for t in range(1, self.total_steps + 1) if self.due(t)), None)
