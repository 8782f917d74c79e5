"""Native save / load (safetensors + JSON) and export to the standard PEFT LoRA format.

Writes are staged: files are written into a temporary folder beside the target and moved into place with
``os.replace`` only once complete, so a failed save never leaves a half-written adapter where a good one was, and
files in the target folder that are not ours are left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import AdapterConfig
from .distributed import dist_rank, dtensor_type, gathered_adapter_tensors
from .linalg import svd_of_product
from .methods import get_method
from .model import AdaptedModel, attach_layers

FORMAT = "sdslora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


STAGING_PREFIX = ".sdslora-staging-"
COMMIT_NAME = "COMMIT.json"
_fault_hook: Callable[[str], None] | None = None  # tests inject failures at each named point of a save


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _finish_staged(stage: Path, target: Path) -> None:
    """Roll a committed staging folder forward: move its files into ``target`` (JSON last), drop the files the new
    version no longer has, remove the staging folder. Idempotent: a crash in here is finished by the next call."""
    plan = json.loads((stage / COMMIT_NAME).read_text())
    names = sorted(plan.get("files", []), key=lambda n: n.endswith(".json"))  # weights first, config last
    for name in names:
        src = stage / name
        if src.exists():
            _fault(f"replace:{name}")
            os.replace(src, target / name)
    for name in plan.get("remove", []):
        (target / name).unlink(missing_ok=True)
    _fsync_dir(target)
    _fault("replaced")
    shutil.rmtree(stage, ignore_errors=True)


def recover_folder(path: str | Path) -> list[str]:
    """Finish or discard interrupted saves in ``path``: a staging folder whose commit marker was written is rolled
    forward (the save had completed its writes), any other is removed (the previous version is intact). Returns what
    was done, one line per staging folder. Saves and loads call it first; it needs write access only when there is
    something to clean."""
    path = Path(path)
    done: list[str] = []
    if not path.is_dir():
        return done
    for stage in sorted(path.glob(STAGING_PREFIX + "*")):
        if not stage.is_dir():
            continue
        if (stage / COMMIT_NAME).is_file():
            _finish_staged(stage, path)
            done.append(f"finished the interrupted save {stage.name}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
            done.append(f"removed the incomplete save {stage.name}")
    # staging folders of sdslora < 0.1.1 lived beside the target
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the incomplete save {old.name}")
    return done


@contextmanager
def _staged_dir(path: str | Path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging folder inside ``path``; once the block has written the new files there, switch to them
    atomically: a commit marker is written (the point of no return), then the files are moved into ``path``.

    A save interrupted before the marker leaves the previous version untouched (its staging folder is removed by
    the next save or load); one interrupted after it is finished by the next save or load (:func:`recover_folder`).
    Files of ``owned`` that the new version does not have are removed; other files in ``path`` are left alone."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; choose another output path")
    path.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    try:
        yield stage
        written = sorted(n for n in owned if (stage / n).is_file())
        for name in written:
            _fsync_file(stage / name)
        _fault("written")
        plan = {"files": written, "remove": sorted(n for n in owned if n not in written)}
        marker = stage / (COMMIT_NAME + ".tmp")
        marker.write_text(json.dumps(plan))
        _fsync_file(marker)
        os.replace(marker, stage / COMMIT_NAME)  # the commit point
        _fsync_dir(stage)
    except Exception:
        shutil.rmtree(stage, ignore_errors=True)  # nothing was switched: the previous version stays
        raise
    _fault("committed")
    _finish_staged(stage, path)


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


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
    with _staged_dir(path, (WEIGHTS_NAME, CONFIG_NAME, "export_report.json")) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_NAME, cfg)
        if max_rank is not None:
            _write_json(tmp / "export_report.json", report)
    return Path(path)
