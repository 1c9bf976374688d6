"""compact.py without Ray: the file count stays near rows / target over many nights, a compaction
killed at any step loses and duplicates nothing (for the planner, the count and readers), and the
plan over a compacted history is exact. Small rows, tiny targets: seconds."""
from __future__ import annotations

import shutil
from datetime import datetime, timezone

import boto3
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from promptad.data import storage
from promptad.score import compact as compaction
from promptad.score.output import OUTPUT_SCHEMA, commit_file, listing, live_files, read_rows, verify
from promptad.score.plan import make_plan

MODEL = "0123456789abcdef"
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
TARGET_MB = 0.02  # ~20 KB: a few hundred of these rows


class Killed(Exception):
    """Stands for a kill at one step of a compaction."""


def _rows(ids: list[str], run_seq: int, version: str = "v1", error: str | None = None) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": i, "path": f"/imgs/{i}.png", "category": "tile", "error": error,
                                  "source_version": version, "model_id": MODEL, "run_id": f"run{run_seq}",
                                  "scored_at": T0, "score": None if error else float(k), "run_seq": run_seq,
                                  "map_png": b"\x89PNG" + bytes(40)} for k, i in enumerate(ids)],
                                schema=OUTPUT_SCHEMA)


def _night(out: str, ids: list[str], run_seq: int, per_file: int = 10, version: str = "v1") -> None:
    """One night's commits: `ids` in files of `per_file` rows, as score writes them."""
    for k in range(0, len(ids), per_file):
        commit_file(out, f"part-n{run_seq:03d}-{k:05d}.parquet", _rows(ids[k:k + per_file], run_seq, version))


def _current(table: pa.Table) -> dict[str, tuple]:
    """What a reader who takes the highest run_seq per image_id gets: {image_id: (run_seq, version, score)}."""
    best: dict[str, tuple] = {}
    for r in table.select(["image_id", "run_seq", "source_version", "score"]).to_pylist():
        key = (r["run_seq"], r["source_version"], r["score"])
        if r["image_id"] not in best or key[0] > best[r["image_id"]][0]:
            best[r["image_id"]] = key
    return best


def test_file_count_stays_near_rows_over_target_whatever_the_nights(tmp_path):
    out = str(tmp_path / "out")
    storage.makedirs(out)
    expected: dict[str, str] = {}
    counts = []
    for night in range(1, 31):
        new = [f"n{night:02d}-{i:03d}" for i in range(40)]
        changed = [f"n{night - 1:02d}-{i:03d}" for i in range(3)] if night > 1 else []
        _night(out, new + changed, night, version=f"v{night}")
        expected.update({i: f"v{night}" for i in new + changed})
        inputs = pa.table({"image_id": list(expected), "source_version": list(expected.values())})
        assert verify(inputs, out).rows == len(expected)  # drops the changed images' old rows
        compaction.compact(out, target_mb=TARGET_MB)
        files = listing(out)[0]
        counts.append(len(files))
        bound = 2 * sum(files.values()) / (TARGET_MB * (1 << 20)) + 1
        assert len(files) <= bound, (night, len(files), bound)
    assert counts[-1] < 30 * 4 / 3  # 30 nights of 4-5 files each, without compaction
    # every reader sees one row per image, its current one
    table = pq.read_table(out)
    assert table.num_rows == len(expected) == len(set(table["image_id"].to_pylist()))
    assert dict(zip(table["image_id"].to_pylist(), table["source_version"].to_pylist())) == expected
    assert len(pd.read_parquet(out)) == len(expected)
    assert duckdb.sql(f"select count(*), count(distinct image_id) from read_parquet('{out}/*.parquet')").fetchall() \
        == [(len(expected), len(expected))]


def _history(out: str) -> None:
    """Three nights of small files and a killed run's leftover: image a0 has a superseded row."""
    storage.makedirs(out)
    _night(out, [f"a{i}" for i in range(25)], 1)
    _night(out, [f"b{i}" for i in range(25)], 2)
    _night(out, ["a0"], 3, version="v3")


def test_a_compaction_killed_at_any_step_loses_and_duplicates_nothing(tmp_path):
    pristine = str(tmp_path / "pristine")
    _history(pristine)
    want = _current(pq.read_table(pristine))
    steps: list[str] = []
    trial = str(tmp_path / "trial")
    shutil.copytree(pristine, trial)
    compaction.compact(trial, target_mb=TARGET_MB, fault=steps.append)
    assert steps[:2] == ["drop", "journal"] and steps[-1] == "done" and len(steps) > 6, steps
    assert _current(pq.read_table(trial)) == want and pq.read_table(trial).num_rows == len(want)

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_id": list(want), "path": [f"/imgs/{i}.png" for i in want],
                             "version": [v for _, v, _ in want.values()]}), manifest)
    for k, at in enumerate(steps):
        out = str(tmp_path / f"kill{k}")
        shutil.copytree(pristine, out)

        def kill(step: str, at=at) -> None:
            if step == at:
                raise Killed(step)

        with pytest.raises(Killed):
            compaction.compact(out, target_mb=TARGET_MB, fault=kill)
        # the planner and the count read each row once, whatever the step ...
        live = read_rows(out, ["image_id", "run_seq", "source_version", "score"])
        assert live.num_rows == pc.count_distinct(live["image_id"]).as_py() == len(want), at
        assert _current(live) == want, at
        plan = make_plan(manifest, out, MODEL, ["tile"])
        assert (plan.done, plan.todo.num_rows) == (len(want), 0), at
        # ... a plain reader that dedupes by run_seq gets each current row, and the pending work is done
        assert _current(pq.read_table(out)) == want, at
        again = compaction.compact(out, target_mb=TARGET_MB)
        assert again.recovered == (0 if at in ("drop", "done") else 1), at
        table = pq.read_table(out)
        assert table.num_rows == len(want) and _current(table) == want, at
        assert listing(out)[1] == [] and len(live_files(out)) == len(listing(out)[0]), at


