"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-shaped adapter whose rank budget is pruned during training.

ΔW = s · B diag(E) A, A ∈ R^{r×in} and B ∈ R^{out×r} (``lora_A``, ``lora_B``, N(0, 0.02²) at the start, as PEFT),
E ∈ R^r the "singular values" (``lora_E``, zeros at the start), with r = the configured rank (PEFT's ``init_r``).
Training adds an orthogonality penalty to the loss, ``orth_reg_weight`` × the mean over every A and B of
‖AAᵀ − I‖_F, ‖BᵀB − I‖_F (added to the model output's ``loss`` while training, as PEFT does; a loop that computes
its own loss adds ``model.regularization_loss()``).

Budget (the plan, :class:`AdaLoRAPlan`): after each optimizer step the importance of every entry of A, B and E is
smoothed, I = |p ⊙ ∇p|, Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2)|I − Ī| (while t < T − tfinal), and the score of
triplet i of a layer is Ī⊙Ū of E_i plus the mean of Ī⊙Ū over row i of A and over column i of B. The total budget
(the number of triplets kept over all layers) falls from r·L to ``target_r``·L: all kept for t ≤ ``tinit``, then
b(t) = ⌊(r − target_r)·L·(1 − (t − tinit)/(T − tfinal − tinit))³ + target_r·L⌋, the E entries of the lowest scores
set to 0 every ``deltaT`` steps; at t = T − tfinal the pattern is fixed, and re-applied after every later step. This is
PEFT's ``RankAllocator`` step for step (``update_and_allocate(t)`` after optimizer step t); tests/test_adalora.py
checks the masks against it. The importance averages are buffers of the layer (``lora_ipt_*``, ``lora_unc_*``, saved
with the adapter, so a resumed run continues exactly), and so is the fixed pattern (``lora_keep``).

PEFT export: a LoRA of the kept triplets, B' = s·B[:, k]·diag(E_k), A' = A[k] (exact; rank = the triplets kept, at
least 1). Linear layers only (as PEFT's AdaLoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer
from .plan import StepOutcome, StepPlan

_FACTORS = ("A", "B", "E")


@dataclass
class AdaLoRAOptions:
    """Options of ``adalora`` (PEFT's ``AdaLoraConfig`` names): ``target_r`` (average rank kept at the end; None:
    2/3 of the rank), ``tinit`` / ``tfinal`` (steps before pruning starts / after it ends), ``deltaT`` (steps between
    two prunings), ``beta1`` / ``beta2`` (importance / uncertainty smoothing), ``orth_reg_weight``."""

    target_r: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.target_r is not None and (isinstance(self.target_r, bool) or not isinstance(self.target_r, int)
                                          or self.target_r < 1):
            raise ValueError(f"adalora target_r must be an int >= 1 (the average rank kept), got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"adalora {name} must be an int >= 0 (steps), got {v!r}")
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT < 1:
            raise ValueError(f"adalora deltaT must be an int >= 1 (steps between prunings), got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"adalora {name} must be in (0, 1), got {v!r}")
        if (isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float))
                or not self.orth_reg_weight >= 0):
            raise ValueError(f"adalora orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")


class AdaLoRALayer(AdapterLayer):
    """AdaLoRA: ``y = W0 x + s · B (E ⊙ (A dropout(x)))``; E entries of pruned triplets are 0."""

    method = "adalora"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev, dt = self.base_weight.device, self.adapter_dtype
        self.lora_A = nn.Parameter(torch.randn(self.r, self.in_features, dtype=dt, device=dev) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, self.r, dtype=dt, device=dev) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(self.r, dtype=dt, device=dev))
        for f in _FACTORS:  # the smoothed importance Ī and uncertainty Ū of every entry (float32 at least)
            shape = getattr(self, f"lora_{f}").shape
            sdt = torch.float64 if dt == torch.float64 else torch.float32
            self.register_buffer(f"lora_ipt_{f}", torch.zeros(shape, dtype=sdt, device=dev))
            self.register_buffer(f"lora_unc_{f}", torch.zeros(shape, dtype=sdt, device=dev))
        self.register_buffer("lora_keep", torch.ones(self.r, dtype=torch.bool, device=dev))  # the fixed pattern

    # ---- the contract -------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return self.scale * ((self.lora_B * self.lora_E) @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self._cast_in(x), self.lora_A) * self.lora_E
        return F.linear(h, self.lora_B) * self.scale

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        kept = torch.nonzero(self.lora_E != 0).flatten()
        if kept.numel() == 0:  # every triplet pruned: ΔW = 0, a rank-1 zero LoRA
            kept = torch.zeros(1, dtype=torch.long, device=self.lora_E.device)
        up = self.scale * self.lora_B[:, kept] * self.lora_E[kept]
        return up.detach().clone(), self.lora_A[kept].detach().clone()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B diag(E)): the pair whose product is ΔW / s."""
        return self.lora_A.detach(), (self.lora_B * self.lora_E).detach()

    @classmethod
    def regularization(cls, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """``orth_reg_weight`` × the mean over every A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT's penalty)."""
        terms = []
        weight = 0.0
        for layer in layers.values():
            if not isinstance(layer, AdaLoRALayer):
                continue
            weight = float(layer.options.orth_reg_weight)
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        if not terms or weight == 0.0:
            return None
        return weight * torch.stack(terms).mean()

    # ---- the budget's tensor operations (the plan decides when) -------------------------------------------------
    @torch.no_grad()
    def observe(self, beta1: float, beta2: float) -> None:
        """Smooth the importance |p ⊙ ∇p| of every entry of A, B, E with the gradient of the step just taken."""
        for f in _FACTORS:
            p = getattr(self, f"lora_{f}")
            if p.grad is None:
                continue
            ipt_avg, unc_avg = getattr(self, f"lora_ipt_{f}"), getattr(self, f"lora_unc_{f}")
            ipt = (p.detach() * p.grad).abs().to(ipt_avg.dtype)
            ipt_avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
            unc_avg.mul_(beta2).add_((ipt - ipt_avg).abs(), alpha=1 - beta2)

    def triplet_scores(self) -> torch.Tensor:
        """[r]: score of E_i + mean score of row i of A + mean score of column i of B (score = Ī ⊙ Ū)."""
        s = {f: getattr(self, f"lora_ipt_{f}") * getattr(self, f"lora_unc_{f}") for f in _FACTORS}
        return s["E"] + s["A"].mean(1) + s["B"].mean(0)

    @torch.no_grad()
    def prune(self, keep: torch.Tensor) -> None:
        """Set E to 0 where ``keep`` is False."""
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device), 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={int(self.lora_keep.sum())}"


