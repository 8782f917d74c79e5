"""Merge-and-restart (ReLoRA, Lialin et al. 2023, arXiv 2307.05695) over LoRA (``relora``) and SDS-LoRA
(``relora_sds``).

Every N optimizer steps (``restart_every``) the adapter's current update is merged into the frozen weight and the
factors start again, so the accumulated update is a sum of low-rank pieces, of high rank over a long run:

    ΔW_total = M + ΔW_cycle,  M = Σ_k ΔW_cycle(k)  (the merged part, a buffer ``lora_merged`` [out, in])

At a restart: M ← M + ΔW_cycle; the factors re-initialise as at attach (LoRA: A Kaiming-uniform, B = 0; SDS-LoRA:
back to its LoRA warm-up phase, bases cleared), so ΔW_cycle = 0 and the model's function is unchanged; the optimizer
state of the factors is pruned by magnitude (``prune``: the share of each moment tensor's entries set to zero,
ReLoRA's 0.99; 1.0 forgets the state); the adapter's learning rate re-warms linearly over ``restart_warmup`` steps
(ReLoRA's jagged schedule, on top of any scheduler). Within a cycle SDS-LoRA runs its own schedule (warm-up,
re-parameterisation, refreshes) with the cycle as its run (T = N).

The frozen weight the layer computes with is W0 + M, re-derived from the original W0 (kept in memory beside it)
and M in one rounding, so a run resumed from a saved adapter continues bit for bit. Memory: two weight-sized
tensors per adapted layer beside the base (W0 and M); full fine-tuning with Adam keeps three trained ones
(gradient, two moments). ``delta_weight()`` is relative to the original W0 (M + ΔW_cycle); ``merge()`` adds
ΔW_cycle to W0 + M; ``unload()`` without merging puts W0 back exactly. The PEFT export is exact: M + ΔW_cycle has
rank up to min(out, in), written as ΔW = I·ΔW (or ΔW·I) before any restart it is the cycle's own rank-r LoRA;
``export_peft(max_rank=k)`` compresses it by an exact truncated SVD and reports the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import work_dtype
from .lora import LoRALayer, lora_init
from .plan import StepOutcome, StepPlan
from .sds import SDSLayer
from .sds_schedule import SDSOptions, SDSPlan


def _check_restart_options(o: Any) -> None:
    if o.restart_warmup is None and isinstance(o.restart_every, int):
        o.restart_warmup = min(10, o.restart_every // 10)
    for name in ("restart_every", "restart_warmup"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "restart_every" else 0):
            low = 1 if name == "restart_every" else 0
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if o.restart_warmup >= o.restart_every:
        raise ValueError(
            f"restart_warmup ({o.restart_warmup}) must be shorter than restart_every ({o.restart_every})"
        )
    p = o.prune
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(
            f"prune must be a number in [0, 1] (the share of optimizer-state entries zeroed), got {p!r}"
        )


@dataclass
class ReLoRAOptions:
    """Options of ``relora``.

    Args:
        restart_every: N, merge and restart after every N optimizer steps.
        restart_warmup: the adapter's learning rate re-warms linearly over this many steps after each restart
            (j/(W+1), j = 1..W); 0: no re-warm; None (default): min(10, restart_every // 10).
        prune: share of the entries of each factor's optimizer moments zeroed at a restart, smallest magnitudes
            first (ReLoRA: 0.99); 1.0 forgets the state (moments and step counter), 0.0 keeps it.
    """

    restart_every: int = 100
    restart_warmup: int | None = None
    prune: float = 0.99

    def __post_init__(self) -> None:
        _check_restart_options(self)


@dataclass
class ReLoRASDSOptions(SDSOptions):
    """Options of ``relora_sds``: SDS-LoRA's (each cycle is one SDS-LoRA run of ``restart_every`` steps, so the
    warm-up must be shorter than a cycle) and ReLoRA's (see :class:`ReLoRAOptions`)."""

    restart_every: int = 100
    restart_warmup: int | None = None
    prune: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_restart_options(self)
        if self.warmup_mode != "reparam":
            raise ValueError("relora_sds supports warmup_mode='reparam' only")
        if self.warmup_steps >= self.restart_every:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be shorter than restart_every ({self.restart_every}): each "
                "cycle re-parameterises after its warm-up"
            )


