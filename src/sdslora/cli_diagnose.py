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
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZE = 16  # RunConfig's defaults: the probe `train` takes with its own defaults
DEFAULT_MAX_LENGTH = 128
DEFAULT_SEED = 0
# run.json fields the probe needs; flags of the same name override them
_RUN_FIELDS = ("model", "task", "train_file", "format", "data_dir", "train_limit", "max_length", "batch_size", "seed")


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


# ---- probe input -------------------------------------------------------------------------------------------
def read_examples(path: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` examples ``{"text", "label"?}`` of a JSONL or TSV file (ValueError naming what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".tsv", ".tab"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            fields = [c.lower() for c in (reader.fieldnames or [])]
            col = next((c for c in (reader.fieldnames or []) if c.lower() in ("text", "sentence")), None)
            if col is None:
                raise ValueError(f"{path}: the TSV header {fields} has no 'text' or 'sentence' column (for a "
                                 "task's own files use --task NAME or --train-file FILE --format FMT)")
            lab = next((c for c in (reader.fieldnames or []) if c.lower() == "label"), None)
            for rec in reader:
                rows.append({"text": rec[col], **({"label": rec[lab]} if lab else {})})
                if len(rows) >= n:
                    break
    else:
        with path.open() as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i} is not valid JSON ({e}); use JSONL or a .tsv file") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{path}:{i} has no string 'text' field")
                rows.append(rec)
                if len(rows) >= n:
                    break
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def lm_batch(examples: list[dict[str, Any]], tok: Any, max_length: int) -> dict[str, Any]:
    """A causal-LM probe batch of plain texts (``--data`` without a task): labels are the input ids, padding
    ignored."""
    if tok.pad_token is None:
        raise ValueError("the tokenizer has no pad, eos or unk token to pad the probe batch")
    enc = tok([e["text"] for e in examples], padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def _read_run(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """(the run's config from run.json, its adapter folder); ValueError for a folder diagnose cannot use."""
    from .io import CONFIG_NAME
    from .methods import get_method

    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder {run} does not exist")
    meta = run / "run.json"
    if not meta.is_file():
        raise ValueError(f"{run} holds no run.json, so it is not a run folder of `sdslora train`; give the run's "
                         "output folder, or --model NAME --adapter DIR --task NAME")
    try:
        cfg = json.loads(meta.read_text()).get("config")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{meta} is not a run.json of `sdslora train` ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{meta} holds no 'config' mapping; is it a run.json of `sdslora train`?")
    method = cfg.get("method")
    adapter = run / "adapter"
    if not (adapter / CONFIG_NAME).is_file():
        try:
            no_layers = get_method(str(method)).layer_cls is None
        except ValueError:
            no_layers = False
        if no_layers or (run / "NO_ADAPTER.md").is_file():
            raise ValueError(f"run {run} used method {method!r}, which trains the whole model and has no adapter "
                             "layers; diagnose needs an adapter (a method such as lora or sds)")
        if (run / "failed.json").is_file() and not (run / "done.json").is_file():
            raise ValueError(f"run {run} stopped on an error (see {run / 'failed.json'}) before its adapter was "
                             "saved: nothing to diagnose")
        if not (run / "done.json").is_file():
            raise ValueError(f"run {run} has not finished: the adapter is saved into {adapter} when training ends "
                             "(run the same `sdslora train` command again to finish it)")
        raise ValueError(f"run {run} holds no adapter ({adapter / CONFIG_NAME} is missing)")
    return cfg, adapter


def probe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What to build: model, adapter, task (name or train file + format), data_dir, train_limit, data, batch_size,
    max_length, seed — from ``--run``'s run.json, each overridden by the flag of the same name."""
    fields: dict[str, Any] = {k: None for k in _RUN_FIELDS}
    fields["adapter"] = None
    if args.run:
        cfg, adapter = _read_run(args.run)
        fields.update({k: cfg.get(k) for k in _RUN_FIELDS})
        fields["adapter"] = str(adapter)
    if args.task is not None and (args.train_file is not None or args.format is not None):
        raise ValueError("give either --task or --train-file with --format, not both")
    if args.task is not None:
        fields.update(task=args.task, train_file=None, format=None)
    if args.train_file is not None or args.format is not None:
        fields.update(task=None, train_file=args.train_file if args.train_file is not None else fields["train_file"],
                      format=args.format if args.format is not None else fields["format"])
    for k in ("model", "adapter", "data_dir", "train_limit", "batch_size", "max_length"):
        if getattr(args, k) is not None:
            fields[k] = getattr(args, k)
    fields["data"] = args.data
    fields["batch_size"] = DEFAULT_BATCH_SIZE if fields["batch_size"] is None else fields["batch_size"]
    fields["max_length"] = DEFAULT_MAX_LENGTH if fields["max_length"] is None else fields["max_length"]
    fields["seed"] = DEFAULT_SEED if fields["seed"] is None else fields["seed"]
    for k in ("batch_size", "max_length", "train_limit"):
        v = fields[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"--{k.replace('_', '-')} must be an int >= 1, got {v!r}")
    if not fields["model"]:
        raise ValueError("give --run RUN_DIR, or --model NAME_OR_DIR (with --adapter DIR and --task NAME or "
                         "--train-file FILE --format FMT)")
    if fields["task"] is None and fields["format"] is None and fields["train_file"] is not None:
        raise ValueError("--train-file needs --format (cls, alpaca-number, alpaca-letter, alpaca-choice)")
    if fields["format"] is not None and fields["train_file"] is None and fields["data"] is None:
        raise ValueError("--format needs --train-file FILE (the probe batch comes from the training data)")
    if fields["task"] is None and fields["format"] is None and fields["data"] is None:
        raise ValueError("give --task NAME (or --train-file FILE --format FMT) for the probe batch, as for train")
    if fields["adapter"] is not None:
        fields["adapter"] = str(_adapter_folder(fields["adapter"]))
    return fields


def _adapter_folder(path: str | Path) -> Path:
    """``path``, or ``path/adapter`` when ``path`` is a run folder."""
    from .io import CONFIG_NAME

    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter"
    if not p.is_dir():
        raise ValueError(f"adapter folder {p} does not exist")
    return p


def _model_kind(spec: str) -> tuple[str, int]:
    """(kind, num_labels) from a model's config, for ``--data`` without a task."""
    from transformers import AutoConfig

    from .experiments.models import resolve_model

    cfg = AutoConfig.from_pretrained(str(resolve_model(spec)))
    if any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or [])):
        return "classification", int(cfg.num_labels)
    return "generation", 0


def build_probe(fields: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    """(model with its adapter loaded, probe batch, a line saying what was built) for :func:`probe_fields`'s
    output: the model as ``train`` builds it for the task, the first ``batch_size`` training examples encoded and
    padded as ``train`` does."""
    from transformers import set_seed

    from .data import resolve_data_dir
    from .experiments.data import Collator, encode, encode_classification
    from .experiments.models import head_modules, load_model
    from .experiments.train import _shuffled
    from .io import load_adapter
    from .tasks import file_task, get_task

    task = None
    if fields["task"] is not None:
        task = get_task(fields["task"])
    elif fields["format"] is not None:
        task = file_task(fields["format"], None if fields["data"] else fields["train_file"], None)
    if task is not None:
        kind, num_labels = task.kind, max(task.num_labels, 2)
    else:
        kind, num_labels = _model_kind(fields["model"])
    n = fields["batch_size"]
    if fields["data"]:
        rows = read_examples(fields["data"], n)
        source = str(fields["data"])
    else:
        assert task is not None
        rows = task.load("train", resolve_data_dir(fields["data_dir"]))
        if fields["train_limit"]:
            rows = _shuffled(rows, 0)[: fields["train_limit"]]  # as experiments.train.prepare_data
        source = f"task {task.name}" + (f" ({fields['train_file']})" if task.name == "file" else "") + " training data"
    set_seed(int(fields["seed"]))  # a head the adapter does not hold is initialised as train did
    model, tok, _ = load_model(fields["model"], kind, num_labels)
    adapter = fields["adapter"]
    if adapter is not None:
        model = load_adapter(model, adapter)
        saved = set(model.adapter_config.modules_to_save or [])
        heads = [h for h in head_modules(model) if h not in saved] if kind == "classification" else []
        if heads:
            print(f"note: the adapter does not hold the classification head ({heads[0]}): it is initialised afresh "
                  f"(seed {fields['seed']})", file=sys.stderr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if kind == "classification":
        enc = encode_classification(tok, rows[:n], fields["max_length"], num_labels,
                                    f"task {task.name}" if task is not None else "the model's head")
        batch = Collator(pad)(enc)
    elif fields["data"]:
        batch = lm_batch(rows[:n], tok, fields["max_length"])
    else:
        assert task is not None
        enc: list[dict[str, Any]] = []
        for i in range(0, len(rows), 256):  # as train: rows whose prompt fills max_length are dropped
            enc += encode(task, tok, rows[i : i + 256], fields["max_length"])
            if len(enc) >= n:
                break
        enc = enc[:n]
        if not enc:
            raise ValueError("no training example fits max_length; raise --max-length")
        batch = Collator(pad)(enc)
    rows_n = int(batch["input_ids"].shape[0])
    what = (f"model: {fields['model']}   adapter: {adapter or '(none: the base model, as full fine-tuning)'}   "
            f"probe: {rows_n} example(s) of {source}, max_length {fields['max_length']}")
    return model, batch, what


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
