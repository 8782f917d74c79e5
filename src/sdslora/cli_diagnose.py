"""``sdslora diagnose``: is the adapter bending the gradient? A per-layer table and a verdict in plain words.

    sdslora diagnose --model MODEL_DIR --adapter ADAPTER_DIR --data probe.jsonl [--batch-size 8 --max-length 128]
    sdslora diagnose --history run_a.jsonl --history run_b.jsonl --out plots/

``--model``: a local Hugging Face model folder (``AutoModelForSequenceClassification`` when its config's
``architectures`` names a ``...ForSequenceClassification`` class, else ``AutoModelForCausalLM``) with its tokenizer.
``--adapter``: an sdslora adapter folder (:func:`sdslora.load_adapter`); without it the plain model is diagnosed as
full fine-tuning. ``--data``: JSONL with a ``"text"`` field (and ``"label"`` for classification), or TSV with a
header naming a ``text`` or ``sentence`` column (and ``label``); the first ``--batch-size`` rows form the probe
batch. Causal LM labels are the input ids (padding ignored).

Verdict thresholds (also in docs/diagnostics.md; :func:`sdslora.diagnostics.verdict`): factors are *well
conditioned* when the median over layers of max(κ_A, κ_B) is below 3, *moderately* below 10, *badly* otherwise;
the effective gradient rank (mean Roy–Vetterli effective rank of ∇_A and ∇_B) is *low* below r/2; the alignment
cos(G, G̃) is *poor* below 0.5, *fair* below 0.8, *good* otherwise. For LoRA with any of these problems the verdict
adds that SDS-LoRA removes the anisotropic scaling.

``--history FILE.jsonl`` (repeatable; a DiagnosticsRecorder / DiagnosticsCallback file) writes PNG plots of
alignment, effective rank, stable rank and basis similarity over training into ``--out`` (default ``.``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="gradient diagnostics of an adapter on a probe batch; history plots")
    p.add_argument("--model", help="local Hugging Face model folder (with its tokenizer)")
    p.add_argument("--adapter", help="sdslora adapter folder (omit to diagnose full fine-tuning)")
    p.add_argument("--data", help="probe data: JSONL with a 'text' field, or TSV with a text/sentence column")
    p.add_argument("--batch-size", type=int, default=8, help="probe batch size (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="diagnostics history to plot (repeatable: one line per file in each plot)",
    )
    p.add_argument("--out", default=".", help="folder for the PNG plots (default .)")
    p.add_argument(
        "--json", dest="json_out", help="also write the per-layer rows and summary to this JSON file"
    )
    p.set_defaults(func=run)


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
                raise ValueError(f"{path}: the TSV header {fields} has no 'text' or 'sentence' column")
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


def load_model(model_dir: str | Path) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_classifier) from a local folder."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (config.json is missing)")
    cfg = AutoConfig.from_pretrained(model_dir)
    is_cls = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    cls = AutoModelForSequenceClassification if is_cls else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ValueError(
                f"the tokenizer in {model_dir} has no pad, eos or unk token to pad the probe batch"
            )
    return model.eval(), tok, is_cls


def build_batch(examples: list[dict[str, Any]], tok: Any, max_length: int, is_cls: bool) -> dict[str, Any]:
    import torch

    enc = tok(
        [e["text"] for e in examples],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if is_cls:
        if any("label" not in e for e in examples):
            raise ValueError("a sequence-classification model needs a 'label' for every probe example")
        try:
            batch["labels"] = torch.tensor([int(e["label"]) for e in examples])
        except (TypeError, ValueError) as e:
            raise ValueError(f"labels must be integers for classification: {e}") from e
    else:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


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
    except ValueError as e:
        print(f"sdslora diagnose: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not args.model and not args.history:
        raise ValueError("give --model (with --data) to diagnose an adapter, or --history FILE.jsonl to plot")
    if args.model:
        if not args.data:
            raise ValueError("--data FILE (JSONL with 'text', or TSV) is needed with --model")
        if args.batch_size < 1 or args.max_length < 1:
            raise ValueError("--batch-size and --max-length must be >= 1")
        import sdslora
        from sdslora.diagnostics import diagnose, verdict

        model, tok, is_cls = load_model(args.model)
        if args.adapter:
            model = sdslora.load_adapter(model, args.adapter)
        batch = build_batch(read_examples(args.data, args.batch_size), tok, args.max_length, is_cls)
        diag = diagnose(model, batch)
        print(f"method: {diag.method}   probe loss: {diag.summary['loss']:.4g}   layers: {len(diag.rows)}")
        print(format_table(diag.rows))
        print("summary (mean over layers): " + ", ".join(f"{k}={_fmt(v)}" for k, v in diag.summary.items()))
        print("verdict: " + verdict(diag))
        if args.json_out:
            from sdslora.diagnostics.probe import _jsonable

            Path(args.json_out).write_text(
                json.dumps(
                    _jsonable({"summary": diag.summary, "layers": diag.rows, "events": diag.events}), indent=1
                )
            )
    if args.history:
        from sdslora.diagnostics import read_history
        from sdslora.diagnostics.plots import plot_history

        runs = {}
        for h in args.history:
            label = Path(h).stem
            while label in runs:
                label += "'"
            if not Path(h).is_file():
                raise ValueError(f"history file {h} does not exist")
            runs[label] = read_history(h)
        for p in plot_history(runs, args.out):
            print(f"wrote {p}")
    return 0
