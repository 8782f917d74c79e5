"""AdapterConfig: which method, at what rank and scale, on which modules, with which method options."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

SCALINGS = ("rslora", "standard")
ADAPTER_DTYPES = ("float32", "base")


@dataclass
class AdapterConfig:
    """Everything that defines an adapter, validated on construction.

    Args:
        method: a registered method name (``sdslora.methods.METHODS``): ``"lora"``, ``"sds"``,
            ``"orthogonal"``, ``"full"``, ...
        r: adapter rank (>= 1 and <= min(in, out) of every adapted layer; checked at attach time).
        alpha: scale numerator. The scale is ``s = alpha / sqrt(r)`` for ``scaling="rslora"`` (default, as the
            SDS-LoRA authors used with alpha = 4) or ``s = alpha / r`` for ``scaling="standard"`` (PEFT's default).
        scaling: ``"rslora"`` or ``"standard"``.
        target_modules: ``"all-linear"`` (every ``nn.Linear``/transformers ``Conv1D`` except the output embedding
            and ``modules_to_save``), a list of module names (a name matches a module whose full name equals it or
            ends with ``"." + name``), or any other string, used as a regular expression that must match the full
            module name.
        exclude_modules: names (same matching as a list of targets) never adapted.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classification head).
        dropout: dropout probability on the adapter input (PEFT's ``lora_dropout``).
        adapter_dtype: ``"float32"`` keeps adapter tensors in float32 whatever the base dtype (PEFT's
            ``autocast_adapter_dtype``); ``"base"`` uses the base layer's dtype.
        options: method-specific options, validated against the method's options dataclass (unknown keys raise).
    """

    method: str = "sds"
    r: int = 8
    alpha: float = 4.0
    scaling: str = "rslora"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    dropout: float = 0.0
    adapter_dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .methods import get_method  # local import: methods import this module

        spec = get_method(self.method)
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"AdapterConfig.r must be an int, got {type(self.r).__name__} ({self.r!r})")
        if self.r < 1:
            raise ValueError(f"AdapterConfig.r must be >= 1, got {self.r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdapterConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"AdapterConfig.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        check_field_types(AdapterConfig, {"dropout": self.dropout}, "AdapterConfig")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"AdapterConfig.adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.target_modules, (str, list)) or (
            isinstance(self.target_modules, list) and not all(isinstance(t, str) for t in self.target_modules)
        ):
            raise TypeError("AdapterConfig.target_modules must be 'all-linear', a regex string or a list of names")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("AdapterConfig.target_modules is an empty list: name at least one module")
        for name in ("exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"AdapterConfig.{name} must be a list of module names")
                setattr(self, name, list(value))
        if not isinstance(self.options, dict):
            raise TypeError(f"AdapterConfig.options must be a dict, got {type(self.options).__name__}")
        self.options = dataclasses.asdict(spec.parse_options(self.options))

    @property
    def scale(self) -> float:
        """The adapter scale s (``alpha/sqrt(r)`` or ``alpha/r``)."""
        if self.scaling == "rslora":
            return float(self.alpha) / math.sqrt(self.r)
        return float(self.alpha) / self.r

    def method_options(self) -> Any:
        """The validated options dataclass of this config's method."""
        from .methods import get_method

        return get_method(self.method).parse_options(self.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return strict_from_dict(cls, data, "AdapterConfig")


def strict_from_dict(cls: type, data: Any, what: str) -> Any:
    """``cls(**data)`` for a dataclass, with clear ValueErrors for a non-mapping or unknown fields."""
    if not isinstance(data, dict):
        raise ValueError(f"a {what} must be a mapping of field: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known fields: {sorted(known)}")
    check_field_types(cls, data, what)
    return cls(**data)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is float:
        return "a finite number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _matches_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches_type(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bools are ints to Python, never to a user
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (
            not args or args[-1] is Ellipsis or all(_matches_type(v, args[0]) for v in value) or len(args) > 1
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: the dataclass's own __post_init__ judges


def check_field_types(cls: type, values: dict[str, Any], what: str) -> None:
    """Raise a ValueError naming the field when a value does not have its dataclass field's annotated type (bools
    are not integers, floats must be finite, ``"0.1"`` is not a number), before any arithmetic sees it."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: leave the checking to the dataclass
        return
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _matches_type(value, hint):
            raise ValueError(f"{what} field {name}={value!r} must be {_type_name(hint)}")


def parse_value(text: str) -> Any:
    """An option value written as text (``--option key=value``, ``sds:key=value``): JSON when it parses (numbers,
    true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
