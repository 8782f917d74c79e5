"""Controller: the one place that carries out a method's per-optimizer-step duties and talks to the optimizer.

Call :meth:`Controller.step` right after every ``optimizer.step()`` (after gradient accumulation: one call per
optimizer step, not per micro-batch). For SDS-LoRA that runs the warm-up re-parameterisation (and clears the
optimizer state of A and B), then the basis-refresh schedule. The step counter and the run length are part of the
adapter saved by ``save_adapter``, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .adapted import wrapper_of
from .distributed import (  # noqa: F401  (dist_rank, broadcast_from_rank0: importable from here as before)
    broadcast_from_rank0,
    dist_rank,
    dist_world_size,
    dtensor_type,
    fsdp2_sharded,
    gathered_adapter_tensors,
    unsupported_sharding,
)
from .methods import StepOutcome, StepPlan, get_method
from .model import AdaptedModel
from .nonfinite import (  # noqa: F401  (NonFiniteError, NONFINITE_CAUSES, _finite_flags: importable from here)
    NONFINITE_CAUSES,
    NonFiniteError,
    _finite_flags,
    _Snapshot,
)
from .optimizer_state import OptimizerStateOps, unwrap_optimizer


def find_adapted_model(model: nn.Module) -> AdaptedModel:
    """The AdaptedModel inside DDP / FSDP / accelerate / torch.compile wrappers."""
    seen = 0
    while not isinstance(model, AdaptedModel) and seen < 8:
        adapted = wrapper_of(model) if isinstance(model, nn.Module) else None
        if adapted is not None:  # the inner model of an AdaptedModel
            return adapted
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


class Controller(OptimizerStateOps):
    """Drives the per-step duties of the attached method.

    Args:
        model: the :class:`AdaptedModel` (or a DDP/compile wrapper of it).
        optimizer: the optimizer that holds ``model.trainable_parameters()``; required when the method resets
            optimizer state (SDS-LoRA, orthogonal).
        total_steps: the run's total number of optimizer steps T (required by SDS-LoRA's decaying schedule).
        sync: ``"auto"`` (default): when torch.distributed is initialised with world size > 1 (DDP, FSDP2, the HF
            Trainer / Accelerate under ``torchrun`` or ``accelerate launch``), after every step that runs a duty
            the adapter tensors of all layers are broadcast from rank 0, so every rank holds bitwise the same A, B
            and bases whatever its hardware's rounding; ``False``: never broadcast. Every rank must call
            :meth:`step` (the duties of an FSDP2-sharded model gather A and B: a collective).

    Under FSDP2 (``fully_shard``) the duties run on all-gathered A, B (never the base weight) and the results are
    written back into the shards. Under gradient accumulation with Accelerate (``accelerator.accumulate``), a call
    of ``step()`` on a micro-batch whose optimizer step was skipped is ignored, so the counter counts optimizer
    steps. Raises ``ValueError`` when ``total_steps`` is needed but missing, the optimizer does not hold the
    adapter's trainable tensors, or a method with per-step duties runs under a wrapping whose copies of the
    adapter it cannot update (DeepSpeed ZeRO, FSDP1: use DDP or FSDP2, see docs/scaling.md). If the model was
    loaded from a saved adapter that carries a Controller state, the step counter resumes from it (and
    ``total_steps`` must agree).
    """

    def __init__(
        self, model: nn.Module, optimizer: Any = None, total_steps: int | None = None, sync: str | bool = "auto"
    ):
        if sync not in ("auto", True, False):
            raise ValueError(f"sync must be 'auto', True or False, got {sync!r}")
        self.sync = sync
        self._sync_checked = False
        self._outer_optimizer = optimizer
        self.model = find_adapted_model(model)
        cfg = self.model.adapter_config
        self.options = cfg.method_options()
        layers = self.model.adapter_layers()
        self.layers = list(layers.values())
        self.layer_names = list(layers)
        # the method's schedule: what it does over the run's optimizer steps (nothing for most methods)
        self.plan_cls: type[StepPlan] = get_method(cfg.method).plan_cls if self.layers else StepPlan
        needs_t = self.plan_cls.needs_total_steps(self.options)
        saved = self.model.schedule_state
        if total_steps is None and saved and saved.get("total_steps") is not None:
            total_steps = saved["total_steps"]  # resuming a saved run: its T comes with it
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
        self.plan = self.plan_cls(self.options, total_steps)
        if total_steps is not None and self.plan.acts and self.plan.first_duty() is None:
            raise ValueError(
                f"total_steps={total_steps} ends before method {cfg.method!r} runs any of its per-step duties (for "
                "SDS-LoRA: the re-parameterisation after the warm-up, options.warmup_steps), so the run would train "
                "plain LoRA under another name; train for more steps or shorten the warm-up"
            )
        self._warned_past_end = False
        resets = self.plan.acts
        why = unsupported_sharding(model, self.model, optimizer) if resets else None
        if why:
            raise ValueError(
                f"method {cfg.method!r} rewrites the adapter tensors in place at its per-step duties, which is not "
                f"supported here: {why}. Use DDP or FSDP2 (torch.distributed.fsdp.fully_shard; Accelerate: "
                "fsdp_version 2) instead; see docs/scaling.md"
            )
        if resets and not self.plan.fsdp2_ready and fsdp2_sharded(self.model):
            raise ValueError(
                f"method {cfg.method!r} runs per-step duties written for unsharded tensors (a restart merges into the "
                "frozen weight, AdaLoRA reads every step's gradients into its importance buffers, growth replaces the "
                "parameters), and this model is sharded by FSDP2 (fully_shard). Use DDP for it, or a method whose "
                "duties run under FSDP2 (sds, orthogonal); see docs/scaling.md"
            )
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        if self.optimizer is not None:
            self._warn_fp16_eps()
        observes = self.plan.observes_gradients and bool(self.layers)
        if observes and self.optimizer is None:
            raise ValueError(
                f"method {cfg.method!r} reads the gradients of every optimizer step: pass the optimizer to the "
                "Controller (Controller(model, optimizer, total_steps=T))"
            )
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
        self._lr_saved: list[tuple[dict[str, Any], Any]] = []
        if self.optimizer is not None and (self.plan_cls.scales_lr(self.options) or observes):
            # the method scales the adapter's learning rate by lr_factor(t) (a function of the step counter only,
            # so a resumed run continues exactly): around every optimizer.step(), on top of any LR scheduler
            # one set of hooks per optimizer: a new Controller on the same optimizer (re-created, resumed) replaces the
            # previous one's, so the factor is never applied twice
            for handle in getattr(self.optimizer, "_sdslora_lr_hooks", ()):
                handle.remove()
            self.optimizer._sdslora_lr_hooks = (  # type: ignore[attr-defined]
                self.optimizer.register_step_pre_hook(self._lr_pre_hook),
                self.optimizer.register_step_post_hook(self._lr_post_hook),
            )
            self._warn_mixed_lr_groups()
        pending = self.model.schedule_state
        if pending:
            self.load_state_dict(pending)
            self.model.schedule_state = None
        self.model.controller = self

    def step(self, t: int | None = None) -> StepOutcome:
        """Run the duties of optimizer step ``t`` (default: the next one). Returns what was done.

        A duty never runs on non-finite factors and never leaves non-finite ones: :class:`NonFiniteError` names
        the step, the layer and the likely cause, and the adapter tensors are left as they were before the duty
        (the step counter stays at the previous step). Resume from a checkpoint taken before the values went bad,
        with a lower learning rate."""
        gradient_state = getattr(self._outer_optimizer, "gradient_state", None)  # accelerate's AcceleratedOptimizer
        if t is None and gradient_state is not None and not getattr(gradient_state, "sync_gradients", True):
            return StepOutcome()  # a micro-batch of an accumulation cycle: the optimizer did not step
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"Controller.step(t): t must be an int >= 1 (the optimizer step just taken), got {t!r}")
        new_t = self.t + 1 if t is None else int(t)
        if self.total_steps is not None and new_t > self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"Controller.step(): optimizer step {new_t} is past total_steps={self.total_steps}; the method's "
                "schedule was planned for that many steps and does nothing more. Pass the run's real length as "
                "total_steps.", stacklevel=2)
        if not self.plan.due(new_t):
            self.t = new_t
            return StepOutcome()
        broadcast = self._sync_now()
        atomic = self.plan.atomic(self.layers, new_t)
        with gathered_adapter_tensors(self.layers, broadcast=broadcast) as alias:
            # inside the block the layers hold full (gathered) tensors; raising here skips the write-back into
            # FSDP2 shards, and the snapshot below restores unsharded tensors, so a failed duty changes nothing
            if atomic:  # the duty checks its inputs and results and writes only at its end: nothing to roll back
                try:
                    out = self.plan.run(self.layers, new_t)
                except NonFiniteError as e:
                    self._check_finite(new_t, "before")  # names the layer when the factors were bad already
                    raise NonFiniteError(
                        f"after optimizer step {new_t}, method {self.model.method!r}'s duty: {e}") from e
                except Exception as e:
                    self._raise_duty_error(new_t, e)
            else:
                out = self._run_with_rollback(new_t)
        if broadcast:  # state derived from the broadcast tensors (phase flags, a re-based weight) follows them
            for layer in self.layers:
                layer.sync_state()
        self.t = new_t
        if out.replaced:
            self.replace_parameters(out.replaced)
        if out.reset_params:
            self.reset_optimizer_state([alias.get(id(p), p) for p in out.reset_params])
        if out.prune_params:
            self.prune_optimizer_state([(alias.get(id(p), p), share) for p, share in out.prune_params])
        if out.state_maps:
            self.map_optimizer_state([(alias.get(id(p), p), left, right) for p, left, right in out.state_maps])
        self.events.extend(out.events)
        return out

    def _run_with_rollback(self, t: int) -> StepOutcome:
        """Run the duty of step ``t`` from a snapshot of every adapter tensor, checked finite before and after; on any
        failure the tensors, the tensor objects and the ranks are put back (a duty may replace parameters by new
        ones, as rank growth does, and then fail)."""
        held = [(layer, layer.adapter_tensors(), layer.r) for layer in self.layers]
        snapshot = _Snapshot([t_ for _, tensors, _ in held for t_ in tensors.values()])
        if not snapshot.finite():
            self._check_finite(t, "before")
        try:
            out = self.plan.run(self.layers, t)
            if not _Snapshot.all_finite([t_ for layer in self.layers for t_ in layer.adapter_tensors().values()]):
                self._check_finite(t, "after")
        except Exception as e:
            for layer, tensors, r in held:
                for name, obj in tensors.items():
                    if getattr(layer, name) is not obj:
                        setattr(layer, name, obj)
                layer.r = r
            snapshot.restore()
            for layer in self.layers:
                layer.sync_state()
            self._raise_duty_error(t, e)
        return out

    def _raise_duty_error(self, t: int, e: Exception) -> None:
        """Re-raise a failed duty's error; a factorisation that met non-finite values as :class:`NonFiniteError`."""
        if isinstance(e, NonFiniteError):
            raise e
        if isinstance(e, torch.linalg.LinAlgError) or "non-finite" in str(e):
            raise NonFiniteError(
                f"step {t}: a factorisation in method {self.model.method!r}'s duty failed ({e}); the "
                f"adapter was left as it was before the duty. {NONFINITE_CAUSES}"
            ) from e
        raise e

    def _check_finite(self, t: int, when: str) -> None:
        """Raise :class:`NonFiniteError` naming the first adapter tensor that holds NaN/Inf (the slow, per-tensor
        scan; :class:`_Snapshot` checks the common all-finite case in one reduction first)."""
        for name, layer in zip(self.layer_names, self.layers, strict=True):
            for t_name, tensor in layer.adapter_tensors().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    n_bad = int((~torch.isfinite(tensor)).sum())
                    if when == "before":
                        what = (f"before method {self.model.method!r}'s duty after optimizer step {t}, layer "
                                f"{name!r} holds {n_bad} NaN/Inf value(s) in {t_name}: training had already diverged")
                    else:
                        what = (f"method {self.model.method!r}'s duty after optimizer step {t} produced {n_bad} "
                                f"NaN/Inf value(s) in {t_name} of layer {name!r}")
                    raise NonFiniteError(
                        f"{what}; the duty did not run and the adapter is as it was. {NONFINITE_CAUSES}. To go on, "
                        "resume from a checkpoint saved before this step with a lower learning rate."
                    )

    def _warn_fp16_eps(self) -> None:
        assert self.optimizer is not None
        mine = {id(p) for p in self.model.adapter_parameters()}
        for g in self.optimizer.param_groups:
            eps = g.get("eps")
            half = [p for p in g["params"] if id(p) in mine and p.dtype == torch.float16]
            if half and isinstance(eps, (int, float)) and eps < 1e-7:
                warnings.warn(
                    f"the adapter's parameters are float16 and the optimizer's eps={eps:g} is below float16's "
                    "resolution (it rounds to 0, and Adam's update divides by it): expect Inf/NaN factors. Keep "
                    "adapter_dtype='float32' (the default) or use eps >= 1e-6.", stacklevel=3)
                return

    def _lr_groups(self) -> list[dict[str, Any]]:
        assert self.optimizer is not None
        mine = {id(p) for p in self.model.adapter_parameters()}
        return [g for g in self.optimizer.param_groups if any(id(p) in mine for p in g["params"])]

    def _warn_mixed_lr_groups(self) -> None:
        """The lr factor scales whole param groups: say so when a group also holds other trainable tensors."""
        mine = {id(p) for p in self.model.adapter_parameters()}
        names = {id(p): n for n, p in self.model.named_trainable_parameters()}
        for i, g in enumerate(self._lr_groups()):
            others = [names.get(id(p), "?") for p in g["params"] if id(p) not in mine]
            if others:
                warnings.warn(
                    f"{self.model.method}: lr_scale / rewarm scale the learning rate of whole optimizer param groups, and "
                    f"param group {i} also holds {len(others)} non-adapter tensor(s) (e.g. {others[0]!r}), whose "
                    "learning rate is scaled too. To keep their learning rate, give them their own param group: "
                    "build the optimizer from model.trainable_param_groups() instead of model.trainable_parameters().",
                    stacklevel=3,
                )
                return

    def _lr_pre_hook(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        factor = float(self.plan.lr_factor(self.t + 1))
        self._lr_saved = []
        if factor == 1.0:
            return
        for g in self._lr_groups():
            self._lr_saved.append((g, g["lr"]))
            g["lr"] = g["lr"] * factor

    def _lr_post_hook(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        for g, lr in self._lr_saved:  # give the scheduler back exactly its own value
            g["lr"] = lr
        self._lr_saved = []
        if self.plan.observes_gradients:  # right after the step, before any zero_grad: the step's gradients
            self.plan.observe(self.layers, self.t + 1)

    def _sync_now(self) -> bool:
        if self.sync is False or dist_world_size() == 1:
            return False
        if not self._sync_checked:  # the broadcast needs the same tensors on every rank (not pipeline parallel)
            mine = [(n, tuple(t.shape), str(t.dtype)) for layer in self.layers for n, t in layer.adapter_tensors().items()]
            every: list[Any] = [None] * dist_world_size()
            dist.all_gather_object(every, mine)
            if any(o != mine for o in every):
                raise RuntimeError(
                    "the ranks hold different adapter tensors (pipeline / tensor parallelism?): the Controller cannot "
                    "sync them from rank 0; pass Controller(..., sync=False)"
                )
            self._sync_checked = True
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "total_steps": self.total_steps, "method": self.model.adapter_config.method,
                "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"a Controller state must be a mapping, got {type(state).__name__}")
        t = state.get("t", 0)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"the saved Controller state has step t={t!r}; it must be an int >= 0 (corrupt adapter "
                             "file? save the adapter again)")
        saved_total = state.get("total_steps")
        if saved_total is not None and (isinstance(saved_total, bool) or not isinstance(saved_total, int)
                                        or saved_total < 1):
            raise ValueError(f"the saved Controller state has total_steps={saved_total!r}; it must be an int >= 1")
        if not isinstance(state.get("events", []), list):
            raise ValueError("the saved Controller state's 'events' must be a list")
        if state.get("method") not in (None, self.model.adapter_config.method):
            raise ValueError(f"controller state is for method {state.get('method')!r}, not {self.model.method!r}")
        saved_t = state.get("total_steps")
        if self.total_steps is None and saved_t is not None:
            self.total_steps = saved_t
            self.plan = self.plan_cls(self.options, saved_t)
        elif saved_t is not None and saved_t != self.total_steps:
            raise ValueError(
                f"the saved run had total_steps={saved_t}, this Controller has {self.total_steps}: the refresh "
                "schedule would change; pass the same total_steps to resume"
            )
        self.t = int(state.get("t", 0))
        self.events = list(state.get("events", []))
