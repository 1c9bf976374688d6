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
- **Compact.** compact.py merges small files under a journal in COMPACT_DIR; while one is pending
  (a killed compaction), `live_files` leaves out either its sources or its partial targets, so
  every reader here (plan, verify) counts each row once.

At 10,000,000 rows everything here stays column-wise: only the named columns are read, the file
of each row is a dictionary column, and duplicates are found by hashing, not by sorting all rows.
"""
from __future__ import annotations

import io
import json
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
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


# read dictionary-encoded: a few values each (one model, a few categories, mostly null errors),
# 4 bytes a row instead of 8 + the text
DICTIONARY_COLUMNS = ("model_id", "category", "error")
COMPACT_DIR = "_compact"  # one journal per compaction in progress (compact.py)


def _is_data(rel: str) -> bool:
    return rel.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in rel.split("/"))


def listing(output_uri: str) -> tuple[dict[str, int], list[str]]:
    """One listing of the output: {relative name: bytes} of its committed Parquet files, and the
    relative names of pending compaction journals (COMPACT_DIR/*.json)."""
    fs, root = storage.filesystem(output_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return {}, []
    files, journals = {}, []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root.rstrip("/")) + 1:]
        if _is_data(rel):
            files[rel] = int(info.size or 0)
        elif rel.startswith(COMPACT_DIR + "/") and rel.endswith(".json"):
            journals.append(rel)
    return dict(sorted(files.items())), sorted(journals)


def read_journal(output_uri: str, rel: str) -> dict:
    """A compaction journal: {"sources": [...], "targets": [...]}, names relative to the output."""
    return json.loads(storage.read_bytes(storage.join(output_uri, rel)))


def dead_files(files: dict[str, int] | set[str], journals: list[dict]) -> set[str]:
    """Files a pending compaction has made invisible to the planner and the count: its sources once
    every target is committed (the rows are in the targets), else its targets (a partial merge)."""
    dead: set[str] = set()
    for j in journals:
        targets = set(j["targets"])
        dead |= set(j["sources"]) if targets <= set(files) else targets
    return dead


def live_files(output_uri: str) -> list[str]:
    """URIs of the committed files whose rows count: every committed file but those a pending
    (killed) compaction made dead. Reading them gives each row once, at any point of a compaction."""
    files, journals = listing(output_uri)
    dead = dead_files(files, [read_journal(output_uri, j) for j in journals])
    return [storage.join(output_uri, f) for f in files if f not in dead]


def committed_files(output_uri: str) -> list[str]:
    """Parquet files committed to the output (not staged ones, not run summaries), as URIs."""
    return [storage.join(output_uri, f) for f in listing(output_uri)[0]]


def _read_file(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """`columns` of one committed file (cast to OUTPUT_SCHEMA; null where an older file lacks one).
    Raises ArrowInvalid for a file that is not scoring output. Only the named column chunks are
    read (never the maps); model_id comes back dictionary-encoded (one value per file, in practice)."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, read_dictionary=[c for c in DICTIONARY_COLUMNS if c in columns])
        names = set(pf.schema_arrow.names)
        if "image_id" not in names:
            raise pa.ArrowInvalid(f"{posixpath.basename(path)} has no image_id column")
        table = pf.read(columns=[c for c in columns if c in names])
    n = table.num_rows
    out = []
    for c in columns:
        kind = OUTPUT_SCHEMA.field(c).type
        if c in DICTIONARY_COLUMNS:
            kind = pa.dictionary(pa.int32(), kind)
        if c not in names:
            out.append(pa.nulls(n, kind))
        elif table[c].type == kind:
            out.append(table[c])
        elif c in DICTIONARY_COLUMNS:
            out.append(pc.dictionary_encode(table[c].cast(OUTPUT_SCHEMA.field(c).type)))
        else:
            out.append(table[c].cast(kind))
    return pa.table(out, names=columns)


def _with_files(parts: list[pa.Table], paths: list[str]) -> pa.Table:
    """The parts as one table plus FILE, dictionary-encoded: at 10,000,000 rows a plain string column
    of file paths alone would take ~600 MB."""
    table = pa.concat_tables(parts, promote_options="permissive")  # chunked, not combined: no second copy
    counts = np.asarray([p.num_rows for p in parts], np.int64)
    indices = pa.array(np.repeat(np.arange(len(parts), dtype=np.int32), counts), pa.int32())
    return table.append_column(FILE, pa.DictionaryArray.from_arrays(indices, pa.array(paths, pa.string())))


def read_rows(output_uri: str, columns: list[str], files: list[str] | None = None) -> pa.Table:
    """`columns` of every committed row (of `files`, default: the output's live files) plus FILE
    (the filesystem path of its file, dictionary-encoded).

    Only the named columns are read (never the maps). Files written before a column existed
    (`source_version`) read as null there. File by file, a few at a time: a pyarrow dataset over
    the ~14,000 files of 900,000 rows kept every file's metadata and peaked at 1 GB for a 100 MB
    table."""
    files = live_files(output_uri) if files is None else files
    if not files:
        empty = [pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in DICTIONARY_COLUMNS
                 else OUTPUT_SCHEMA.field(c) for c in columns]
        return pa.schema(empty + [(FILE, pa.dictionary(pa.int32(), pa.string()))]).empty_table()
    fs, _ = storage.filesystem(output_uri)
    paths = [storage.filesystem(f)[1] for f in files]
    threads = READ_THREADS_S3 if isinstance(fs, pafs.S3FileSystem) else READ_THREADS_LOCAL
    try:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda p: _read_file(fs, p, columns), paths))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError) as e:
        raise UserError(f"--output {output_uri} holds Parquet files that are not scoring output "
                        f"({' '.join(str(e).split())[:160]}); pass an empty or new --output") from None
    return _with_files(parts, paths)


def next_run_seq(rows: pa.Table) -> int:
    """The sequence number of a run planned against `rows` (with run_seq): one more than any run's
    that left a row; 1 for an empty output or one written before run_seq existed."""
    if "run_seq" not in rows.column_names or rows.num_rows == 0:
        return 1
    return int(pc.max(pc.fill_null(rows["run_seq"], 0)).as_py() or 0) + 1


def newest_rows(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(current, superseded): the row of each image_id of the latest run (highest run_seq, a row
    without one counting as run 0; then the latest scored_at, which orders rows written before
    run_seq existed; then the larger file name), and every older one.

    Hash-based, not a sort of every row: the image_ids that occur more than once are found with
    two hash passes, and only their rows are sorted (at 10,000,000 rows, a few thousand at most
    after a completed run)."""
    n = rows.num_rows
    if n == 0:
        return rows, rows.slice(0, 0)
    ids = rows["image_id"]
    unique = pc.unique(ids)
    if len(unique) == n:
        return rows, rows.slice(0, 0)
    later = np.ones(n, bool)
    later[pc.index_in(unique, value_set=ids).to_numpy(zero_copy_only=False)] = False  # not a first occurrence
    repeated = pc.unique(ids.filter(pa.array(later)))
    involved = pc.is_in(ids, value_set=repeated)
    rest, sub = rows.filter(pc.invert(involved)), rows.filter(involved)
    seq = pc.fill_null(sub["run_seq"], 0) if "run_seq" in sub.column_names else pa.nulls(sub.num_rows, pa.int64())
    keyed = sub.append_column("_seq", seq)
    keys = [("image_id", "ascending"), ("_seq", "descending")]
    if "scored_at" in sub.column_names:
        keys.append(("scored_at", "descending"))
    if FILE in sub.column_names:
        keyed = keyed.append_column("_file", keyed[FILE].cast(pa.string()))
        keys.append(("_file", "descending"))
    sub = sub.take(pc.sort_indices(keyed.select([k for k, _ in keys]), sort_keys=keys))
    sub_ids = sub["image_id"].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(sub_ids[1:], sub_ids[:-1])])
    current = pa.concat_tables([rest, sub.filter(first)])
    return current, sub.filter(pc.invert(first))


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


def commit_bytes(output_uri: str, name: str, data: bytes) -> str:
    """Write `data` as OUTPUT/name so that the file appears whole or not at all (replacing any file
    of that name in one step); returns its URI. Local files are staged in TMP_DIR (a `.tmp` file
    beside them would be read as data by pyarrow's folder discovery) and renamed."""
    uri = storage.join(output_uri, name)
    fs, path = storage.filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        storage.write_bytes(uri, data)  # one PUT: an S3 object appears whole or not at all
        return uri
    staged = storage.join(output_uri, TMP_DIR, f"{posixpath.basename(name)}.{uuid.uuid4().hex}")
    storage.write_bytes(staged, data)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    fs.move(storage.filesystem(staged)[1], path)
    return uri


def commit_file(output_uri: str, name: str, table: pa.Table) -> str:
    """Write `table` as OUTPUT/name, whole or not at all (commit_bytes); returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return commit_bytes(output_uri, name, buf.getvalue())


def as_output(table: pa.Table) -> pa.Table:
    """`table` in OUTPUT_SCHEMA: columns an older file lacks become nulls."""
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                     for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)


def _drop_from_file(output_uri: str, fs: pafs.FileSystem, path: str, ids: pa.Array) -> None:
    """Rewrite one committed file without the rows of `ids` (they have newer rows elsewhere), or
    delete it when none is left. Old-format files gain the missing columns as nulls."""
    table = pq.read_table(path, filesystem=fs)
    keep = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=ids)))
    if keep.num_rows == 0:
        fs.delete_file(path)
        return
    commit_file(output_uri, posixpath.relpath(path, storage.filesystem(output_uri)[1]), as_output(keep))


def drop_superseded(output_uri: str, superseded: pa.Table) -> list[str]:
    """Remove `superseded` rows (image_id, FILE) from their files; returns the paths of the files
    rewritten (or deleted). Each file is rewritten once however many of its rows went, by a few
    threads (the work is I/O)."""
    if superseded.num_rows == 0:
        return []
    fs, _ = storage.filesystem(output_uri)
    plain = superseded.select(["image_id", FILE]).set_column(1, FILE, superseded[FILE].cast(pa.string()))
    by_file = plain.group_by(FILE).aggregate([("image_id", "list")])
    jobs = [(p, pa.array(ids, pa.string())) for p, ids in zip(by_file[FILE].to_pylist(),
                                                             by_file["image_id_list"].to_pylist())]
    with ThreadPoolExecutor(REWRITE_THREADS) as pool:
        list(pool.map(lambda job: _drop_from_file(output_uri, fs, *job), jobs))
    return [p for p, _ in jobs]


@dataclass
class Verified:
    """What `verify` counted after a run."""

    rows: int  # rows of this run's inputs in the output (== inputs)
    superseded_dropped: int  # older rows of re-scored inputs (or a killed run's) removed now


def verify(inputs: pa.Table, output_uri: str) -> Verified:
    """Drop superseded rows, then check exactly once: every input has one row, from the version
    the plan saw. Counted, not assumed: the files rewritten are read again, and a mismatch fails
    the run. Hash partitions (match.py), no join or sort of the whole output: at 10,000,000 rows
    this runs in the memory the plan did."""
    from promptad.score.match import match

    columns = ["image_id", "source_version", *ORDER_COLUMNS]
    rows = read_rows(output_uri, columns)
    _, superseded, _ = match(rows, inputs["image_id"])
    rewritten = drop_superseded(output_uri, superseded)
    if rewritten:
        touched = pc.is_in(rows[FILE].cast(pa.string()), value_set=pa.array(rewritten, pa.string()))
        again = [f for f in live_files(output_uri) if storage.filesystem(f)[1] in set(rewritten)]
        rows = pa.concat_tables([rows.filter(pc.invert(touched)).drop_columns([FILE]),
                                 read_rows(output_uri, columns, again).drop_columns([FILE])])
    where, left, _ = match(rows, inputs["image_id"])
    if left.num_rows:
        raise RuntimeError(f"output {output_uri} has {left.num_rows} duplicate rows after dropping "
                           "superseded ones; this is a bug, please report it with the output's file list")
    found = int((where >= 0).sum())
    if found != inputs.num_rows:
        raise RuntimeError(f"output {output_uri} has rows for {found} of {inputs.num_rows} inputs; "
                           "re-run the same command to score the missing ones")
    row_version = rows["source_version"].take(pa.array(where))
    version = inputs["source_version"]
    stale = pc.sum(pc.and_(pc.is_valid(version), pc.fill_null(pc.not_equal(version, row_version), True)))
    if (stale.as_py() or 0) > 0:
        raise RuntimeError(f"output {output_uri} has {stale.as_py()} rows scored from another version than "
                           "the one listed; this is a bug, please report it")
    return Verified(rows=found, superseded_dropped=superseded.num_rows)
