"""Optimizer-side methods: a registry ``OPTIMIZERS`` and one factory :func:`build_optimizer`.

    opt = sdslora.optim.build_optimizer(model, "scaled_adamw", lr=2e-4)
    trainer = Trainer(model=model, args=args, ..., optimizers=(opt, None))

=================  ===========================================================================================
``adamw``          plain ``torch.optim.AdamW`` over ``model.trainable_param_groups()`` (every method)
``loraplus``       LoRA+ (Hayou et al. 2024): lr_B = λ·lr_A, as AdamW parameter groups (PEFT-compatible)
``scaled_adamw``   Riemannian preconditioned AdamW (Zhang & Pilanci 2024)
``lora_pro``       LoRA-Pro, light variant (Wang et al. 2024): gradients matched to G*, per-factor AdamW
``altlora``        AltLoRA (2025): alternating projected updates with momentum transport
=================  ===========================================================================================

All but ``adamw`` need LoRA-style layers (trainable lora_A, lora_B with ΔW = s·B·A, paired explicitly through
``AdaptedModel.layer_parameter_groups()``) and raise ``ValueError`` otherwise (full fine-tuning, LoRA-XS/SB,
SDS-LoRA). Trainable tensors outside the adapter layers are updated by plain AdamW inside the same optimizer.
The results are ordinary ``torch.optim.Optimizer`` objects: lazy state (the Controller may pop
``optimizer.state[p]``), stock ``state_dict`` / ``load_state_dict``, only ``.grad`` read at ``step()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import check_field_types
from .altlora import AltLoRA, AltLoRAOptions
from .common import PairedAdamW, _check_hparams, split_pairs
from .lora_pro import LoRAPro, LoRAProOptions, lora_pro_gradients
from .loraplus import LoRAPlusOptions, loraplus_optimizer
from .scaled import ScaledAdamW, ScaledAdamWOptions, riemannian_gradients


@dataclass
class AdamWOptions:
    """Plain AdamW has no options beyond lr, betas, eps, weight_decay."""


def adamw_optimizer(
    model: nn.Module,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the trainable parameters (for an adapted model
    ``model.trainable_param_groups()``: the adapter's parameters and the other trainable tensors in two groups with
    the same settings, so that a method's learning-rate factor scales only the adapter; else every parameter with
    ``requires_grad``)."""
    _check_hparams(lr, betas, eps, weight_decay)
    groups = getattr(model, "trainable_param_groups", None)  # adapter / other groups (lr_scale scales the first)
    params = groups() if callable(groups) else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to optimize")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[..., torch.optim.Optimizer]  # build(model, lr=, betas=, eps=, weight_decay=, **options)
    options_cls: type
    description: str
    citation: str

    def parse_options(self, options: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            hint = f"valid options: {sorted(known)}" if known else "it takes no options"
            raise ValueError(f"unknown option(s) {unknown} for optimizer {self.name!r}; {hint}")
        check_field_types(self.options_cls, options, f"optimizer {self.name!r} option")
        return dataclasses.asdict(self.options_cls(**options))


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        "adamw",
        adamw_optimizer,
        AdamWOptions,
        "plain AdamW over the trainable parameters",
        "Loshchilov & Hutter 2019, arXiv 1711.05101",
    ),
    "loraplus": OptimizerSpec(
        "loraplus",
        loraplus_optimizer,
        LoRAPlusOptions,
        "LoRA+: lr_B = λ·lr_A (AdamW groups)",
        "Hayou, Ghosh, Yu 2024, arXiv 2402.12354",
    ),
    "scaled_adamw": OptimizerSpec(
        "scaled_adamw",
        ScaledAdamW,
        ScaledAdamWOptions,
        "Riemannian preconditioned AdamW: ĝ_A=(BᵀB+δI)⁻¹∇_A, ĝ_B=∇_B(AAᵀ+δI)⁻¹",
        "Zhang & Pilanci 2024, arXiv 2402.02347",
    ),
    "lora_pro": OptimizerSpec(
        "lora_pro",
        LoRAPro,
        LoRAProOptions,
        "LoRA-Pro (light): factor gradients with equivalent gradient G*, per-factor AdamW",
        "Wang, Liang, et al. 2024, arXiv 2407.18242",
    ),
    "altlora": OptimizerSpec(
        "altlora",
        AltLoRA,
        AltLoRAOptions,
        "AltLoRA: alternating projected updates with momentum transport",
        "arXiv 2505.12455",
    ),
}


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (a key of :data:`OPTIMIZERS`) for ``model``.

    Args:
        model: the :class:`~sdslora.model.AdaptedModel` (or a wrapper of it; ``adamw`` also takes any module).
        name: ``"adamw"`` (default), ``"loraplus"``, ``"scaled_adamw"``, ``"lora_pro"``, ``"altlora"``.
        lr: learning rate (2e-4; for ``loraplus`` the lr of A). Any LR scheduler scales every group.
        weight_decay: decoupled weight decay (0.0).
        betas, eps: Adam coefficients ((0.9, 0.999), 1e-8).
        options: method options (``loraplus``: ``loraplus_lr_ratio``=16, ``loraplus_lr_embedding``=1e-6;
            ``scaled_adamw``: ``delta``=1e-6, ``correct_bias``=True, ``sequential``=False; ``lora_pro``:
            ``delta``=1e-8; ``altlora``: ``delta``=1e-6, ``transport``=True).

    Raises ``ValueError`` for an unknown name or option (listing the valid ones), bad hyper-parameters, or a model
    whose layers have no (lora_A, lora_B) pair for a method that needs one; ``TypeError`` for a model that is not an
    adapted model (except for ``adamw``).
    """
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available optimizers: {sorted(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    for key, value, ok in (("lr", lr, lambda v: v > 0), ("weight_decay", weight_decay, lambda v: v >= 0),
                           ("eps", eps, lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"build_optimizer: {key} must be a finite number {'>= 0' if key == 'weight_decay' else '> 0'}"
                             f", got {value!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"build_optimizer: betas must be two numbers in [0, 1), got {betas!r}")
    opts = spec.parse_options(options)
    return spec.build(model, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **opts)


__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "build_optimizer",
    "adamw_optimizer",
    "loraplus_optimizer",
    "ScaledAdamW",
    "LoRAPro",
    "AltLoRA",
    "PairedAdamW",
    "riemannian_gradients",
    "lora_pro_gradients",
    "split_pairs",
    "LoRAPlusOptions",
    "ScaledAdamWOptions",
    "LoRAProOptions",
    "AltLoRAOptions",
]