def test_plan_and_verify_over_a_compacted_history_are_exact(tmp_path):
    """Changed, read-error and new inputs against a compacted output: the same decisions as before
    compaction, and verify leaves one row per input from its version."""
    out = str(tmp_path / "out")
    storage.makedirs(out)
    ids = [f"i{k:03d}" for k in range(60)]
    _night(out, ids[:30], 1)
    _night(out, ids[30:50], 2)
    commit_file(out, "part-err.parquet", _rows(ids[50:52], 2, error="read: timeout"))
    manifest = str(tmp_path / "m.parquet")
    versions = ["v2" if k < 3 else "v1" for k in range(60)]  # three changed; 52..59 new
    pq.write_table(pa.table({"image_id": ids, "path": [f"/imgs/{i}.png" for i in ids], "version": versions}),
                   manifest)
    before = make_plan(manifest, out, MODEL, ["tile"])
    done = compaction.compact(out, target_mb=TARGET_MB)
    assert done.targets >= 1 and done.files_after < done.files_before
    after = make_plan(manifest, out, MODEL, ["tile"])
    assert (after.done, after.new, after.changed, after.retry, after.run_seq) == \
        (before.done, before.new, before.changed, before.retry, before.run_seq) == (47, 8, 3, 2, 3)
    assert after.todo["image_id"].to_pylist() == before.todo["image_id"].to_pylist()
    todo = after.todo
    commit_file(out, "part-run3.parquet", _rows(todo["image_id"].to_pylist(), 3).set_column(
        OUTPUT_SCHEMA.get_field_index("source_version"), "source_version", todo["source_version"]))
    checked = verify(after.inputs, out)
    assert (checked.rows, checked.superseded_dropped) == (60, 5)
    table = pq.read_table(out)
    assert table.num_rows == 60 and dict(zip(table["image_id"].to_pylist(), table["source_version"].to_pylist())) \
        == dict(zip(ids, versions))


def test_compaction_on_s3_and_a_paged_listing(s3_bucket, s3_server, monkeypatch):
    out = f"{s3_bucket}/scores"
    _night(out, [f"s{i}" for i in range(30)], 1)
    _night(out, [f"t{i}" for i in range(30)], 2)
    done = compaction.compact(out, target_mb=TARGET_MB)
    assert done.targets >= 1 and done.files_after < done.files_before
    fs, path = storage.filesystem(out)
    assert pq.read_table(path, filesystem=fs).num_rows == 60

    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket[len("s3://"):]
    for i in range(7):
        s3.put_object(Bucket=bucket, Key=f"cam/{i}.png", Body=b"x" * (i + 1))
    s3.put_object(Bucket=bucket, Key="cam/notes.txt", Body=b"not an image")
    pages = []
    from promptad.data import s3 as s3_listing

    real = s3_listing.pages

    def counted(*args):
        for page in real(*args):
            pages.append(len(page[0]))
            yield page

    monkeypatch.setattr(s3_listing, "LIST_PAGE", 3)
    monkeypatch.setattr(s3_listing, "pages", counted)
    listed = storage.list_versions(f"{s3_bucket}/cam", storage.IMAGE_EXTENSIONS)
    assert pages == [3, 3, 2] and listed["uri"].to_pylist() == [f"{s3_bucket}/cam/{i}.png" for i in range(7)]
    assert listed["size"].to_pylist() == list(range(1, 8))


KILLER = """
import os, signal, sys
from promptad.score.compact import compact
at = sys.argv[2]
compact(sys.argv[1], target_mb=float(sys.argv[3]),
        fault=lambda step: os.kill(os.getpid(), signal.SIGKILL) if step.startswith(at) else None)
"""


def test_a_compaction_sigkilled_mid_way_is_finished_by_the_next(tmp_path):
    """The same with a real SIGKILL (no exception handler, no finally runs) in a process of its own,
    after the journal, after the first merged file, after the first source is deleted."""
    import subprocess
    import sys

    pristine = str(tmp_path / "pristine")
    _history(pristine)
    want = _current(pq.read_table(pristine))
    for k, at in enumerate(("journal", "target 0", "delete ")):
        out = str(tmp_path / f"killed{k}")
        shutil.copytree(pristine, out)
        proc = subprocess.run([sys.executable, "-c", KILLER, out, at, str(TARGET_MB)], capture_output=True)
        assert proc.returncode == -9, proc.stderr.decode()[-1000:]
        assert len(listing(out)[1]) == 1, at  # the journal is still there
        live = read_rows(out, ["image_id", "run_seq", "source_version", "score"])
        assert live.num_rows == len(want) and _current(live) == want, at
        assert compaction.compact(out, target_mb=TARGET_MB).recovered == 1
        table = pq.read_table(out)
        assert table.num_rows == len(want) and _current(table) == want and listing(out)[1] == [], at
