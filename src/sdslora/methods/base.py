"""The adapter-layer contract every method implements, and the shared merge / export / state mechanics.

A method is a subclass of :class:`AdapterLayer` that owns its tensors (named ``lora_*``) and defines
``delta_weight()`` (the single source of truth for merge, export and diagnostics) and ``adapter_forward(x)``
(the adapter path, computed without forming an out x in matrix). Per-optimizer-step duties (re-parameterisation,
basis refresh) are declared through :meth:`AdapterLayer.on_optimizer_step`; only the Controller calls it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    raise TypeError(
        f"unsupported layer type {type(module).__name__}: sdslora adapts nn.Linear and transformers Conv1D; "
        "remove this module from target_modules"
    )


_DEFERRED_INIT: ContextVar[bool] = ContextVar("sdslora_deferred_init", default=False)


@contextmanager
def deferred_init() -> Iterator[None]:
    """Inside this context, new adapter layers skip weight-dependent initialisation (e.g. PiSSA's SVD and re-basing
    of W0): their tensors are about to be overwritten by a saved adapter, after which ``post_load()`` runs.
    ``io.load_adapter`` uses it; a layer reads it with :func:`init_deferred`."""
    token = _DEFERRED_INIT.set(True)
    try:
        yield
    finally:
        _DEFERRED_INIT.reset(token)


def init_deferred() -> bool:
    """Whether layers are being built inside :func:`deferred_init` (to be filled from a saved adapter)."""
    return _DEFERRED_INIT.get()


@dataclass
class StepOutcome:
    """What a method asks of the Controller after an optimizer step."""

    reset_params: list[nn.Parameter] = field(default_factory=list)  # clear these parameters' optimizer state
    events: list[dict[str, Any]] = field(default_factory=list)  # logged records (e.g. refresh jumps)
    # carry these parameters' optimizer state into new coordinates: (param, left, right) means the parameter's
    # gradient now reads g' = left @ g @ right (left/right None = identity); the Controller maps first moments the
    # same way and second moments by the element-wise squares, (left∘left) v (right∘right) (see Controller)
    state_maps: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)


class AdapterLayer(nn.Module):
    """Base class: wraps a frozen ``base_layer``; ``forward = base(x) + adapter_forward(x)``."""

    method: ClassVar[str] = ""
    has_step_duties: ClassVar[bool] = False  # True: on_optimizer_step may reset optimizer state
    needs_init_data: ClassVar[bool] = False  # True: attach() needs init_data and calls init_from_gradient(G)
    # True: the method replaces the frozen base weight (PiSSA: W_res = W0 − s·B0·A0), so "adapter disabled" means the
    # re-based weight, delta_weight() is relative to the ORIGINAL W0 and merge() adds delta_to_base() instead
    rebases_base_weight: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any):
        super().__init__()
        self.in_features, self.out_features = layer_dims(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r = int(r)
        self.scale = float(scale)
        self.options = options
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = self.base_weight
        self.adapter_dtype = torch.float32 if (dtype == "float32" and w.is_floating_point()) else w.dtype
        self.merged = False
        self.disabled = False

    # ---- the contract ---------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout [out, in], in the adapter dtype, differentiable w.r.t. the trainable tensors."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x`` (no dense ΔW)."""
        raise NotImplementedError

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact plain-LoRA factorisation ``(B', A')`` with ``ΔW = B' @ A'`` (scale folded into B')."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable layer state that is not a tensor (saved with the adapter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got {sorted(state)}")

    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """Data-driven initialisation of a ``needs_init_data`` method, called by attach() right after construction
        (never when a saved adapter is loaded). ``grad``: mean ∂L/∂W over the init data, float32, [out, in]."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient-based initialisation")

    def sync_state(self) -> None:
        """Re-derive the layer's Python-side state (e.g. SDS-LoRA's phase flag) from its tensors after they were
        overwritten from outside (a loaded adapter, a rolled-back duty). Default: nothing."""

    def post_load(self) -> None:
        """Called by ``io.load_adapter`` after the saved tensors and extra state are copied in (layers built inside
        :func:`deferred_init`): re-derive what depends on them (PiSSA re-bases W0). Default: nothing."""

    def delta_to_base(self) -> torch.Tensor:
        """What ``merge()`` adds to the layer's current base weight, [out, in]: ``delta_weight()``, except for
        methods that re-base W0 (``rebases_base_weight``), whose ``delta_weight()`` is relative to the original."""
        return self.delta_weight()

    def peft_extras(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Extra PEFT ``adapter_config.json`` fields (equal for every layer, e.g. ``{"use_dora": True}``) and extra
        tensors of this layer (local key -> tensor, e.g. ``{"lora_magnitude_vector": m}``) for ``io.export_peft``."""
        return {}, {}

    @classmethod
    def requires_total_steps(cls, options: Any) -> bool:
        """Whether the Controller needs the run's total number of optimizer steps for this method."""
        return False

    @classmethod
    def duties_due(cls, t: int, total_steps: int | None, options: Any) -> bool:
        """Whether :meth:`on_optimizer_step` may change tensors after optimizer step ``t``: only then does the
        Controller gather FSDP2 shards and sync the ranks. Default: ``has_step_duties`` (always, to be safe)."""
        return cls.has_step_duties

    @classmethod
    def on_optimizer_step(
        cls, layers: list[AdapterLayer], t: int, total_steps: int | None, options: Any
    ) -> StepOutcome:
        """Per-step duties after optimizer step ``t`` (1-based). Default: none."""
        return StepOutcome()

    @classmethod
    def uses_lr_factor(cls, options: Any) -> bool:
        """Whether :meth:`lr_factor` can differ from 1 (then the Controller scales the adapter's learning rate)."""
        return False

    @classmethod
    def lr_factor(cls, t: int, total_steps: int | None, options: Any) -> float:
        """Multiplier on the learning rate of the param groups holding the adapter's parameters for optimizer step
        ``t`` (1-based), applied by the Controller around ``optimizer.step()`` on top of any LR scheduler.
        Default: 1."""
        return 1.0

    # ---- shared mechanics -------------------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own parameters and persistent buffers (not the base layer's), by local name."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters(recurse=False):
            out[name] = p
        for name, b in self.named_buffers(recurse=False):
            if name not in self._non_persistent_buffers_set:
                out[name] = b
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        return result + self.adapter_forward(x).to(result.dtype)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> AdapterLayer:
        # model.to(dtype) / .half() / .bfloat16() cast the adapter tensors too: follow them (else the adapter
        # path would feed float32 inputs into bf16 factors)
        out = super()._apply(fn, *args, **kwargs)
        for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            if t.is_floating_point():
                self.adapter_dtype = t.dtype
                break
        return out

    def _cast_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x.to(self.adapter_dtype))

    def _to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW to the base weight (in place); the adapter path is then skipped."""
        if self.merged:
            return
        w = self.base_weight
        delta = self._to_base_layout(self.delta_to_base()).to(w.dtype)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{type(self).__name__}: ΔW has non-finite entries; refusing to merge")
        w.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            return
        w = self.base_weight
        w.sub_(self._to_base_layout(self.delta_to_base()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:.4g}"
