"""GLUE sequence-classification tasks from the local GLUE TSV files (SST-2, RTE, MRPC, CoLA).

Examples are dicts ``{"text", "text_pair" (or None), "label": int}``. Label conventions follow GLUE: MRPC 1 =
paraphrase; RTE 0 = entailment, 1 = not_entailment; CoLA 1 = acceptable; SST-2 1 = positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import SHIPPED_MRPC, class_label, read_json_records, read_tsv_lines

RTE_LABELS = {"entailment": 0, "not_entailment": 1}
NUM_LABELS = 2  # every GLUE task here is binary


def _label(value: Any, path: Path, line: int | str, owner: str, num_labels: int = NUM_LABELS) -> int:
    where = f"{path} line {line}" if isinstance(line, int) else f"{path} {line}"
    return class_label(value, num_labels, where, owner)


def load_mrpc(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    return [{"text": r["#1 String"], "text_pair": r["#2 String"], "label": _label(r["Quality"], path, n, "task mrpc")}
            for n, r in read_tsv_lines(path, columns=("Quality", "#1 String", "#2 String"))]


def load_sst2(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    return [{"text": r["sentence"].strip(), "text_pair": None, "label": _label(r["label"], path, n, "task sst2")}
            for n, r in read_tsv_lines(path, columns=("sentence", "label"))]


def load_rte(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    out = []
    for n, r in read_tsv_lines(path, columns=("sentence1", "sentence2", "label")):
        label = r["label"].strip()
        if label not in RTE_LABELS:
            raise ValueError(f"{path} line {n} has label {r['label']!r}, but task rte has the labels "
                             f"{sorted(RTE_LABELS)}")
        out.append({"text": r["sentence1"], "text_pair": r["sentence2"], "label": RTE_LABELS[label]})
    return out


def load_cola(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    out = []
    for n, r in read_tsv_lines(path, header=False):
        if len(r) < 4 or any(c.strip() for c in r[4:]):
            raise ValueError(f"{path} line {n} has {len(r)} tab-separated field(s); CoLA rows have 4 (source, label, "
                             "mark, sentence)")
        out.append({"text": r[3], "text_pair": None, "label": _label(r[1], path, n, "task cola")})
    return out


def mrpc_folder(data_dir: Path | None) -> Path:
    """``<data_dir>/mrpc`` when it holds the GLUE files, else the subset shipped in the package."""
    if data_dir is not None and (data_dir / "mrpc" / "train.tsv").is_file():
        return data_dir / "mrpc"
    return SHIPPED_MRPC


def load_cls_file(path: Path, num_labels: int = NUM_LABELS, owner: str = "the cls format") -> list[dict[str, Any]]:
    """A user classification file: TSV with a header (``label`` plus ``sentence`` / ``text`` or
    ``sentence1``+``sentence2`` / ``text``+``text_pair``), or JSON(L) objects with the same keys. Labels must be
    class ids ``0..num_labels-1``; a ValueError names the file and line of a row that breaks this."""
    if path.suffix in (".json", ".jsonl"):
        rows: list[tuple[Any, dict[str, Any]]] = list(read_json_records(path))
    else:
        rows = list(read_tsv_lines(path))
    out = []
    for where, r in rows:
        text = r.get("text", r.get("sentence", r.get("sentence1")))
        pair = r.get("text_pair", r.get("sentence2"))
        at = f"line {where}" if isinstance(where, int) else where
        if text is None or "label" not in r:
            raise ValueError(f"{path} {at}: classification rows need 'label' and 'text'/'sentence'/'sentence1'")
        out.append({"text": str(text), "text_pair": None if pair is None else str(pair),
                    "label": _label(r["label"], path, where, owner, num_labels)})
    return out
