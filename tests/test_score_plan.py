"""score_plan.py and score_output.py without Ray: content versions from listings, what the plan
decides for each kind of stored row, superseded rows, the exactly-once count, and the Arrow
manifest reader against the Python one."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from promptad.data import storage
from promptad.data.datasets import manifest_samples, manifest_table
from promptad.errors import UserError
from promptad.score.output import OUTPUT_SCHEMA, commit_file, drop_superseded, newest_rows, read_rows, verify
from promptad.score.plan import list_inputs, make_plan

MODEL = "0123456789abcdef"
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _rows(specs: list[tuple], when: datetime = T0, run_seq: int | None = None) -> pa.Table:
    """Output rows from (image_id, error, source_version[, category]) tuples."""
    rows = []
    for spec in specs:
        image_id, error, version, *rest = spec
        rows.append({"image_id": image_id, "path": image_id, "category": rest[0] if rest else "tile",
                     "error": error, "source_version": version, "model_id": MODEL, "run_id": "r",
                     "scored_at": when, "score": None if error else 1.0, "run_seq": run_seq})
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _manifest(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --------------------------------------------------------------------------- versions from listings
def test_local_listing_versions_change_with_size_or_mtime(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ("a.png", "b/c.JPG", "b/notes.txt"):
        (tmp_path / rel).write_bytes(b"1234")
    first = storage.list_versions(str(tmp_path), storage.IMAGE_EXTENSIONS)
    assert first["uri"].to_pylist() == [str(tmp_path / "a.png"), str(tmp_path / "b/c.JPG")]
    st = os.stat(tmp_path / "a.png")
    assert first["version"][0].as_py() == f"{st.st_size}:{st.st_mtime_ns}" and first["size"][0].as_py() == 4
    assert storage.file_version(str(tmp_path / "a.png")) == (4, first["version"][0].as_py())

    os.utime(tmp_path / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same bytes, touched
    (tmp_path / "b/c.JPG").write_bytes(b"12345")  # rewritten
    second = storage.list_versions(str(tmp_path), storage.IMAGE_EXTENSIONS)
    assert [a != b for a, b in zip(first["version"].to_pylist(), second["version"].to_pylist())] == [True, True]


def test_s3_listing_versions_are_etags_plus_version_ids_where_versioned(s3_bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket[len("s3://"):]
    s3.put_object(Bucket=bucket, Key="in/a.png", Body=b"one")
    s3.put_object(Bucket=bucket, Key="in/b.png", Body=b"two")
    s3.put_object(Bucket=bucket, Key="in-other/c.png", Body=b"not under in/")
    first = storage.list_versions(f"{s3_bucket}/in", storage.IMAGE_EXTENSIONS)
    assert first["uri"].to_pylist() == [f"{s3_bucket}/in/a.png", f"{s3_bucket}/in/b.png"]
    etag = s3.head_object(Bucket=bucket, Key="in/a.png")["ETag"].strip('"')
    assert first["version"][0].as_py() == etag and first["size"].to_pylist() == [3, 3]

    s3.put_object(Bucket=bucket, Key="in/a.png", Body=b"ONE")  # overwritten: another ETag
    s3.put_object(Bucket=bucket, Key="in/b.png", Body=b"two")  # same bytes again: same ETag
    second = storage.list_versions(f"{s3_bucket}/in", storage.IMAGE_EXTENSIONS)["version"].to_pylist()
    assert second[0] != first["version"][0].as_py() and second[1] == first["version"][1].as_py()

    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="in/b.png", Body=b"two")  # same bytes, a new version
    third = storage.list_versions(f"{s3_bucket}/in", storage.IMAGE_EXTENSIONS)["version"].to_pylist()
    version_id = s3.head_object(Bucket=bucket, Key="in/b.png")["VersionId"]
    assert third[1] == f"{second[1]}:{version_id}"
    assert storage.file_version(f"{s3_bucket}/in/b.png")[1] == third[1]
    s3.delete_object(Bucket=bucket, Key="in/a.png")  # latest version is a delete marker: not listed
    assert storage.list_versions(f"{s3_bucket}/in")["uri"].to_pylist() == [f"{s3_bucket}/in/b.png"]


# --------------------------------------------------------------------------- manifests as Arrow
def test_manifest_table_agrees_with_manifest_samples(tmp_path):
    (tmp_path / "lists").mkdir()
    csv_text = ("path , image_id,category,version,label\n"
                " imgs/a.png ,007,tile,v1,0\n"
                '"imgs/b,c.png",,, ,1\n'
                "../x/y.png,z,cookie,,\n"
                "/abs/q.png,,,,\n"
                "s3://bkt/k/r.png,r,tile,etag-1,\n"
                "imgs/sub/../w.png,w,,,\n")
    (tmp_path / "lists" / "m.csv").write_text(csv_text, encoding="utf-8-sig")
    pq.write_table(pa.table({"path": ["imgs/a.png", "b.png", "c.png"], "image_id": [7, None, 9],
                             "version": ["v1", "", None]}), tmp_path / "lists" / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        uri = str(tmp_path / "lists" / name)
        table = manifest_table(uri, ("image_id", "category", "version"))
        samples = manifest_samples(uri)
        assert table["path"].to_pylist() == [s.path for s in samples]
        assert table["image_id"].to_pylist() == [s.image_id for s in samples]
        assert table["category"].to_pylist() == [s.category for s in samples]
    versions = manifest_table(str(tmp_path / "lists" / "m.csv"), ("version",))["version"].to_pylist()
    assert versions == ["v1", None, None, None, "etag-1", None]


@pytest.mark.parametrize("text,message", [
    ("file,image_id\na.png,x\n", "has no 'path' column (columns: file, image_id)"),
    ("path,image_id\na.png,x\n ,y\n", "row 2: empty 'path'"),
    ("path,image_id\na.png,x\nb.png,x\n", "1 duplicate image_id value(s), e.g. 'x'"),
    ("path\na.png\na.png\n", "1 duplicate path value(s), e.g. 'a.png'"),
])
def test_manifest_table_errors_match_manifest_samples(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    for read in (manifest_table, manifest_samples):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read(str(tmp_path / "m.csv"))


# --------------------------------------------------------------------------- what the plan decides
def test_plan_decides_per_stored_row(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["new", "same", "changed", "read_err", "decode_same", "decode_changed", "category_err"]
    for name in names:
        (images / f"{name}.png").write_bytes(b"x")
    listed = {u.rsplit("/", 1)[1][:-4]: (u, v) for u, v in
              zip(*storage.list_versions(str(images)).select(["uri", "version"]).to_pydict().values())}
    out = str(tmp_path / "out")
    storage.makedirs(out)
    rows = _rows([(listed["same"][0], None, listed["same"][1]),
                  (listed["changed"][0], None, "4:123"),
                  (listed["read_err"][0], "read: not found", listed["read_err"][1]),
                  (listed["decode_same"][0], "decode: truncated image data", listed["decode_same"][1]),
                  (listed["decode_changed"][0], "decode: truncated image data", "1:1"),
                  (listed["category_err"][0], "category: unknown 'x'", listed["category_err"][1])])
    commit_file(out, "part-a.parquet", rows)

    plan = make_plan(str(images), out, MODEL, ["tile"])
    assert (plan.inputs.num_rows, plan.done, plan.new, plan.changed, plan.retry) == (7, 3, 1, 2, 1)
    todo = sorted(u.rsplit("/", 1)[1][:-4] for u in plan.todo["image_id"].to_pylist())
    assert todo == ["changed", "decode_changed", "new", "read_err"]
    by_id = dict(zip(plan.todo["image_id"].to_pylist(), plan.todo["source_version"].to_pylist()))
    assert by_id == {listed[n][0]: listed[n][1] for n in todo}  # the listed version, not the row's
    assert plan.todo_bytes == 4 and plan.versioned
    assert plan.todo["image_id"].to_pylist() == sorted(plan.todo["image_id"].to_pylist())  # listing order
    text = "\n".join(plan.lines())
    for words in ("inputs                     7", "already done               3", "changed                    2",
                  "to retry                   1", "to score                   4   would read 4 files, 4 B"):
        assert words in text, text


def test_plan_for_a_manifest_without_versions_retries_every_error_but_category(tmp_path):
    out = str(tmp_path / "out")
    storage.makedirs(out)
    commit_file(out, "part-a.parquet", _rows([("ok", None, None), ("r", "read: timeout", None),
                                               ("d", "decode: not an image", None),
                                               ("c", "category: unknown 'screw'", None, "screw"),
                                               ("moved", None, None, "cookie")]))
    manifest = _manifest(tmp_path / "m.parquet", [
        {"path": f"/imgs/{i}.png", "image_id": i, "category": c}
        for i, c in (("ok", "tile"), ("r", "tile"), ("d", "tile"), ("c", "screw"), ("moved", "tile"), ("n", "tile"))])
    plan = make_plan(manifest, out, MODEL, ["tile", "cookie"])
    assert not plan.versioned and plan.todo_bytes is None
    assert sorted(plan.todo["image_id"].to_pylist()) == ["d", "moved", "n", "r"]
    assert (plan.new, plan.changed, plan.retry, plan.done) == (1, 1, 2, 2)
    assert "bytes unknown" in "\n".join(plan.lines())

    versioned = _manifest(tmp_path / "v.parquet", [  # a version column: decode errors wait for a new one
        {"path": "/imgs/d.png", "image_id": "d", "category": "tile", "version": None},
        {"path": "/imgs/ok.png", "image_id": "ok", "category": "tile", "version": "v2"}])
    plan = make_plan(versioned, out, MODEL, ["tile", "cookie"])
    assert sorted(plan.todo["image_id"].to_pylist()) == ["d", "ok"]  # d: no version on this row
    assert plan.changed == 1 and plan.retry == 1


def test_output_of_another_model_and_an_output_that_is_a_file(tmp_path):
    out = str(tmp_path / "out")
    storage.makedirs(out)
    commit_file(out, "part-a.parquet", _rows([("a", None, None)]))
    (tmp_path / "m.csv").write_text("path\n/x.png\n")
    with pytest.raises(UserError, match=f"already holds scores of model {MODEL}"):
        make_plan(str(tmp_path / "m.csv"), out, "fedcba9876543210", ["tile"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        make_plan(str(tmp_path / "m.csv"), str(tmp_path / "file"), MODEL, ["tile"])
    (tmp_path / "empty.csv").write_text("path,image_id\n")
    with pytest.raises(UserError, match="is empty: no rows"):
        make_plan(str(tmp_path / "empty.csv"), str(tmp_path / "o2"), MODEL, ["tile"])


# --------------------------------------------------------------------------- superseded rows, exactly once
def test_superseded_rows_are_dropped_after_the_new_ones_commit(tmp_path):
    out = str(tmp_path / "out")
    storage.makedirs(out)
    commit_file(out, "part-old.parquet", _rows([("a", None, "1"), ("b", None, "1"), ("c", "read: x", "1")]))
    commit_file(out, "part-mid.parquet", _rows([("c", "read: x", "1")], T0 + timedelta(hours=1)))
    commit_file(out, "part-new.parquet", _rows([("a", None, "2"), ("c", None, "1")], T0 + timedelta(days=1)))
    rows = read_rows(out, ["image_id", "source_version", "scored_at"])
    current, superseded = newest_rows(rows)
    assert sorted(current["image_id"].to_pylist()) == ["a", "b", "c"]
    assert pc.all(pc.equal(current.filter(pc.is_in(current["image_id"], pa.array(["a", "c"])))["scored_at"],
                           pa.scalar(T0 + timedelta(days=1)))).as_py()
    assert sorted(zip(superseded["image_id"].to_pylist(),
                      [os.path.basename(f) for f in superseded["__filename"].to_pylist()])) == \
        [("a", "part-old.parquet"), ("c", "part-mid.parquet"), ("c", "part-old.parquet")]

    inputs = pa.table({"image_id": ["a", "b", "c"], "source_version": ["2", "1", "1"]})
    checked = verify(inputs, out)
    assert (checked.rows, checked.superseded_dropped) == (3, 3)
    assert sorted(os.listdir(out)) == ["_tmp", "part-new.parquet", "part-old.parquet"]  # mid was emptied
    assert pq.read_table(os.path.join(out, "part-old.parquet"))["image_id"].to_pylist() == ["b"]
    assert pq.read_table(out).num_rows == 3
    assert drop_superseded(out, newest_rows(read_rows(out, ["image_id", "scored_at"]))[1]) == []


def test_the_current_row_is_the_latest_runs_whatever_the_workers_clocks_say(tmp_path):
    """Issue 34: run 2's worker clock is a day behind run 1's. The current row of an image is
    the one of the later run (run_seq, set by the driver), not the later scored_at: the plan
    sees run 2's version as done and verify drops run 1's row. Rows of files written before
    run_seq existed count as run 0 (and among themselves scored_at still orders them)."""
    out = str(tmp_path / "out")
    storage.makedirs(out)
    commit_file(out, "part-legacy.parquet", _rows([("a", None, "0"), ("b", None, "0")], T0 + timedelta(days=5))
                .drop_columns(["run_seq"]))
    commit_file(out, "part-run1.parquet", _rows([("a", None, "1"), ("b", None, "1")], T0 + timedelta(days=1), run_seq=1))
    commit_file(out, "part-run2.parquet", _rows([("a", None, "2")], T0, run_seq=2))  # skewed: a day early
    current, superseded = newest_rows(read_rows(out, ["image_id", "source_version", "run_seq", "scored_at"]))
    assert dict(zip(current["image_id"].to_pylist(), current["source_version"].to_pylist())) == {"a": "2", "b": "1"}
    assert superseded.num_rows == 3
    manifest = _manifest(tmp_path / "m.parquet", [{"path": "a", "image_id": "a", "version": "2"},
                                                  {"path": "b", "image_id": "b", "version": "1"}])
    plan = make_plan(manifest, out, MODEL, ["tile"])
    assert (plan.done, plan.changed, plan.run_seq) == (2, 0, 3)
    checked = verify(pa.table({"image_id": ["a", "b"], "source_version": ["2", "1"]}), out)
    assert (checked.rows, checked.superseded_dropped) == (2, 3)
    # the legacy rows alone: ordered by scored_at, and the next run is run 1
    old = str(tmp_path / "old")
    storage.makedirs(old)
    commit_file(old, "part-x.parquet", _rows([("a", None, "late")], T0 + timedelta(days=1)).drop_columns(["run_seq"]))
    commit_file(old, "part-y.parquet", _rows([("a", None, "early")], T0).drop_columns(["run_seq"]))
    rows = read_rows(old, ["image_id", "source_version", "run_seq", "scored_at"])
    assert newest_rows(rows)[0]["source_version"].to_pylist() == ["late"]
    assert make_plan(manifest, old, MODEL, ["tile"]).run_seq == 1


def test_rows_carry_the_run_seq_the_driver_gave(tmp_path):
    """postprocess_and_commit writes the plan's run_seq in every row, whatever its clock."""
    import numpy as np

    from promptad.score.command import postprocess_and_commit

    out = str(tmp_path / "out")
    storage.makedirs(out)
    batch = {"image_id": np.asarray(["a", "b"], object), "path": np.asarray(["a", "b"], object),
             "category": np.asarray(["tile", "tile"], object), "source_version": np.asarray(["1", "1"], object),
             "error": np.asarray(["read: x", "read: y"], object), "height": np.zeros(2, np.int32),
             "width": np.zeros(2, np.int32), "score": np.zeros(2, np.float32), "map": np.zeros((2, 4, 4), np.float32)}
    postprocess_and_commit(batch, out, {}, MODEL, "r", nonce="n", run_seq=7)
    assert read_rows(out, ["image_id", "run_seq"])["run_seq"].to_pylist() == [7, 7]


