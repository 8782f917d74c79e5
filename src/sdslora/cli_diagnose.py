"""``sdslora diagnose``: is the adapter bending the gradient? A per-layer table and a verdict in plain words.

    sdslora diagnose --run runs/sds                                   # a run folder written by `sdslora train`
    sdslora diagnose --model minilm-l6 --adapter runs/sds/adapter --task mrpc        # the same, spelled out
    sdslora diagnose --model DIR --adapter DIR --train-file train.tsv --format cls [--batch-size 16 --max-length 128]
    sdslora diagnose --history runs/lora runs/sds --out plots/        # history plots, one line per run

The model is rebuilt the way ``sdslora train`` / ``sdslora eval`` build it (:func:`sdslora.experiments.models.
load_model`: a local Hugging Face folder or an embedded name such as ``minilm-l6``, with the head the task needs: a
``num_labels``-way sequence-classification head for classification tasks, a causal LM for generation tasks), then
the adapter is loaded onto it (:func:`sdslora.load_adapter`). The probe batch is the first ``--batch-size`` examples
of the task's training split, tokenised and padded as ``train`` does (:func:`sdslora.experiments.data.encode`,
:class:`~sdslora.experiments.data.Collator`) — the batch ``train --diagnostics-every N`` probes, so the numbers are
comparable with the run's ``diagnostics.jsonl`` (for runs of ``sdslora compare`` with a validation split, whose
training rows exclude that split, the probe can differ).

``--run RUN_DIR`` reads ``RUN_DIR/run.json`` (model, task or train file and format, data_dir, train_limit,
max_length, batch_size, seed) and loads ``RUN_DIR/adapter``; any of ``--model``, ``--adapter``, ``--task``,
``--train-file``/``--format``, ``--data-dir``, ``--train-limit``, ``--batch-size``, ``--max-length`` given with it
overrides the run's value (e.g. a data folder that moved). A full fine-tuning run has no adapter: diagnose needs one.
Without ``--run``, ``--model`` with ``--task`` (or ``--train-file`` + ``--format``) says what to build; without
``--adapter`` the base model itself is diagnosed as full fine-tuning.

``--data FILE`` (the older probe input, instead of the task's training data): JSONL with a ``"text"`` field (and
``"label"`` for classification), or TSV with a header naming a ``text`` or ``sentence`` column (and ``label``).
Without a task the head follows the model's config (``...ForSequenceClassification`` in ``architectures``: that
classifier; else a causal LM, whose labels are the input ids, padding ignored).

Verdict thresholds (also in docs/diagnostics.md; :func:`sdslora.diagnostics.verdict`): factors are *well
conditioned* when the median over layers of max(κ_A, κ_B) is below 3, *moderately* below 10, *badly* otherwise;
the effective gradient rank (mean Roy–Vetterli effective rank of ∇_A and ∇_B) is *low* below r/2; the alignment
cos(G, G̃) is *poor* below 0.5, *fair* below 0.8, *good* otherwise. For LoRA with any of these problems the verdict
adds that SDS-LoRA removes the anisotropic scaling.

``--history RUN_DIR_OR_JSONL ...`` (several after one flag, or the flag repeated): a run folder (its
``diagnostics.jsonl``, written by ``train --diagnostics-every N``) or a DiagnosticsRecorder / DiagnosticsCallback
JSONL file. Writes PNG plots of alignment, effective rank, stable rank and basis similarity over training into
``--out`` (default ``.``); each line is labelled with its run's folder name (:func:`sdslora.diagnostics.plots.
history_labels`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from .cli_diagnose_probe import (  # noqa: F401  (read_examples, lm_batch, probe_fields, ...: importable from here)
    _RUN_FIELDS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_SEED,
    _adapter_folder,
    _model_kind,
    _read_run,
    build_probe,
    lm_batch,
    probe_fields,
    read_examples,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="gradient diagnostics of a trained adapter on a probe batch; history plots",
        description="Per-layer gradient diagnostics of an adapter (rebuilt as `sdslora train` built it) on a probe "
        "batch of the task's training data, with a verdict in plain words; and plots of diagnostics histories.",
    )
    g = p.add_argument_group("what to diagnose")
    g.add_argument("--run", help="a run folder written by `sdslora train` (run.json + adapter/)")
    g.add_argument("--model", help="local Hugging Face model folder, or minilm-l6 / smollm2-135m (as for train)")
    g.add_argument("--adapter", help="sdslora adapter folder (a run's adapter/); omit to diagnose the base model "
                                     "as full fine-tuning")
    g.add_argument("--task", help="registered task (as for train): its training data forms the probe batch")
    g.add_argument("--train-file", help="training file (with --format), as for train")
    g.add_argument("--format", help="format of --train-file: cls, alpaca-number, alpaca-letter, alpaca-choice")
    g.add_argument("--data-dir", help="local data folder (default: $SDSLORA_DATA_DIR; MRPC ships in the package)")
    g.add_argument("--train-limit", type=int, help="as for train: the first N rows of the shuffled training data")
    g.add_argument("--data", help="probe file instead of the task's training data: JSONL with a 'text' field, or "
                                  "TSV with a text/sentence column")
    g.add_argument("--batch-size", type=int, help=f"probe batch size (default: the run's, else {DEFAULT_BATCH_SIZE})")
    g.add_argument("--max-length", type=int, help=f"tokens per example (default: the run's, else "
                                                  f"{DEFAULT_MAX_LENGTH})")
    g.add_argument("--json", dest="json_out", help="also write the per-layer rows and summary to this JSON file")
    h = p.add_argument_group("history plots")
    h.add_argument(
        "--history",
        action="extend",
        nargs="+",
        default=[],
        metavar="RUN_DIR_OR_JSONL",
        help="run folders (their diagnostics.jsonl) or diagnostics JSONL files to plot, one line per run "
        "(several after one flag, or the flag repeated)",
    )
    h.add_argument("--out", default=".", help="folder for the PNG plots (default .)")
    p.set_defaults(func=run)


# ---- output ------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v)


COLUMNS = [
    ("cos_g_geff", "cos(G,G̃)"),
    ("cos_geff_gstar", "cos(G̃,G*)"),
    ("cos_g_gstar", "cos(G,G*)"),
    ("cos_g_gr", "cos(G,Gr)"),
    ("erank_grad_A", "er∇A"),
    ("erank_grad_B", "er∇B"),
    ("stable_rank_A", "srA"),
    ("stable_rank_B", "srB"),
    ("kappa_A", "κA"),
    ("kappa_B", "κB"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text per-layer table."""
    head = ["layer"] + [h for _, h in COLUMNS]
    body = [[r["name"]] + [_fmt(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [head, *body]
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError) as e:
        print(f"sdslora diagnose: error: {e}", file=sys.stderr)
        return 2


def _probe_requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("run", "model", "adapter", "task", "train_file", "format",
                                                     "data"))


def _run(args: argparse.Namespace) -> int:
    if not _probe_requested(args) and not args.history:
        raise ValueError("give --run RUN_DIR (or --model, --adapter and --task) to diagnose an adapter, or "
                         "--history RUN_DIR ... to plot diagnostics histories")
    if _probe_requested(args):
        fields = probe_fields(args)
        from .diagnostics import diagnose, verdict

        model, batch, what = build_probe(fields)
        diag = diagnose(model, batch)
        print(what)
        print(f"method: {diag.method}   probe loss: {diag.summary['loss']:.4g}   layers: {len(diag.rows)}")
        print(format_table(diag.rows))
        print("summary (mean over layers): " + ", ".join(f"{k}={_fmt(v)}" for k, v in diag.summary.items()))
        print("verdict: " + verdict(diag))
        if args.json_out:
            from .utils import json_safe

            Path(args.json_out).write_text(
                json.dumps(
                    json_safe({"summary": diag.summary, "layers": diag.rows, "events": diag.events}), indent=1
                )
            )
    if args.history:
        from .diagnostics.plots import plot_history

        runs = read_histories(args.history)
        for p in plot_history(runs, args.out):
            print(f"wrote {p}")
    return 0


def history_file(path: str | Path) -> Path:
    """The diagnostics JSONL of ``path`` (a run folder: its ``diagnostics.jsonl``; or the file itself)."""
    p = Path(path)
    if p.is_dir():
        f = p / "diagnostics.jsonl"
        if not f.is_file():
            raise ValueError(f"run folder {p} holds no diagnostics.jsonl: train it with --diagnostics-every N")
        return f
    if not p.is_file():
        raise ValueError(f"history {p} is neither a run folder nor a diagnostics JSONL file")
    return p


def read_histories(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{run label: records}`` for ``--history`` (labels: :func:`~sdslora.diagnostics.plots.history_labels`).
    Prints a note on stderr for a run folder whose records stop before the run's last step (a history written
    before the last step was always recorded)."""
    from .diagnostics import read_history
    from .diagnostics.plots import history_labels

    runs: dict[str, list[dict[str, Any]]] = {}
    for label, path in zip(history_labels(paths), paths):
        f = history_file(path)
        recs = read_history(f)
        if not recs:
            raise ValueError(f"history {f} holds no records")
        runs[label] = recs
        results = f.parent / "results.json"
        if f.name == "diagnostics.jsonl" and results.is_file():
            try:
                steps = json.loads(results.read_text()).get("steps")
            except (json.JSONDecodeError, AttributeError):
                steps = None
            last = max(int(r["step"]) for r in recs)
            if isinstance(steps, int) and last < steps:
                print(f"note: the diagnostics of {label} end at step {last} of {steps}", file=sys.stderr)
    return runs
