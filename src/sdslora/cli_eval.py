"""``sdslora eval``: evaluate a base model + saved adapter folder on a task; prints and writes the metrics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a base model + adapter folder on a task")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on (folder or "
                                                  "embedded name)")
    p.add_argument("--adapter", help="an sdslora adapter folder (save_adapter / a run's adapter/); omit to "
                                     "evaluate the base model")
    p.add_argument("--task", help="registered task name")
    p.add_argument("--eval-file", help="evaluation file (with --format)")
    p.add_argument("--format", help="format of --eval-file: cls, alpaca-number, alpaca-letter, alpaca-choice")
    p.add_argument("--data-dir")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-mode", choices=["generate", "loglik"], default="generate")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", "-o", help="JSON file for the metrics (default: <adapter>/../eval-<task>.json "
                                          "when --adapter is given)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        metrics, out = evaluate_cli(args)
    except (ValueError, TypeError) as e:
        print(f"sdslora eval: error: {e}", file=sys.stderr)
        return 2
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if out is not None:
        print(f"written: {out}")
    return 0


def evaluate_cli(args: argparse.Namespace) -> tuple[dict, Path | None]:
    from .data import resolve_data_dir
    from .experiments.data import evaluate
    from .experiments.models import load_model
    from .experiments.run_folder import write_json
    from .io import load_adapter
    from .tasks import file_task, get_task

    if args.task is None and args.eval_file is None:
        raise ValueError("give --task NAME or --eval-file FILE --format FMT")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit must be an int >= 1, got {args.eval_limit}")
    task = get_task(args.task) if args.task else file_task(args.format or "", None, args.eval_file)
    rows = task.load("eval", resolve_data_dir(args.data_dir))
    if args.eval_limit:
        rows = rows[: args.eval_limit]
    model, tok, _ = load_model(args.model, task.kind, max(task.num_labels, 2))
    if args.adapter:
        model = load_adapter(model, args.adapter)
    metrics = evaluate(model, tok, task, rows, max_length=args.max_length, eval_mode=args.eval_mode,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    metrics["task"] = task.name
    metrics["model"] = args.model
    metrics["adapter"] = args.adapter
    out = Path(args.output) if args.output else (
        Path(args.adapter).resolve().parent / f"eval-{task.name}.json" if args.adapter else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
    return metrics, out
