"""Rank growth's options and schedule (``lora_grow``, ``sds_grow``): when the capture of the full gradient is armed and
when the rank grows, in equal increments r → ``grow_to``. The tensor operations they call (capture, new directions,
the shape change) are the layers' (:mod:`sdslora.methods.grow`); the method is described in docs/algorithm.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .plan import StepOutcome, StepPlan
from .sds_schedule import SDSOptions, SDSPlan

DIRECTIONS = ("gradient", "random")


# ---- options ----------------------------------------------------------------------------------------------------------
def _parse_steps(value: Any) -> list[int | float]:
    """``grow_steps`` as a list of entries: ints >= 1 (optimizer steps) or floats in (0, 1) (fractions of T)."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    parts = [p.strip() for p in text.split(",")] if text else []
    out: list[int | float] = []
    for p in parts:
        try:
            v: int | float = int(p)
        except ValueError:
            try:
                v = float(p)
            except ValueError:
                v = math.nan
        if isinstance(v, float) and not 0.0 < v < 1.0:
            v = math.nan
        if (isinstance(v, int) and v < 1) or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(
                f"grow_steps={value!r}: {p!r} is neither an optimizer step (an int >= 1) nor a fraction of the run's "
                "total_steps in (0, 1); write e.g. '50,100' or '0.25,0.5'"
            )
        out.append(v)
    if not out:
        raise ValueError(
            f"grow_steps={value!r} is empty; give the steps after which the rank grows, e.g. '50,100'"
        )
    ints = [v for v in out if isinstance(v, int)]
    fracs = [v for v in out if isinstance(v, float)]
    for seq, what in ((ints, "steps"), (fracs, "fractions")):
        if any(b <= a for a, b in zip(seq, seq[1:])):
            raise ValueError(f"grow_steps={value!r}: the {what} must be strictly increasing")
    return out


def _check_grow(o: Any) -> None:
    if o.grow_to is not None and (
        isinstance(o.grow_to, bool) or not isinstance(o.grow_to, int) or o.grow_to < 2
    ):
        raise ValueError(f"grow_to must be an int > r (default 2·r), got {o.grow_to!r}")
    if o.directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {o.directions!r}")
    if isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {o.seed!r}")
    steps = _parse_steps(o.grow_steps)
    if o.directions == "gradient" and 1 in steps:
        raise ValueError(
            "grow_steps contains step 1: directions='gradient' captures G in the backward pass of the growth step, "
            "armed after the step before it, so the first growth can come after step 2 at the earliest (or use "
            "directions='random')"
        )


@dataclass
class GrowOptions:
    """Options of ``lora_grow``.

    ``grow_to``: the final rank r1 (> r; default None = 2·r). ``grow_steps``: the optimizer steps after which the
    rank grows, comma-separated ints (``"50,100"``) or fractions of the run's ``total_steps`` (``"0.25,0.5"``; default
    ``"0.5"``: once, half-way), in equal increments from r to r1 (rounded down, the last step reaches r1).
    ``directions``: ``"gradient"`` (the top singular vectors of the unreachable gradient) or ``"random"``. ``seed``:
    of the random directions (and of the random completion when G has fewer usable directions than needed).
    """

    grow_to: int | None = None
    grow_steps: str | int | float = "0.5"
    directions: str = "gradient"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_grow(self)


@dataclass
class SDSGrowOptions(SDSOptions):
    """Options of ``sds_grow``: SDS-LoRA's (:class:`SDSOptions`) plus those of :class:`GrowOptions`."""

    grow_to: int | None = None
    grow_steps: str | int | float = "0.5"
    directions: str = "gradient"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_grow(self)


def final_rank(r: int, options: Any) -> int:
    """r1: ``options.grow_to``, or 2·r."""
    return int(options.grow_to) if options.grow_to is not None else 2 * int(r)


def grow_step_list(options: Any, total_steps: int | None) -> list[int] | None:
    """The growth steps of a run of ``total_steps`` (None when fractions need a T that is not known). ValueError when
    steps fall outside the run or collide."""
    entries = _parse_steps(options.grow_steps)
    if any(isinstance(v, float) for v in entries) and total_steps is None:
        return None
    steps = [v if isinstance(v, int) else math.ceil(v * total_steps) for v in entries]  # type: ignore[operator]
    if sorted(set(steps)) != steps:
        raise ValueError(
            f"grow_steps={options.grow_steps!r} gives the steps {steps} with total_steps={total_steps}: "
            "they must be strictly increasing"
        )
    if total_steps is not None and steps[-1] > total_steps:
        raise ValueError(
            f"grow_steps={options.grow_steps!r}: step {steps[-1]} is after the run's last step "
            f"(total_steps={total_steps}); that growth would never happen"
        )
    if options.directions == "gradient" and steps[0] < 2:
        raise ValueError(
            f"grow_steps={options.grow_steps!r} gives a growth after step {steps[0]} (total_steps="
            f"{total_steps}); directions='gradient' needs the first growth after step 2 or later"
        )
    return steps


