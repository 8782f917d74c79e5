"""Task registry over local data files: GLUE classification, LLM-Adapters commonsense and math.

    task = get_task("mrpc")
    train, dev = task.load("train", data_dir), task.load("eval", data_dir)
    scores = task.score(predictions, dev)            # {"accuracy": ..., "f1": ...}

A task is a :class:`Task`: its kind (``"classification"`` or ``"generation"``), loaders for its training and
evaluation splits, and how predictions are scored. ``file_task(format, train_file, eval_file)`` builds the same for
user files. Generation tasks use the Alpaca prompt (:mod:`.prompts`) and the answer extraction of LLM-Adapters
(:mod:`.extract`): ``answer="number"`` (last number, |pred − gold| <= 1e-3), ``"letter"`` (AQuA options) or
``"choice"`` (commonsense label words).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import data_hint, need_file, read_json_list
from . import glue
from .extract import extract_choice, extract_number, extract_option_letter, parse_gold_number
from .metrics import METRICS, accuracy, numbers_equal
from .prompts import alpaca_prompt, choice_labels

Loader = Callable[[Path | None], list[dict[str, Any]]]
KINDS = ("classification", "generation")
ANSWERS = ("number", "letter", "choice")


@dataclass(frozen=True)
class Task:
    """One task: ``name``, ``kind``, loaders, metric names (the first is the primary one)."""

    name: str
    kind: str
    train_loader: Loader
    eval_loader: Loader
    metrics: tuple[str, ...] = ("accuracy",)
    num_labels: int = 2
    answer: str | None = None  # generation tasks: "number" | "letter" | "choice"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def load(self, split: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
        """``split`` = ``"train"`` or ``"eval"``; raises ValueError for a missing file or an empty split."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rows = (self.train_loader if split == "train" else self.eval_loader)(data_dir)
        if not rows:
            raise ValueError(f"task {self.name!r}: the {split} split is empty")
        return rows

    # ---- scoring ---------------------------------------------------------------------------------------------
    def predict_from_text(self, text: str, example: dict[str, Any]) -> Any:
        """Generation tasks: the answer extracted from a generated text."""
        if self.answer == "number":
            return extract_number(text)
        if self.answer == "letter":
            return extract_option_letter(text)
        return extract_choice(text, choice_labels(example["instruction"]))

    def gold(self, example: dict[str, Any]) -> Any:
        if self.kind == "classification":
            return int(example["label"])
        if self.answer == "number":
            return parse_gold_number(example["answer"])
        return str(example["answer"]).strip()

    def score(self, predictions: list[Any], examples: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics of ``predictions`` (class ids, or extracted answers for generation tasks)."""
        gold = [self.gold(e) for e in examples]
        if self.kind == "classification":
            return {m: float(METRICS[m](predictions, gold)) for m in self.metrics}
        if self.answer == "number":
            hits = [int(numbers_equal(float(p), g)) for p, g in zip(predictions, gold)]
            return {"accuracy": sum(hits) / max(len(hits), 1)}
        return {"accuracy": accuracy(predictions, gold)}


# ---- registry ------------------------------------------------------------------------------------------------
def _glue(name: str, folder: str, loader: Callable[[Path, str], list[dict[str, Any]]], metrics: tuple[str, ...],
          desc: str) -> Task:
    def where(data_dir: Path | None) -> Path:
        if folder == "mrpc":
            return glue.mrpc_folder(data_dir)
        if data_dir is None:
            raise ValueError(f"task {name!r} needs the GLUE files: pass --data-dir DIR (with {folder}/) or set "
                             f"SDSLORA_DATA_DIR; {data_hint(name)}")
        return data_dir / folder

    return Task(name, "classification", lambda d: loader(where(d), "train"), lambda d: loader(where(d), "dev"),
                metrics, glue.NUM_LABELS, None, desc)


def _json_at(rel: str, name: str) -> Loader:
    def load(data_dir: Path | None) -> list[dict[str, Any]]:
        if data_dir is None:
            raise ValueError(f"task {name!r} needs {rel}: pass --data-dir DIR or set SDSLORA_DATA_DIR; "
                             f"{data_hint(name)}")
        what = f"task {name}"
        if rel.endswith("train.json"):
            what += ("; this task has no local training split: train with --train-file FILE --format alpaca-choice "
                     "(e.g. LLM-Adapters commonsense_170k.json) or only evaluate it")
        return read_json_list(need_file(data_dir / rel, what, task=name))

    return load


def _math(name: str, folder: str, answer: str) -> Task:
    return Task(name, "generation", _json_at("math/math_data.json", name), _json_at(f"math/{folder}/test.json", name),
                ("accuracy",), 0, answer, f"{folder} test set; trained on math_data.json (LLM-Adapters)")


def _commonsense(name: str, folder: str) -> Task:
    return Task(name, "generation", _json_at(f"commonsense/{folder}/train.json", name),
                _json_at(f"commonsense/{folder}/test.json", name), ("accuracy",), 0, "choice",
                f"LLM-Adapters {folder}")


TASKS: dict[str, Task] = {
    "mrpc": _glue("mrpc", "mrpc", glue.load_mrpc, ("accuracy", "f1"), "GLUE MRPC paraphrase (accuracy, F1)"),
    "sst2": _glue("sst2", "sst2", glue.load_sst2, ("accuracy",), "GLUE SST-2 sentiment (accuracy)"),
    "rte": _glue("rte", "rte", glue.load_rte, ("accuracy",), "GLUE RTE entailment (accuracy)"),
    "cola": _glue("cola", "cola", glue.load_cola, ("matthews", "accuracy"), "GLUE CoLA acceptability (Matthews)"),
    "gsm8k": _math("gsm8k", "gsm8k", "number"),
    "svamp": _math("svamp", "SVAMP", "number"),
    "mawps": _math("mawps", "mawps", "number"),
    "aqua": _math("aqua", "AQuA", "letter"),
    "boolq": _commonsense("boolq", "boolq"),
    "piqa": _commonsense("piqa", "piqa"),
    "siqa": _commonsense("siqa", "social_i_qa"),
    "winogrande": _commonsense("winogrande", "winogrande"),
    "arc-e": _commonsense("arc-e", "ARC-Easy"),
    "arc-c": _commonsense("arc-c", "ARC-Challenge"),
    "obqa": _commonsense("obqa", "openbookqa"),
}

FILE_FORMATS = {
    "cls": "classification rows: TSV with a header or JSON/JSONL with 'label' and 'text'/'sentence' "
           "(+ 'text_pair'/'sentence2')",
    "alpaca-number": "LLM-Adapters JSON {instruction, input, output, answer}; numeric answers (math)",
    "alpaca-letter": "LLM-Adapters JSON; option-letter answers A-E (AQuA)",
    "alpaca-choice": "LLM-Adapters JSON; label-word answers listed in 'Answer format: a/b' (commonsense)",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {sorted(TASKS)} (or --train-file/--eval-file "
                         "with --format)")
    return TASKS[name]


def file_task(fmt: str, train_file: str | Path | None, eval_file: str | Path | None) -> Task:
    """A task over user files in a declared format (see ``FILE_FORMATS``)."""
    if fmt not in FILE_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(FILE_FORMATS)}")
    files = {"train": None if train_file is None else Path(train_file),
             "eval": None if eval_file is None else Path(eval_file)}
    for split, p in files.items():
        if p is not None:
            need_file(p, f"--{split}-file")

    num_labels = glue.NUM_LABELS  # the cls format is binary

    def loader(split: str) -> Loader:
        def load(_data_dir: Path | None) -> list[dict[str, Any]]:
            p = files[split]
            if p is None:
                raise ValueError(f"no --{split}-file given")
            if fmt == "cls":
                return glue.load_cls_file(p, num_labels, "--format cls")
            return read_json_list(p)

        return load

    if fmt == "cls":
        return Task("file", "classification", loader("train"), loader("eval"), ("accuracy", "f1"), num_labels, None,
                    f"user files ({fmt})", {"format": fmt})
    return Task("file", "generation", loader("train"), loader("eval"), ("accuracy",), 0, fmt.split("-")[1],
                f"user files ({fmt})", {"format": fmt})


__all__ = ["Task", "TASKS", "FILE_FORMATS", "get_task", "file_task", "alpaca_prompt", "choice_labels"]
