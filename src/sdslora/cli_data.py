"""``sdslora data``: which data files the tasks need, which are present, and where to get the missing ones.

    sdslora data                                  # every task, in --data-dir or $SDSLORA_DATA_DIR
    sdslora data --data-dir DIR --task sst2 --task gsm8k
    sdslora data --data-dir DIR --fetch sst2      # download the public set and write it in sdslora's layout

Exit status: 0 when every requested task has all its files, 1 when some are missing, 2 for a usage error (unknown
task, a --data-dir that does not exist, a failed download). The layouts, sources and licences are in docs/data.md.
Only the standard library is imported here; ``--fetch`` of a GLUE task imports ``datasets`` when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .data import GLUE_FOLDERS, SPLITS, TASK_FILES, TASK_SOURCES, check_data

DOCS = "docs/data.md in the sdslora repository"
GLUE_HUB_ID = "nyu-mll/glue"
GLUE_HUB_SPLITS = {"train": "train", "eval": "validation"}
# the LLM-Adapters repository (Hu et al. 2023, arXiv 2304.01933) at a fixed commit, so a fetch is reproducible
LLM_ADAPTERS_RAW = ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/"
                    "816657208af4db747803f87ba40a4c71383fed7a/")
RTE_NAMES = ("entailment", "not_entailment")  # the hub's ClassLabel order (= sdslora.tasks.glue.RTE_LABELS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="check (or fetch) the data files of the tasks",
        description="List, per task, the data files found and missing in the data folder (--data-dir, else "
                    f"$SDSLORA_DATA_DIR) and where to get the missing ones ({DOCS}). Exit 0 when every requested "
                    "task is complete, 1 otherwise.")
    p.add_argument("--data-dir", help="the data folder (default: $SDSLORA_DATA_DIR; MRPC falls back to the subset "
                                      "shipped in the package)")
    p.add_argument("--task", action="append", default=[], metavar="T",
                   help=f"a task to check (repeatable; default: all): {', '.join(TASK_FILES)}")
    p.add_argument("--eval-only", action="store_true", help="check only the evaluation files")
    p.add_argument("--fetch", action="append", default=[], metavar="T",
                   help="download task T's public files into --data-dir in sdslora's layout (repeatable; GLUE tasks "
                        "need `pip install datasets`), then check them")
    p.add_argument("--force", action="store_true", help="with --fetch: overwrite files that are already there")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = ("eval",) if args.eval_only else SPLITS
    tasks = list(dict.fromkeys([*args.task, *args.fetch]))
    try:
        if args.fetch:
            root = args.data_dir or os.environ.get("SDSLORA_DATA_DIR")
            if not root:
                raise ValueError("--fetch needs a folder to write into: pass --data-dir DIR or set SDSLORA_DATA_DIR")
            unknown = [t for t in args.fetch if t not in TASK_FILES]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; available tasks: {sorted(TASK_FILES)}")
            for task in dict.fromkeys(args.fetch):
                for line in fetch(task, Path(root), splits=splits, force=args.force):
                    print(line)
        files = check_data(args.data_dir, tasks, splits)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"sdslora data: error: {e}", file=sys.stderr)
        return 2
    return 0 if report(files, args.data_dir) else 1


def report(files: list[Any], data_dir: str | None, out: Any = None) -> bool:
    """Print ``check_data``'s result grouped by task; True when every file is present."""
    out = out or sys.stdout
    env = os.environ.get("SDSLORA_DATA_DIR")
    if data_dir:
        print(f"data directory: {data_dir} (--data-dir)", file=out)
    elif env:
        print(f"data directory: {env} (SDSLORA_DATA_DIR)", file=out)
    else:
        print("data directory: none (pass --data-dir DIR or set SDSLORA_DATA_DIR; without one only the MRPC subset "
              "shipped in the package is available)", file=out)
    by_task: dict[str, list[Any]] = {}
    for f in files:
        by_task.setdefault(f.task, []).append(f)
    complete = 0
    for task, fs in by_task.items():
        missing = [f for f in fs if not f.present]
        if not missing:
            complete += 1
            state = "complete" + (" (the MRPC subset shipped in the package)" if any(f.shipped for f in fs) else "")
        else:
            state = f"missing {len(missing)} of {len(fs)} file(s)"
        print(f"{task:11s} {state}", file=out)
        for f in fs:
            where = f.path if f.path is not None else f"<data dir>/{f.rel}"
            print(f"  {f.split:5s}  {'found' if f.present else 'MISSING':7s}  {where}", file=out)
        if missing:
            print(f"  get it: {TASK_SOURCES[task]}", file=out)
    total = len(by_task)
    print(f"{complete} of {total} task(s) complete" + ("" if complete == total else
          f"; file layouts, sources and licences: {DOCS}"), file=out)
    return complete == total


