"""What ``sdslora diagnose`` probes: the model and adapter rebuilt as ``sdslora train`` built them, and the probe batch.

See :mod:`~sdslora.cli_diagnose` for the command and what ``--run`` / ``--model`` / ``--data`` mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZE = 16  # RunConfig's defaults: the probe `train` takes with its own defaults
DEFAULT_MAX_LENGTH = 128
DEFAULT_SEED = 0
# run.json fields the probe needs; flags of the same name override them
_RUN_FIELDS = ("model", "task", "train_file", "format", "data_dir", "train_limit", "max_length", "batch_size", "seed")


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
