"""The one default for turning a batch into a scalar loss: ``model(**batch).loss`` (Hugging Face style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def batch_loss(model: nn.Module, batch: Any, what: str = "batch") -> torch.Tensor:
    """``model(**batch).loss``. Raises TypeError for a non-dict batch and ValueError when the model returns no loss;
    ``what`` names the batch in the message (e.g. "probe batch", "init batch")."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the {what} must be a dict of model inputs (batches are dicts passed as model(**batch)), got {type(batch).__name__}; "
            "pass loss_fn(model, batch) for other batch types"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"the model returned no .loss for the {what}: include 'labels', or pass loss_fn(model, batch) -> scalar loss"
        )
    return loss
