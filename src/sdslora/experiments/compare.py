"""Methods x seeds (x ranks) with everything else identical, resumable, followed by a report.

    cc = CompareConfig(base=RunConfig(model="minilm-l6", task="mrpc", steps=150), methods=["lora", "sds", "full"])
    summary = run_compare(cc, "runs/mrpc")        # writes runs/mrpc/report.md, results.json, *.png

Every run lives in ``<out>/runs/<method>-r<r>-s<seed>/`` (see :func:`~sdslora.experiments.train.run_train`): a run
whose folder holds ``done.json`` with the same config is skipped, so an interrupted comparison resumes where it
stopped; a folder holding a different run raises :class:`~sdslora.experiments.train.RunDirError`.

Learning rates: per method, ``lrs[method]`` if given, else ``base.lr``, else the per-method default table
(:data:`~sdslora.experiments.train.DEFAULT_LR`) — unless ``lr_sweep`` is given, which turns the comparison into a
**study** (the protocol of ``docs/evidence.md``):

* a validation split is carved from the training data (``val_fraction``, at most ``val_max`` rows, fixed seed 1234,
  disjoint from the rows trained on); every run of the study trains on the rest, so that all methods see the same
  data in the same order (the order is set by the seed);
* per method *and rank*, each learning rate of the grid is trained with the first seed and scored on the validation
  split (its primary metric, ties broken by the lower validation loss; generation tasks: the validation loss); when
  the best value sits on an edge of the grid, the grid is extended by one more step (the spacing at that edge) on
  that side, at most ``widen`` times, so that the chosen value is bracketed; the evaluation split is never used;
* the chosen learning rate is then trained with the other seeds (the first seed's run is the sweep's own);
* with ``evidence_dir`` every finished run's summary (config, learning rate, seed, metrics on the validation and
  evaluation splits, learning curve, train-loss curve, diagnostics) is written there as
  ``runs/<run>.json`` as soon as it finishes, and a run whose summary is there with the same config is not
  trained again: a study resumes across sessions from the repository alone. ``sdslora evidence`` rebuilds the
  report from those files.
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
from .run_config import RunConfig, with_defaults
from .run_folder import RunDirError, versions, write_json
from .train import prepare_data, run_train

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


VAL_SEED = 1234


def split_validation(rows: list[dict[str, Any]], fraction: float, cap: int) -> tuple[list, list]:
    """(rest, val): a validation split of ``min(cap, fraction·n)`` rows (at least 1) drawn with a fixed seed from
    the training rows, and the rows left to train on. The two never share a row (by position)."""
    if len(rows) < 2:
        raise ValueError(f"a validation split needs at least 2 training rows, got {len(rows)}")
    g = torch.Generator().manual_seed(VAL_SEED)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_val = max(1, min(cap, int(len(rows) * fraction), len(rows) - 1))
    val = [rows[i] for i in order[:n_val]]
    rest = [rows[i] for i in sorted(order[n_val:])]
    return rest, val



def selection_key(res: dict[str, Any], metric: str | None) -> tuple[float, float]:
    """How a sweep run is ranked (higher is better): its validation ``metric`` (None: none, loss only), ties broken
    by the lower validation loss; a diverged run (no finite value) ranks last."""
    val = res.get("val") or {}
    loss = val.get("loss")
    loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
    if metric is None:
        return (-loss, 0.0)
    m = val.get(metric)
    m = float(m) if isinstance(m, (int, float)) and math.isfinite(m) else -math.inf
    return (m, -loss)


def select_lr(keys: dict[float, tuple[float, float]]) -> tuple[float, str | None]:
    """The best learning rate of a sweep (``keys``: lr -> :func:`selection_key`; exact ties go to the smaller lr)
    and where it sits: ``"low"`` / ``"high"`` when on an edge of the grid (not bracketed), else None."""
    if not keys:
        raise ValueError("select_lr needs at least one scored learning rate")
    lrs = sorted(keys)
    best = max(lrs, key=lambda lr: (keys[lr], -lr))
    if len(lrs) == 1:
        return best, "low"
    edge = "low" if best == lrs[0] else "high" if best == lrs[-1] else None
    return best, edge


def widen_grid(lrs: list[float], edge: str) -> float:
    """The next learning rate beyond ``edge`` of the grid, one step of the spacing at that edge."""
    lrs = sorted(lrs)
    if len(lrs) < 2:
        return lrs[0] / 3 if edge == "low" else lrs[0] * 3
    if edge == "low":
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}")
    return float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}")


def _safe(method: str) -> str:
    """A method label as a folder name ("sds:lr_scale=0.35" -> "sds-lr_scale0.35")."""
    return method.replace(":", "-").replace("+", "-").replace("=", "")


def _run_name(method: str, r: int, seed: int, lr: float | None = None) -> str:
    tag = "" if lr is None else f"-lr{lr:g}"
    return f"{_safe(method)}-r{r}{tag}-s{seed}" if method != "full" else f"full{tag}-s{seed}"


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

    task = cc.base.get_task()
    train_rows, eval_rows = prepare_data(cc.base, task)
    study = cc.study
    val_rows = None
    if study:
        train_rows, val_rows = split_validation(train_rows, cc.val_fraction, cc.val_max)
    plan = planned_work(cc, len(train_rows))
    if progress:
        print(plan["text"], flush=True)

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

    runner = _Runner(cc, out, task, train_rows, eval_rows, val_rows, progress)
    runner.bar = _StepProgress(plan["runs"], plan["steps_per_run"], progress)
    try:
        if cc.evidence_dir:
            runner.write_setting()
        chosen, sweep = _choose_lrs(cc, runner)

        grid = cc.grid()
        results: list[dict[str, Any]] = []
        for method, r, seed in grid:
            results.append(runner.run(method, r, chosen[(method, r)], seed))
    finally:
        runner.bar.close()
    machine = versions()
    from .stats import baseline_rate

    summary = write_report(out, cc, results, synthetic=synthetic, sweep=sweep, machine=machine,
                           wall_s=time.perf_counter() - t_start, baseline=baseline_rate(task, eval_rows))
    if progress:
        print_summary(summary)
    return summary


EVIDENCE_FORMAT = "sdslora-evidence-run/1"


class _Runner:
    """Trains (or finds) one run of a comparison: in ``<out>/runs/<name>``, and, in a study with an evidence
    folder, found in or recorded to ``<evidence_dir>/runs/<name>.json``."""

    def __init__(self, cc: CompareConfig, out: Path, task: Any, train_rows: list, eval_rows: list,
                 val_rows: list | None, progress: bool) -> None:
        self.cc, self.out, self.task, self.progress = cc, out, task, progress
        self.train_rows, self.eval_rows, self.val_rows = train_rows, eval_rows, val_rows
        self.study = val_rows is not None
        self.evidence = Path(cc.evidence_dir) if cc.evidence_dir else None
        self.bar = _StepProgress(0, 0, False)  # run_compare sets the outer progress bar

    def config(self, method: str, r: int, lr: float, seed: int) -> RunConfig:
        return for_method(self.cc.base, method, r=r, seed=seed, lr=float(lr))

    def name(self, method: str, r: int, lr: float, seed: int) -> str:
        return _run_name(method, r, seed, lr if self.study else None)

    def run(self, method: str, r: int, lr: float, seed: int) -> dict[str, Any]:
        cfg = self.config(method, r, lr, seed)
        name = self.name(method, r, lr, seed)
        found = self._from_evidence(name, cfg)
        if found is not None:
            self.bar.skipped(name)
            return found
        run_dir = self.out / "runs" / name
        if _finished(run_dir, cfg):
            self.bar.skipped(name)
            res = run_train(cfg, run_dir, progress=self.progress, train_rows=self.train_rows,
                            eval_rows=self.eval_rows, val_rows=self.val_rows)
        else:
            with self.bar.track(name, run_dir / "metrics.jsonl") as track:
                res = run_train(cfg, run_dir, progress=self.progress, train_rows=self.train_rows,
                                eval_rows=self.eval_rows, val_rows=self.val_rows)
                track.finished(int(res.get("steps") or 0))
        res["run"] = name
        res["method"] = method  # the label the report groups by (a variant such as "sds:faithful" keeps its name)
        if self.evidence is not None:
            res["machine"] = versions()
            (self.evidence / "runs").mkdir(parents=True, exist_ok=True)
            write_json(self.evidence / "runs" / f"{name}.json", {"format": EVIDENCE_FORMAT, **res}, compact=True)
        return res

    def _from_evidence(self, name: str, cfg: RunConfig) -> dict[str, Any] | None:
        if self.evidence is None:
            return None
        f = self.evidence / "runs" / f"{name}.json"
        if not f.is_file():
            return None
        try:
            saved = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"evidence file {f} is not valid JSON ({e}); delete it to re-run that run") from e
        want = json.loads(json.dumps(cfg.to_dict()))
        got = with_defaults(saved.get("config") or {}, want)  # fields added since it was recorded: their defaults
        if got != want:
            diff = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
            raise RunDirError(f"evidence folder {self.evidence} holds run {name} with a different config (fields "
                              f"that differ: {diff[:8]}); use another --evidence folder for a different study")
        return saved

    def write_setting(self) -> None:
        """``setting.json``: what every run of this study shares (written once; a different study in the same
        folder is refused)."""
        assert self.evidence is not None
        from .stats import baseline_rate

        cc = self.cc
        base = {k: v for k, v in cc.base.to_dict().items() if k not in ("method", "options", "seed", "r", "lr")}
        setting = {
            "format": "sdslora-evidence-setting/1", "base": base, "options": cc.base.options,
            "methods": cc.methods, "seeds": cc.seeds, "ranks": cc.ranks or [cc.base.r],
            "lr_grids": {m: cc.grid_for(m) for m in cc.methods if m not in cc.lrs},
            "widen": cc.widen, "val_fraction": cc.val_fraction, "val_max": cc.val_max, "val_seed": VAL_SEED,
            "task": self.task.name, "kind": self.task.kind, "primary_metric": self.task.primary_metric,
            "n_train": len(self.train_rows), "n_val": len(self.val_rows or []), "n_eval": len(self.eval_rows),
            "baseline": baseline_rate(self.task, self.eval_rows),
            "val_baseline": baseline_rate(self.task, self.val_rows or []), "command": cc.command,
        }
        f = self.evidence / "setting.json"
        if f.is_file():
            old = json.loads(f.read_text())
            keep = ("base", "options", "val_fraction", "val_max", "val_seed", "task", "n_train", "n_val", "n_eval")
            if isinstance(old.get("base"), dict):  # fields added since it was written: their defaults
                old["base"] = with_defaults(old["base"], setting["base"])
            diff = [k for k in keep if json.dumps(old.get(k), sort_keys=True) != json.dumps(setting[k], sort_keys=True)]
            if diff:
                raise RunDirError(f"evidence folder {self.evidence} holds a study with different settings ({diff}); "
                                  "use another --evidence folder")
            # the grid may grow across sessions (more methods, seeds, ranks, learning rates): keep the union
            for k in ("methods", "seeds", "ranks"):
                setting[k] = list(dict.fromkeys([*(old.get(k) or []), *setting[k]]))
            setting["lr_grids"] = {**(old.get("lr_grids") or {}), **setting["lr_grids"]}
            setting["commands"] = list(dict.fromkeys([*old.get("commands", [old.get("command")]), cc.command]))
        else:
            setting["commands"] = [cc.command]
        self.evidence.mkdir(parents=True, exist_ok=True)
        write_json(f, setting)


def _choose_lrs(cc: CompareConfig, runner: _Runner) -> tuple[dict[tuple[str, int], float], dict[str, Any]]:
    """Learning rate per (method, rank), and how it was chosen (see the module docstring)."""
    chosen: dict[tuple[str, int], float] = {}
    sweep: dict[str, Any] = {}
    ranks = cc.ranks or [cc.base.r]
    combos = list(dict.fromkeys((m, r) for m, r, _ in cc.grid()))
    multi = len(ranks) > 1
    metric = runner.task.primary_metric if runner.task.kind == "classification" else None
    for m, r in combos:
        label = m if m == "full" or not multi else f"{m} r={r}"
        if m in cc.lrs:
            chosen[(m, r)] = float(cc.lrs[m])
            sweep[label] = {"source": "given"}
        elif cc.grid_for(m):
            grid = [float(x) for x in cc.grid_for(m)]
            keys: dict[float, tuple[float, float]] = {}
            scores: dict[str, Any] = {}
            widened = 0
            while True:
                for lr in grid:
                    if lr in keys:
                        continue
                    res = runner.run(m, r, lr, cc.seeds[0])
                    keys[lr] = selection_key(res, metric)
                    val = res.get("val") or {}
                    scores[f"{lr:g}"] = val.get(metric) if metric else val.get("loss")
                best, edge = select_lr(keys)
                if edge is None or widened >= cc.widen:
                    break
                grid = [*grid, widen_grid(list(keys), edge)]
                widened += 1
            chosen[(m, r)] = best
            sweep[label] = {"source": "sweep on a validation split of the training data", "scores": scores,
                            "selected_on": f"validation {metric}" if metric else "validation loss",
                            "bracketed": edge is None, "n_val": len(runner.val_rows or [])}
        else:
            chosen[(m, r)] = for_method(cc.base, m).learning_rate
            sweep[label] = {"source": "given (--lr)" if cc.base.lr is not None else "per-method default table"}
        sweep[label]["lr"] = chosen[(m, r)]
    return chosen, sweep


def planned_work(cc: CompareConfig, n_train: int) -> dict[str, Any]:
    """What a comparison will train, before it starts: ``runs`` (the grid, plus the learning-rate sweeps of a study;
    a sweep widened past its grid adds runs), ``steps_per_run`` (``base.steps``, else the epochs over ``n_train``
    rows) and a one-line ``text`` for the terminal. Runs already finished (or recorded as evidence) are counted
    here and skipped when reached."""
    b = cc.base
    per_epoch = math.ceil(max(1, n_train) / (b.batch_size * b.grad_accum))
    steps = b.steps if b.steps is not None else max(1, math.ceil(per_epoch * (b.epochs if b.epochs is not None
                                                                             else 1.0)))
    ranks = cc.ranks or [b.r]
    combos = list(dict.fromkeys((m, r) for m, r, _ in cc.grid()))
    runs, widen = 0, 0
    for m, _r in combos:
        grid = cc.grid_for(m) if m not in cc.lrs else None
        if grid:  # sweep with the first seed (the chosen rate's run is that seed's), then the other seeds
            runs += len(grid) + len(cc.seeds) - 1
            widen += cc.widen
        else:
            runs += len(cc.seeds)
    text = (f"compare: {runs} run{'s' if runs != 1 else ''} x {steps} optimizer steps = {runs * steps:,} steps"
            + (f" (up to {widen} more runs if a learning-rate grid is widened)" if widen else "")
            + f"; {len(cc.methods)} method(s) x {len(ranks)} rank(s) x {len(cc.seeds)} seed(s)"
            + ("; the synthetic kappa sweep first" if cc.synthetic else "")
            + "; runs already finished in the output folder are skipped")
    return {"runs": runs, "steps_per_run": steps, "total_steps": runs * steps, "text": text}


def _finished(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds this run finished (run_train will return its results without training)."""
    from .run_folder import run_state

    try:
        return (run_dir / "done.json").is_file() and run_state(run_dir, cfg.to_dict()) == "done"
    except RunDirError:
        return False  # run_train raises it with its message


