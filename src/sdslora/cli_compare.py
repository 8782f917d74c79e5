"""``sdslora compare``: methods x seeds (x ranks) with everything else identical, then a report.

With no task, model or data arguments it runs the demo preset (all-MiniLM-L6-v2 on the shipped MRPC subset, LoRA vs
SDS-LoRA vs full fine-tuning at rank 8, diagnostics on, synthetic κ sweep first), sized for ~10 minutes on 2 CPU
cores; see :func:`sdslora.experiments.compare.demo_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from .cli_train import _csv, add_run_arguments, build_run_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare methods x seeds (x ranks) on one task and write a report "
                                       "(no arguments: the MiniLM/MRPC demo)")
    add_run_arguments(p, grid=True)
    p.add_argument("--methods", help="comma-separated methods (default lora,sds,full); a variant of a method is "
                   "name:key=value+key=value, e.g. sds:faithful (a bare key means true)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1; demo: 0)")
    p.add_argument("--ranks", help="comma-separated ranks (default 8)")
    p.add_argument("--lr", action="append", dest="method_lr", metavar="METHOD=LR", help="learning rate of a method (repeatable); "
                                                                      "a bare number sets it for every method")
    p.add_argument("--lr-sweep", action="append", metavar="[METHOD=]LR,LR,...",
                   help="learning-rate grid tried per method and rank on a validation split of the training data "
                        "(a study, see docs/evidence.md); METHOD=... gives that method its own grid (repeatable)")
    p.add_argument("--val-max", type=int, help="size cap of the validation split carved from the training data "
                   "(default 200)")
    p.add_argument("--widen", type=int, help="times the sweep grid may be extended past an edge that holds the best "
                   "learning rate (default 2)")
    p.add_argument("--evidence", help="study record folder (with --lr-sweep): each finished run's summary is written "
                   "there and runs already recorded are not trained again; rebuild the report with sdslora evidence")
    p.add_argument("--loss-target", type=float, help="train-loss level for 'steps to target'")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="run the synthetic κ sweep first (default: on in the demo, off otherwise)")
    p.add_argument("--output", "-o", default=None, help="comparison folder (default: runs/compare-<task>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


_DATA_FLAGS = ("config", "model", "task", "train_file", "eval_file", "format")


def build_compare_config(args: argparse.Namespace, argv_text: str) -> tuple[object, str]:
    from .experiments.compare import CompareConfig, demo_config

    demo = all(getattr(args, f, None) is None for f in _DATA_FLAGS)
    if demo:
        cc = demo_config(argv_text)
        base_fields = cc.base.to_dict()
        from .cli_train import run_config_fields

        base_fields.update(run_config_fields(args))  # flags still override the preset (e.g. --steps)
        cc.base = type(cc.base).from_dict(base_fields)
    else:
        cc = CompareConfig(base=build_run_config(args), command=argv_text)
    if args.methods:
        cc.methods = _csv(args.methods)
    if args.seeds:
        cc.seeds = [int(s) for s in _csv(args.seeds)]
    if args.ranks:
        cc.ranks = [int(s) for s in _csv(args.ranks)]
    lrs: dict[str, float] = dict(cc.lrs)  # the demo preset's learning rates, unless flags replace them
    for item in args.method_lr or []:
        m, sep, v = item.rpartition("=")  # the last "=": a variant label may hold "=" itself
        if sep:
            lrs[m.strip()] = float(v)
        else:  # one rate for every method: also replaces the preset's per-method rates
            cc.base = dataclasses.replace(cc.base, lr=float(v))
            lrs = {}
    cc.lrs = {m: v for m, v in lrs.items() if m in cc.methods}
    for item in args.lr_sweep or []:
        m, sep, values = item.rpartition("=")
        grid = [float(x) for x in _csv(values) or []]
        if sep:
            cc.lr_grids[m.strip()] = grid
        else:
            cc.lr_sweep = grid
    if args.val_max is not None:
        cc.val_max = args.val_max
    if args.widen is not None:
        cc.widen = args.widen
    if args.evidence:
        cc.evidence_dir = args.evidence
    if args.loss_target is not None:
        cc.loss_target = args.loss_target
    if args.synthetic is not None:
        cc.synthetic = args.synthetic
    cc.__post_init__()
    out = args.output or f"runs/compare-{cc.base.task or 'files'}"
    return cc, out


def run(args: argparse.Namespace) -> int:
    from .experiments.compare import run_compare

    argv_text = "sdslora " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", sys.argv[1:]))
    try:
        cc, out = build_compare_config(args, argv_text)
        summary = run_compare(cc, out, progress=not args.no_progress)
    except (ValueError, TypeError, FloatingPointError) as e:
        print(f"sdslora compare: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out}/report.md ({summary['setup']['wall_s']:.0f} s)")
    return 0
