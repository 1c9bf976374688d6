"""`promptad compact`: merge the scoring output's small files into files of about a target size,
so that the number of files follows rows / target size, not the number of nights. Pure pyarrow.

Why files, not a table format: the output stays a plain folder of Parquet files in OUTPUT_SCHEMA
that pyarrow, pandas, DuckDB and Spark read as they are (DESIGN.md). The planner reads a few small
columns of every file (output.read_rows), so the compacted files are the compact state (image_id,
source_version, category, error, run_seq by column projection: the maps are never read) and each
night's commits are the small deltas; compaction folds the deltas in. A separate state table
would be a second copy of those columns that could disagree with the data.

A compaction is atomic and resumable like a commit, through a journal:

    1. OUTPUT/_compact/<id>.json lists the source files and the target files (written first);
    2. each target is committed whole (output.commit_bytes: staged + renamed, or one S3 PUT);
    3. the sources are deleted; 4. the journal is deleted.

While a journal exists, the planner and the count (output.live_files) take its targets as the
rows once all of them are committed, else its sources: after a kill at any point every row is
counted exactly once, and the next `compact` or `score` finishes the job (`recover`: deletes the
sources, or the partial targets). A reader that lists the folder between steps 2 and 3 sees the
merged rows twice, identical (same image_id, run_seq, content); taking the highest run_seq per
image_id, as during a run, still gives one current row.

Files at or above half the target size are left alone; superseded rows (a killed run's) are
dropped first, so no target holds two rows of one image. One writer at a time: run it after the
night's `score` (which calls it itself, see command.py), not beside one.
"""
from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from promptad.data import storage
from promptad.errors import UserError
from promptad.score.output import (COMPACT_DIR, ORDER_COLUMNS, as_output, commit_bytes, dead_files,
                                   drop_superseded, listing, newest_rows, read_journal, read_rows)

TARGET_MB = 128  # default size of a compacted file: ~13,000 rows of ~10 KB (a 256 px map as PNG)
# `score` compacts after a run once this many files are below half the target: a nightly job then
# keeps the output near rows / target, and a small output (or a test's) is left as it was written.
AUTO_MIN_SMALL_FILES = 32
ROW_GROUP_BYTES = 32 << 20  # rows buffered per row group written into a target


@dataclass
class Compacted:
    """What `compact` did."""

    files_before: int
    files_after: int
    small_before: int  # files below half the target size before
    merged: int  # source files merged
    targets: int  # files written
    rows: int  # rows moved into targets
    superseded_dropped: int
    recovered: int  # interrupted compactions finished or rolled back first
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [f"compact: {self.files_before:,} files ({self.small_before:,} below half the target) -> "
                f"{self.files_after:,}: merged {self.merged:,} files ({self.rows:,} rows) into {self.targets:,}; "
                f"{self.superseded_dropped:,} superseded rows dropped; {self.recovered} interrupted compaction(s) "
                f"completed; {self.seconds:.1f} s"]


def recover(output_uri: str) -> int:
    """Finish (every target committed: delete the sources) or roll back (delete the partial targets)
    each compaction a kill left behind; returns how many there were. Idempotent: a kill during
    recovery leaves a journal that the next call handles the same way."""
    files, journals = listing(output_uri)
    fs, root = storage.filesystem(output_uri)
    for rel in journals:
        journal = read_journal(output_uri, rel)
        for dead in sorted(dead_files(files, [journal])):
            if dead in files:
                fs.delete_file(f"{root}/{dead}")
        fs.delete_file(f"{root}/{rel}")
    return len(journals)


def _groups(small: dict[str, int], target_bytes: int) -> list[list[str]]:
    """Consecutive runs of small files (by name) of about target_bytes each; a last group of one
    file is not worth a rewrite."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in small.items():
        if groups[-1] and size + nbytes > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if len(g) > 1]


def _merge(output_uri: str, sources: list[str]) -> tuple[bytes, int]:
    """The rows of `sources` as one Parquet file in OUTPUT_SCHEMA (in memory: at most about the
    target size), row groups of about ROW_GROUP_BYTES."""
    fs, root = storage.filesystem(output_uri)
    buf = io.BytesIO()
    rows = 0
    with pq.ParquetWriter(buf, as_output(pa.table({"image_id": pa.array([], pa.string())})).schema) as writer:
        pending: list[pa.Table] = []
        for name in sources:
            table = as_output(pq.read_table(f"{root}/{name}", filesystem=fs))
            rows += table.num_rows
            pending.append(table)
            if sum(t.nbytes for t in pending) >= ROW_GROUP_BYTES:
                writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
    return buf.getvalue(), rows


def compact(output_uri: str, target_mb: float = TARGET_MB, min_small_files: int = 2, drop: bool = True,
            fault: Callable[[str], None] | None = None) -> Compacted:
    """Merge the output's files below half of `target_mb` into files of about `target_mb`, when
    there are at least `min_small_files` of them (see the module docstring). `drop`: first drop
    superseded rows (a killed run's; `score` has just done so itself and passes False). `fault(step)`
    is called after each write or delete (tests: raise there to stand for a kill)."""
    t0 = time.monotonic()
    step = fault or (lambda _: None)
    recovered = recover(output_uri)
    superseded = pa.table({"image_id": pa.array([], pa.string())})
    if drop:
        rows = read_rows(output_uri, ["image_id", *ORDER_COLUMNS])
        _, superseded = newest_rows(rows)
        del rows
        if superseded.num_rows:
            drop_superseded(output_uri, superseded)
            step("drop")
    files, _ = listing(output_uri)
    target_bytes = int(target_mb * (1 << 20))
    small = {name: size for name, size in files.items() if size < target_bytes // 2}
    groups = _groups(small, target_bytes) if len(small) >= min_small_files else []
    token = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    targets = [f"part-c{token}-{k:04d}.parquet" for k in range(len(groups))]
    moved = 0
    if groups:
        fs, root = storage.filesystem(output_uri)
        journal = f"{COMPACT_DIR}/{token}.json"
        sources = [name for g in groups for name in g]
        storage.write_bytes(storage.join(output_uri, journal),
                            json.dumps({"sources": sources, "targets": targets}).encode())
        step("journal")
        for k, (group, target) in enumerate(zip(groups, targets)):
            data, n = _merge(output_uri, group)
            commit_bytes(output_uri, target, data)
            moved += n
            step(f"target {k}")
        for name in sources:
            fs.delete_file(f"{root}/{name}")
            step(f"delete {name}")
        fs.delete_file(f"{root}/{journal}")
        step("done")
    after = listing(output_uri)[0]
    return Compacted(files_before=len(files), files_after=len(after), small_before=len(small),
                     merged=sum(len(g) for g in groups), targets=len(targets), rows=moved,
                     superseded_dropped=superseded.num_rows, recovered=recovered,
                     seconds=time.monotonic() - t0)


def run(args) -> Compacted:
    """`promptad compact`: no Ray, no model; one summary line."""
    storage.preflight({"--output": args.output})
    if not storage.is_dir(args.output):
        raise UserError(f"--output {args.output} is not a scoring output folder or prefix")
    done = compact(args.output, target_mb=args.target_mb)
    for line in done.lines():
        print(line)
    return done

