"""Local data files: where the data directory is, and readers for the file formats the tasks use.

The data directory is ``--data-dir``, else the environment variable ``SDSLORA_DATA_DIR`` (a folder laid out as
``mrpc/``, ``sst2/``, ``cola/``, ``rte/`` with the GLUE TSV files, ``math/``, ``commonsense/`` with the LLM-Adapters
JSON files). The small MRPC subset the demo needs ships inside the package
(``sdslora/data/mrpc``, see its SOURCE.md), so ``sdslora compare`` works on a fresh machine.

``TASK_FILES`` lists the file every task reads for each split (relative to the data directory) and ``check_data``
reports which of them are present (``sdslora data``; the layouts, sources and licences are in docs/data.md).
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
from pathlib import Path
from typing import Any, NamedTuple

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


def need_file(path: Path, what: str, task: str | None = None) -> Path:
    """``path`` if it is a file, else a ValueError that says what is missing, how to point at it and (for a file of
    ``TASK_FILES``; ``task`` names the task when several share the file) which ``sdslora data`` call lists it."""
    if not path.is_file():
        tasks = [task] if task is not None else tasks_reading(path)
        hint = f"; {data_hint(tasks[0])}" if len(tasks) == 1 else ""
        raise ValueError(
            f"missing data file {path} ({what}); pass --data-dir DIR (or set SDSLORA_DATA_DIR) to a folder that holds "
            f"it{hint}"
        )
    return path


# ---- which files each task reads -------------------------------------------------------------------------------
# The one declarative list of the task files (relative to the data directory), checked against the loaders of
# sdslora.tasks by tests/test_data_check.py. GLUE: the TSV files of the GLUE distribution; math and commonsense: the
# JSON files of the LLM-Adapters repository (the four math tasks train on the same math_data.json).
GLUE_FOLDERS = {"mrpc": "mrpc", "sst2": "sst2", "rte": "rte", "cola": "cola"}
MATH_FOLDERS = {"gsm8k": "gsm8k", "svamp": "SVAMP", "mawps": "mawps", "aqua": "AQuA"}
COMMONSENSE_FOLDERS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "winogrande": "winogrande",
                       "arc-e": "ARC-Easy", "arc-c": "ARC-Challenge", "obqa": "openbookqa"}
SPLITS = ("train", "eval")

TASK_FILES: dict[str, dict[str, str]] = {
    **{t: {"train": f"{d}/train.tsv", "eval": f"{d}/dev.tsv"} for t, d in GLUE_FOLDERS.items()},
    **{t: {"train": "math/math_data.json", "eval": f"math/{d}/test.json"} for t, d in MATH_FOLDERS.items()},
    **{t: {"train": f"commonsense/{d}/train.json", "eval": f"commonsense/{d}/test.json"}
       for t, d in COMMONSENSE_FOLDERS.items()},
}

# where the public files come from (one line each; the details and licences are in docs/data.md)
_GLUE_SOURCE = ("GLUE {name}: the GLUE TSV distribution (e.g. download_glue_data.py), or `sdslora data --fetch {task}` "
                "(Hugging Face hub id nyu-mll/glue, config {task}; needs `pip install datasets`)")
_LLM_ADAPTERS_SOURCE = ("LLM-Adapters {name} (github.com/AGI-Edgerunners/LLM-Adapters, {where}; ODC-By), or "
                        "`sdslora data --fetch {task}`")
TASK_SOURCES: dict[str, str] = {
    **{t: _GLUE_SOURCE.format(name=n, task=t)
       for t, n in {"mrpc": "MRPC", "sst2": "SST-2", "rte": "RTE", "cola": "CoLA"}.items()},
    **{t: _LLM_ADAPTERS_SOURCE.format(name=d, task=t, where=f"ft-training_set/math_data.json and dataset/{d}/test.json")
       for t, d in MATH_FOLDERS.items()},
    **{t: _LLM_ADAPTERS_SOURCE.format(name=d, task=t, where=f"dataset/{d}/")
       for t, d in COMMONSENSE_FOLDERS.items()},
}


def data_hint(task: str) -> str:
    """The pointer the data errors end with: which command lists ``task``'s files and where to get them."""
    return f"`sdslora data --task {task}` lists the files task {task} needs and where to get them (docs/data.md)"


def tasks_reading(path: Path) -> list[str]:
    """The tasks of ``TASK_FILES`` that read a file at ``path`` (matched on the path's trailing parts)."""
    parts = Path(path).parts
    return [t for t, files in TASK_FILES.items()
            if any(parts[-len(Path(rel).parts):] == Path(rel).parts for rel in files.values())]


class DataFile(NamedTuple):
    """One file of :func:`check_data`: ``path`` is None when there is no data directory to look in; ``shipped``
    when the copy inside the package stands in (MRPC)."""

    task: str
    split: str
    rel: str
    path: Path | None
    present: bool
    shipped: bool = False


def task_root(task: str, data_dir: Path | None) -> Path | None:
    """The folder ``task``'s ``TASK_FILES`` are relative to: ``data_dir``, or for MRPC the package's own data when
    ``data_dir`` lacks ``mrpc/train.tsv`` (the rule of the MRPC loader, which is reused here)."""
    if task == "mrpc":
        from ..tasks.glue import mrpc_folder  # lazy: sdslora.tasks imports this module

        return mrpc_folder(data_dir).parent
    return data_dir


