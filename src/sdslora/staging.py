"""Atomic folder writes: files are staged inside the target, committed by a marker, rolled forward after a crash.

Files are written into a temporary folder inside the target and moved into place with ``os.replace`` only once
complete, so a failed save never leaves a half-written adapter where a good one was, and files in the target folder
that are not ours are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".sdslora-staging-"
COMMIT_NAME = "COMMIT.json"


def _fault(point: str) -> None:
    # the hook is set on sdslora.io, where the tests inject failures at each named point of a save
    from . import io

    if io._fault_hook is not None:
        io._fault_hook(point)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _finish_staged(stage: Path, target: Path) -> None:
    """Roll a committed staging folder forward: move its files into ``target`` (JSON last), drop the files the new
    version no longer has, remove the staging folder. Idempotent: a crash in here is finished by the next call."""
    plan = json.loads((stage / COMMIT_NAME).read_text())
    names = sorted(plan.get("files", []), key=lambda n: n.endswith(".json"))  # weights first, config last
    for name in names:
        src = stage / name
        if src.exists():
            _fault(f"replace:{name}")
            os.replace(src, target / name)
    for name in plan.get("remove", []):
        (target / name).unlink(missing_ok=True)
    _fsync_dir(target)
    _fault("replaced")
    shutil.rmtree(stage, ignore_errors=True)


def recover_folder(path: str | Path) -> list[str]:
    """Finish or discard interrupted saves in ``path``: a staging folder whose commit marker was written is rolled
    forward (the save had completed its writes), any other is removed (the previous version is intact). Returns what
    was done, one line per staging folder. Saves and loads call it first; it needs write access only when there is
    something to clean."""
    path = Path(path)
    done: list[str] = []
    if not path.is_dir():
        return done
    for stage in sorted(path.glob(STAGING_PREFIX + "*")):
        if not stage.is_dir():
            continue
        if (stage / COMMIT_NAME).is_file():
            _finish_staged(stage, path)
            done.append(f"finished the interrupted save {stage.name}")
        else:
            shutil.rmtree(stage, ignore_errors=True)
            done.append(f"removed the incomplete save {stage.name}")
    # staging folders of sdslora < 0.1.1 lived beside the target
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the incomplete save {old.name}")
    return done


@contextmanager
def _staged_dir(path: str | Path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging folder inside ``path``; once the block has written the new files there, switch to them
    atomically: a commit marker is written (the point of no return), then the files are moved into ``path``.

    A save interrupted before the marker leaves the previous version untouched (its staging folder is removed by
    the next save or load); one interrupted after it is finished by the next save or load (:func:`recover_folder`).
    Files of ``owned`` that the new version does not have are removed; other files in ``path`` are left alone."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; choose another output path")
    path.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    try:
        yield stage
        written = sorted(n for n in owned if (stage / n).is_file())
        for name in written:
            _fsync_file(stage / name)
        _fault("written")
        plan = {"files": written, "remove": sorted(n for n in owned if n not in written)}
        marker = stage / (COMMIT_NAME + ".tmp")
        marker.write_text(json.dumps(plan))
        _fsync_file(marker)
        os.replace(marker, stage / COMMIT_NAME)  # the commit point
        _fsync_dir(stage)
    except Exception:
        shutil.rmtree(stage, ignore_errors=True)  # nothing was switched: the previous version stays
        raise
    _fault("committed")
    _finish_staged(stage, path)

def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
