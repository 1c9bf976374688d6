"""What a `promptad score` run will do, decided on the driver before Ray starts. Pure pyarrow.

The unit of exactly-once is (image_id, content version). Inputs come with the version their
listing gives for free (storage.list_versions: local size + mtime_ns; S3 ETag, plus the version id
in a versioned bucket) or, for a manifest, its optional `version` column. Each input's current row
in the output (the one of the latest run, output.newest_rows) then decides:

    no row                                   -> new       (scored)
    row of another category                  -> changed   (scored again)
    input has a version != row's version     -> changed   (scored again; a row without one counts as different)
    row is a `read:` error                   -> retry     (every run: throttling, permissions, a late file)
    row is another error, input has no version
      (manifest without `version`)           -> retry     (nothing tells whether the file was fixed)
    anything else                            -> done      (a `decode:` or `model:` error waits for a new version;
                                                           a `category:` error for a new category)

Planning never sends a request per input: a manifest row without a version is re-scored only when
its last row is an error row. Everything here is column-wise Arrow (no Python object per row, no
join or sort of the history: each input finds its current row by a hash lookup of its image_id),
so a 10,500,000-row manifest against 10,000,000 rows of history plans with ~11 s of CPU and 1.6 GB
(benchmarks/score_plan.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from promptad.data import storage
from promptad.data.datasets import MANIFEST_EXTENSIONS, manifest_table, resolve_paths
from promptad.errors import UserError
from promptad.score.match import match
from promptad.score.output import ORDER_COLUMNS, check_same_model, next_run_seq, read_rows

INPUT_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("category", pa.string()),
                          ("source_version", pa.string()), ("size", pa.int64())])
_INPUT_HINT = "pass a folder/prefix of images or a manifest (.parquet/.csv)"


def check_output_location(output_uri: str) -> None:
    """A --output that is a file cannot hold a dataset: say so before anything else runs."""
    if storage.exists(output_uri) and not storage.is_dir(output_uri):
        raise UserError(f"--output {output_uri} is a file; pass a folder or prefix for the Parquet dataset")


def list_inputs(input_uri: str, categories: list[str], *, planning: bool = False) -> pa.Table:
    """INPUT_SCHEMA rows of every input: a manifest's rows, or every image file under a folder or
    prefix (image_id = its URI). category is null where neither the manifest nor a single-category
    model names one (those become error rows); size is null where the listing gives none (manifests).
    `planning`: a manifest's paths as written and its image_ids unchecked (make_plan resolves the
    paths it will read and checks the ids in its own hash pass)."""
    only = categories[0] if len(categories) == 1 else None
    manifest = input_uri.lower().endswith(MANIFEST_EXTENSIONS)
    if only is None and not manifest:  # before listing what may be millions of objects
        raise UserError(f"the model scores several categories ({', '.join(categories)}) and a folder does not say "
                        "which each image is; pass a manifest with a 'category' column as --input")
    try:
        if manifest:
            if not storage.exists(input_uri):
                raise UserError(f"--input {input_uri} does not exist; {_INPUT_HINT}")
            m = manifest_table(input_uri, ("image_id", "category", "version"), resolve=not planning,
                               unique=not planning, path=not planning)
            if planning:  # paths (where not needed as ids), the default category and sizes: for the rows to score
                return pa.table({"image_id": m["image_id"], **({"path": m["path"]} if "path" in m.column_names else {}),
                                 "category": m["category"], "source_version": m["version"]})
            category = pc.fill_null(m["category"], only) if only is not None else m["category"]
            return pa.table([m["image_id"], m["path"], category, m["version"], pa.nulls(m.num_rows, pa.int64())],
                            schema=INPUT_SCHEMA)
        if storage.is_dir(input_uri):
            listed = storage.list_versions(input_uri, storage.IMAGE_EXTENSIONS)
        elif storage.exists(input_uri):
            size, version = storage.file_version(input_uri)
            listed = pa.table([[input_uri], [size], [version]], schema=storage.VERSIONED_SCHEMA)
        else:
            raise UserError(f"--input {input_uri} does not exist; {_INPUT_HINT}")
    except FileNotFoundError as e:
        raise UserError(f"--input: {e}; {_INPUT_HINT}") from None
    n = listed.num_rows
    return pa.table([listed["uri"], listed["uri"], pa.array([only] * n, pa.string()), listed["version"],
                     listed["size"]], schema=INPUT_SCHEMA)


def _differs(a, b) -> pa.ChunkedArray:
    """a != b where null == null and null != any value."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.if_else(both_null, False, pc.fill_null(pc.not_equal(a, b), True))


def _count(mask) -> int:
    return int(pc.sum(mask).as_py() or 0)