def test_verify_fails_loudly_on_a_missing_row_or_a_stale_version(tmp_path):
    out = str(tmp_path / "out")
    storage.makedirs(out)
    commit_file(out, "part-a.parquet", _rows([("a", None, "1")]))
    with pytest.raises(RuntimeError, match="rows for 1 of 2 inputs"):
        verify(pa.table({"image_id": ["a", "b"], "source_version": ["1", None]}), out)
    with pytest.raises(RuntimeError, match="1 rows scored from another version"):
        verify(pa.table({"image_id": ["a"], "source_version": ["2"]}), out)
    verify(pa.table({"image_id": ["a"], "source_version": pa.array([None], pa.string())}), out)


def test_old_output_files_without_source_version_read_as_null_and_are_rescored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = _rows([("a", None, None)]).drop_columns(["source_version"])
    pq.write_table(old, out / "part-legacy.parquet")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(f"path,image_id\n{tmp_path / 'imgs' / 'a.png'},a\n")
    assert read_rows(str(out), ["image_id", "source_version"])["source_version"].to_pylist() == [None]
    assert make_plan(str(tmp_path / "m.csv"), str(out), MODEL, ["tile"]).todo.num_rows == 0  # no versions
    plan = make_plan(str(tmp_path / "imgs"), str(out), MODEL, ["tile"])  # listed: image_id is the path
    assert plan.new == 1