def check_data(data_dir: str | Path | None = None, tasks: list[str] | tuple[str, ...] | None = None,
               splits: tuple[str, ...] = SPLITS) -> list[DataFile]:
    """Which files the ``tasks`` (default: all of ``TASK_FILES``) need for ``splits`` and whether they are there.

    ``data_dir`` as for training (``--data-dir``, else ``SDSLORA_DATA_DIR``; an explicitly given folder that does not
    exist raises ValueError, as does an unknown task or split). MRPC counts as present from the subset that ships in
    the package when the data directory has no ``mrpc/train.tsv`` (that is what training reads then).
    """
    names = list(TASK_FILES) if not tasks else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in TASK_FILES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available tasks: {sorted(TASK_FILES)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be among {SPLITS}, got {tuple(splits)!r}")
    root_dir = resolve_data_dir(data_dir)
    out = []
    for task in names:
        root = task_root(task, root_dir)
        for split in splits:
            rel = TASK_FILES[task][split]
            path = None if root is None else root / rel
            shipped = root is not None and root == PACKAGE_DATA
            out.append(DataFile(task, split, rel, path, path is not None and path.is_file(), shipped))
    return out


def _read_text(path: Path, what: str) -> str:
    """The text of ``path`` (UTF-8, BOM-tolerant), with a ValueError naming the file when it is not UTF-8."""
    data = need_file(path, what).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text ({e.reason} at byte {e.start}); save the file as "
                         "UTF-8") from e


def read_tsv_lines(path: Path, header: bool = True, columns: tuple[str, ...] = ()
                   ) -> list[tuple[int, dict[str, str]]] | list[tuple[int, list[str]]]:
    """:func:`read_tsv` with the file line number (1-based) of every row: ``[(line, row), ...]``.

    With ``header``, every row must have as many fields as the header (extra fields that are empty are tolerated:
    trailing tabs), and ``columns`` names the header fields the caller needs; a ValueError names the file and line
    otherwise.
    """
    text = _read_text(path, "TSV")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    if not header:
        return rows
    if not rows:
        raise ValueError(f"{path} is empty (a TSV file with a header line was expected)")
    head_line, head = rows[0][0], [h.strip() for h in rows[0][1]]
    missing = [c for c in columns if c not in head]
    if missing:
        raise ValueError(f"{path} line {head_line}: the header has no column(s) {missing}; it has {head}")
    out = []
    for line, r in rows[1:]:
        if len(r) < len(head) or any(c.strip() for c in r[len(head):]):
            raise ValueError(f"{path} line {line} has {len(r)} tab-separated field(s), but the header (line {head_line}) "
                             f"has {len(head)} ({head}); fix or remove that row")
        out.append((line, dict(zip(head, r))))
    return out


def read_tsv(path: Path, header: bool = True) -> list[dict[str, str]] | list[list[str]]:
    """Rows of a tab-separated file (BOM-tolerant, no quoting: GLUE files contain bare quotes); with ``header``, a
    dict per row. A row whose field count does not match the header raises a ValueError naming the file and line."""
    return [r for _, r in read_tsv_lines(path, header)]


def _kind(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


def read_json_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """:func:`read_json_list` with where each object is in the file: ``[("line 17", {...}), ...]`` for JSON lines,
    ``("entry 3", ...)`` (1-based) for a JSON list.

    A malformed file raises a ValueError naming the file and the line (JSON lines: the file line of the bad row;
    a JSON document: line and column of the parse error)."""
    text = _read_text(path, "JSON")
    doc_error: json.JSONDecodeError | None = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            doc_error = e
        else:
            if isinstance(data, dict):  # one object (JSON lines with a single line)
                return [("line 1" if "\n" not in text.strip() else "entry 1", data)]
            if not isinstance(data, list):
                raise ValueError(f"{path} must hold a list of JSON objects (or one JSON object a line), got a JSON "
                                 f"{_kind(data)}")
            for i, x in enumerate(data, start=1):
                if not isinstance(x, dict):
                    raise ValueError(f"{path}: entry {i} of the list is a JSON {_kind(x)}, not an object")
            return [(f"entry {i}", x) for i, x in enumerate(data, start=1)]
        if text.lstrip().startswith("["):  # a JSON list, not JSON lines
            raise _doc_error(path, doc_error)
    out: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not out and doc_error is not None and doc_error.lineno > n:
                raise _doc_error(path, doc_error) from None  # a multi-line JSON document, not JSON lines
            raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}: column {e.colno}); fix or remove that "
                             "row") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {n} is a JSON {_kind(obj)}, not an object; JSON lines files hold one "
                             "object a line")
        out.append((f"line {n}", obj))
    return out


def _doc_error(path: Path, e: json.JSONDecodeError) -> ValueError:
    return ValueError(f"{path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg} (a JSON list of objects, "
                      "or one JSON object a line, was expected)")


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON lines (one object a line); see :func:`read_json_records` for the errors."""
    return [x for _, x in read_json_records(path)]


def class_label(value: Any, num_labels: int | None, where: str, owner: str) -> int:
    """``value`` as a class id of a ``num_labels``-way head (ints, integral floats and their strings), else a
    ValueError that names ``where`` (file and line, or split and row), the label and the allowed range of ``owner``
    (``"task mrpc"``)."""
    label: int | None = None
    integral_float = isinstance(value, float) and value.is_integer()
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or integral_float:
        label = int(value)
    elif isinstance(value, str):
        try:
            label = int(value.strip())
        except ValueError:
            label = None
    allowed = "" if num_labels is None else f"{owner} has {num_labels} classes (labels 0..{num_labels - 1})"
    if label is None:
        raise ValueError(f"{where} has label {value!r}, which is not an integer class id"
                         + (f"; {allowed}" if allowed else ""))
    if num_labels is not None and not 0 <= label < num_labels:
        raise ValueError(f"{where} has label {label}, but {allowed}")
    return label
