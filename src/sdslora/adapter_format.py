"""The native adapter folder: its file names, what it records of the model, and the checks a load runs on it."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .distributed import dtensor_type
from .methods import get_method

FORMAT = "sdslora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _cpu_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    dtensor = dtensor_type()
    for k, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):  # FSDP2 shard: gather the full tensor (a collective)
            t = t.full_tensor()
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.to("cpu").contiguous().clone()  # clone: tied / shared tensors must not alias in safetensors
    return out


def _base_model_info(model: nn.Module, record_path: bool = False) -> dict[str, Any]:
    """What identifies the base model without leaking the local folder layout: a hub id as given, a local folder by
    its last name only (unless ``record_path``), and a hash of the model's configuration."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None
    info: dict[str, Any] = {"class": type(model).__name__, "name_or_path": name}
    if isinstance(name, str) and not record_path and (os.path.isabs(name) or os.path.exists(name)):
        info["name_or_path"] = Path(name).name or None  # a local folder: its name, not where it lives
        info["local_path_withheld"] = True
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        try:
            data = {k: v for k, v in to_dict().items() if k not in ("_name_or_path", "transformers_version")}
            text = json.dumps(data, sort_keys=True, default=str)
            info["config_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        except Exception:  # a config that does not serialise: the class and name identify it
            pass
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{cfg_file} is corrupt: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer sdslora (format {meta['format_version']}); upgrade sdslora to load it"
        )
    for key in ("config", "layers", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{cfg_file} is incomplete: field {key!r} is missing or malformed")
    return meta


def _check_layer_meta(meta: dict[str, Any], config: AdapterConfig, path: Path) -> None:
    """The per-layer records must agree with the config (an edited JSON must not load with other numbers)."""
    cfg_file = path / CONFIG_NAME
    lo, hi = _rank_bounds(config)
    for name, rec in meta["layers"].items():
        if not isinstance(rec, dict):
            raise ValueError(f"{cfg_file} is corrupt: the record of layer {name!r} is not a mapping")
        if rec.get("method", config.method) != config.method:
            raise ValueError(
                f"{cfg_file} is inconsistent: layer {name!r} was saved by method {rec['method']!r} but the config "
                f"says {config.method!r} (was the file edited?); save the adapter again"
            )
        # a method whose rank grows in training is saved at a rank in [r, grow_to]
        grows = (lo, hi) != (config.r, config.r)
        if "r" in rec and grows and not (type(rec["r"]) is int and lo <= rec["r"] <= hi):
            raise ValueError(
                f"{cfg_file} is inconsistent: layer {name!r} was saved at rank {rec['r']!r} but method "
                f"{config.method!r} with r={config.r} holds ranks {lo} to {hi} (was the file edited?); save the "
                "adapter again"
            )
        if "r" in rec and not grows and rec["r"] != config.r:
            raise ValueError(
                f"{cfg_file} is inconsistent: layer {name!r} was saved at rank {rec['r']} but the config says "
                f"r={config.r} (was the file edited?); save the adapter again"
            )
        if "scale" in rec and not math.isclose(float(rec["scale"]), config.scale, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"{cfg_file} is inconsistent: layer {name!r} was saved with scale {rec['scale']:.6g} but the config "
                f"(alpha={config.alpha}, r={config.r}, scaling={config.scaling!r}) gives {config.scale:.6g}; the "
                "outputs would differ from the trained model. Was the file edited? Save the adapter again"
            )


def _rank_bounds(config: AdapterConfig) -> tuple[int, int]:
    """The ranks a layer of ``config`` may have been saved at: [r, r] except for a method whose rank grows during
    training (its layer class's ``rank_bounds``: [r, grow_to])."""
    spec = get_method(config.method)
    bounds = getattr(spec.layer_cls, "rank_bounds", None)
    return bounds(config.r, config.method_options()) if bounds is not None else (config.r, config.r)
