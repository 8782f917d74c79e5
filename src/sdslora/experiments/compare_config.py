"""What a comparison runs: :class:`CompareConfig` (methods, seeds, ranks, learning rates), the demo, method variants.

See :mod:`~sdslora.experiments.compare` for how a comparison (or a learning-rate study) runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import parse_value
from ..methods import get_method
from .run_config import RunConfig

DEMO_STEPS = 240
DEMO_LRS = {"lora": 1e-3, "sds": 1e-3, "full": 1e-4}
"""The demo's learning rates: those the MRPC study (docs/evidence.md, setting ``minilm-mrpc``: the same model, data,
rank, batch and steps) chose on its validation split."""


@dataclass
class CompareConfig:
    """A comparison: ``base`` (everything shared) and the grid.

    Args:
        base: the shared :class:`RunConfig` (its ``method``, ``seed``, ``r`` are replaced per run).
        methods: method names (default lora, sds, full).
        seeds: seeds (default [0, 1]).
        ranks: ranks (default: ``[base.r]``); ignored for ``full``.
        lrs: per-method learning rates that override everything else.
        lr_sweep: learning rates to try per method on the validation split (None: no sweep).
        val_fraction, val_max: size of the validation split carved from the training data for the sweep.
        loss_target: train-loss level for "steps to target" (None: the highest final train loss among the
            methods, so that every method reaches it).
        synthetic: also run the synthetic κ sweep (:mod:`~sdslora.experiments.synthetic`) for the report.
        synthetic_max_steps: its step budget per run.
        command: the command line, recorded in the report.
    """

    base: RunConfig = field(default_factory=RunConfig)
    methods: list[str] = field(default_factory=lambda: ["lora", "sds", "full"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    ranks: list[int] | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    lr_sweep: list[float] | None = None
    val_fraction: float = 0.1
    val_max: int = 200
    loss_target: float | None = None
    synthetic: bool = False
    synthetic_max_steps: int = 2000
    command: str = ""
    widen: int = 2
    evidence_dir: str | None = None
    lr_grids: dict[str, list[float]] = field(default_factory=dict)

    @property
    def study(self) -> bool:
        """A learning-rate study (validation split, per-method-and-rank sweeps): ``lr_sweep`` or ``lr_grids``."""
        return bool(self.lr_sweep) or bool(self.lr_grids)

    def grid_for(self, method: str) -> list[float] | None:
        """The learning rates swept for ``method``: its own grid, else the shared ``lr_sweep``."""
        return self.lr_grids.get(method) or self.lr_sweep

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("compare needs at least one method")
        if not self.seeds:
            raise ValueError("compare needs at least one seed")
        for m in self.methods:
            for_method(self.base, m)  # validates the method name
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("methods and seeds must not repeat")
        unknown = sorted(set(self.lrs) - set(self.methods))
        if unknown:
            raise ValueError(f"lrs given for method(s) {unknown} that are not compared ({self.methods})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not isinstance(self.val_max, int) or isinstance(self.val_max, bool) or self.val_max < 1:
            raise ValueError(f"val_max must be an int >= 1, got {self.val_max!r}")
        if not isinstance(self.widen, int) or isinstance(self.widen, bool) or self.widen < 0:
            raise ValueError(f"widen must be an int >= 0, got {self.widen!r}")
        for what, g in [("lr_sweep", self.lr_sweep), *((f"lr_grids[{m!r}]", v) for m, v in self.lr_grids.items())]:
            if g is None:
                continue
            bad = [x for x in g if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                        and x > 0)]
            if bad or len(set(g)) != len(g) or not g:
                raise ValueError(f"{what} must hold distinct positive learning rates, got {g}")
        unknown = sorted(set(self.lr_grids) - set(self.methods))
        if unknown:
            raise ValueError(f"lr_grids given for method(s) {unknown} that are not compared ({self.methods})")
        if self.lr_grids and not self.lr_sweep and set(self.lr_grids) != set(self.methods) - set(self.lrs):
            missing = sorted(set(self.methods) - set(self.lrs) - set(self.lr_grids))
            raise ValueError(f"no learning-rate grid for method(s) {missing}: give each compared method a grid "
                             "(--lr-sweep METHOD=a,b,c) or a shared one (--lr-sweep a,b,c)")
        if self.evidence_dir is not None and not self.study:
            raise ValueError("evidence_dir records a study: give lr_sweep (--lr-sweep) too, so that learning rates are "
                             "chosen on a validation split")

    def grid(self) -> list[tuple[str, int, int]]:
        """(method, r, seed) of every run, in run order (seed-major, so a partial grid has every method)."""
        ranks = self.ranks or [self.base.r]
        out = []
        for seed in self.seeds:
            for r in ranks:
                for m in self.methods:
                    if m == "full":  # no rank: once per seed, under the base config's r whatever the ranks
                        if r == ranks[0]:  # (so that a study adding ranks later reuses its full runs)
                            out.append((m, self.base.r, seed))
                        continue
                    out.append((m, r, seed))
        return out


def demo_config(command: str = "sdslora compare") -> CompareConfig:
    """The main job: all-MiniLM-L6-v2 on MRPC (the subset shipped in the package, the full GLUE dev set for
    evaluation, on every machine), LoRA vs SDS-LoRA vs full fine-tuning at rank 8 on every encoder linear layer
    (36), classification head trained in every method, 240 steps of batch 16, each method at the learning rate the
    MRPC study chose on its validation split (:data:`DEMO_LRS`), diagnostics on, synthetic κ sweep first. Sized for
    about 10 minutes on 2 CPU cores."""
    from ..cli_train import DEFAULT_EXCLUDE  # the one default of train and compare: the pooler is not adapted
    from ..data import SHIPPED_MRPC

    base = RunConfig(model="minilm-l6", task="mrpc", data_dir=str(SHIPPED_MRPC.parent), targets="all-linear",
                     exclude=list(DEFAULT_EXCLUDE), modules_to_save=["classifier"], r=8, alpha=4.0, steps=DEMO_STEPS,
                     batch_size=16, max_length=128, diagnostics_every=80, seed=0, scheduler="cosine",
                     eval_batch_size=128)
    return CompareConfig(base=base, methods=["lora", "sds", "full"], seeds=[0], lrs=dict(DEMO_LRS), synthetic=True,
                         command=command)


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """``"sds"`` -> ("sds", {}); a variant ``"sds:faithful"`` -> ("sds", {"faithful": True});
    ``"sds:lr_scale=0.35+refresh_align=qr"`` -> ("sds", {"lr_scale": 0.35, "refresh_align": "qr"}). A bare key
    means True; values are parsed like ``--option`` values. The options are validated against the method's."""
    name, sep, variant = label.partition(":")
    spec = get_method(name.strip())  # unknown method -> ValueError listing the methods
    opts: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in variant.split("+"))):
        key, eq, value = item.partition("=")
        opts[key.strip()] = parse_value(value) if eq else True
    if sep and not opts:
        raise ValueError(f"method variant {label!r} names no option: use e.g. 'sds:faithful' or 'sds:lr_scale=0.35'")
    spec.parse_options(opts)  # unknown option / bad value -> ValueError naming it
    return spec.name, opts


def for_method(base: RunConfig, method: str, **changes: Any) -> RunConfig:
    """``base`` for ``method`` (a method name or a variant ``name:key=value+...``, see :func:`parse_method`): method
    options that this method does not have are dropped (``--option`` applies to every compared method that has that
    option, e.g. SDS-LoRA's ``warmup_steps``), then the variant's options are set. Full fine-tuning runs without
    diagnostics (its effective gradient is G itself)."""
    name, variant = parse_method(method)
    known = {f.name for f in dataclasses.fields(get_method(name).options_cls)}
    opts = {k: v for k, v in base.options.items() if k in known} | variant
    if name == "full":  # no factors: G̃ = G, nothing to diagnose (and probes cost ~10 steps each)
        changes.setdefault("diagnostics_every", 0)
    return dataclasses.replace(base, method=name, options=opts, **changes)
