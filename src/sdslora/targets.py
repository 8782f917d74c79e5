"""Module names in a model: the modules an AdapterConfig targets, and swapping a module in by its name."""

from __future__ import annotations

import re
import warnings

from torch import nn

from .config import AdapterConfig
from .methods.base import supported_base


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return set()
    try:
        out = get()
    except Exception:  # some models raise NotImplementedError here
        return set()
    return {n for n, m in model.named_modules() if out is not None and m is out}


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def find_targets(model: nn.Module, config: AdapterConfig, exact: list[str] | None = None) -> list[str]:
    """Names of the modules ``config`` adapts in ``model`` (raises a ValueError naming what exists if none)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    save_roots = [n for n, _ in named if config.modules_to_save and _matches(n, config.modules_to_save)]
    excluded = [n for n, _ in named if config.exclude_modules and _matches(n, config.exclude_modules)]
    skip = set(save_roots)
    linear_names = [n for n, m in named if supported_base(m)]

    if exact is not None:
        present = {n for n, _ in named}
        missing = [n for n in exact if n not in present]
        if missing:
            raise ValueError(
                f"the model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that the adapter "
                "adapts: it was saved from a different architecture"
            )
        targets = list(exact)
    elif config.target_modules == "all-linear":
        out_emb = _output_embedding_names(model)
        targets = [n for n, m in named if supported_base(m) and n not in out_emb and not _under(n, list(skip))]
    elif isinstance(config.target_modules, list):
        targets = [n for n, _ in named if _matches(n, config.target_modules) and not _under(n, list(skip))]
        unmatched = [t for t in config.target_modules if not any(_matches(n, [t]) for n, _ in named)]
        if unmatched and targets:
            warnings.warn(f"target_modules entries {unmatched} matched no module", stacklevel=3)
    else:
        try:
            rx = re.compile(config.target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {config.target_modules!r} is not a valid regular expression: {e}") from e
        targets = [n for n, _ in named if rx.fullmatch(n) and not _under(n, list(skip))]
    targets = [n for n in targets if not _under(n, excluded)]
    if not targets:
        shown = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}"
            + (f" (after exclude_modules={config.exclude_modules})" if config.exclude_modules else "")
            + f". Linear modules in this model (by last name): {shown[:30]}"
            + (" ..." if len(shown) > 30 else "")
            + "; pass some of these, a full module name, or 'all-linear'"
        )
    # drop targets nested inside another target (never adapt a module twice)
    targets = [n for n in targets if not any(n != o and n.startswith(o + ".") for o in targets)]
    return targets


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