# ---- the plans --------------------------------------------------------------------------------------------------------
def _pad(m: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if m is None:
        return None
    out = torch.eye(n, dtype=m.dtype, device=m.device)
    out[: m.shape[0], : m.shape[1]] = m
    return out


class _GrowSchedule:
    """The growth part of a plan: arm the capture one step before each growth, grow at the growth steps."""

    options: Any

    def _init_grow(self, options: Any, total_steps: int | None) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "rank growth replaces the adapter's parameters by bigger ones, which DDP / FSDP wrappers (registered "
                "once, at wrapping) would not see: train lora_grow / sds_grow on one process, or use lora / sds"
            )
        self.grow_steps = grow_step_list(options, total_steps) or []
        self.arms = options.directions == "gradient"

    def _grow_due(self, t: int) -> bool:
        return t in self.grow_steps or (self.arms and t + 1 in self.grow_steps)

    def _grow_run(self, layers: list[Any], t: int, out: StepOutcome) -> None:
        o = self.options
        if t in self.grow_steps:
            i = self.grow_steps.index(t)
            prepared = []
            for j, layer in enumerate(layers):
                target = layer.rank_after(i, len(self.grow_steps))
                if target <= layer.r:
                    continue
                gen = torch.Generator().manual_seed((o.seed * 1_000_003 + t) * 10_007 + j)
                prepared.append((layer, layer.prepare_growth(target, o.directions, gen)))
            infos = []
            for layer, growth in prepared:  # every growth computed before any layer changes
                out.replaced += layer.commit_growth(growth)
                infos.append(growth.info)
            for layer in layers:
                layer.disarm_capture()
            out.events.append(self._event(t, layers, infos))
        if self.arms and t + 1 in self.grow_steps:
            for layer in layers:
                layer.arm_capture()

    def _event(self, t: int, layers: list[Any], infos: list[dict[str, Any]]) -> dict[str, Any]:
        ranks = [layer.r for layer in layers]
        ev: dict[str, Any] = {
            "step": t,
            "event": "grow",
            "layers": len(infos),
            "rank": max(ranks),
            "rank_min": min(ranks),
            "directions": self.options.directions,
            "random_filled": sum(i["random_filled"] for i in infos),
        }
        for key in ("unreachable_share", "captured_share"):
            vals = [i[key] for i in infos if key in i and math.isfinite(i[key])]
            if vals:
                ev[f"{key}_mean"] = sum(vals) / len(vals)
        tops = [i["sigma"][0] for i in infos if i.get("sigma")]
        if tops:
            ev["sigma_top_max"] = max(tops)
        return ev


class GrowPlan(_GrowSchedule, StepPlan):
    """``lora_grow``'s plan: arm one step before each growth step, grow after it."""

    acts = True

    def __init__(self, options: GrowOptions, total_steps: int | None) -> None:
        super().__init__(options, total_steps)
        self._init_grow(options, total_steps)

    @classmethod
    def needs_total_steps(cls, options: Any) -> bool:
        return any(isinstance(v, float) for v in _parse_steps(options.grow_steps))

    def due(self, t: int) -> bool:
        return self._grow_due(t)

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        out = StepOutcome()
        if layers:
            self._grow_run(layers, t, out)
        return out


class SDSGrowPlan(_GrowSchedule, SDSPlan):
    """``sds_grow``'s plan: SDS-LoRA's schedule (:class:`SDSPlan`), then, at the same step, the growth."""

    fsdp2_ready = False  # growth replaces the parameters

    def __init__(self, options: SDSGrowOptions, total_steps: int | None) -> None:
        super().__init__(options, total_steps)
        self._init_grow(options, total_steps)

    @classmethod
    def needs_total_steps(cls, options: Any) -> bool:
        return SDSPlan.needs_total_steps(options) or GrowPlan.needs_total_steps(options)

    def due(self, t: int) -> bool:
        return SDSPlan.due(self, t) or self._grow_due(t)

    def atomic(self, layers: list[Any], t: int) -> bool:
        return not self._grow_due(t) and SDSPlan.atomic(self, layers, t)  # a growth replaces parameters: snapshot

    def run(self, layers: list[Any], t: int) -> StepOutcome:
        out = SDSPlan.run(self, layers, t) if SDSPlan.due(self, t) else StepOutcome()
        if not layers:
            return out
        grown = StepOutcome()
        self._grow_run(layers, t, grown)
        # SDS's duty of this step addressed the parameters the growth then replaced: address the new ones (the
        # Controller replaces first, then resets / maps); maps get identity blocks for the new rows / columns
        new_of = {id(old): new for old, new, _ in grown.replaced}
        out.reset_params = [new_of.get(id(p), p) for p in out.reset_params]
        maps = []
        for p, left, right in out.state_maps:
            new = new_of.get(id(p))
            if new is not None:
                left = _pad(left, new.shape[0])
                right = _pad(right, new.shape[1])
                p = new
            maps.append((p, left, right))
        out.state_maps = maps
        out.replaced += grown.replaced
        out.events += grown.events
        return out