class AdaLoRAPlan(StepPlan):
    """The budget schedule of AdaLoRA (see the module docstring). It observes the gradients of every optimizer step
    (the Controller calls :meth:`observe` right after ``optimizer.step()``, before gradients are cleared) and prunes
    at the steps the schedule says."""

    acts: ClassVar[bool] = True
    observes_gradients: ClassVar[bool] = True

    def __init__(self, options: AdaLoRAOptions, total_steps: int | None) -> None:
        super().__init__(options, total_steps)
        if total_steps is not None and options.tinit + options.tfinal >= total_steps:
            raise ValueError(
                f"adalora: tinit={options.tinit} + tfinal={options.tfinal} leave no pruning phase in total_steps="
                f"{total_steps}; lower them (PEFT requires the same)"
            )

    @classmethod
    def needs_total_steps(cls, options: Any) -> bool:
        return True

    def _final(self) -> int:
        assert self.total_steps is not None
        return self.total_steps - self.options.tfinal

    def budget(self, t: int, init: int, target: int) -> tuple[int, bool]:
        """PEFT's ``budget_schedule(t)``: (triplets to keep over all layers, whether to prune at step t)."""
        o = self.options
        total = self.total_steps
        assert total is not None
        if t <= o.tinit:
            return init, False
        if t > total - o.tfinal:
            return target, True
        mul = 1 - (t - o.tinit) / (total - o.tfinal - o.tinit)
        return int((init - target) * mul**3 + target), t % o.deltaT == 0

    def due(self, t: int) -> bool:
        if self.total_steps is None or t > self.total_steps:
            return False
        o = self.options
        return t >= self._final() or (t > o.tinit and t % o.deltaT == 0)

    def observe(self, layers: list[Any], t: int) -> None:
        """After optimizer step ``t``: smooth the importances (until the pattern is fixed, as PEFT)."""
        if self.total_steps is not None and t < self._final():
            for layer in layers:
                layer.observe(self.options.beta1, self.options.beta2)

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        out = StepOutcome()
        if not layers:
            return out
        final = self._final()
        if t > final:  # the pattern fixed at T − tfinal, re-applied after every step
            for layer in layers:
                layer.prune(layer.lora_keep)
            return out
        r = layers[0].r
        target = self.options.target_r or max(1, (2 * r) // 3)
        init_bgt, target_bgt = sum(layer.r for layer in layers), target * len(layers)
        budget, prune_now = self.budget(t, init_bgt, target_bgt)
        if not (prune_now or t == final) or init_bgt - budget < 1:
            return out
        scores = [layer.triplet_scores() for layer in layers]
        threshold = torch.kthvalue(torch.cat([s.flatten().cpu() for s in scores]), k=init_bgt - budget)[0]
        kept = 0
        for layer, s in zip(layers, scores, strict=True):
            keep = s > threshold.to(s.device)
            layer.prune(keep)
            kept += int(keep.sum())
            if t == final:
                layer.lora_keep.copy_(keep)
        if t == final:  # the importances restart (PEFT's reset_ipt); they are not used again
            for layer in layers:
                for f in _FACTORS:
                    getattr(layer, f"lora_ipt_{f}").zero_()
                    getattr(layer, f"lora_unc_{f}").zero_()
        out.events.append({"step": t, "event": "prune", "budget": budget, "kept": kept, "final": t == final})
        return out
