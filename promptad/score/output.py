"""The scoring output: a Parquet dataset (local folder or S3 prefix) that holds exactly one row per
input after a completed run (DESIGN.md, Scoring output). Pure pyarrow; no Ray.

How rows are committed, superseded and counted:

- **Commit.** Every file appears whole or not at all: local files are written under `_tmp/` and
  renamed, S3 objects are one PUT. A file's name is a hash of the run's nonce and the image_ids it
  holds, so a retried write task of the same run overwrites its own file instead of adding a
  second one, and no run ever writes over a file another run left.
- **Supersede.** An input that is scored again (its content version changed, or its last row is a
  `read:` error) gets its new row in a new file first; only after the pipeline has finished are
  the older rows dropped, by rewriting each file that holds one without it (an atomic replace, or
  a delete when nothing is left). So at every moment, including after a kill at any point, every
  input that had a row still has at least one. Between the commit and the rewrite an input can
  have two rows; the one of the latest run is the current one (`newest_rows`), for the next run's
  plan as for any reader who looks during a run. "Latest" is the run's sequence number in the
  output (`run_seq`), which the driver sets from the rows it planned against, never a worker's
  clock: with skew between nodes, a re-scored image's new row could carry an older `scored_at`.
- **Count.** After the rewrite, `verify` reads the output again and checks that every input has
  exactly one row and that it was scored from the version the plan saw.
"""
from __future__ import annotations

import io
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from promptad.data import storage
from promptad.errors import UserError

OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("category", pa.string()),
    ("score", pa.float32()),
    ("score_norm", pa.float32()),
    ("is_anomalous", pa.bool_()),
    ("threshold", pa.float32()),
    ("map_png", pa.binary()),
    ("map_height", pa.int32()),
    ("map_width", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("defect_area", pa.float32()),
    ("error", pa.string()),
    ("source_version", pa.string()),
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
    # which run wrote the row, in the order of runs into this output (next_run_seq); decides which
    # row of an image is current. Null in files written before it existed: they count as run 0.
    ("run_seq", pa.int64()),
])
ORDER_COLUMNS = ["run_seq", "scored_at"]  # what newest_rows orders by; read them with image_id
TMP_DIR = "_tmp"  # local commits are staged here; '_' folders are skipped by pyarrow, pandas and Spark
RUNS_DIR = "_runs"  # one JSON summary per run
FILE = "__filename"  # pyarrow's scan column: the file a row came from
REWRITE_THREADS = 8  # files rewritten at once when superseded rows are dropped (I/O bound)
READ_THREADS_LOCAL = 8  # committed files read at once when planning and counting
READ_THREADS_S3 = 32  # S3 reads wait on the network, not the CPU


def committed_files(output_uri: str) -> list[str]:
    """Parquet files committed to the output (not staged ones, not run summaries)."""
    try:
        files = storage.list_files(output_uri)
    except FileNotFoundError:
        return []
    return [f for f in files if f.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in storage.relative(f, output_uri).split("/"))]


def _read_file(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """`columns` of one committed file (cast to OUTPUT_SCHEMA; null where an older file lacks one)
    plus FILE. Raises ArrowInvalid for a file that is not scoring output."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if "image_id" not in names:
            raise pa.ArrowInvalid(f"{posixpath.basename(path)} has no image_id column")
        table = pf.read(columns=[c for c in columns if c in names])
    n = table.num_rows
    out = [table[c].cast(OUTPUT_SCHEMA.field(c).type) if c in names else pa.nulls(n, OUTPUT_SCHEMA.field(c).type)
           for c in columns]
    return pa.table([*out, pa.array([path] * n, pa.string())], names=[*columns, FILE])


def read_rows(output_uri: str, columns: list[str]) -> pa.Table:
    """`columns` of every committed row plus FILE (the filesystem path of its file).

    Only the named columns are read (never the maps). Files written before a column existed
    (`source_version`) read as null there. File by file, a few at a time: a pyarrow dataset over
    the ~14,000 files of 900,000 rows kept every file's metadata and peaked at 1 GB for a 100 MB
    table."""
    files = committed_files(output_uri)
    if not files:
        return pa.schema([OUTPUT_SCHEMA.field(c) for c in columns] + [(FILE, pa.string())]).empty_table()
    fs, _ = storage.filesystem(output_uri)
    paths = [storage.filesystem(f)[1] for f in files]
    threads = READ_THREADS_S3 if isinstance(fs, pafs.S3FileSystem) else READ_THREADS_LOCAL
    try:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda p: _read_file(fs, p, columns), paths))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError) as e:
        raise UserError(f"--output {output_uri} holds Parquet files that are not scoring output "
                        f"({' '.join(str(e).split())[:160]}); pass an empty or new --output") from None
    return pa.concat_tables(parts).combine_chunks()


def next_run_seq(rows: pa.Table) -> int:
    """The sequence number of a run planned against `rows` (with run_seq): one more than any run's
    that left a row; 1 for an empty output or one written before run_seq existed."""
    if "run_seq" not in rows.column_names or rows.num_rows == 0:
        return 1
    return int(pc.max(pc.fill_null(rows["run_seq"], 0)).as_py() or 0) + 1


def newest_rows(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(current, superseded): the row of each image_id of the latest run (highest run_seq, a row
    without one counting as run 0; then the latest scored_at, which orders rows written before
    run_seq existed; then the larger file name), and every older one. Sorts only when some
    image_id has more than one row."""
    if rows.num_rows == 0 or pc.count_distinct(rows["image_id"]).as_py() == rows.num_rows:
        return rows, rows.slice(0, 0)
    seq = pc.fill_null(rows["run_seq"], 0) if "run_seq" in rows.column_names else pa.nulls(rows.num_rows, pa.int64())
    keyed = rows.append_column("_seq", seq)
    keys = [("image_id", "ascending"), ("_seq", "descending")]
    if "scored_at" in rows.column_names:
        keys.append(("scored_at", "descending"))
    order = pc.sort_indices(keyed, sort_keys=keys + [(FILE, "descending")])
    rows = rows.take(order)
    ids = rows["image_id"].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1])])
    return rows.filter(first), rows.filter(pc.invert(first))