def test_planning_a_large_manifest(tmp_path):
    """100,000 rows (a tenth of benchmarks/score_plan.py's): half done, half new, order kept."""
    n = 100_000
    ids = pa.array([f"img{i:07d}" for i in range(n)])
    manifest = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image_id": ids, "path": pc.binary_join_element_wise("/data/", ids, ".png", "")}),
                   manifest)
    out = str(tmp_path / "out")
    storage.makedirs(out)
    done = _rows([(f"img{i:07d}", None, None) for i in range(0, n, 2)])
    commit_file(out, "part-a.parquet", done)
    plan = make_plan(str(manifest), out, MODEL, ["tile"])
    assert (plan.done, plan.new) == (n // 2, n // 2)
    assert plan.todo["image_id"][0].as_py() == "img0000001" and plan.todo["path"][0].as_py() == "/data/img0000001.png"
    assert len(list_inputs(str(manifest), ["tile"])) == n


def test_progress_line_says_done_total_rate_eta_and_errors():
    from promptad.score.progress import Progress, Summary

    progress = Progress(Summary(output="o", run_id="r", model_id="m", inputs=300, already_done=100), total=200)
    progress.start -= 10  # ten seconds in
    progress.add(50, ["read: not found", "decode: truncated image data"])
    progress.add(50, [])
    line = progress.line()
    assert line.startswith("score: 100/200 rows (50 %), 10.0 rows/s, ETA 10 s, 2 errors"), line
    assert progress.summary.errors_by_kind == {"read": 1, "decode": 1} and progress.summary.files == 2
    assert "rows/s), 2 files; " in progress.summary.lines()[0]
    progress.summary.files = 1
    assert "rows/s), 1 file; " in progress.summary.lines()[0]


def test_matching_in_hash_partitions_agrees_with_a_dict_whatever_the_chunks():
    """Issue 38: the plan matches image_ids partition by partition (match.match); a string's
    partition must not depend on how its column is chunked or sliced, and the match must pick
    each input's current row as a dict of the rows would."""
    import random

    import numpy as np

    from promptad.score.output import FILE
    from promptad.score.match import buckets as _buckets
    from promptad.score.match import match as _match

    rng = random.Random(0)
    for _ in range(200):
        values = ["".join(rng.choice("ab/é1") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 30))]
        whole = pa.array(values)
        cut = rng.randint(0, len(values))
        expected = _buckets(pa.chunked_array([whole]), 8)
        assert (_buckets(pa.chunked_array([whole.slice(0, cut), whole.slice(cut)]), 8) == expected).all()
        assert (np.concatenate([_buckets(pa.chunked_array([pa.array([v])]), 8) for v in values]) == expected).all()
    for _ in range(30):
        n = rng.randint(0, 200)
        ids = [f"id{rng.randint(0, 120)}" for _ in range(n)]
        seq = [rng.randint(0, 4) for _ in range(n)]
        rows = pa.table({"image_id": pa.chunked_array([pa.array(ids[:n // 2], pa.string()),
                                                       pa.array(ids[n // 2:], pa.string())]),
                         "run_seq": pa.array(seq, pa.int64()),
                         FILE: pa.array([f"f{i:04d}" for i in range(n)], pa.string()).dictionary_encode()})
        wanted = sorted({f"id{rng.randint(0, 200)}" for _ in range(80)}) + [""]
        where, superseded, repeats = _match(rows, pa.chunked_array([pa.array(wanted)]), parts=rng.choice([1, 3, 8]))
        best: dict[str, tuple] = {}
        for i, (k, s) in enumerate(zip(ids, seq)):
            if k not in best or (s, f"f{i:04d}") > best[k][0]:
                best[k] = ((s, f"f{i:04d}"), i)
        assert list(where) == [best[k][1] if k in best else -1 for k in wanted]
        assert superseded.num_rows == n - len(best) and not repeats
    assert _match(rows, pa.chunked_array([pa.array(["x", "x"])]))[2]  # a repeated input
