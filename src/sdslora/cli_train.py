"""``sdslora train``: one run (Hugging Face Trainer + SDSLoRACallback); see :mod:`sdslora.experiments.train`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import parse_value

# flag -> RunConfig field, for flags whose value is stored as given
_FIELDS = ("model", "task", "train_file", "eval_file", "format", "data_dir", "method", "r", "alpha", "scaling",
           "dropout", "adapter_dtype", "optimizer", "lr", "steps", "epochs", "batch_size", "grad_accum", "seed", "precision",
           "scheduler", "warmup_ratio", "weight_decay", "max_length", "diagnostics_every", "eval_every", "train_limit",
           "eval_limit", "eval_mode", "max_new_tokens", "eval_batch_size")

DEFAULT_EXCLUDE: tuple[str, ...] = ("pooler",)
"""What ``train`` and ``compare`` (the demo included) leave out of ``--targets all-linear`` when ``--exclude`` is not
given: BERT's pretraining pooler (``bert.pooler.dense``, trained for next-sentence prediction; a model without a
module named ``pooler`` is unaffected). This is the one place the default is set; ``--exclude`` replaces it
(``--exclude ''`` adapts the pooler too). The resolved list is stored in the run's config. The Python API
(``AdapterConfig``, ``RunConfig``) adapts what ``all-linear`` finds, as PEFT does."""


def parse_options(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def add_run_arguments(p: argparse.ArgumentParser, *, grid: bool = False) -> None:
    """The RunConfig flags shared by ``train`` and ``compare`` (defaults None: the config file or RunConfig
    supplies them)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--config", help="YAML file with RunConfig fields (flags override it)")
    g.add_argument("--model", help="local Hugging Face model folder, or minilm-l6 / smollm2-135m")
    g.add_argument("--task", help="registered task (sdslora.tasks.TASKS), e.g. mrpc, sst2, gsm8k, boolq")
    g.add_argument("--train-file", help="training file (with --format)")
    g.add_argument("--eval-file", help="evaluation file (with --format)")
    g.add_argument("--format", help="format of --train-file/--eval-file: cls, alpaca-number, alpaca-letter, "
                                    "alpaca-choice")
    g.add_argument("--data-dir", help="local data folder (default: $SDSLORA_DATA_DIR; MRPC also works without one: a subset ships in the package)")
    g.add_argument("--train-limit", type=int, help="use at most N training rows")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N rows")
    g.add_argument("--max-length", type=int)
    a = p.add_argument_group("adapter")
    if not grid:
        a.add_argument("--method", help="lora, sds, orthogonal, full, ... (sdslora methods)")
        a.add_argument("--r", "--rank", dest="r", type=int)
    a.add_argument("--alpha", type=float)
    a.add_argument("--scaling", choices=["rslora", "standard"])
    a.add_argument("--targets", help="'all-linear', a regex, or comma-separated module names")
    a.add_argument("--exclude", help="comma-separated module names never adapted (default with --targets all-linear: "
                   f"{','.join(DEFAULT_EXCLUDE)}, BERT's pretraining pooler; '' adapts every linear layer)")
    a.add_argument("--modules-to-save", help="comma-separated modules trained in full (default: the "
                                             "classification head)")
    a.add_argument("--dropout", type=float)
    a.add_argument("--adapter-dtype", choices=["float32", "base"],
                   help="adapter tensors in float32 whatever the base dtype (default), or in the base's dtype")
    a.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    t = p.add_argument_group("training")
    t.add_argument("--optimizer", help="adamw (default), loraplus, scaled_adamw, lora_pro, altlora")
    t.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE")
    if not grid:
        t.add_argument("--lr", type=float, help="learning rate (default: per-method table)")
        t.add_argument("--seed", type=int)
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--scheduler", help="transformers lr_scheduler_type (cosine, linear, constant, ...)")
    t.add_argument("--warmup-ratio", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--diagnostics-every", type=int, help="log sdslora diagnostics every N steps (0: off)")
    t.add_argument("--eval-every", type=int, help="learning curve on the validation split every N steps (compare "
                   "with --lr-sweep; 0: off)")
    t.add_argument("--eval-mode", choices=["generate", "loglik"])
    t.add_argument("--max-new-tokens", type=int)
    t.add_argument("--eval-batch-size", type=int)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def run_config_fields(args: argparse.Namespace, file_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """RunConfig fields: the config file first, then every flag that was given."""
    fields = dict(file_fields or {})
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            fields[name] = v
    if getattr(args, "targets", None) is not None:
        t = args.targets
        fields["targets"] = t if t == "all-linear" or "," not in t and any(c in t for c in ".*[]()|^$\\+?") else _csv(t)
    if getattr(args, "exclude", None) is not None:
        fields["exclude"] = _csv(args.exclude)
    if getattr(args, "modules_to_save", None) is not None:
        fields["modules_to_save"] = _csv(args.modules_to_save)
    if getattr(args, "option", None):
        fields["options"] = {**fields.get("options", {}), **parse_options(args.option)}
    if getattr(args, "optimizer_option", None):
        fields["optimizer_options"] = {**fields.get("optimizer_options", {}), **parse_options(args.optimizer_option)}
    if (fields.get("train_file") or fields.get("eval_file")) and "task" not in fields:
        fields["task"] = None
    return fields


def with_default_exclude(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with :data:`DEFAULT_EXCLUDE` filled in where it applies (targets ``all-linear``, the RunConfig
    default, and no ``exclude`` given)."""
    if fields.get("exclude") is None and fields.get("targets", "all-linear") == "all-linear":
        fields = {**fields, "exclude": list(DEFAULT_EXCLUDE)}
    return fields


def build_run_config(args: argparse.Namespace) -> Any:
    from .experiments.run_config import RunConfig, load_config_file

    file_fields = load_config_file(args.config) if getattr(args, "config", None) else {}
    fields = run_config_fields(args, file_fields)
    if fields.get("task") is not None and fields.get("format") and (fields.get("train_file") or fields.get("eval_file")):
        raise ValueError("give either --task or --train-file/--eval-file with --format, not both")
    return RunConfig.from_dict(with_default_exclude(fields))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run (model x task x method) and evaluate it",
                       description="Train one run on Hugging Face Trainer with the sdslora callback; writes the "
                                   "resolved config, versions, metrics.jsonl, the adapter (native + PEFT) and the "
                                   "evaluation into --output.")
    add_run_arguments(p)
    p.add_argument("--output", "-o", required=True, help="run folder (new, empty, or this same run to resume)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="checkpoint adapter, optimizer, scheduler, RNG and data position every N optimizer steps "
                        "into OUTPUT/checkpoints (0: never; default 100); the same command resumes from the last one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .experiments.train import run_train

    try:
        cfg = build_run_config(args)
        res = run_train(cfg, args.output, progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
    except (ValueError, TypeError, FloatingPointError) as e:
        print(f"sdslora train: error: {e}", file=sys.stderr)
        return 2
    ev = {k: v for k, v in res["eval"].items() if isinstance(v, (int, float))}
    print(f"done: {args.output}  method={res['method']}  trainable={res['trainable_parameters']:,}  "
          f"final train loss={res['final_train_loss']:.4f}  eval: "
          + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()))
    return 0