@dataclass
class Plan:
    """The inputs, what each needs, and the rows to score; `lines()` is what --dry-run prints."""

    input_uri: str
    output_uri: str
    model_id: str
    inputs: pa.Table  # image_id and source_version of every input (verify checks each has its row)
    todo: pa.Table  # INPUT_SCHEMA, the inputs to score now, in listing order
    done: int
    new: int
    changed: int
    retry: int
    superseded: int  # older rows of inputs that already have a newer one (a killed run's leftovers)
    versioned: bool  # every input carries a content version
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    run_seq: int = 1  # the run's sequence number in the output (output.next_run_seq): its rows' run_seq

    @property
    def todo_bytes(self) -> int | None:
        """Bytes the run would read, where the listing gave sizes (folders/prefixes; not manifests)."""
        sizes = self.todo["size"]
        if sizes.null_count:
            return None
        return int(pc.sum(sizes).as_py() or 0)

    def lines(self) -> list[str]:
        n = self.todo.num_rows
        size = self.todo_bytes
        read = f"{n:,} files, {human_bytes(size)}" if size is not None else f"{n:,} files (bytes unknown: a manifest lists no sizes)"
        if not self.input_uri.lower().endswith(MANIFEST_EXTENSIONS):
            versions = "from the listing (size + mtime, or S3 ETag)"
        elif self.versioned:
            versions = "from the manifest's 'version' column"
        else:
            versions = "none (no 'version' column: a row is scored again only after an error)"
        return [
            f"score: plan for --input {self.input_uri} -> --output {self.output_uri} (model {self.model_id})",
            f"  inputs          {self.inputs.num_rows:>12,}   content versions: {versions}",
            f"  already done    {self.done:>12,}",
            f"  new             {self.new:>12,}   no row yet",
            f"  changed         {self.changed:>12,}   content version (or category) differs from its row: scored again",
            f"  to retry        {self.retry:>12,}   last row is a read error (or any error, without a version)",
            f"  to score        {n:>12,}   would read {read}",
            f"  superseded rows {self.superseded:>12,}   older duplicate rows, dropped when a run completes",
            f"  planned in {self.seconds:.1f} s",
            *self.notes,
        ]


def human_bytes(n: float) -> str:
    """1,234 B, 58.7 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def make_plan(input_uri: str, output_uri: str, model_id: str, categories: list[str]) -> Plan:
    """List the inputs, read what the output holds, and decide what to score (see module docstring).

    Raises UserError for a bad --input or --output before anything is written."""
    t0 = time.monotonic()
    check_output_location(output_uri)
    rows = read_rows(output_uri, ["image_id", "category", "error", "source_version", "model_id", *ORDER_COLUMNS])
    check_same_model(rows, model_id, output_uri)  # before listing: a wrong --output fails fast
    rows = rows.drop_columns(["model_id"])
    inputs = list_inputs(input_uri, categories, planning=True)
    if inputs.num_rows == 0:
        what = "rows" if input_uri.lower().endswith(MANIFEST_EXTENSIONS) else \
            f"images ({', '.join(sorted(storage.IMAGE_EXTENSIONS))})"
        raise UserError(f"--input {input_uri} is empty: no {what}; {_INPUT_HINT} that lists at least one image")
    where, superseded, repeats = match(rows, inputs["image_id"])
    if repeats:  # a manifest's duplicate image_ids: its own one-line error
        manifest_table(input_uri, ("image_id",), resolve=False)
    # Each input's current row (a null index where it has none), then the decisions column-wise.
    has_row = pa.array(where >= 0)
    index = pa.array(where, mask=where < 0)
    del where
    row_category, error, row_version = (rows[c].take(index).cast(pa.string())
                                        for c in ("category", "error", "source_version"))
    run_seq = next_run_seq(rows)
    del rows, index
    only = categories[0] if len(categories) == 1 else None
    if only is not None and inputs["category"].null_count:  # a manifest's rows without a category
        inputs = inputs.set_column(inputs.schema.get_field_index("category"), "category",
                                   pc.fill_null(inputs["category"], only))
    version = inputs["source_version"]
    changed = pc.and_(has_row, pc.or_(_differs(inputs["category"], row_category),
                                      pc.and_(pc.is_valid(version), _differs(version, row_version))))
    read_error = pc.fill_null(pc.starts_with(error, "read:"), False)
    other_error = pc.and_(pc.is_valid(error), pc.invert(pc.fill_null(pc.starts_with(error, "category:"), False)))
    retry = pc.and_(pc.and_(has_row, pc.invert(changed)),
                    pc.or_(read_error, pc.and_(pc.is_null(version), other_error)))
    new = pc.invert(has_row)
    wanted = pc.or_(pc.or_(new, changed), retry)
    todo = inputs.filter(wanted)  # filter keeps the listing order
    if input_uri.lower().endswith(MANIFEST_EXTENSIONS):  # only the paths it will read are resolved
        paths = todo["path"] if "path" in todo.column_names else \
            manifest_table(input_uri, (), resolve=False, unique=False)["path"].filter(wanted)
        todo = pa.table([todo["image_id"], resolve_paths(input_uri, paths), todo["category"], todo["source_version"],
                         pa.nulls(todo.num_rows, pa.int64())], schema=INPUT_SCHEMA)
    return Plan(input_uri=input_uri, output_uri=output_uri, model_id=model_id,
                inputs=inputs.select(["image_id", "source_version"]), todo=todo,
                done=inputs.num_rows - todo.num_rows, new=_count(new), changed=_count(changed),
                retry=_count(retry), superseded=superseded.num_rows,
                versioned=inputs["source_version"].null_count == 0, seconds=time.monotonic() - t0,
                run_seq=run_seq)
