"""Native save / load (safetensors + JSON) and export to the standard PEFT LoRA format.

Writes are staged: files are written into a temporary folder beside the target and moved into place with
``os.replace`` only once complete, so a failed save never leaves a half-written adapter where a good one was, and
files in the target folder that are not ours are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import AdapterConfig
from .control import _dtensor_type, dist_rank, gathered_adapter_tensors
from .linalg import svd_of_product
from .methods.base import deferred_init
from .model import AdaptedModel, attach

FORMAT = "sdslora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@contextmanager
def _staged_dir(path: str | Path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield a temporary folder; on success move the ``owned`` files written there into ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        path.mkdir(parents=True, exist_ok=True)
        # weights first, config last: a reader that finds the new config also finds the new weights
        for name in sorted(owned, key=lambda n: n.endswith(".json")):
            src = tmp / name
            if src.exists():
                os.replace(src, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    dtensor = _dtensor_type()
    for k, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):  # FSDP2 shard: gather the full tensor (a collective)
            t = t.full_tensor()
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.to("cpu").contiguous().clone()  # clone: tied / shared tensors must not alias in safetensors
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _base_model_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None,
    }


# ---- native format ---------------------------------------------------------------------------------------------
def save_adapter(model: AdaptedModel, path: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``path`` (created if needed).

    Under torch.distributed call it on every rank when the model is FSDP2-sharded (the shards are gathered, a
    collective); only rank 0 writes (under DDP, calling it on rank 0 alone is fine too)."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"save_adapter() takes an AdaptedModel, got {type(model).__name__}")
    model._check_live()
    if any(layer.merged for layer in model.adapter_layers().values()):
        raise RuntimeError("unmerge() before saving: a merged adapter's base weights already contain ΔW")
    tensors = _cpu_tensors(model.adapter_state_dict())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sdslora_version": __version__,
        "config": model.adapter_config.to_dict(),
        "layers": {
            name: {"method": layer.method, "in": layer.in_features, "out": layer.out_features,
                   "extra": layer.extra_state()}
            for name, layer in model.adapter_layers().items()
        },
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "controller": model._controller.state_dict() if model._controller is not None else None,
        "base_model": _base_model_info(model.model),
    }
    if dist_rank() != 0:  # under torch.distributed every rank gathers (FSDP2), rank 0 alone writes
        return Path(path)
    with _staged_dir(path, (WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        _write_json(tmp / CONFIG_NAME, meta)
    return Path(path)


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """Parse and check an adapter folder's ``adapter_config.json`` (clear ValueErrors for what is wrong)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter folder {path} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not an sdslora adapter folder: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is corrupt (not valid JSON: {e}); save the adapter again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = " (this looks like a PEFT adapter: load it with peft)" if isinstance(meta, dict) and "peft_type" in meta else ""
        raise ValueError(f"{cfg_file} is not an sdslora adapter config{hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer sdslora (format {meta['format_version']}); upgrade sdslora to load it"
        )
    for key in ("config", "layers", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{cfg_file} is incomplete: field {key!r} is missing or malformed")
    return meta


def load_adapter(base_model: nn.Module, path: str | Path) -> AdaptedModel:
    """Attach the adapter saved in ``path`` to ``base_model`` (a fresh copy of the model it was trained on).

    Raises ``ValueError`` for a missing, corrupt or incomplete folder, or a model whose module names or shapes do
    not match the saved adapter.
    """
    path = Path(path)
    meta = read_adapter_meta(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{path} is incomplete: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{weights} is corrupt or truncated ({e}); save the adapter again") from e
    expected = {k: tuple(v) for k, v in meta["tensors"].items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights} is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    config = AdapterConfig.from_dict(meta["config"])
    with deferred_init():  # the saved tensors replace any initialisation; post_load() below finishes the layers
        adapted = attach(base_model, config, _exact_targets=list(meta["layers"]), _from_saved=True)
    try:
        own = adapted.adapter_state_dict()
        wrong = [
            f"{k}: saved {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
            for k in expected
            if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)
        ]
        unknown = sorted(k for k in expected if k not in own)
        if unknown or wrong:
            detail = "; ".join(wrong[:3]) if wrong else f"no tensor {unknown[0]!r} in the model"
            raise ValueError(f"the adapter in {path} does not fit this model ({detail}): load it on the base model it "
                             "was trained from")
        not_saved = sorted(set(own) - set(expected))
        if not_saved:
            raise ValueError(f"{path} is incomplete: no saved value for {not_saved[0]!r}")
        with torch.no_grad():
            for k in expected:
                own[k].copy_(tensors[k].to(own[k].dtype))
        for name, layer in adapted.adapter_layers().items():
            layer.load_extra_state(meta["layers"][name].get("extra", {}))
            sync = getattr(layer, "_sync_phase", None)
            if sync is not None:
                sync()
            layer.post_load()
    except Exception:
        adapted.unload()  # leave the user's base model as it was
        raise
    adapted._pending_controller_state = meta.get("controller")
    return adapted


# ---- PEFT export -----------------------------------------------------------------------------------------------
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
) -> Path:
    """Export an exact plain LoRA (``ΔW = B'A'``, scale 1, scale folded into B') in PEFT's format.

    SDS-LoRA exports at rank 2r. vLLM caps the LoRA rank (``--max-lora-rank``); ``max_rank`` compresses every layer
    by an exact truncated SVD of its ΔW to at most that rank; the relative Frobenius errors are written to
    ``export_report.json``. Layers whose ranks differ are exported with
    PEFT's ``rank_pattern`` / ``alpha_pattern``.
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
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    saved_modules = []
    for root in model.adapter_config.modules_to_save or []:
        for n, mod in model.model.named_modules():
            if n and (n == root or n.endswith("." + root)):
                saved_modules.append(root)
                for k, v in mod.state_dict().items():
                    tensors[f"base_model.model.{n}.{k}"] = v
    tensors = _cpu_tensors(tensors, dtype)
    rank = max(ranks.values())
    rank_pattern = {n: k for n, k in ranks.items() if k != rank}
    cfg = {
        "peft_type": "LORA",
        "task_type": _task_type(model.model),
        "base_model_name_or_path": _base_model_info(model.model)["name_or_path"],
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
    with _staged_dir(path, (WEIGHTS_NAME, CONFIG_NAME, "export_report.json")) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_NAME, cfg)
        if max_rank is not None:
            _write_json(tmp / "export_report.json", report)
    return Path(path)
