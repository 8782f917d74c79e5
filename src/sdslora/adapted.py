"""AdaptedModel: the wrapper of a model with adapters attached (inspection, merge, disable, unload, saving)."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .methods import AdapterLayer
from .targets import _set_module


class _Forward:
    """``AdaptedModel.forward``: calls the wrapped model and carries its signature (HF Trainer inspects it). For a
    method with a training penalty (AdaLoRA's orthogonality term) it adds the penalty to the output's ``loss`` while
    training, as PEFT does."""

    def __init__(self, model: nn.Module, penalty: Any = None):
        self._model = model
        self._penalty = penalty  # None for every method without a penalty: no per-call work
        with contextlib.suppress(TypeError, ValueError):
            self.__signature__ = inspect.signature(model.forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._model(*args, **kwargs)
        if self._penalty is not None and self._model.training:
            loss = getattr(out, "loss", None)
            if isinstance(loss, torch.Tensor):
                extra = self._penalty()
                if extra is not None:
                    out.loss = loss + extra.to(loss.dtype)
        return out


def _class_forward(self: Any, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
    """Class-level view of ``AdaptedModel.forward`` (transformers' ``find_labels`` inspects the class)."""
    if labels is not None:
        kwargs["labels"] = labels
    return self.model(*args, **kwargs)


class _ForwardDescriptor:
    """On an instance: a callable with the wrapped model's signature; on the class: a generic function."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return _class_forward
        cached = obj.__dict__.get("_forward_cache")  # built once per wrapped model: no introspection per call
        if cached is None or cached._model is not obj.model:
            cached = _Forward(obj.model, obj.regularization_loss if obj.has_regularization() else None)
            obj.__dict__["_forward_cache"] = cached
        return cached


# the wrapped model -> its AdaptedModel, both weakly (a trainer handed the inner model still finds the adapter); held
# here rather than on the inner model, so pickling or copying that model carries no reference to the wrapper
_WRAPPER_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref[AdaptedModel]] = weakref.WeakKeyDictionary()


def wrapper_of(model: nn.Module) -> AdaptedModel | None:
    """The live (not unloaded) AdaptedModel that wraps ``model``, if any."""
    ref = _WRAPPER_OF.get(model)
    adapted = ref() if ref is not None else None
    return adapted if adapted is not None and not adapted._unloaded and adapted.model is model else None


class AdaptedModel(nn.Module):
    """A model with adapters attached. Calls go to the wrapped model; unknown attributes are looked up there."""

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]):
        super().__init__()
        self.model = model
        self.adapter_config = config
        self._layers = dict(layers)
        # the Controller driving this model (set by it), and the schedule state a loaded adapter brought, which the
        # next Controller built on the model takes over (step counter, T, events)
        self.controller: Any = None
        self.schedule_state: dict[str, Any] | None = None
        self._unloaded = False
        self._grad_flags: dict[int, tuple[nn.Parameter, bool]] = {}  # requires_grad before attach (for rollback)
        self.training = model.training  # the wrapper reports the wrapped model's mode (an eval model stays eval)
        _WRAPPER_OF[model] = weakref.ref(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (copy.deepcopy) or an unpickled model: its own inner model knows it
        super().__setstate__(state)
        _WRAPPER_OF[self.model] = weakref.ref(self)

    forward = _ForwardDescriptor()  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- inspection -------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """What ``base_model`` is on the wrapped model: for a transformers model its backbone (``LlamaModel`` inside
        ``LlamaForCausalLM``), as libraries that treat this object like the model it wraps expect (TRL's fused LM
        head calls ``model.base_model(...)`` for the hidden states). The whole wrapped model is
        :meth:`get_base_model` (PEFT's name for it)."""
        inner = self.model
        backbone = getattr(type(inner), "base_model", None)
        if backbone is not None and isinstance(backbone, property):
            return inner.base_model
        return inner

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' marker for "trainable adapters are attached": its Trainer (and TRL's) refuse to fine-tune a
        quantised model without it. True while adapter layers are attached."""
        return bool(self._layers) and not self._unloaded

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its target modules replaced by adapter layers), as ``PeftModel.get_base_model()``."""
        return self.model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Turn on the wrapped model's gradient checkpointing; with the base frozen, re-entrant checkpointing also
        needs the input embeddings to require grad (as PEFT does), so that the adapter's gradients flow."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        if kwargs.get("use_reentrant", True) and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    @property
    def method(self) -> str:
        return self.adapter_config.method

    def has_regularization(self) -> bool:
        """Whether the method adds a penalty to the training loss (AdaLoRA)."""
        layers = self._layers
        if not layers:
            return False
        own = type(next(iter(layers.values()))).regularization.__func__  # type: ignore[attr-defined]
        return own is not AdapterLayer.regularization.__func__  # type: ignore[attr-defined]

    def regularization_loss(self) -> torch.Tensor | None:
        """The method's training penalty (AdaLoRA: ``orth_reg_weight`` × the mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F), None
        for methods without one. ``model(**batch)`` adds it to the output's ``loss`` while training; a training loop
        that computes its own loss adds it itself: ``loss = loss_fn(...) + model.regularization_loss()``."""
        if not self._layers:
            return None
        return type(next(iter(self._layers.values()))).regularization(self._layers)

    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """Adapted module name (in the wrapped model) -> adapter layer."""
        self._check_live()
        return dict(self._layers)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                yield n, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer."""
        return [p for _, p in self.named_trainable_parameters()]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter layers' own parameters (factors, DoRA's magnitude, ...), without ``modules_to_save``; a
        tensor shared by several layers (LoTR's U, V) once."""
        return list({id(p): p for layer in self._layers.values() for p in layer.parameters(recurse=False)}.values())

    def trainable_param_groups(self, adapter: dict[str, Any] | None = None,
                               other: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Optimizer param groups: the adapter layers' own parameters (factors, DoRA's magnitude, ...) in one group,
        the other trainable tensors (``modules_to_save``) in a second, each with its extra settings, e.g.
        ``AdamW(model.trainable_param_groups(other={"lr": 1e-4}), lr=1e-3)``. Empty groups are left out. Use it
        when a method scales the adapter's learning rate (SDS-LoRA's ``lr_scale``) and the rest should keep theirs."""
        mine = {id(p) for p in self.adapter_parameters()}
        params = [p for _n, p in self.named_trainable_parameters()]
        groups = [
            {"params": [p for p in params if id(p) in mine], **(adapter or {})},
            {"params": [p for p in params if id(p) not in mine], **(other or {})},
        ]
        return [g for g in groups if g["params"]]

    def layer_parameter_groups(self) -> list[dict[str, Any]]:
        """One entry per adapter layer: ``{"name", "layer", "params": {local name: parameter}}`` (explicit pairing
        for optimizer-side methods that need both factors of a layer)."""
        return [
            {"name": n, "layer": layer, "params": dict(layer.named_parameters(recurse=False))}
            for n, layer in self._layers.items()
        ]

    def trainable_summary(self) -> dict[str, Any]:
        """Trainable and total parameter counts (each tensor counted once)."""
        seen: set[int] = set()
        total = trainable = 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        adapter = sum(p.numel() for p in self.adapter_parameters())  # shared tensors once
        return {
            "method": self.method,
            "trainable": trainable,
            "adapter": adapter,
            "total": total,
            "trainable_percent": 100.0 * trainable / max(total, 1),
            "layers": len(self._layers),
        }

    def print_trainable_parameters(self) -> None:
        s = self.trainable_summary()
        print(
            f"method={s['method']} layers={s['layers']} trainable={s['trainable']:,} of {s['total']:,} "
            f"({s['trainable_percent']:.4f} %)"
        )

    # ---- merge / disable / unload -----------------------------------------------------------------------------
    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("this AdaptedModel was unloaded; attach() the returned model again to continue")

    def merge(self) -> None:
        """Fold every ΔW into its base weight (outputs unchanged, adapter path skipped). All layers or none: a layer
        that cannot merge (a quantised base) is found before any layer changes."""
        self._check_live()
        for layer in self._layers.values():
            layer.check_mergeable()
        for layer in self._layers.values():
            layer.merge()

    def unmerge(self) -> None:
        self._check_live()
        for layer in self._layers.values():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model computes with the (possibly re-based) base weights only."""
        self._check_live()
        if any(layer.merged for layer in self._layers.values()):
            raise RuntimeError("unmerge() before disabling the adapter")
        for layer in self._layers.values():
            layer.disabled = True
        try:
            yield
        finally:
            for layer in self._layers.values():
                layer.disabled = False

    def unload(self, merge: bool = False) -> nn.Module:
        """Put the plain base modules back (merging ΔW into them first if ``merge``) and return the model.

        Without ``merge`` the original base weights come back, also for methods that re-base W0 (PiSSA,
        LoRA-GA: their residual weight is shifted back, up to rounding)."""
        self._check_live()
        if merge:  # all layers or none
            for layer in self._layers.values():
                layer.check_mergeable()
        for name, layer in self._layers.items():
            if merge:
                layer.merge()
            else:
                if layer.merged:
                    layer.unmerge()
                layer.prepare_unload()
            _set_module(self.model, name, layer.base_layer)
        self._unloaded = True
        _WRAPPER_OF.pop(self.model, None)
        return self.model

    def _rollback(self) -> nn.Module:
        """Undo attach() after a failed call (e.g. a load): plain modules back and every ``requires_grad`` flag as
        it was before attach()."""
        model = self.unload()
        for p, flag in self._grad_flags.values():
            p.requires_grad_(flag)
        return model

    def merge_and_unload(self) -> nn.Module:
        """A plain ``nn.Module`` with W0 + ΔW in every adapted layer."""
        return self.unload(merge=True)

    # ---- persistence (see io.py) ------------------------------------------------------------------------------
    def save_adapter(self, path: str | Path, **kwargs: Any) -> Path:
        """Native adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (with Q buffers,
        layer state and the Controller state); see :func:`sdslora.io.save_adapter`."""
        from .io import save_adapter

        return save_adapter(self, path, **kwargs)

    def export_peft(self, path: str | Path, **kwargs: Any) -> Path:
        """Standard PEFT LoRA folder that ``peft.PeftModel.from_pretrained(base, path)`` loads."""
        from .io import export_peft

        return export_peft(self, path, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the adapter owns, keyed like the wrapped model's state_dict: adapter tensors of each layer
        and all trainable parameters outside the layers (modules_to_save, or everything for full fine-tuning)."""
        self._check_live()
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._layers.items():
            for t_name, t in layer.adapter_tensors().items():
                out[f"{name}.{t_name}"] = t
        for n, p in self.named_trainable_parameters():
            out.setdefault(n, p)
        return out
