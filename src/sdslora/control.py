"""Controller: the one place that carries out a method's per-optimizer-step duties and talks to the optimizer.

Call :meth:`Controller.step` right after every ``optimizer.step()`` (after gradient accumulation: one call per
optimizer step, not per micro-batch). For SDS-LoRA that runs the warm-up re-parameterisation (and clears the
optimizer state of A and B), then the basis-refresh schedule. The step counter and the run length are part of the
adapter saved by ``save_adapter``, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .methods import StepOutcome
from .model import AdaptedModel


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def find_adapted_model(model: nn.Module) -> AdaptedModel:
    """The AdaptedModel inside DDP / FSDP / accelerate / torch.compile wrappers."""
    seen = 0
    while not isinstance(model, AdaptedModel) and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
        seen += 1
    if not isinstance(model, AdaptedModel):
        raise TypeError(
            f"expected a model returned by sdslora.attach() (or a wrapper of one), got {type(model).__name__}"
        )
    return model


class Controller:
    """Drives the per-step duties of the attached method.

    Args:
        model: the :class:`AdaptedModel` (or a DDP/compile wrapper of it).
        optimizer: the optimizer that holds ``model.trainable_parameters()``; required when the method resets
            optimizer state (SDS-LoRA, orthogonal).
        total_steps: the run's total number of optimizer steps T (required by SDS-LoRA's decaying schedule).

    Raises ``ValueError`` when ``total_steps`` is needed but missing, or the optimizer does not hold the adapter's
    trainable tensors. If the model was loaded from a saved adapter that carries a Controller state, the step
    counter resumes from it (and ``total_steps`` must agree).
    """

    def __init__(self, model: nn.Module, optimizer: Any = None, total_steps: int | None = None):
        self.model = find_adapted_model(model)
        cfg = self.model.adapter_config
        self.options = cfg.method_options()
        layers = self.model.adapter_layers()
        self.layers = list(layers.values())
        self.layer_cls = type(self.layers[0]) if self.layers else None
        needs_t = self.layer_cls is not None and self.layer_cls.requires_total_steps(self.options)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)):
            raise TypeError(f"total_steps must be an int, got {total_steps!r}")
        if needs_t and total_steps is None:
            raise ValueError(
                f"method {cfg.method!r} with these options needs total_steps (the run's number of optimizer steps "
                "T) for its schedule: Controller(model, optimizer, total_steps=T)"
            )
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        resets = self.layer_cls is not None and self.layer_cls.has_step_duties
        if resets and self.optimizer is None:
            raise ValueError(f"method {cfg.method!r} resets optimizer state: pass the optimizer to the Controller")
        if self.optimizer is not None:
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            missing = [n for n, p in self.model.named_trainable_parameters() if id(p) not in held]
            if missing and resets:
                raise ValueError(
                    f"the optimizer does not hold {len(missing)} trainable parameter(s) (e.g. {missing[0]!r}); "
                    "build it from model.trainable_parameters()"
                )
        self.t = 0
        self.events: list[dict[str, Any]] = []
        pending = self.model._pending_controller_state
        if pending:
            self.load_state_dict(pending)
            self.model._pending_controller_state = None
        self.model._controller = self

    def step(self, t: int | None = None) -> StepOutcome:
        """Run the duties of optimizer step ``t`` (default: the next one). Returns what was done."""
        self.t = self.t + 1 if t is None else int(t)
        if self.layer_cls is None:
            return StepOutcome()
        out = self.layer_cls.on_optimizer_step(self.layers, self.t, self.total_steps, self.options)
        if out.reset_params:
            self.reset_optimizer_state(out.reset_params)
        self.events.extend(out.events)
        return out

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Forget the optimizer state (moments and step counters) of ``params``; they re-initialise lazily."""
        if self.optimizer is None:
            return
        for p in params:
            self.optimizer.state.pop(p, None)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "total_steps": self.total_steps, "method": self.model.adapter_config.method,
                "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") not in (None, self.model.adapter_config.method):
            raise ValueError(f"controller state is for method {state.get('method')!r}, not {self.model.method!r}")
        saved_t = state.get("total_steps")
        if self.total_steps is None:
            self.total_steps = saved_t
        elif saved_t is not None and saved_t != self.total_steps:
            raise ValueError(
                f"the saved run had total_steps={saved_t}, this Controller has {self.total_steps}: the refresh "
                "schedule would change; pass the same total_steps to resume"
            )
        self.t = int(state.get("t", 0))
        self.events = list(state.get("events", []))