class _Restarting:
    """The merge-and-restart mechanics, mixed in front of a layer class (LoRA or SDS-LoRA)."""

    rebases_base_weight = True
    quantised_refusal = "it merges the adapter into the frozen weight at every restart, which a quantised weight cannot hold exactly"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        dropout: float,
        dtype: str,
        options: Any,
        *,
        deferred: bool = False,
    ):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)  # type: ignore[call-arg]
        w = self.base_weight
        if not w.is_floating_point():
            raise ValueError(
                f"{self.method} needs a floating-point base weight (got {w.dtype}); dequantise first"
            )
        # the original weight (not saved: it is the base model's own) and the merged updates M (saved)
        self.register_buffer("base_original", w.detach().clone(), persistent=False)
        self.register_buffer(
            "lora_merged",
            torch.zeros(self.out_features, self.in_features, dtype=self.adapter_dtype, device=w.device),
        )

    @torch.no_grad()
    def sync_state(self) -> None:
        """Re-derive the frozen weight from W0 and M (after a restart, a load, a rolled-back duty)."""
        super().sync_state()
        w = self.base_weight
        work = work_dtype(w.dtype)
        total = self.lora_merged.to(work)
        if self.merged:
            total = total + super().delta_weight().to(work)
        with torch.autocast(device_type=w.device.type, enabled=False):
            w.copy_((self.base_original.to(work) + self._to_base_layout(total)).to(w.dtype))

    def prepare_unload(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base_weight.copy_(self.base_original)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_merged + super().delta_weight()

    def delta_to_base(self) -> torch.Tensor:
        return super().delta_weight()

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.lora_merged.any()):  # no restart yet: the cycle's own factors
            return super().export_lora()
        delta = self.delta_weight().detach()
        eye = torch.eye(min(delta.shape), dtype=delta.dtype, device=delta.device)
        return (eye, delta.clone()) if delta.shape[0] <= delta.shape[1] else (delta.clone(), eye)

    @torch.no_grad()
    def restart(self) -> float:
        """Merge the cycle's update into M, re-initialise the factors (ΔW_cycle = 0: the function is unchanged) and
        re-derive the frozen weight. Returns ‖ΔW_cycle‖ / ‖W0‖."""
        cycle = super().delta_weight()
        self.lora_merged.add_(cycle.to(self.lora_merged.dtype))
        self._restart_factors()
        self.sync_state()
        w0 = float(self.base_original.float().norm())
        return float(cycle.float().norm()) / max(w0, 1e-30)

    def _restart_factors(self) -> None:
        a, b = lora_init(self)  # type: ignore[arg-type]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)


class ReLoRALayer(_Restarting, LoRALayer):
    """ReLoRA over LoRA. Buffers: ``lora_merged`` [out, in] (M, saved), ``base_original`` (W0, not saved)."""

    method = "relora"


class ReLoRASDSLayer(_Restarting, SDSLayer):
    """ReLoRA over SDS-LoRA: each cycle is an SDS-LoRA run; a restart returns the layer to its LoRA warm-up."""

    method = "relora_sds"

    def _restart_factors(self) -> None:
        super()._restart_factors()
        self.lora_QA.zero_()
        self.lora_QB.zero_()
        self.lora_phase.fill_(0)
        self.decoupled = False


class ReLoRAPlan(StepPlan):
    """Restart after every ``restart_every`` steps (t = N, 2N, ...); within a cycle, the inner method's plan (none
    for LoRA, SDS-LoRA's with T = N) at the cycle's own step j = t − kN; the jagged learning-rate factor."""

    acts = True
    inner_cls: type[StepPlan] = StepPlan

    def __init__(self, options: Any, total_steps: int | None) -> None:
        super().__init__(options, total_steps)
        self.every = options.restart_every
        self.inner = self.inner_cls(options, self.every)

    @classmethod
    def scales_lr(cls, options: Any) -> bool:
        return options.restart_warmup > 0 or cls.inner_cls.scales_lr(options)

    def _local(self, t: int) -> tuple[int, int]:
        """(cycle k, step j in 1..N) of optimizer step t."""
        return (t - 1) // self.every, (t - 1) % self.every + 1

    def due(self, t: int) -> bool:
        k, j = self._local(t)
        return j == self.every or self.inner.due(j)

    def lr_factor(self, t: int) -> float:
        k, j = self._local(t)
        factor = self.inner.lr_factor(j)
        w = self.options.restart_warmup
        if k >= 1 and j <= w:
            factor *= j / (w + 1)
        return factor

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        k, j = self._local(t)
        if j != self.every:
            if not self.inner.due(j):
                return StepOutcome()
            out = self.inner.run(layers, j)
            for (
                event
            ) in out.events:  # the inner plan counts the cycle's steps; the run's log counts the run's
                event["step"], event["cycle"] = t, k + 1
            return out
        share = [layer.restart() for layer in layers]
        out = StepOutcome()
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        if self.options.prune >= 1.0:
            out.reset_params += params
        elif self.options.prune > 0.0:
            out.prune_params += [(p, float(self.options.prune)) for p in params]
        out.events.append(
            {
                "step": t,
                "event": "restart",
                "cycle": k + 1,
                "layers": len(layers),
                "delta_rel_mean": sum(share) / max(len(share), 1),
            }
        )
        return out


class ReLoRASDSPlan(ReLoRAPlan):
    inner_cls = SDSPlan
