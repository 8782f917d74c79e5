"""attach(model, config) -> AdaptedModel: find the targets, swap in adapter layers, freeze the base.

The user's model is modified in place (its target modules are replaced by adapter layers that wrap them, as PEFT
does); :meth:`AdaptedModel.unload` or :meth:`AdaptedModel.merge_and_unload` put plain modules back.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .methods import METHODS, AdapterLayer, get_method
from .methods.base import KIND_NAMES, layer_dims, layer_kind, layer_type_name, supported_base
from .methods.quantised import refusal as quantised_refusal


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return set()
    try:
        out = get()
    except Exception:  # some models raise NotImplementedError here
        return set()
    return {n for n, m in model.named_modules() if out is not None and m is out}


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def find_targets(model: nn.Module, config: AdapterConfig, exact: list[str] | None = None) -> list[str]:
    """Names of the modules ``config`` adapts in ``model`` (raises a ValueError naming what exists if none)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    save_roots = [n for n, _ in named if config.modules_to_save and _matches(n, config.modules_to_save)]
    excluded = [n for n, _ in named if config.exclude_modules and _matches(n, config.exclude_modules)]
    skip = set(save_roots)
    linear_names = [n for n, m in named if supported_base(m)]

    if exact is not None:
        present = {n for n, _ in named}
        missing = [n for n in exact if n not in present]
        if missing:
            raise ValueError(
                f"the model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that the adapter "
                "adapts: it was saved from a different architecture"
            )
        targets = list(exact)
    elif config.target_modules == "all-linear":
        out_emb = _output_embedding_names(model)
        targets = [n for n, m in named if supported_base(m) and n not in out_emb and not _under(n, list(skip))]
    elif isinstance(config.target_modules, list):
        targets = [n for n, _ in named if _matches(n, config.target_modules) and not _under(n, list(skip))]
        unmatched = [t for t in config.target_modules if not any(_matches(n, [t]) for n, _ in named)]
        if unmatched and targets:
            warnings.warn(f"target_modules entries {unmatched} matched no module", stacklevel=3)
    else:
        try:
            rx = re.compile(config.target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {config.target_modules!r} is not a valid regular expression: {e}") from e
        targets = [n for n, _ in named if rx.fullmatch(n) and not _under(n, list(skip))]
    targets = [n for n in targets if not _under(n, excluded)]
    if not targets:
        shown = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}"
            + (f" (after exclude_modules={config.exclude_modules})" if config.exclude_modules else "")
            + f". Linear modules in this model (by last name): {shown[:30]}"
            + (" ..." if len(shown) > 30 else "")
            + "; pass some of these, a full module name, or 'all-linear'"
        )
    # drop targets nested inside another target (never adapt a module twice)
    targets = [n for n in targets if not any(n != o and n.startswith(o + ".") for o in targets)]
    return targets


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def attach(
    model: nn.Module,
    config: AdapterConfig,
    *,
    init_data: Iterable[Any] | None = None,
    init_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> AdaptedModel:
    """Adapt ``model`` in place according to ``config`` and return the :class:`AdaptedModel` wrapper.

    The base is frozen (``requires_grad=False``) except ``modules_to_save``; for ``method="full"`` nothing is
    frozen and no layer is swapped. Methods with a data-driven initialisation (``needs_init_data``: LoRA-GA,
    LoRA-SB) need ``init_data``, an iterable of a few training batches (dicts passed as ``model(**batch)``, whose
    output carries ``.loss``, or any batch with ``init_loss(model, batch) -> loss``): the mean gradient ∂L/∂W of
    every target is estimated on the plain model (:func:`sdslora.init.estimate_gradients`, memory-bounded) before
    the layers are swapped, and handed to each new layer's ``init_from_gradient``. Other methods ignore
    ``init_data``. Raises ``ValueError`` for an unknown method or option, no matched target, a rank larger than a
    layer allows, missing ``init_data`` or a tied target weight that the method would re-base (PiSSA), and
    ``TypeError`` for a target layer type that sdslora or the method cannot adapt (nn.Embedding and nn.Conv1d/2d/3d:
    ``lora``, ``sds``, ``orthogonal``, ``pissa``; the others adapt linear layers only). A target whose weight is tied
    to another module's warns: merging changes both.
    """
    return attach_layers(model, config, init_data=init_data, init_loss=init_loss)


def attach_layers(
    model: nn.Module,
    config: AdapterConfig,
    *,
    targets: list[str] | None = None,
    from_saved: bool = False,
    init_data: Iterable[Any] | None = None,
    init_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> AdaptedModel:
    """:func:`attach` with the two choices a saved adapter makes (``io.load_adapter``): the exact module names it
    adapts (``targets``, instead of matching ``config.target_modules``), and ``from_saved`` (layers built with
    ``deferred=True``: no data-driven or weight-dependent initialisation, since the saved tensors replace it)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"attach() takes an AdapterConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel) or any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("this model already has sdslora adapters; call unload() or merge_and_unload() first")
    spec = get_method(config.method)
    layers: dict[str, AdapterLayer] = {}
    if spec.layer_cls is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return AdaptedModel(model, config, layers)

    targets = find_targets(model, config, targets)
    param_names: dict[int, list[str]] = {}  # tied weights: one tensor under several names
    for n, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(n)
    for name in targets:
        module = model.get_submodule(name)
        kind = layer_kind(module)
        if kind is None:
            raise TypeError(
                f"module {name!r} is a {layer_type_name(module)}, which sdslora cannot adapt (supported: nn.Linear, "
                "transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d); remove it from target_modules"
            )
        if kind not in spec.layer_cls.layer_kinds:
            able = sorted(n for n, s in METHODS.items() if s.layer_cls is not None and kind in s.layer_cls.layer_kinds)
            raise TypeError(
                f"module {name!r} is a {layer_type_name(module)}, which method {config.method!r} cannot adapt "
                f"(it adapts {', '.join(KIND_NAMES[k] for k in spec.layer_cls.layer_kinds)}); methods that adapt "
                f"a {layer_type_name(module)}: "
                f"{able}. Use one of them or remove {name!r} from target_modules"
            )
        refused = quantised_refusal(module, spec.layer_cls)  # bitsandbytes 4/8-bit, torchao: methods.quantised
        if refused:
            raise TypeError(f"module {name!r}: {refused}")
        try:
            n_in, n_out = layer_dims(module)  # TypeError for a configuration without a matrix view (groups > 1, ...)
        except TypeError as e:
            raise TypeError(f"module {name!r}: {e}") from None
        if config.r > min(n_in, n_out):
            raise ValueError(
                f"rank r={config.r} is larger than layer {name!r} allows (in={n_in}, out={n_out}, max rank "
                f"{min(n_in, n_out)}); lower r or exclude this layer"
            )
        tied = [n for n in param_names.get(id(module.weight), []) if not _under(n, [name])]
        if tied and spec.layer_cls.rebases_base_weight:
            raise ValueError(
                f"module {name!r} shares its weight with {tied} (tied weights, e.g. input embedding and LM head): "
                f"method {config.method!r} re-bases that weight (W0 − s·B0·A0), which would change those modules "
                f"too; untie the weights or remove {name!r} from target_modules"
            )
        if tied and not from_saved:
            warnings.warn(
                f"module {name!r} shares its weight with {tied} (tied weights): the adapter changes {name!r} only, "
                "but merge() / merge_and_unload() add ΔW to the shared weight and so change those modules too",
                stacklevel=2,
            )
    options = spec.parse_options(config.options)
    data_init = spec.layer_cls.needs_init_data and not from_saved  # a saved adapter brings its tensors: no data
    if data_init and init_data is None:
        raise ValueError(
            f"{spec.description.split(',')[0]} (method {config.method!r}) needs init_data: a few batches of "
            "training data for its gradient-based initialisation (attach(model, config, init_data=[batch, ...]))"
        )
    roots: list[str] = []
    if config.modules_to_save:  # checked before anything changes: a failing attach leaves the model as it was
        roots = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
        if not roots:
            raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of the model")
    new = {  # built (and checked) before the gradient pass, swapped in after it
        name: spec.layer_cls(model.get_submodule(name), config.r, config.scale, config.dropout,
                             config.adapter_dtype, options, deferred=from_saved)
        for name in targets
    }
    grads: dict[str, torch.Tensor] = {}
    if data_init:
        from .init import estimate_gradients

        grads = estimate_gradients(model, targets, init_data, init_loss)  # on the plain model
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in new.items():
            if data_init:
                layer.init_from_gradient(grads.pop(name))
            _set_module(model, name, layer)
            layers[name] = layer
        spec.layer_cls.tie_layers(new)  # what the method shares across layers (LoTR's U, V), once all exist
        for n in roots:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    except BaseException:
        for name, layer in layers.items():  # put the plain modules back, restore every flag
            _set_module(model, name, layer.base_layer)
        for p, flag in flags.values():
            p.requires_grad_(flag)
        raise
    adapted = AdaptedModel(model, config, layers)
    adapted._grad_flags = flags
    return adapted


class _Forward:
    """``AdaptedModel.forward``: calls the wrapped model and carries its signature (HF Trainer inspects it)."""

    def __init__(self, model: nn.Module):
        self._model = model
        with contextlib.suppress(TypeError, ValueError):
            self.__signature__ = inspect.signature(model.forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)


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
            cached = _Forward(obj.model)
            obj.__dict__["_forward_cache"] = cached
        return cached


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
        # the wrapped model knows its wrapper (weakly): a trainer handed the inner model still finds the adapter
        object.__setattr__(model, "_sdslora_adapted", weakref.ref(self))

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
        self.model.__dict__.pop("_sdslora_adapted", None)
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
