"""The run config: everything that defines one training run (also the schema of ``--config run.yaml`` and of the
recorded runs), its checks, and how it reads older records. :func:`sdslora.experiments.train.run_train` runs it."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AdapterConfig, strict_from_dict
from ..methods import get_method
from ..tasks import Task, file_task, get_task
from ..utils import json_safe

DEFAULT_LR = {"lora": 1e-3, "sds": 5e-4, "orthogonal": 5e-4, "full": 5e-5}
"""Per-method default learning rates (used when ``lr`` is not given). SDS-LoRA's best rate is 2x smaller than LoRA's
on real models (docs/sds_stability.md); full fine-tuning uses the usual BERT-style rate. Other methods default to 5e-4."""
FALLBACK_LR = 5e-4
PRECISIONS = ("fp32", "bf16", "fp16")


# AdapterConfig field -> the RunConfig field that holds it (the flat run config is the schema of --config files
# and of the recorded runs; the command line says --targets / --exclude)
ADAPTER_FIELDS = {
    "method": "method",
    "r": "r",
    "alpha": "alpha",
    "scaling": "scaling",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "modules_to_save": "modules_to_save",
    "dropout": "dropout",
    "adapter_dtype": "adapter_dtype",
    "options": "options",
}


@dataclass
class RunConfig:
    """Everything that defines one run (also the schema of ``--config run.yaml``).

    Args:
        model: ``"minilm-l6"``, ``"smollm2-135m"`` or a local Hugging Face model folder.
        task: a registered task name (``sdslora.tasks.TASKS``), or None with ``train_file``/``eval_file`` and
            ``format`` (``sdslora.tasks.FILE_FORMATS``).
        data_dir: the local data folder (default: ``$SDSLORA_DATA_DIR``; MRPC falls back to the subset shipped in the package).
        method, options, r, alpha, scaling, targets, exclude, modules_to_save, dropout, adapter_dtype: the adapter
            (:class:`~sdslora.config.AdapterConfig`); ``modules_to_save=None`` trains the classification head
            (``classifier`` / ``score``) of classification models, nothing extra for generation.
        optimizer: ``"adamw"`` (torch AdamW via the Trainer) or a name known to ``sdslora.optim.build_optimizer``
            (``"loraplus"``, ``"scaled_adamw"``, ``"lora_pro"``, ``"altlora"``), with ``optimizer_options``.
        lr: learning rate (None: ``DEFAULT_LR[method]``). steps / epochs: run length (steps wins if both are set).
        batch_size, grad_accum, seed, precision (``fp32`` / ``bf16`` / ``fp16``), scheduler, warmup_ratio,
        weight_decay, max_length: as in ``TrainingArguments`` / the tokenizer.
        diagnostics_every: N > 0 logs ``sdslora.diagnostics`` every N steps (skipped with a warning if absent).
        train_limit / eval_limit: use only the first rows of the (shuffled with ``seed`` = 0 for train) splits.
        eval_mode: ``"generate"`` (greedy + answer extraction) or ``"loglik"`` (option scoring), generation tasks.
        eval_every: N > 0 evaluates on the validation rows given to :func:`run_train` (``val_rows``) every N
            optimizer steps and at step 0, into the run's learning curve (held-out loss for every task, plus the
            task's metrics for classification tasks; generation metrics cost a decoding pass and are measured only at
            the end).
    """

    model: str = "minilm-l6"
    task: str | None = "mrpc"
    train_file: str | None = None
    eval_file: str | None = None
    format: str | None = None
    data_dir: str | None = None
    method: str = "sds"
    options: dict[str, Any] = field(default_factory=dict)
    r: int = 8
    alpha: float = 4.0
    scaling: str = "rslora"
    targets: str | list[str] = "all-linear"
    exclude: list[str] | None = None
    modules_to_save: list[str] | None = None
    dropout: float = 0.0
    adapter_dtype: str = "float32"
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    precision: str = "fp32"
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_length: int = 128
    diagnostics_every: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_mode: str = "generate"
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    eval_every: int = 0

    def __post_init__(self) -> None:
        get_method(self.method)  # unknown method -> ValueError listing the methods
        if self.task is None and self.format is None:
            raise ValueError(
                "give a task (--task NAME) or data files with their format (--train-file/--eval-file "
                "--format FMT)"
            )
        if self.task is not None:
            get_task(self.task)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self._check_numbers()
        if self.eval_mode not in ("generate", "loglik"):
            raise ValueError(f"eval_mode must be 'generate' or 'loglik', got {self.eval_mode!r}")
        self.adapter_config()  # validates r, alpha, scaling, options, targets

    def _check_numbers(self) -> None:
        """Every numeric field has its type and range (ValueErrors naming the field): bools are not numbers, strings
        are not parsed, reals must be finite, ``train_limit=-5`` is not "all rows but five"."""

        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        ints = {  # name: (minimum, maximum, optional)
            "batch_size": (1, None, False),
            "grad_accum": (1, None, False),
            "max_length": (1, None, False),
            "eval_batch_size": (1, None, False),
            "max_new_tokens": (1, None, False),
            "steps": (1, None, True),
            "train_limit": (1, None, True),
            "eval_limit": (1, None, True),
            "diagnostics_every": (0, None, False),
            "eval_every": (0, None, False),
            "seed": (0, 2**32 - 1, False),
        }
        for name, (lo, hi, optional) in ints.items():
            v = getattr(self, name)
            if v is None and optional:
                continue
            what = (
                f"an int >= {lo}"
                + (f" and <= {hi}" if hi is not None else "")
                + (" (or None)" if optional else "")
            )
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                raise bad(name, what)
        reals = {  # name: (minimum, minimum allowed, maximum exclusive, optional)
            "lr": (0.0, False, None, True),
            "epochs": (0.0, False, None, True),
            "alpha": (0.0, False, None, False),
            "warmup_ratio": (0.0, True, 1.0, False),
            "weight_decay": (0.0, True, None, False),
            "dropout": (0.0, True, 1.0, False),
        }
        for name, (lo, lo_ok, hi, optional) in reals.items():
            v = getattr(self, name)
            if v is None and optional:
                continue
            what = (
                "a finite number "
                + (f">= {lo:g}" if lo_ok else f"> {lo:g}")
                + (f" and < {hi:g}" if hi else "")
                + (" (or None)" if optional else "")
            )
            if not _is_real(v) or (v < lo if lo_ok else v <= lo) or (hi is not None and v >= hi):
                raise bad(name, what)

    # ---- derived -----------------------------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR.get(self.method, FALLBACK_LR)

    def adapter_config(self, modules_to_save: list[str] | None = None) -> AdapterConfig:
        """The :class:`AdapterConfig` of this run: every field through :data:`ADAPTER_FIELDS` (the one place the run
        config's adapter fields are mapped; a test checks it covers every AdapterConfig field)."""
        values = {field_: getattr(self, mine) for field_, mine in ADAPTER_FIELDS.items()}
        values["options"] = dict(self.options)
        if modules_to_save is not None:
            values["modules_to_save"] = modules_to_save
        return AdapterConfig(**values)

    def get_task(self) -> Task:
        if self.task is not None:
            return get_task(self.task)
        return file_task(self.format or "", self.train_file, self.eval_file)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return strict_from_dict(cls, data, "run config")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Fields of a YAML (or JSON) run config file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:
        data = json.loads(text)
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"config file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of field: value")
    return data


def with_defaults(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A config saved before a field existed, read with that field at its default (records stay valid when
    :class:`RunConfig` grows a field)."""
    return {**{k: _field_default(k) for k in config if k not in saved}, **saved}


def _field_default(name: str) -> Any:
    f = RunConfig.__dataclass_fields__.get(name)
    if f is None:
        return None
    if f.default is not dataclasses.MISSING:
        return json_safe(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return json_safe(f.default_factory())
    return None
