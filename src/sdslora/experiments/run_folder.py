"""The run folder: what a run writes and how a folder is recognised, resumed or refused (see
:mod:`sdslora.experiments.train` for the files), the atomic JSON writer, the library versions a run records."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..utils import json_safe
from .run_config import with_defaults

RUN_FILES = (
    "run.json",
    "versions.json",
    "metrics.jsonl",
    "diagnostics.jsonl",
    "curve.jsonl",
    "eval.json",
    "results.json",
    "done.json",
    "failed.json",
    "NO_ADAPTER.md",
    "adapter",
    "peft",
    "trainer",
    "checkpoints",
    "peft_export_error.txt",
)
CHECKPOINT_DIR = "checkpoints"
DEFAULT_CHECKPOINT_EVERY = 100


class RunDirError(ValueError):
    """The output folder holds something other than this run."""


# ---- run folder ------------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any, *, compact: bool = False) -> None:
    """Atomic JSON write (temporary file + rename); ``compact``: one line, no spaces (records kept in git). The
    temporary file is the writing process's own, so two processes writing the same file never rename each other's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    text = (
        json.dumps(json_safe(data), separators=(",", ":"), allow_nan=False)
        if compact
        else json.dumps(json_safe(data), indent=2, allow_nan=False)
    )
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def folder_lock(folder: Path, name: str = ".lock") -> Iterator[None]:
    """Exclusive lock on ``folder`` between processes (an advisory ``flock`` on ``folder/name``), for a
    read-modify-write of a file that several runs share, such as a study's ``setting.json`` when studies of one
    setting run side by side. Where ``fcntl`` is missing (Windows) it does not lock."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_state(out: Path, config: dict[str, Any]) -> str:
    """``"new"`` (absent or empty folder), ``"done"`` (finished run with this config), ``"partial"`` (an
    unfinished run with this config: resumed from its last checkpoint, if any) or ``"failed"`` (a run of any config
    that stopped on an error before its first checkpoint: replaced). Raises RunDirError for a folder holding
    anything else."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise RunDirError(f"output path {out} exists and is not a folder; choose another --output")
    entries = [e.name for e in out.iterdir()]
    if not entries:
        return "new"
    if (
        (out / "failed.json").is_file()
        and not (out / "done.json").is_file()
        and latest_checkpoint(out) is None
    ):
        return (
            "failed"  # a run that stopped on an error before its first checkpoint: nothing to keep or resume
        )
    for marker in ("done.json", "run.json"):
        f = out / marker
        if f.is_file():
            try:
                saved = json.loads(f.read_text()).get("config")
            except (json.JSONDecodeError, AttributeError):
                saved = None
            if isinstance(saved, dict):  # a field added since that run was saved counts as its default value
                saved = with_defaults(saved, config)
            if saved != json_safe(config):
                diff = sorted(
                    k for k in set(config) | set(saved or {}) if (saved or {}).get(k) != config.get(k)
                )
                raise RunDirError(
                    f"output folder {out} holds a different run (fields that differ: {diff[:8]}); choose another "
                    "--output or delete that folder yourself"
                )
            return "done" if marker == "done.json" else "partial"
    raise RunDirError(
        f"output folder {out} is not empty and holds no sdslora run ({sorted(entries)[:5]}); choose "
        "an empty or new folder"
    )


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete Trainer checkpoint of the run in ``out`` (``trainer_state.json`` is written last, so a
    checkpoint killed while being written is passed over), or None."""
    folder = Path(out) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [
        (int(c.name.rsplit("-", 1)[1]), c)
        for c in folder.glob("checkpoint-*")
        if c.is_dir() and c.name.rsplit("-", 1)[1].isdigit()
    ]
    for _step, c in sorted(found, reverse=True):
        if (c / "trainer_state.json").is_file():
            return c
    return None


def _keep_records(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Records of a JSON-lines log up to ``last_step`` (a resumed run redoes the steps after its checkpoint); the
    file is rewritten with them."""
    kept: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= last_step:
                kept.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def versions() -> dict[str, Any]:
    import transformers

    from .. import __version__

    info: dict[str, Any] = {
        "sdslora": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info
