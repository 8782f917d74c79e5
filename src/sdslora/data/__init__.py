"""Local data files: where the data directory is, and readers for the file formats the tasks use.

The data directory is ``--data-dir``, else the environment variable ``SDSLORA_DATA_DIR`` (a folder laid out as
``mrpc/``, ``sst2/``, ``cola/``, ``rte/`` with the GLUE TSV files, ``math/``, ``commonsense/`` with the LLM-Adapters
JSON files). The small MRPC subset the demo needs ships inside the package
(``sdslora/data/mrpc``, see its SOURCE.md), so ``sdslora compare`` works on a fresh machine.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

PACKAGE_DATA = Path(__file__).resolve().parent
SHIPPED_MRPC = PACKAGE_DATA / "mrpc"


def default_data_dir() -> Path | None:
    """``SDSLORA_DATA_DIR`` if set, else None (tasks then use only what ships in the package: the MRPC subset)."""
    env = os.environ.get("SDSLORA_DATA_DIR")
    return Path(env) if env else None


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory to read (raises ValueError when an explicitly given one does not exist)."""
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise ValueError(f"data directory {p} does not exist; pass --data-dir or set SDSLORA_DATA_DIR")
        return p
    return default_data_dir()


def need_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a ValueError that says what is missing and how to point at it."""
    if not path.is_file():
        raise ValueError(
            f"missing data file {path} ({what}); pass --data-dir DIR (or set SDSLORA_DATA_DIR) to a folder that holds it"
        )
    return path


def read_tsv(path: Path, header: bool = True) -> list[dict[str, str]] | list[list[str]]:
    """Rows of a tab-separated file (BOM-tolerant, no quoting: GLUE files contain bare quotes)."""
    with open(need_file(path, "TSV"), encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not header:
        return rows
    if not rows:
        raise ValueError(f"{path} is empty")
    head = [h.strip() for h in rows[0]]
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if len(r) < len(head):
            raise ValueError(f"{path} line {i}: {len(r)} columns, expected {len(head)} ({head})")
        out.append(dict(zip(head, r)))
    return out


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON lines (one object a line)."""
    text = need_file(path, "JSON").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines: {e}") from e
    if isinstance(data, dict):  # JSON lines with a single line
        data = [data]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValueError(f"{path} must hold a list of JSON objects")
    return data
