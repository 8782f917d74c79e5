"""Native save / load of an adapter (safetensors + JSON), and the in-place restore for resuming a run.

Writes are staged and atomic (:mod:`~sdslora.staging`); the folder's format and the checks a load runs are in
:mod:`~sdslora.adapter_format`; the PEFT export is :mod:`~sdslora.peft_export`. The names of those modules that
callers and tests import from here remain importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapter_format import (  # noqa: F401  (FORMAT_VERSION, read_adapter_meta, ...: importable from here)
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    _base_model_info,
    _check_layer_meta,
    _cpu_tensors,
    _rank_bounds,
    _sha256,
    read_adapter_meta,
)
from .config import AdapterConfig
from .distributed import dist_rank, dtensor_type, gathered_adapter_tensors  # noqa: F401  (as before)
from .linalg import svd_of_product  # noqa: F401  (importable from here as before)
from .methods import get_method  # noqa: F401  (importable from here as before)
from .model import AdaptedModel, attach_layers
from .peft_export import _TASK_TYPES, _task_type, export_peft  # noqa: F401  (importable from here)
from .staging import (  # noqa: F401  (STAGING_PREFIX, recover_folder, ...: importable from here)
    COMMIT_NAME,
    STAGING_PREFIX,
    _fault,
    _finish_staged,
    _fsync_dir,
    _fsync_file,
    _staged_dir,
    _write_json,
    recover_folder,
)

# tests inject failures at each named point of a save (staging._fault reads the hook here)
_fault_hook: Callable[[str], None] | None = None


# ---- native format ---------------------------------------------------------------------------------------------
def save_adapter(model: AdaptedModel, path: str | Path, *, record_path: bool = False) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``path`` (created if needed).

    The switch to the new files is atomic (see :func:`_staged_dir`): a save that fails or is killed leaves the
    previous adapter in ``path`` loadable, never a mix; the JSON records a SHA-256 of the weights file, checked on
    load. The base model is recorded by name and configuration hash; its local folder only with ``record_path``.
    Refuses (ValueError) to save NaN/Inf values, naming the tensor.

    Under torch.distributed call it on every rank when the model is FSDP2-sharded (the shards are gathered, a
    collective); only rank 0 writes (under DDP, calling it on rank 0 alone is fine too)."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"save_adapter() takes an AdaptedModel, got {type(model).__name__}")
    model._check_live()
    if any(layer.merged for layer in model.adapter_layers().values()):
        raise RuntimeError("unmerge() before saving: a merged adapter's base weights already contain ΔW")
    tensors = _cpu_tensors(model.adapter_state_dict())
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"the adapter holds NaN/Inf values ({len(bad)} tensor(s), e.g. {bad[0]!r}): training diverged; nothing "
            "was saved (a previous save in that folder is untouched). Resume from an earlier checkpoint with a "
            "lower learning rate."
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sdslora_version": __version__,
        "config": model.adapter_config.to_dict(),
        "layers": {
            name: {"method": layer.method, "in": layer.in_features, "out": layer.out_features, "r": layer.r,
                   "scale": layer.scale, "extra": layer.extra_state()}
            for name, layer in model.adapter_layers().items()
        },
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "controller": model.controller.state_dict() if model.controller is not None else None,
        "base_model": _base_model_info(model.model, record_path),
    }
    if dist_rank() != 0:  # under torch.distributed every rank gathers (FSDP2), rank 0 alone writes
        return Path(path)
    with _staged_dir(path, (WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        meta["weights_sha256"] = _sha256(tmp / WEIGHTS_NAME)
        _write_json(tmp / CONFIG_NAME, meta)
    return Path(path)



def _resize_to_saved(layers: dict[str, Any], meta: dict[str, Any]) -> list[tuple[Any, int, dict[str, Any]]]:
    """Give each layer of a method whose rank grows (``resize_rank``) the rank it was saved at (zero-filled; the
    saved tensors are copied in next). Returns what :func:`_undo_resize` needs to put the previous tensors back."""
    done = []
    for name, layer in layers.items():
        saved_r = meta["layers"].get(name, {}).get("r")
        resize = getattr(layer, "resize_rank", None)
        if resize is not None and type(saved_r) is int and saved_r != layer.r:
            done.append((layer, layer.r, dict(layer.adapter_tensors())))
            resize(saved_r)
    return done


def _undo_resize(resized: list[tuple[Any, int, dict[str, Any]]]) -> None:
    for layer, r, tensors in resized:  # the very tensors (parameters, buffers) the layer held before
        for t_name, t in tensors.items():
            setattr(layer, t_name, t)
        layer.r = r


def load_adapter(base_model: nn.Module, path: str | Path) -> AdaptedModel:
    """Attach the adapter saved in ``path`` to ``base_model`` (a fresh copy of the model it was trained on).

    Raises ``ValueError`` for a missing, corrupt or incomplete folder, or a model whose module names or shapes do
    not match the saved adapter.
    """
    path = Path(path)
    if path.is_dir() and any(path.glob(STAGING_PREFIX + "*")):
        try:
            recover_folder(path)  # an interrupted save: finish it (committed) or drop it (not)
        except OSError as e:
            raise ValueError(f"{path} holds an interrupted save that could not be finished ({e}); open the folder "
                             "with write access once, or save the adapter again") from e
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
    digest = meta.get("weights_sha256")
    if isinstance(digest, str) and _sha256(weights) != digest:
        raise ValueError(f"{weights} is not the file {CONFIG_NAME} was saved with (its SHA-256 differs): the folder "
                         "was edited or mixed with another save; save the adapter again")
    bad = [k for k in expected if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]
    if bad:
        raise ValueError(f"{weights} holds NaN/Inf values ({len(bad)} tensor(s), e.g. {bad[0]!r}): it was saved from "
                         "a diverged run; load an earlier checkpoint")
    config = AdapterConfig.from_dict(meta["config"])
    _check_layer_meta(meta, config, path)
    try:
        # the saved tensors replace any initialisation; post_load() below finishes the layers
        adapted = attach_layers(base_model, config, targets=list(meta["layers"]), from_saved=True)
    except (ValueError, TypeError) as e:  # e.g. "rank larger than the layer allows": a hint meant for attach()
        raise ValueError(f"the adapter in {path} does not fit this model ({e}); load it on the base model it was "
                         "trained from") from e
    try:
        # a grown adapter: the layers were built at rank r, they take the saved ranks
        _resize_to_saved(adapted.adapter_layers(), meta)
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
            layer.sync_state()
            layer.post_load()
    except Exception:
        adapted._rollback()  # leave the user's base model as it was (modules and requires_grad flags)
        raise
    adapted.schedule_state = meta.get("controller")
    return adapted


def load_adapter_state(model: AdaptedModel, path: str | Path) -> AdaptedModel:
    """Copy the adapter saved in ``path`` into ``model``, an :class:`AdaptedModel` attached with the same config to
    the same base (resuming a run: the Trainer checkpoints of :class:`~sdslora.integrations.hf.AdapterCheckpointMixin`).

    Unlike :func:`load_adapter` nothing is attached and the base is not touched (a method that re-bases W0 did so
    when the model was attached, identically). The Controller state travels with it (the next Controller built on
    the model resumes its step counter). Raises ValueError when the saved adapter does not fit the model; the model
    is unchanged then."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"load_adapter_state() takes an AdaptedModel, got {type(model).__name__}")
    model._check_live()
    path = Path(path)
    if path.is_dir() and any(path.glob(STAGING_PREFIX + "*")):
        recover_folder(path)
    meta = read_adapter_meta(path)
    config = AdapterConfig.from_dict(meta["config"])
    if config.to_dict() != model.adapter_config.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if model.adapter_config.to_dict().get(k) != v)
        raise ValueError(f"the adapter in {path} was saved with another config (fields {diff}); it cannot resume "
                         "this model")
    _check_layer_meta(meta, config, path)
    if sorted(meta["layers"]) != sorted(model.adapter_layers()):
        raise ValueError(f"the adapter in {path} adapts other modules than this model")
    weights = path / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights} is missing, corrupt or truncated ({e})") from e
    digest = meta.get("weights_sha256")
    if isinstance(digest, str) and _sha256(weights) != digest:
        raise ValueError(f"{weights} is not the file {CONFIG_NAME} was saved with (its SHA-256 differs)")
    # a grown adapter: the layers take the saved ranks (new parameters: resume before building the optimizer)
    resized = _resize_to_saved(model.adapter_layers(), meta)
    own = model.adapter_state_dict()
    if sorted(own) != sorted(tensors) or any(tuple(own[k].shape) != tuple(tensors[k].shape) for k in own):
        _undo_resize(resized)  # the model is left as it was
        raise ValueError(f"the tensors in {weights} do not match this model's adapter (names or shapes)")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k].to(device=t.device, dtype=t.dtype))
    for name, layer in model.adapter_layers().items():
        layer.load_extra_state(meta["layers"][name].get("extra", {}))
        layer.sync_state()
    model.schedule_state = meta.get("controller")
    return model
