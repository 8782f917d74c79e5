"""The method registry: a plain dict from method name to :class:`MethodSpec`.

Adding a method = one module with an :class:`~sdslora.methods.base.AdapterLayer` subclass and an options
dataclass, plus one entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import check_field_types
from .adalora import AdaLoRALayer, AdaLoRAOptions, AdaLoRAPlan
from .base import AdapterLayer
from .dora import DoRALayer, DoRAOptions
from .grow import GrowLoRALayer, GrowSDSLayer
from .grow_schedule import GrowOptions, GrowPlan, SDSGrowOptions, SDSGrowPlan
from .lora import LoRALayer, LoRAOptions
from .lora_ga import LoRAGALayer, LoRAGAOptions
from .pissa import PiSSALayer, PiSSAOptions
from .plan import StepOutcome, StepPlan
from .quantised import QuantisedMergeError, dequantize_bases
from .restart import ReLoRALayer, ReLoRAOptions, ReLoRAPlan, ReLoRASDSLayer, ReLoRASDSOptions, ReLoRASDSPlan
from .sds import OrthogonalLayer, SDSLayer, SDSOptions, SDSPlan
from .shared import LoTRLayer, LoTROptions
from .vera import VeRALayer, VeRAOptions
from .xs import SBLayer, SBOptions, XSLayer, XSOptions


@dataclass
class FullOptions:
    """Full fine-tuning has no options."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    layer_cls: type[AdapterLayer] | None  # None: no adapter layers (full fine-tuning)
    options_cls: type
    description: str
    citation: str
    plan_cls: type[StepPlan] = StepPlan  # what the method does over training steps (default: nothing)

    def parse_options(self, options: dict[str, Any] | None) -> Any:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            hint = f"valid options: {sorted(known)}" if known else "it takes no options"
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; {hint}")
        check_field_types(self.options_cls, options, f"method {self.name!r} option")
        return self.options_cls(**options)


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(
        "lora", LoRALayer, LoRAOptions, "LoRA, ΔW = s·B·A (rsLoRA or standard scaling)",
        "Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732",
    ),
    "sds": MethodSpec(
        "sds", SDSLayer, SDSOptions, "SDS-LoRA, ΔW = s(Q_B·A + B·Q_Aᵀ) with warm-up, re-parameterisation, refresh",
        "Oh, Baik, Lee 2026, arXiv 2606.16454", SDSPlan,
    ),
    "orthogonal": MethodSpec(
        "orthogonal", OrthogonalLayer, SDSOptions, "orthogonal-only ablation of SDS-LoRA (orthonormal B, A)",
        "Oh, Baik, Lee 2026, arXiv 2606.16454 (Table 5)", SDSPlan,
    ),
    "lora_ga": MethodSpec(
        "lora_ga", LoRAGALayer, LoRAGAOptions,
        "LoRA-GA, LoRA initialised from the SVD of the mean gradient, base shifted by −s·B0A0 (needs init_data)",
        "Wang, Yu, Li 2024, arXiv 2407.05000",
    ),
    "lora_xs": MethodSpec(
        "lora_xs", XSLayer, XSOptions, "LoRA-XS, ΔW = s·B·R·A, frozen B, A from the SVD of W0, only R (r×r) trains",
        "Bałazy et al. 2024, arXiv 2405.17604",
    ),
    "lora_sb": MethodSpec(
        "lora_sb", SBLayer, SBOptions,
        "LoRA-SB, ΔW = s·B·R·A initialised from the approximated first full-FT step, only R trains (needs init_data)",
        "Ponkshe et al. 2024, arXiv 2411.19557",
    ),
    "pissa": MethodSpec(
        "pissa", PiSSALayer, PiSSAOptions,
        "PiSSA, LoRA initialised from the principal rank-r SVD part of W0, base re-based to W0 − s·B0A0",
        "Meng, Wang, Zhang 2024, arXiv 2404.02948",
    ),
    "dora": MethodSpec(
        "dora", DoRALayer, DoRAOptions, "DoRA, W' = m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖_c (norm detached), trainable m",
        "Liu et al. 2024, arXiv 2402.09353",
    ),
    "relora": MethodSpec(
        "relora", ReLoRALayer, ReLoRAOptions,
        "ReLoRA over LoRA: every N steps merge ΔW into the frozen weight and restart the factors (high-rank total)",
        "Lialin et al. 2023, arXiv 2307.05695", ReLoRAPlan,
    ),
    "relora_sds": MethodSpec(
        "relora_sds", ReLoRASDSLayer, ReLoRASDSOptions,
        "ReLoRA over SDS-LoRA: merge-and-restart every N steps, each cycle an SDS-LoRA run of N steps",
        "Lialin et al. 2023, arXiv 2307.05695; Oh, Baik, Lee 2026, arXiv 2606.16454", ReLoRASDSPlan,
    ),
    "lotr": MethodSpec(
        "lotr", LoTRLayer, LoTROptions,
        "LoTR, ΔW_l = s·U·C_l·Vᵀ, U and V shared across the depth (per module name or shape), Tucker-2 across layers",
        "Bershatsky et al. 2024, arXiv 2402.01376",
    ),
    "vera": MethodSpec(
        "vera", VeRALayer, VeRAOptions,
        "VeRA, ΔW_l = s·diag(b_l)·B·diag(d_l)·A, frozen random A, B shared by every layer, only d_l and b_l train",
        "Kopiczko, Blankevoort, Asano 2024, arXiv 2310.11454",
    ),
    "adalora": MethodSpec(
        "adalora", AdaLoRALayer, AdaLoRAOptions,
        "AdaLoRA, ΔW = s·B·diag(E)·A, the rank budget pruned during training by importance (+ orthogonal penalty)",
        "Zhang et al. 2023, arXiv 2303.10512", AdaLoRAPlan,
    ),
    "lora_grow": MethodSpec(
        "lora_grow", GrowLoRALayer, GrowOptions,
        "LoRA whose rank grows r -> grow_to during training along the unreachable gradient's top directions",
        "rank growth as in IncreLoRA, Zhang et al. 2023, arXiv 2308.12043", GrowPlan,
    ),
    "sds_grow": MethodSpec(
        "sds_grow", GrowSDSLayer, SDSGrowOptions,
        "SDS-LoRA whose rank grows r -> grow_to during training along the unreachable gradient's top directions",
        "Oh, Baik, Lee 2026, arXiv 2606.16454; rank growth as in IncreLoRA, Zhang et al. 2023, arXiv 2308.12043",
        SDSGrowPlan,
    ),
    "full": MethodSpec("full", None, FullOptions, "full fine-tuning (reference)", "-"),
}


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "MethodSpec", "AdapterLayer", "StepOutcome", "StepPlan", "get_method", "LoRALayer", "SDSLayer",
           "OrthogonalLayer", "SDSOptions", "LoRAOptions", "FullOptions", "QuantisedMergeError", "dequantize_bases"]
