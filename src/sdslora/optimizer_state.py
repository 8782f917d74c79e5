"""The optimizer side of the Controller's duties: per-parameter state reset, remapped, moved to new parameters, pruned.

:func:`unwrap_optimizer` finds the torch optimizer inside wrappers; :class:`OptimizerStateOps` holds the operations,
which :class:`~sdslora.control.Controller` inherits and calls with the outcome of a duty.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .distributed import dtensor_type


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    # accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer: follow `.optimizer` links regardless
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


class OptimizerStateOps:
    """The Controller's operations on the optimizer state of the parameters a duty changed (``self.optimizer``: the
    torch optimizer, or None when the Controller has none, and then every operation does nothing)."""

    optimizer: torch.optim.Optimizer | None

    # keys of torch Adam/AdamW state that hold per-element first / second moments
    FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
    SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")

    def map_optimizer_state(self, maps: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]) -> None:
        """Carry optimizer state into a parameter's new coordinates, in which its gradient reads
        ``g' = L g R`` (``L``/``R`` None = identity): first moments ``m' = L m R``; second moments, exact when the
        gradient's entries are uncorrelated, ``v' = (L∘L) v (R∘R)``; step counters kept. A state holding any other
        tensor of the parameter's shape (an optimizer this does not know) or sharded (DTensor) is cleared instead."""
        if self.optimizer is None:
            return
        dtensor = dtensor_type()
        with torch.no_grad():
            for p, left, right in maps:
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                known = (*self.FIRST_MOMENTS, *self.SECOND_MOMENTS)
                unknown = [k for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape and k not in known]
                sharded = dtensor is not None and any(isinstance(v, dtensor) for v in st.values())
                if unknown or sharded:
                    self.optimizer.state.pop(p, None)
                    continue
                for key in known:
                    v = st.get(key)
                    if not torch.is_tensor(v):
                        continue
                    sq = key in self.SECOND_MOMENTS
                    x = v.float() if v.dtype != torch.float64 else v
                    if left is not None:
                        lm = left.to(x)
                        x = (lm * lm if sq else lm) @ x
                    if right is not None:
                        rm = right.to(x)
                        x = x @ (rm * rm if sq else rm)
                    v.copy_(x.to(v.dtype))

    def replace_parameters(self, pairs: list[tuple[nn.Parameter, nn.Parameter, tuple[slice, ...] | None]]) -> None:
        """Put ``new`` in the optimizer where ``old`` was (same param group, same position) and carry old's
        per-element state (moments) into ``new[where]``, zeros elsewhere; scalar state (the step counter) is kept.
        ``where=None`` drops old's state (it re-initialises lazily). For plans that change a parameter's shape (rank
        growth); not under FSDP2 sharding."""
        if self.optimizer is None:
            return
        for old, new, where in pairs:
            found = False
            for group in self.optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        group["params"][i] = new
                        found = True
            if not found:
                raise ValueError("replace_parameters(): the optimizer does not hold the replaced parameter")
            state = self.optimizer.state.pop(old, None)
            if not state or where is None:
                continue
            carried: dict[str, Any] = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
                    nv = torch.zeros(new.shape, dtype=v.dtype, device=v.device)
                    nv[where] = v
                    carried[k] = nv
                else:
                    carried[k] = v
            self.optimizer.state[new] = carried

    def prune_optimizer_state(self, pairs: list[tuple[nn.Parameter, float]]) -> None:
        """Zero the share ``p`` of the entries of each parameter's moments (ReLoRA's partial optimizer reset): the
        entries with the smallest second moment, in the first and second moments alike; step counters are kept.
        State this Controller does not
        know (another optimizer's tensors of the parameter's shape) or sharded state is cleared instead."""
        if self.optimizer is None:
            return
        dtensor = dtensor_type()
        known = (*self.FIRST_MOMENTS, *self.SECOND_MOMENTS)
        with torch.no_grad():
            for p, share in pairs:
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                unknown = [k for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape and k not in known]
                if unknown or (dtensor is not None and any(isinstance(v, dtensor) for v in st.values())):
                    self.optimizer.state.pop(p, None)
                    continue
                moments = [st[k] for k in known if torch.is_tensor(st.get(k)) and st[k].numel() > 0]
                if not moments:
                    continue
                # one mask for all moments of the parameter, by the second moment's magnitude where there is one: a
                # first moment kept without its second moment would be divided by ~eps (an exploding step)
                ranked = next((st[k] for k in self.SECOND_MOMENTS if torch.is_tensor(st.get(k))), moments[0])
                keep = ranked.numel() - int(round(share * ranked.numel()))
                mask = torch.zeros(ranked.numel(), dtype=torch.bool, device=ranked.device)
                if keep > 0:
                    mask[ranked.reshape(-1).abs().topk(keep).indices] = True
                for v in moments:
                    v.view(-1).masked_fill_(~mask, 0)

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Forget the optimizer state (moments and step counters) of ``params``; they re-initialise lazily."""
        if self.optimizer is None:
            return
        for p in params:
            self.optimizer.state.pop(p, None)