def check_same_model(rows: pa.Table, model_id: str, output_uri: str) -> None:
    """One model per output: mixing models would make resume skip images scored by the other one."""
    others = sorted(set(pc.unique(rows["model_id"]).to_pylist()) - {model_id, None})
    if others:
        raise UserError(f"--output {output_uri} already holds scores of model {others[0]}, not of this model "
                        f"{model_id}; pass a new --output (re-running the same model into it resumes it)")


def clean_staging(output_uri: str) -> None:
    """Drop files a killed run left half-written in the staging folder (local outputs only)."""
    fs, path = storage.filesystem(output_uri)
    if isinstance(fs, pafs.S3FileSystem):
        return
    staging = posixpath.join(path, TMP_DIR)
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir_contents(staging)


def commit_file(output_uri: str, name: str, table: pa.Table) -> str:
    """Write `table` as OUTPUT/name so that the file appears whole or not at all (replacing any file
    of that name in one step); returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(output_uri, name)
    fs, path = storage.filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        storage.write_bytes(uri, buf.getvalue())  # one PUT: an S3 object appears whole or not at all
        return uri
    staged = storage.join(output_uri, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
    storage.write_bytes(staged, buf.getvalue())
    fs.move(storage.filesystem(staged)[1], path)
    return uri


def _drop_from_file(output_uri: str, fs: pafs.FileSystem, path: str, ids: pa.Array) -> None:
    """Rewrite one committed file without the rows of `ids` (they have newer rows elsewhere), or
    delete it when none is left. Old-format files gain the missing columns as nulls."""
    table = pq.read_table(path, filesystem=fs)
    keep = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=ids)))
    if keep.num_rows == 0:
        fs.delete_file(path)
        return
    keep = pa.table([keep[f.name] if f.name in keep.column_names else pa.nulls(keep.num_rows, f.type)
                     for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    commit_file(output_uri, posixpath.relpath(path, storage.filesystem(output_uri)[1]), keep)


def drop_superseded(output_uri: str, superseded: pa.Table) -> int:
    """Remove `superseded` rows (image_id, FILE) from their files; returns how many rows went.

    Each file is rewritten once however many of its rows went, by a few threads (the work is I/O)."""
    if superseded.num_rows == 0:
        return 0
    fs, _ = storage.filesystem(output_uri)
    by_file = superseded.group_by(FILE).aggregate([("image_id", "list")])
    jobs = [(p, pa.array(ids, pa.string())) for p, ids in zip(by_file[FILE].to_pylist(),
                                                             by_file["image_id_list"].to_pylist())]
    with ThreadPoolExecutor(REWRITE_THREADS) as pool:
        list(pool.map(lambda job: _drop_from_file(output_uri, fs, *job), jobs))
    return superseded.num_rows


@dataclass
class Verified:
    """What `verify` counted after a run."""

    rows: int  # rows of this run's inputs in the output (== inputs)
    superseded_dropped: int  # older rows of re-scored inputs (or a killed run's) removed now


def verify(inputs: pa.Table, output_uri: str) -> Verified:
    """Drop superseded rows, then check exactly once: every input has one row, from the version
    the plan saw. Counted, not assumed: a mismatch fails the run."""
    rows = read_rows(output_uri, ["image_id", "source_version", *ORDER_COLUMNS])
    _, superseded = newest_rows(rows)
    dropped = drop_superseded(output_uri, superseded)
    if dropped:
        rows = read_rows(output_uri, ["image_id", "source_version", *ORDER_COLUMNS])
    mine = rows.filter(pc.is_in(rows["image_id"], value_set=inputs["image_id"]))
    distinct = pc.count_distinct(mine["image_id"]).as_py()
    if mine.num_rows != distinct:
        raise RuntimeError(f"output {output_uri} has {mine.num_rows - distinct} duplicate rows after dropping "
                           "superseded ones; this is a bug, please report it with the output's file list")
    if distinct != inputs.num_rows:
        raise RuntimeError(f"output {output_uri} has rows for {distinct} of {inputs.num_rows} inputs; "
                           "re-run the same command to score the missing ones")
    joined = inputs.select(["image_id", "source_version"]).join(
        mine.select(["image_id", "source_version"]).rename_columns(["image_id", "row_version"]), "image_id")
    stale = pc.sum(pc.and_(pc.is_valid(joined["source_version"]),
                           pc.fill_null(pc.not_equal(joined["source_version"], joined["row_version"]), True)))
    if (stale.as_py() or 0) > 0:
        raise RuntimeError(f"output {output_uri} has {stale.as_py()} rows scored from another version than "
                           "the one listed; this is a bug, please report it")
    return Verified(rows=mine.num_rows, superseded_dropped=dropped)
