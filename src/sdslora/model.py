"""attach(model, config) -> AdaptedModel: find the targets, swap in adapter layers, freeze the base.

The user's model is modified in place (its target modules are replaced by adapter layers that wrap them, as PEFT
does); :meth:`AdaptedModel.unload` or :meth:`AdaptedModel.merge_and_unload` put plain modules back. The wrapper
is :mod:`~sdslora.adapted`, the matching of target names :mod:`~sdslora.targets` (their names stay importable
from here).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .adapted import AdaptedModel, _class_forward, _Forward, _ForwardDescriptor  # noqa: F401  (importable from here)
from .config import AdapterConfig
from .methods import METHODS, AdapterLayer, get_method
from .methods.base import (  # noqa: F401  (supported_base: importable from here as before)
    KIND_NAMES,
    layer_dims,
    layer_kind,
    layer_type_name,
    supported_base,
)
from .methods.quantised import refusal as quantised_refusal
from .targets import (  # noqa: F401  (find_targets, _output_embedding_names, ...: importable from here)
    _matches,
    _output_embedding_names,
    _set_module,
    _under,
    find_targets,
)


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
