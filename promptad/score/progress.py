"""What a `promptad score` run tells its user while it runs and at the end: a progress line every
few seconds (rows done of those to score, rows/s, ETA, errors) and the summary (also written to
OUTPUT/_runs/<run_id>.json). Driver-side only; no Ray.

Rows count as done when the model has scored them (`through`, polled from the pipeline's row
counter), not only when their file is committed: a file holds a few model batches, so counting
commits alone left a short or slow run at 0 % until its end."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from promptad.console import counted

PROGRESS_INTERVAL_S = 5.0
FAILED_SHOWN = 3  # failed files the summary names; the rest are the output's error rows of the run


@dataclass
class Summary:
    """What a run did; printed at the end and written to OUTPUT/_runs/<run_id>.json."""

    output: str
    run_id: str
    model_id: str
    inputs: int
    already_done: int
    new: int = 0
    changed: int = 0  # content version (or category) differed from the input's row: scored again
    retried: int = 0  # the row was a read error (or any error, for an unversioned input)
    scored: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    files: int = 0
    superseded_dropped: int = 0
    files_compacted: int = 0  # small files merged after the run (compact.py)
    files_written_compacted: int = 0  # the files they were merged into
    plan_seconds: float = 0.0
    seconds: float = 0.0
    run_seq: int = 0  # the run's sequence number in the output (its rows' run_seq)
    failed: list[list[str]] = field(default_factory=list)  # the first FAILED_SHOWN [path, error] of this run

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return [
            f"score: done: {self.inputs} inputs, {self.already_done} were already in the output, "
            f"{self.scored} scored now (new {self.new}, changed {self.changed}, retried {self.retried}) "
            f"in {self.seconds:.1f} s ({rate:.1f} rows/s), {counted(self.files, 'file')}; "
            f"{self.superseded_dropped} superseded rows dropped",
            f"score: errors this run: {self.errors} ({kinds})",
            *([f"score: compacted {counted(self.files_compacted, 'small file')} into "
               f"{counted(self.files_written_compacted, 'file')}"] if self.files_compacted else []),
            *self._failed_lines(),
            f"score: output {self.output} (model {self.model_id}, run {self.run_id})",
        ]

    def _failed_lines(self) -> list[str]:
        """The files that failed, by name (a few), and where every one of them is listed."""
        if not self.errors:
            return []
        shown = "; ".join(f"{path} ({error})" for path, error in self.failed)
        more = f"; and {self.errors - len(self.failed)} more" if self.errors > len(self.failed) else ""
        return [f"score: failed: {shown}{more}",
                f"score: every failed file is listed in {self.output} as a row with `error` set and "
                f"run_id {self.run_id}"]


class Progress:
    """Rows committed of those to score, rows/s, ETA and errors so far, printed to stderr every few
    seconds from a thread (so a slow stretch still shows the job is alive)."""

    def __init__(self, summary: Summary, total: int, interval: float | None = None,
                 through: Callable[[], int] | None = None):
        """`through`: rows the model has scored so far (may lag, may count a redone batch twice;
        the line shows at least the committed rows and at most `total`)."""
        self.summary = summary
        self.total = total
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.through = through
        self._through = 0
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="score-progress", daemon=True)

    def add(self, rows: int, errors: list[str], paths: list[str] | None = None) -> None:
        """One committed file: its rows, its error rows' errors and (in the same order) paths."""
        with self.lock:
            self.summary.scored += rows
            self.summary.files += 1
            self.summary.errors += len(errors)
            for path, e in zip(paths or [], errors):
                if len(self.summary.failed) < FAILED_SHOWN:
                    self.summary.failed.append([path, e])
            for e in errors:
                kind = e.split(":", 1)[0]
                self.summary.errors_by_kind[kind] = self.summary.errors_by_kind.get(kind, 0) + 1

    def line(self) -> str:
        with self.lock:
            s = self.summary
            done = min(self.total, max(s.scored, self._through))
            elapsed = time.monotonic() - self.start
            rate = done / max(elapsed, 1e-9)
            left = self.total - done
            eta = _duration(left / rate) if rate > 0 else "unknown"
            return (f"score: {done:,}/{self.total:,} rows ({100 * done / max(self.total, 1):.0f} %), "
                    f"{rate:.1f} rows/s, ETA {eta}, {s.errors:,} errors")

    def _poll(self) -> None:
        if self.through is None:
            return
        try:
            n = int(self.through())
        except Exception:  # noqa: BLE001 - a progress line must never stop the run
            return
        with self.lock:
            self._through = max(self._through, n)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.summary.seconds = time.monotonic() - self.start


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
