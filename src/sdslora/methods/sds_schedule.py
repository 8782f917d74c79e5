"""SDS-LoRA's options and schedule (also the orthogonal ablation's): when the warm-up re-parameterisation and the
basis refreshes happen, and the learning-rate factor around them. The tensor operations they call are the layers'
(:mod:`sdslora.methods.sds`); the algorithm is described in docs/algorithm.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .plan import StepOutcome, StepPlan

WARMUP_MODES = ("reparam", "init_phase")
REFRESH_ALIGNS = ("qr", "procrustes", "preserve")


FAITHFUL = {"refresh_align": "qr", "reparam_state": "reset", "lr_scale": 1.0}


@dataclass
class SDSOptions:
    """Options of ``sds`` and ``orthogonal``.

    The schedule defaults are the paper's / authors' code. One default differs from the paper (docs/sds_stability.md,
    measured): ``refresh_align="preserve"`` (refreshes re-express A and B so that ΔW does not jump). ``faithful=True``
    is the paper's algorithm exactly (``refresh_align="qr"``, ``reparam_state="reset"``, ``lr_scale=1``); combining it
    with another value of those three options is an error.
    """

    warmup_steps: int = 10
    refresh: str = "decay"
    refresh_k: int = 5
    warmup_mode: str = "reparam"
    init_phase_steps: int = 50
    guard_rtol: float = 1e-6
    faithful: bool = False
    # robustness options (docs/sds_stability.md); None = the default of the mode (`faithful` or not)
    refresh_align: str | None = None
    reparam_state: str = "reset"
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.faithful, bool):
            raise ValueError(f"faithful must be True or False, got {self.faithful!r}")
        if self.refresh_align is None:
            self.refresh_align = "qr" if self.faithful else "preserve"
        if self.faithful:
            clash = {k: getattr(self, k) for k, v in FAITHFUL.items() if getattr(self, k) != v}
            if clash:
                raise ValueError(
                    f"faithful=True is the paper's algorithm ({FAITHFUL}); it cannot be combined with {clash}: "
                    "drop faithful=True to use those options, or drop the options"
                )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {self.warmup_steps!r}")
        if not isinstance(self.refresh_k, int) or self.refresh_k < 1:
            raise ValueError(f"refresh_k must be an int >= 1, got {self.refresh_k!r}")
        self.refresh_interval()  # validates `refresh`
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup_mode must be one of {WARMUP_MODES}, got {self.warmup_mode!r}")
        if self.warmup_mode == "init_phase" and (
            not isinstance(self.init_phase_steps, int) or self.init_phase_steps < self.warmup_steps
        ):
            raise ValueError(
                f"init_phase_steps must be an int >= warmup_steps ({self.warmup_steps}), got {self.init_phase_steps!r}"
            )
        if not 0.0 <= float(self.guard_rtol) < 1.0:
            raise ValueError(f"guard_rtol must be in [0, 1), got {self.guard_rtol!r}")
        if self.refresh_align not in REFRESH_ALIGNS:
            raise ValueError(f"refresh_align must be one of {REFRESH_ALIGNS}, got {self.refresh_align!r}")
        self.rewarm_steps()  # validates `reparam_state`
        if isinstance(self.lr_scale, bool) or not isinstance(self.lr_scale, (int, float)) or not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be a number > 0, got {self.lr_scale!r}")

    def rewarm_steps(self) -> int:
        """N of ``reparam_state="rewarm:N"`` (0 for "reset" / "carry")."""
        if self.reparam_state in ("reset", "carry"):
            return 0
        if isinstance(self.reparam_state, str) and self.reparam_state.startswith("rewarm:"):
            try:
                n = int(self.reparam_state.split(":", 1)[1])
            except ValueError:
                n = 0
            if n >= 1:
                return n
        raise ValueError(
            f"reparam_state must be 'reset', 'carry' or 'rewarm:N' with N >= 1, got {self.reparam_state!r}"
        )

    def refresh_interval(self) -> int | None:
        """``None`` for the decaying schedule, 0 for never, N for every N steps."""
        if self.refresh == "decay":
            return None
        if self.refresh == "never":
            return 0
        if isinstance(self.refresh, str) and self.refresh.startswith("every:"):
            try:
                n = int(self.refresh.split(":", 1)[1])
            except ValueError:
                n = 0
            if n >= 1:
                return n
        raise ValueError(f"refresh must be 'decay', 'never' or 'every:N' with N >= 1, got {self.refresh!r}")

    @property
    def offset(self) -> int:
        return self.init_phase_steps if self.warmup_mode == "init_phase" else 0


def refresh_due(t: int, total_steps: int | None, opts: SDSOptions) -> bool:
    """Whether the bases are refreshed after optimizer step ``t`` (1-based, counted after any init phase).

    Decay rule (docs/algorithm.md): for t > T_w, refresh iff ``t mod (⌊t / ⌊T/k⌋⌋ + 1) == 0``.
    """
    if t <= opts.warmup_steps:
        return False
    interval = opts.refresh_interval()
    if interval == 0:
        return False
    if interval is not None:
        return (t - opts.warmup_steps) % interval == 0
    assert total_steps is not None
    phase_len = max(total_steps // opts.refresh_k, 1)
    return t % (t // phase_len + 1) == 0


def refresh_steps(total_steps: int, opts: SDSOptions | None = None) -> list[int]:
    """All steps of a run of ``total_steps`` optimizer steps after which the bases are refreshed."""
    opts = opts or SDSOptions()
    main = total_steps - opts.offset
    return [t + opts.offset for t in range(1, main + 1) if refresh_due(t, main, opts)]


class SDSPlan(StepPlan):
    """SDS-LoRA's schedule (and the orthogonal ablation's), counted in optimizer steps t = 1..T: the warm-up
    re-parameterisation at t = T_w (and, with ``warmup_mode="init_phase"``, the resets of the separate initialisation
    phase before it), then the basis refreshes of :func:`refresh_due`; the learning-rate factor of ``lr_scale`` /
    ``reparam_state="rewarm:N"``. The offset of an initialisation phase is subtracted here, once."""

    acts = True
    fsdp2_ready: ClassVar[bool] = True  # the Controller gathers A and B; the Q bases are kept equal by the sync

    def __init__(self, options: SDSOptions, total_steps: int | None) -> None:
        super().__init__(options, total_steps)
        self.offset = options.offset
        self.main_total = None if total_steps is None else total_steps - self.offset  # steps after any init phase

    @classmethod
    def needs_total_steps(cls, options: SDSOptions) -> bool:
        return options.refresh_interval() is None

    @classmethod
    def scales_lr(cls, options: SDSOptions) -> bool:
        return options.lr_scale != 1.0 or options.rewarm_steps() > 0

    def due(self, t: int) -> bool:
        o = self.options
        if self.offset and t <= self.offset:
            return t % o.warmup_steps == 0
        return t - self.offset == o.warmup_steps or refresh_due(t - self.offset, self.main_total, o)

    def lr_factor(self, t: int) -> float:
        """``lr_scale`` on every step after the re-parameterisation, times the linear re-warm j/(N+1), j = 1..N, on
        the N steps right after it (``reparam_state="rewarm:N"``); 1 before it."""
        o = self.options
        tm = t - self.offset
        if tm <= o.warmup_steps:
            return 1.0
        factor = float(o.lr_scale)
        n = o.rewarm_steps()
        j = tm - o.warmup_steps
        if j <= n:
            factor *= j / (n + 1)
        return factor

    def atomic(self, layers: list[Any], t: int) -> bool:
        """A refresh of layers whose batched refresh checks and writes all at once (SDSLayer's) is atomic; the
        re-parameterisation (layer by layer) and the orthogonal ablation's retraction are not."""
        o = self.options
        if self.offset and t <= self.offset:
            return False
        tm = t - self.offset
        return (tm != o.warmup_steps and refresh_due(tm, self.main_total, o)
                and all(getattr(type(layer), "atomic_refresh", False) for layer in layers))

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        out = StepOutcome()
        o = self.options
        if not layers:
            return out
        if self.offset and t <= self.offset:  # the authors' separate initialisation phase
            if t % o.warmup_steps == 0:
                for layer in layers:
                    layer.reparameterise(reset_to_zero=True)
                    out.reset_params += [layer.lora_A, layer.lora_B]
                out.events.append({"step": t, "event": "init_phase_reset", "layers": len(layers)})
            return out
        tm = t - self.offset
        if tm == o.warmup_steps:
            carry = o.reparam_state == "carry"
            carried = 0
            for layer in layers:
                maps = layer.reparameterise(reset_to_zero=False, carry=carry)
                if maps is None:
                    out.reset_params += [layer.lora_A, layer.lora_B]
                else:
                    out.state_maps += maps
                    carried += 1
            event: dict[str, Any] = {"step": t, "event": "reparameterise", "layers": len(layers)}
            if carry:
                event["state_carried"] = carried
            out.events.append(event)
        elif refresh_due(tm, self.main_total, o):
            out.events.append(self._refresh(layers, t))
        return out

    def _refresh(self, layers: list[Any], t: int) -> dict[str, Any]:
        o = self.options
        groups: dict[tuple, list[Any]] = {}
        for layer in layers:  # layers of one shape are refreshed in one batched call
            key = (layer.in_features, layer.out_features, layer.lora_A.dtype, layer.lora_A.device)
            groups.setdefault(key, []).append(layer)
        rows = torch.cat([type(g[0]).refresh_batch(g, o.guard_rtol, o.refresh_align).float().cpu()
                          for g in groups.values()])  # one device sync per group and refresh
        vals = rows[rows[:, 3] > 0, :3]
        event: dict[str, Any] = {"step": t, "event": "refresh", "layers": len(vals), "skipped": len(rows) - len(vals)}
        if len(vals):
            for i, n in enumerate(("jump", "sim_A", "sim_B")):
                col = vals[:, i]
                if torch.isnan(col).all():
                    continue
                event[f"{n}_mean"] = float(col.mean())
                event[f"{n}_max" if n == "jump" else f"{n}_min"] = float(col.max() if n == "jump" else col.min())
        return event
