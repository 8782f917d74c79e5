"""GLUE sequence-classification tasks from the local GLUE TSV files (SST-2, RTE, MRPC, CoLA).

Examples are dicts ``{"text", "text_pair" (or None), "label": int}``. Label conventions follow GLUE: MRPC 1 =
paraphrase; RTE 0 = entailment, 1 = not_entailment; CoLA 1 = acceptable; SST-2 1 = positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import SHIPPED_MRPC, read_tsv

RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def _int_label(value: str, path: Path) -> int:
    try:
        return int(value.strip())
    except ValueError as e:
        raise ValueError(f"{path}: label {value!r} is not an integer") from e


def load_mrpc(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    return [{"text": r["#1 String"], "text_pair": r["#2 String"], "label": _int_label(r["Quality"], path)}
            for r in read_tsv(path)]


def load_sst2(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    return [{"text": r["sentence"].strip(), "text_pair": None, "label": _int_label(r["label"], path)}
            for r in read_tsv(path)]


def load_rte(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    out = []
    for r in read_tsv(path):
        if r["label"] not in RTE_LABELS:
            raise ValueError(f"{path}: unknown RTE label {r['label']!r} (expected {sorted(RTE_LABELS)})")
        out.append({"text": r["sentence1"], "text_pair": r["sentence2"], "label": RTE_LABELS[r["label"]]})
    return out


def load_cola(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.tsv"
    out = []
    for i, r in enumerate(read_tsv(path, header=False), start=1):
        if len(r) < 4:
            raise ValueError(f"{path} line {i}: CoLA rows have 4 columns (source, label, mark, sentence)")
        out.append({"text": r[3], "text_pair": None, "label": _int_label(r[1], path)})
    return out


def mrpc_folder(data_dir: Path | None) -> Path:
    """``<data_dir>/mrpc`` when it holds the GLUE files, else the subset shipped in the package."""
    if data_dir is not None and (data_dir / "mrpc" / "train.tsv").is_file():
        return data_dir / "mrpc"
    return SHIPPED_MRPC


def load_cls_file(path: Path) -> list[dict[str, Any]]:
    """A user classification file: TSV with a header (``label`` plus ``sentence`` / ``text`` or
    ``sentence1``+``sentence2`` / ``text``+``text_pair``), or JSON(L) objects with the same keys."""
    from ..data import read_json_list

    rows = read_json_list(path) if path.suffix in (".json", ".jsonl") else read_tsv(path)
    out = []
    for i, r in enumerate(rows):
        text = r.get("text", r.get("sentence", r.get("sentence1")))
        pair = r.get("text_pair", r.get("sentence2"))
        if text is None or "label" not in r:
            raise ValueError(f"{path} row {i}: classification rows need 'label' and 'text'/'sentence'/'sentence1'")
        out.append({"text": str(text), "text_pair": None if pair is None else str(pair),
                    "label": _int_label(str(r["label"]), path)})
    return out
