"""Two small helpers every part of the library shares: moving a batch to a device, and making values JSON-safe."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or mappings / lists / tuples of them) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats as ``None`` (JSON has no NaN), paths as strings, one-element tensors as numbers
    and mapping keys as strings, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return json_safe(x.item())
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
