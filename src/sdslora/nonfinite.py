"""Non-finite guards of the Controller's duties: the snapshot to roll back to, the finiteness check, NonFiniteError."""

from __future__ import annotations

import torch


class _Snapshot:
    """A copy of the adapter tensors taken before a duty, to put back if it fails: one flat buffer per (device,
    dtype), so that copying, checking and restoring cost one call each, not several per tensor (the refresh runs at
    almost every other step early in training, across every layer)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.groups: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for x in tensors:
            by_kind.setdefault((x.device, x.dtype), []).append(x)
        with torch.no_grad():
            for group in by_kind.values():
                self.groups.append((group, torch.cat([x.detach().reshape(-1) for x in group])))

    def finite(self) -> bool:
        """Whether every floating-point value copied is finite (one reduction per group, one host sync)."""
        return _finite_flags([flat for _, flat in self.groups])

    @staticmethod
    def all_finite(tensors: list[torch.Tensor]) -> bool:
        """Whether every floating-point value in ``tensors`` is finite: a sum per tensor (NaN and Inf propagate
        through it; an overflowing sum of finite values only sends the caller to the exact per-tensor scan)."""
        return _finite_flags(tensors)

    @torch.no_grad()
    def restore(self) -> None:
        for group, flat in self.groups:
            parts = torch.split(flat, [x.numel() for x in group])
            torch._foreach_copy_(group, [p.view(x.shape) for p, x in zip(parts, group, strict=True)])


def _finite_flags(tensors: list[torch.Tensor]) -> bool:
    sums = [x.detach().sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            for x in tensors if x.is_floating_point() and x.numel()]
    if not sums:
        return True
    device = sums[0].device
    return bool(torch.isfinite(torch.stack([v.to(device) for v in sums])).all())  # one host sync


def require_finite(tensors: list[torch.Tensor], message: str) -> None:
    """Raise :class:`NonFiniteError` (``message``) unless every value of ``tensors`` is finite: one sum per tensor
    and one host sync (a sum of finite values that overflows is checked value by value)."""
    if _finite_flags(tensors) or all(bool(torch.isfinite(x).all()) for x in tensors if x.is_floating_point()):
        return
    raise NonFiniteError(message)


class NonFiniteError(FloatingPointError):
    """Training produced NaN / Inf values where a method's duty needs finite ones (the model is left as it was
    before the duty; the message names the step, the layer and the likely cause)."""


NONFINITE_CAUSES = (
    "likely causes: a learning rate too high for this model (the loss diverged), NaN/Inf in the inputs or the "
    "loss, or float16 overflow (train in bf16 or fp32, keep adapter_dtype='float32')"
)
