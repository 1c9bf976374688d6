"""What a `promptad score` run tells its user while it runs and at the end: a progress line every
few seconds (rows done of those to score, rows/s, ETA, errors) and the summary (also written to
OUTPUT/_runs/<run_id>.json). Driver-side only; no Ray."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from promptad.console import counted

PROGRESS_INTERVAL_S = 10.0


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
    plan_seconds: float = 0.0
    seconds: float = 0.0
    run_seq: int = 0  # the run's sequence number in the output (its rows' run_seq)

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return [
            f"score: done: {self.inputs} inputs, {self.already_done} were already in the output, "
            f"{self.scored} scored now (new {self.new}, changed {self.changed}, retried {self.retried}) "
            f"in {self.seconds:.1f} s ({rate:.1f} rows/s), {counted(self.files, 'file')}; "
            f"{self.superseded_dropped} superseded rows dropped",
            f"score: errors this run: {self.errors} ({kinds})",
            f"score: output {self.output} (model {self.model_id}, run {self.run_id})",
        ]


class Progress:
    """Rows committed of those to score, rows/s, ETA and errors so far, printed to stderr every few
    seconds from a thread (so a slow stretch still shows the job is alive)."""

    def __init__(self, summary: Summary, total: int, interval: float = PROGRESS_INTERVAL_S):
        self.summary = summary
        self.total = total
        self.interval = interval
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="score-progress", daemon=True)

    def add(self, rows: int, errors: list[str]) -> None:
        with self.lock:
            self.summary.scored += rows
            self.summary.files += 1
            self.summary.errors += len(errors)
            for e in errors:
                kind = e.split(":", 1)[0]
                self.summary.errors_by_kind[kind] = self.summary.errors_by_kind.get(kind, 0) + 1

    def line(self) -> str:
        with self.lock:
            s = self.summary
            elapsed = time.monotonic() - self.start
            rate = s.scored / max(elapsed, 1e-9)
            left = self.total - s.scored
            eta = _duration(left / rate) if rate > 0 else "unknown"
            return (f"score: {s.scored:,}/{self.total:,} rows ({100 * s.scored / max(self.total, 1):.0f} %), "
                    f"{rate:.1f} rows/s, ETA {eta}, {s.errors:,} errors")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
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
