"""The outer progress bar of a comparison: optimizer steps over all its runs, followed from each run's metrics file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class _StepProgress:
    """The outer progress bar of a comparison, in optimizer steps over all its runs: the expected total is shown
    before the first run, and the ETA from the first step (a thread follows the running run's ``metrics.jsonl``,
    one record per optimizer step). A run that is skipped (finished before, or recorded as evidence) takes its
    steps off the total instead of adding them to the count, so that the rate and the ETA are those of training."""

    POLL_S = 0.5

    def __init__(self, runs: int, steps_per_run: int, enabled: bool) -> None:
        self.enabled = enabled
        self.steps_per_run = steps_per_run
        self.planned_runs = runs
        self.seen: set[str] = set()
        self.n_skipped = 0
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=runs * steps_per_run, desc="compare", unit="step", position=0, leave=True,
                            smoothing=0.05, dynamic_ncols=True)

    def _new_run(self, name: str, skipped: bool = False) -> bool:
        """Count run ``name`` once (a study's seed-0 run is met again in the grid: already counted)."""
        if name in self.seen:
            return False
        self.seen.add(name)
        self.n_skipped += skipped
        if self.bar is not None:
            if len(self.seen) > self.planned_runs:  # a widened sweep: one more run than planned
                self.bar.total += self.steps_per_run
            self.bar.set_postfix_str(name + (f", {self.n_skipped} skipped" if self.n_skipped else ""), refresh=True)
        return True

    def skipped(self, name: str) -> None:
        if self._new_run(name, skipped=True) and self.bar is not None:
            self.bar.total = max(self.bar.n, self.bar.total - self.steps_per_run)
            self.bar.refresh()

    def track(self, name: str, metrics_file: Path) -> _RunTracker:
        return _RunTracker(self if self._new_run(name) else _StepProgress(0, 0, False), metrics_file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _RunTracker:
    """Counts one run's optimizer steps into the outer bar while it trains (see :class:`_StepProgress`)."""

    def __init__(self, owner: _StepProgress, metrics_file: Path) -> None:
        self.owner, self.file = owner, metrics_file
        self.credited = 0
        self._offset = metrics_file.stat().st_size if metrics_file.is_file() else 0  # an older run's records
        self._buf = b""
        self._stop = None
        self._thread = None

    def __enter__(self) -> _RunTracker:
        if self.owner.bar is not None:
            import threading

            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._follow, name="sdslora-compare-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()  # type: ignore[union-attr]
            self._thread.join()

    def _follow(self) -> None:
        while not self._stop.wait(self.owner.POLL_S):  # type: ignore[union-attr]
            self._poll()

    def _poll(self) -> None:
        try:
            size = self.file.stat().st_size
            if size < self._offset:  # the run (re)wrote its file from the start
                self._offset, self._buf = 0, b""
            if size == self._offset:
                return
            with open(self.file, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
        except OSError:
            return
        self._offset += len(chunk)
        lines = (self._buf + chunk).split(b"\n")
        self._buf = lines.pop()  # a line not yet complete
        n = sum(1 for line in lines if b'"loss"' in line)
        n = min(n, self.owner.steps_per_run - self.credited)
        if n > 0:
            self.credited += n
            self.owner.bar.update(n)

    def finished(self, steps: int) -> None:
        """The run ended with ``steps`` optimizer steps: count what the poller has not, fix the planned total."""
        if self._thread is not None:
            self._stop.set()  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None
        bar = self.owner.bar
        if bar is None:
            return
        if steps != self.owner.steps_per_run:
            bar.total += steps - self.owner.steps_per_run
        if steps > self.credited:
            bar.update(steps - self.credited)
            self.credited = steps

