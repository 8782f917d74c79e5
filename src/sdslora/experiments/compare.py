"""Methods x seeds (x ranks) with everything else identical, resumable, followed by a report.

    cc = CompareConfig(base=RunConfig(model="minilm-l6", task="mrpc", steps=150), methods=["lora", "sds", "full"])
    summary = run_compare(cc, "runs/mrpc")        # writes runs/mrpc/report.md, results.json, *.png

Every run lives in ``<out>/runs/<method>-r<r>-s<seed>/`` (see :func:`~sdslora.experiments.train.run_train`): a run
whose folder holds ``done.json`` with the same config is skipped, so an interrupted comparison resumes where it
stopped; a folder holding a different run raises :class:`~sdslora.experiments.train.RunDirError`.

Learning rates: per method, ``lrs[method]`` if given, else (``lr_sweep``) the best of a small sweep trained on the
training data minus a validation split carved from it (``val_fraction``, at most ``val_max`` rows, fixed seed) and
scored on that split — never on the evaluation set —, else ``base.lr``, else the per-method default table
(:data:`~sdslora.experiments.train.DEFAULT_LR`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import parse_value
from ..methods import get_method
from .train import RunConfig, RunDirError, prepare_data, run_train, versions, write_json

DEMO_STEPS = 150


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

    def grid(self) -> list[tuple[str, int, int]]:
        """(method, r, seed) of every run, in run order (seed-major, so a partial grid has every method)."""
        ranks = self.ranks or [self.base.r]
        out = []
        for seed in self.seeds:
            for r in ranks:
                for m in self.methods:
                    if m == "full" and r != ranks[0]:
                        continue  # full fine-tuning has no rank: run it once per seed
                    out.append((m, r, seed))
        return out


def demo_config(command: str = "sdslora compare") -> CompareConfig:
    """The main job: all-MiniLM-L6-v2 on MRPC (shipped subset), LoRA vs SDS-LoRA vs full fine-tuning at rank 8 on
    every encoder linear layer (36), classification head trained in every method, diagnostics on, synthetic κ
    sweep first. Sized for about 10 minutes on 2 CPU cores."""
    base = RunConfig(model="minilm-l6", task="mrpc", data_dir=None, targets="all-linear", exclude=["pooler"],
                     modules_to_save=["classifier"], r=8, alpha=4.0, steps=DEMO_STEPS, batch_size=16,
                     max_length=128, diagnostics_every=30, seed=0, scheduler="cosine", eval_batch_size=64)
    return CompareConfig(base=base, methods=["lora", "sds", "full"], seeds=[0], synthetic=True, command=command)


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


def _split_validation(rows: list[dict[str, Any]], fraction: float, cap: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(1234)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_val = max(1, min(cap, int(len(rows) * fraction)))
    val = [rows[i] for i in order[:n_val]]
    rest = [rows[i] for i in order[n_val:]]
    return rest, val


def _safe(method: str) -> str:
    """A method label as a folder name ("sds:lr_scale=0.35" -> "sds-lr_scale0.35")."""
    return method.replace(":", "-").replace("+", "-").replace("=", "")


def _run_name(method: str, r: int, seed: int) -> str:
    return f"{_safe(method)}-r{r}-s{seed}" if method != "full" else f"full-s{seed}"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not (out / "compare.json").is_file():
        raise RunDirError(f"output folder {out} is not empty and holds no sdslora comparison; choose an empty or "
                          "new folder")


def run_compare(cc: CompareConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid and write the report; returns the content of ``results.json``."""
    from .report import write_report

    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"compare": _cc_dict(cc)})
    t_start = time.perf_counter()

    synthetic = None
    if cc.synthetic:
        syn_file = out / "synthetic.json"
        if syn_file.is_file() and json.loads(syn_file.read_text()).get("setup", {}).get("max_steps") == \
                cc.synthetic_max_steps:
            synthetic = json.loads(syn_file.read_text())
        else:
            from .synthetic import kappa_sweep

            if progress:
                print("synthetic kappa sweep (128x128 least squares, rank 8) ...", flush=True)
            synthetic = kappa_sweep(max_steps=cc.synthetic_max_steps)
            write_json(syn_file, synthetic)

    task = cc.base.get_task()
    train_rows, eval_rows = prepare_data(cc.base, task)
    chosen_lr, sweep = _choose_lrs(cc, out, train_rows, progress)

    grid = cc.grid()
    results: list[dict[str, Any]] = []
    bar = _bar(len(grid), "grid", progress)
    for method, r, seed in grid:
        cfg = for_method(cc.base, method, r=r, seed=seed, lr=chosen_lr[method])
        name = _run_name(method, r, seed)
        bar.set_postfix_str(name)
        res = run_train(cfg, out / "runs" / name, progress=progress, train_rows=train_rows, eval_rows=eval_rows)
        res["run"] = name
        res["method"] = method  # the label the report groups by (a variant such as "sds:faithful" keeps its name)
        results.append(res)
        bar.update(1)
    bar.close()
    machine = versions()
    summary = write_report(out, cc, results, synthetic=synthetic, sweep=sweep, machine=machine,
                           wall_s=time.perf_counter() - t_start)
    if progress:
        print_summary(summary)
    return summary


def _choose_lrs(cc: CompareConfig, out: Path, train_rows: list, progress: bool
                ) -> tuple[dict[str, float], dict[str, Any]]:
    chosen: dict[str, float] = {}
    sweep: dict[str, Any] = {}
    rest = val = None
    for m in cc.methods:
        if m in cc.lrs:
            chosen[m] = float(cc.lrs[m])
            sweep[m] = {"source": "given"}
        elif cc.lr_sweep:
            if rest is None:
                rest, val = _split_validation(train_rows, cc.val_fraction, cc.val_max)
            scores = {}
            for lr in cc.lr_sweep:
                cfg = for_method(cc.base, m, lr=float(lr), seed=cc.seeds[0])
                res = run_train(cfg, out / "sweep" / f"{_safe(m)}-lr{lr:g}", progress=progress, train_rows=rest,
                                eval_rows=val)
                scores[f"{lr:g}"] = res["eval"][res["primary_metric"]]
            best = max(scores, key=lambda k: (scores[k], -float(k)))
            chosen[m] = float(best)
            sweep[m] = {"source": "sweep on a validation split of the training data", "scores": scores,
                        "n_val": len(val or [])}
        else:
            chosen[m] = for_method(cc.base, m).learning_rate
            sweep[m] = {"source": "given (--lr)" if cc.base.lr is not None else "per-method default table"}
        sweep[m]["lr"] = chosen[m]
    return chosen, sweep


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, position=0, leave=True)


def _cc_dict(cc: CompareConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cc)
    d["base"] = cc.base.to_dict()
    return d


def print_summary(summary: dict[str, Any]) -> None:
    """The comparison table on the terminal (rich if installed, plain text otherwise)."""
    rows = summary["table"]
    cols = summary["table_columns"]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"sdslora compare: {summary['setup']['task']} ({summary['setup']['model']})")
        for c in cols:
            t.add_column(c, justify="right" if c not in ("method",) else "left")
        for row in rows:
            t.add_row(*[str(row.get(c, "")) for c in cols])
        Console().print(t)
    except ImportError:
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in cols))


def fmt_mean_std(xs: list[float], digits: int = 4) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"
