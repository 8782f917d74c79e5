"""Export to the standard PEFT LoRA format: an exact plain LoRA (ΔW = B'A'), optionally compressed to a rank cap."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import CONFIG_NAME, WEIGHTS_NAME, _base_model_info, _cpu_tensors
from .distributed import dist_rank, gathered_adapter_tensors
from .linalg import svd_of_product
from .model import AdaptedModel
from .staging import _staged_dir, _write_json

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((v for k, v in _TASK_TYPES.items() if name.endswith(k)), None)


def export_peft(
    model: AdaptedModel,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_rank: int | None = None,
    record_path: bool = False,
) -> Path:
    """Export an exact plain LoRA (``ΔW = B'A'``, scale 1, scale folded into B') in PEFT's format.

    SDS-LoRA exports at rank 2r. vLLM caps the LoRA rank (``--max-lora-rank``); ``max_rank`` compresses every layer
    by an exact truncated SVD of its ΔW to at most that rank; the relative Frobenius errors are written to
    ``export_report.json``. Layers whose ranks differ are exported with
    PEFT's ``rank_pattern`` / ``alpha_pattern``. ``base_model_name_or_path`` is the base model's hub id, or for a
    local folder its name only (``record_path=True`` writes the full local path, so that
    ``AutoPeftModel.from_pretrained`` finds the base on this machine).
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"export_peft() takes an AdaptedModel, got {type(model).__name__}")
    model._check_live()
    layers = model.adapter_layers()
    if not layers:
        raise ValueError(
            f"method {model.method!r} has no adapter layers to export; save the full model with save_pretrained()"
        )
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge() before exporting")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    extra_cfg: dict[str, Any] = {}
    for name, layer in layers.items():
        with gathered_adapter_tensors([layer]):  # FSDP2: the full factors of this layer (small), else a no-op
            b, a = layer.export_lora()
            fields, extra = layer.peft_extras()  # e.g. DoRA: use_dora and the magnitude vector
        for k, v in fields.items():
            if extra_cfg.setdefault(k, v) != v:
                raise ValueError(f"layers disagree on the PEFT config field {k!r} ({extra_cfg[k]!r} vs {v!r})")
        for k, v in extra.items():
            tensors[f"base_model.model.{name}.{k}"] = v
        if max_rank is not None and b.shape[1] > max_rank:
            with torch.no_grad():
                # all singular values (exact, via the small core): error = √(Σ_{i>k} σ_i²) / √(Σ σ_i²), without
                # the cancellation of ‖ΔW‖² − Σ_{i≤k} σ_i²
                u, s, v = svd_of_product(b.double(), a.double().T, b.shape[1])
                errors[name] = float(((s[max_rank:] ** 2).sum() / (s**2).sum().clamp_min(1e-300)).sqrt())
                b, a = u[:, :max_rank] * s[None, :max_rank], v[:, :max_rank].T
        ranks[name] = int(b.shape[1])
        # PEFT's keys and shapes for the layer type: lora_A/lora_B.weight (Linear, Conv1D; a convolution's as kernels
        # [k, in_ch, k...] / [out, k, 1...]), lora_embedding_A [k, num] / lora_embedding_B [dim, k] (Embedding)
        for k, v in layer.peft_factors(b, a).items():
            tensors[f"base_model.model.{name}.{k}"] = v
        base = layer.base_layer
        if layer.view.kind == "conv" and (any(d != 1 for d in base.dilation) or base.padding_mode != "zeros"):
            warnings.warn(
                f"layer {name!r}: PEFT <= 0.21 builds a convolution's lora_A without the base's dilation "
                f"({base.dilation}) and padding_mode ({base.padding_mode!r}) (huggingface/peft#3697), so its unmerged "
                "forward differs from (or fails on) this exact adapter; PEFT's merge_and_unload() is exact",
                stacklevel=2,
            )
    saved_modules = []
    for root in model.adapter_config.modules_to_save or []:
        for n, mod in model.model.named_modules():
            if n and (n == root or n.endswith("." + root)):
                saved_modules.append(root)
                for k, v in mod.state_dict().items():
                    tensors[f"base_model.model.{n}.{k}"] = v
    tensors = _cpu_tensors(tensors, dtype)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"the export would hold NaN/Inf values ({len(bad)} tensor(s), e.g. {bad[0]!r}): the adapter "
                         "diverged, or its values overflow the export dtype; nothing was written")
    rank = max(ranks.values())
    rank_pattern = {n: k for n, k in ranks.items() if k != rank}
    cfg = {
        "peft_type": "LORA",
        "task_type": _task_type(model.model),
        "base_model_name_or_path": _base_model_info(model.model, record_path)["name_or_path"],
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(set(saved_modules)) or None,
        "inference_mode": True,
        "revision": None,
    }
    cfg.update(extra_cfg)
    report = {"source_method": model.method, "rank": rank, "max_rank": max_rank, "relative_error": errors}
    if dist_rank() != 0:  # rank 0 alone writes (after every rank took part in the gathers above)
        return Path(path)
    from . import io  # save_file is looked up on sdslora.io, where the tests replace it

    with _staged_dir(path, (WEIGHTS_NAME, CONFIG_NAME, "export_report.json")) as tmp:
        io.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_NAME, cfg)
        if max_rank is not None:
            _write_json(tmp / "export_report.json", report)
    return Path(path)