# ---- --fetch -------------------------------------------------------------------------------------------------
def fetch(task: str, root: Path, splits: tuple[str, ...] = SPLITS, force: bool = False) -> list[str]:
    """Download ``task``'s public files for ``splits`` and write them under ``root`` in the layout of
    ``TASK_FILES`` (creating ``root``); files already present are kept unless ``force``. Returns one line per file.
    GLUE tasks come from the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", task)``), the math and
    commonsense tasks from the LLM-Adapters repository (``LLM_ADAPTERS_RAW``)."""
    if task not in TASK_FILES:
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASK_FILES)}")
    lines = []
    for split in splits:
        dest = root / TASK_FILES[task][split]
        if dest.is_file() and not force:
            lines.append(f"{task} {split}: kept {dest} (already there; --force overwrites)")
            continue
        if task in GLUE_FOLDERS:
            text, origin = _glue_tsv(task, split), f"{GLUE_HUB_ID} ({task}, {GLUE_HUB_SPLITS[split]})"
        else:
            origin = LLM_ADAPTERS_RAW + _llm_adapters_path(task, split)
            try:
                text = _llm_adapters_json(origin)
            except OSError as e:
                lines.append(f"{task} {split}: could not download {origin}: {e}")
                continue
        _write(dest, text)
        lines.append(f"{task} {split}: wrote {dest} from {origin}")
    return lines


def _write(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(dest)


def _llm_adapters_path(task: str, split: str) -> str:
    rel = TASK_FILES[task][split]
    if rel == "math/math_data.json":
        return "ft-training_set/math_data.json"
    return "dataset/" + rel.split("/", 1)[1]  # math/<D>/test.json, commonsense/<D>/{train,test}.json


def _download(url: str) -> bytes:
    """The bytes at ``url`` (tests replace this function; no other network access happens here)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def _llm_adapters_json(url: str) -> str:
    data = json.loads(_download(url).decode("utf-8-sig"))
    if not isinstance(data, list) or not all(isinstance(x, dict) and "instruction" in x and "answer" in x
                                             for x in data):
        raise OSError(f"{url} is not a JSON list of LLM-Adapters examples ({{instruction, input, output, answer}})")
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def _cell(x: Any) -> str:
    """A TSV field: the GLUE files are read without quoting, so tabs and line breaks become spaces."""
    return " ".join(str(x).replace("\t", " ").splitlines())


def _glue_tsv(task: str, split: str) -> str:
    """One GLUE split from the hub, as the TSV file of the GLUE distribution that sdslora's loaders read."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError(f"--fetch {task} needs the `datasets` package (pip install datasets): {e}") from e
    try:
        rows = list(load_dataset(GLUE_HUB_ID, task, split=GLUE_HUB_SPLITS[split]))
    except Exception as e:  # offline, hub errors: one clear message
        raise RuntimeError(f"could not load {GLUE_HUB_ID} ({task}, {GLUE_HUB_SPLITS[split]}) from the Hugging Face "
                           f"hub: {e}") from e
    if task == "mrpc":  # the hub has no MSRP sentence ids: those two columns stay empty (sdslora does not read them)
        head = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        body = [[r["label"], "", "", r["sentence1"], r["sentence2"]] for r in rows]
    elif task == "sst2":
        head, body = ["sentence", "label"], [[r["sentence"], r["label"]] for r in rows]
    elif task == "rte":
        head = ["index", "sentence1", "sentence2", "label"]
        body = [[r.get("idx", i), r["sentence1"], r["sentence2"],
                 RTE_NAMES[r["label"]] if isinstance(r["label"], int) else r["label"]] for i, r in enumerate(rows)]
    else:  # cola: no header; source, label, original mark ("*" = unacceptable), sentence
        head, body = [], [["glue", r["label"], "" if int(r["label"]) == 1 else "*", r["sentence"]] for r in rows]
    lines = ([head] if head else []) + body
    return "".join("\t".join(_cell(c) for c in line) + "\n" for line in lines)


__all__ = ["register", "run", "report", "fetch"]
