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
from pathlib import Path
from typing import Any

from ..config import parse_value  # noqa: F401  (importable from here as before)
from ..methods import get_method  # noqa: F401  (importable from here as before)
from .compare_config import (  # noqa: F401  (DEMO_LRS, demo_config, parse_method, ...: importable from here)
    DEMO_LRS,
    DEMO_STEPS,
    CompareConfig,
    demo_config,
    for_method,
    parse_method,
)
from .compare_progress import _RunTracker, _StepProgress  # noqa: F401  (importable from here)
from .lr_sweep import (  # noqa: F401  (select_lr, selection_key, widen_grid: importable from here)
    VAL_SEED,
    _choose_lrs,
    select_lr,
    selection_key,
    split_validation,
    widen_grid,
)
from .report_text import print_summary
from .run_config import RunConfig, with_defaults
from .run_folder import RunDirError, folder_lock, versions, write_json
from .train import prepare_data, run_train


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
        with folder_lock(self.evidence):  # studies of one setting may start side by side: merge, never overwrite
            self._merge_setting(f, setting)

    def _merge_setting(self, f: Path, setting: dict[str, Any]) -> None:
        cc = self.cc
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
        write_json(f, setting)


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


def _cc_dict(cc: CompareConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cc)
    d["base"] = cc.base.to_dict()
    return d