class _StepProgress:
    """The outer progress bar of a comparison, in optimizer steps over all its runs: the expected total is shown
    before the first run, and the ETA from the first step (a thread follows the running run's ``metrics.jsonl``,
    one record per optimizer step). A run that is skipped (finished before, or recorded as evidence) takes its
    steps off the total instead of adding them to the count, so that the rate and the ETA are those of training."""

    POLL_S = 0.5

    def __init__(self, runs: int, steps_per_run: int, enabled: bool) -> None:
        self.enabled = enabled
        self.steps_per_run = steps_per_run
        self.planned_runs = runs
        self.seen: set[str] = set()
        self.n_skipped = 0
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=runs * steps_per_run, desc="compare", unit="step", position=0, leave=True,
                            smoothing=0.05, dynamic_ncols=True)

    def _new_run(self, name: str, skipped: bool = False) -> bool:
        """Count run ``name`` once (a study's seed-0 run is met again in the grid: already counted)."""
        if name in self.seen:
            return False
        self.seen.add(name)
        self.n_skipped += skipped
        if self.bar is not None:
            if len(self.seen) > self.planned_runs:  # a widened sweep: one more run than planned
                self.bar.total += self.steps_per_run
            self.bar.set_postfix_str(name + (f", {self.n_skipped} skipped" if self.n_skipped else ""), refresh=True)
        return True

    def skipped(self, name: str) -> None:
        if self._new_run(name, skipped=True) and self.bar is not None:
            self.bar.total = max(self.bar.n, self.bar.total - self.steps_per_run)
            self.bar.refresh()

    def track(self, name: str, metrics_file: Path) -> _RunTracker:
        return _RunTracker(self if self._new_run(name) else _StepProgress(0, 0, False), metrics_file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _RunTracker:
    """Counts one run's optimizer steps into the outer bar while it trains (see :class:`_StepProgress`)."""

    def __init__(self, owner: _StepProgress, metrics_file: Path) -> None:
        self.owner, self.file = owner, metrics_file
        self.credited = 0
        self._offset = metrics_file.stat().st_size if metrics_file.is_file() else 0  # an older run's records
        self._buf = b""
        self._stop = None
        self._thread = None

    def __enter__(self) -> _RunTracker:
        if self.owner.bar is not None:
            import threading

            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._follow, name="sdslora-compare-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()  # type: ignore[union-attr]
            self._thread.join()

    def _follow(self) -> None:
        while not self._stop.wait(self.owner.POLL_S):  # type: ignore[union-attr]
            self._poll()

    def _poll(self) -> None:
        try:
            size = self.file.stat().st_size
            if size < self._offset:  # the run (re)wrote its file from the start
                self._offset, self._buf = 0, b""
            if size == self._offset:
                return
            with open(self.file, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
        except OSError:
            return
        self._offset += len(chunk)
        lines = (self._buf + chunk).split(b"\n")
        self._buf = lines.pop()  # a line not yet complete
        n = sum(1 for line in lines if b'"loss"' in line)
        n = min(n, self.owner.steps_per_run - self.credited)
        if n > 0:
            self.credited += n
            self.owner.bar.update(n)

    def finished(self, steps: int) -> None:
        """The run ended with ``steps`` optimizer steps: count what the poller has not, fix the planned total."""
        if self._thread is not None:
            self._stop.set()  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None
        bar = self.owner.bar
        if bar is None:
            return
        if steps != self.owner.steps_per_run:
            bar.total += steps - self.owner.steps_per_run
        if steps > self.credited:
            bar.update(steps - self.credited)
            self.credited = steps


def _cc_dict(cc: CompareConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cc)
    d["base"] = cc.base.to_dict()
    return d


def print_summary(summary: dict[str, Any]) -> None:
    """The comparison table on the terminal (rich if installed, plain text otherwise)."""
    from .report import TIMING_NOTE, baseline_row

    rows = list(summary["table"])
    cols = summary["table_columns"]
    runs = summary.get("runs") or []
    base = baseline_row(summary["setup"].get("baseline"), runs[0].get("primary_metric"), cols) if runs else None
    if base is not None:
        rows.append(base)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"sdslora compare: {summary['setup']['task']} ({summary['setup']['model']})")
        for c in cols:
            t.add_column(c, justify="right" if c not in ("method",) else "left")
        for row in rows:
            t.add_row(*[str(row.get(c, "")) for c in cols])
        import sys

        # not a terminal (a log file, CI): a wide console so that the table is not cut at 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(t)
    except ImportError:
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in cols))
    print(TIMING_NOTE.replace("`", ""))
