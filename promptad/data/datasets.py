"""Image lists from an MVTec AD layout or a manifest (Parquet/CSV), local or s3://.

fit and audit take `--data` in either form; both become the same list[Sample], so nothing
downstream knows where the list came from.
"""
from __future__ import annotations

import csv
import io
import math
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from promptad.data import storage
from promptad.errors import UserError

SPLITS = ("train", "test")
MANIFEST_EXTENSIONS = (".parquet", ".csv")
NORMAL_DEFECT = "good"
# Manifest label strings that mean "normal"; any other non-empty string means anomalous.
NORMAL_LABELS = {"good", "normal", "ok", "false"}


@dataclass(frozen=True)
class Sample:
    """One image. label: 0 normal, 1 anomalous, None unknown; defect is "good" for MVTec normals."""

    path: str
    image_id: str
    category: str | None
    label: int | None
    defect: str | None
    mask_path: str | None


def mvtec_categories(root: str) -> list[str]:
    """Sub-folders of `root` that have a train/ or test/ folder, sorted."""
    return [
        name
        for name in storage.list_dirs(root)
        if any(storage.is_dir(storage.join(root, name, split)) for split in SPLITS)
    ]


def mvtec_samples(root: str, category: str, split: str) -> list[Sample]:
    """Images of ROOT/CATEGORY/SPLIT/<defect>/..., sorted by path; [] when the split folder is absent.

    image_id is the path relative to `root`, so it survives moving the dataset. A test anomaly
    whose ground_truth/<defect>/<stem>_mask.png is missing keeps mask_path=None rather than
    being dropped: image-level metrics still need it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    category_uri = storage.join(root, category)
    split_uri = storage.join(category_uri, split)
    if not storage.is_dir(split_uri):
        return []
    gt_uri = storage.join(category_uri, "ground_truth")
    masks = (
        {storage.relative(m, gt_uri): m for m in storage.list_files(gt_uri)}
        if split == "test" and storage.is_dir(gt_uri)
        else {}
    )
    samples = []
    for path in storage.list_files(split_uri, storage.IMAGE_EXTENSIONS):
        rel = storage.relative(path, split_uri)
        defect, _, rest = rel.partition("/")
        name = posixpath.basename(rel)
        if not rest or name.startswith("."):  # loose files beside the defect folders; macOS "._x.png"
            continue
        label = 0 if defect == NORMAL_DEFECT else 1
        mask_rel = posixpath.join(posixpath.dirname(rel), posixpath.splitext(name)[0] + "_mask.png")
        samples.append(
            Sample(
                path=path,
                image_id=storage.relative(path, root),
                category=category,
                label=label,
                defect=defect,
                mask_path=masks.get(mask_rel) if label else None,
            )
        )
    return samples


def _text(value: Any) -> str | None:
    """A manifest cell as stripped text; empty, null and NaN become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _label(value: Any, where: str) -> int | None:
    """0/1 from numbers, booleans or words ("good"/"normal"/"ok" -> 0, any other word -> 1)."""
    if isinstance(value, bool):
        return int(value)
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return 0 if text.lower() in NORMAL_LABELS else 1
    if number not in (0, 1):
        raise UserError(f"{where}: label {text} is not 0 or 1; use 0 for normal and 1 for anomalous")
    return int(number)


def _read_manifest(uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows. CSV cells stay text so ids like "007" keep their zeros."""
    if uri.lower().endswith(".parquet"):
        fs, path = storage.filesystem(uri)
        try:
            table = pq.read_table(path, filesystem=fs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no such file or object: {uri}") from e
        return table.column_names, table.to_pylist()
    reader = csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig")))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    return columns, list(reader)


def manifest_samples(uri: str, split: str | None = None) -> list[Sample]:
    """Rows of a Parquet or CSV manifest (by extension) as Samples.

    Columns: `path` (required; relative paths resolve against the manifest's folder) and optional
    `image_id`, `category`, `label`, `mask_path`, `defect`, `split`. image_id defaults to the path
    as written, which stays stable when the manifest and its images move together. With `split`
    given and a `split` column present, only rows whose split matches are kept.
    """
    columns, rows = _read_manifest(uri)
    if "path" not in columns:
        raise UserError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(columns) or 'none'}); "
            "add a 'path' column with each image's path or URI"
        )
    base = storage.parent(uri)
    samples = []
    for i, row in enumerate(rows, start=1):
        where = f"manifest {uri} row {i}"
        raw_path = _text(row["path"])
        if raw_path is None:
            raise UserError(f"{where}: empty 'path'; give every row an image path or drop the row")
        mask = _text(row.get("mask_path"))
        samples.append(
            (
                _text(row.get("split")),
                Sample(
                    path=storage.resolve(base, raw_path),
                    image_id=_text(row.get("image_id")) or raw_path,
                    category=_text(row.get("category")),
                    label=_label(row.get("label"), where),
                    defect=_text(row.get("defect")),
                    mask_path=storage.resolve(base, mask) if mask else None,
                ),
            )
        )
    duplicates = [k for k, n in Counter(s.image_id for _, s in samples).items() if n > 1]
    if duplicates:
        column = "image_id" if "image_id" in columns else "path"
        raise UserError(
            f"manifest {uri} has {len(duplicates)} duplicate {column} value(s), e.g. {duplicates[0]!r}; "
            "every image needs a unique image_id (or path when there is no image_id column)"
        )
    if split is not None and "split" in columns:
        return [s for row_split, s in samples if row_split is not None and row_split.lower() == split.lower()]
    return [s for _, s in samples]


# --------------------------------------------------------------------------- manifests as Arrow
# `score` plans over millions of manifest rows: the same rules as manifest_samples, column-wise.
_ABSOLUTE = r"^([a-zA-Z][a-zA-Z0-9+.-]*://|/)"
_NEEDS_NORMALIZING = r"(^|/)\.\.?(/|$)|//|/$"  # a '.' or '..' segment, an empty one, a trailing '/'


def _text_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A manifest column as stripped text; empty cells, nulls and NaN become null (as _text)."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    column = column.cast(pa.string())
    # Copies only where needed: at 10,000,000 paths each copy is ~400 MB of driver memory.
    if pc.any(pc.match_substring_regex(column, r"^\s|\s$")).as_py():
        column = pc.utf8_trim_whitespace(column)
    if pc.any(pc.equal(column, "")).as_py():
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    return column


def _read_manifest_arrow(uri: str, wanted: tuple[str, ...]) -> tuple[list[str], pa.Table]:
    """All column names and the `wanted` columns a manifest has (Parquet, or CSV read as text so
    "007" keeps its zeros)."""
    if uri.lower().endswith(".parquet"):
        fs, path = storage.filesystem(uri)
        try:
            names = pq.ParquetFile(path, filesystem=fs).schema_arrow.names
            return names, pq.read_table(path, filesystem=fs, columns=[c for c in wanted if c in names])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no such file or object: {uri}") from e
    import pyarrow.csv as pacsv

    data = storage.read_bytes(uri)
    header = next(csv.reader(io.StringIO(data[:1 << 16].decode("utf-8-sig", errors="replace"))), [])
    names = [c.strip() for c in header]
    if not names:
        return [], pa.table({})
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             include_columns=[c for c in wanted if c in names]))
    return names, table


def _resolve_column(base: str, paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """storage.resolve for a column of manifest paths: absolute paths and URIs pass through;
    relative ones are resolved per distinct folder (a handful), not per row."""
    relative = pc.invert(pc.match_substring_regex(paths, _ABSOLUTE))
    if not pc.any(relative).as_py():
        return paths
    # Most relative paths need no normalizing (no '.', '..' or empty segment): they are the base
    # folder joined to the path, a string concatenation (a regex split took 1.7 s per million rows).
    plain = pc.and_(relative, pc.invert(pc.match_substring_regex(paths, _NEEDS_NORMALIZING)))
    if pc.all(pc.or_(plain, pc.invert(relative))).as_py():
        root = storage.resolve(base, ".").rstrip("/")  # "/" itself: "" + "/" + path
        joined = pc.binary_join_element_wise(root, paths, "/")
        return joined if pc.all(plain).as_py() else pc.if_else(plain, joined, paths)
    parts = pc.extract_regex(paths, r"^(?P<dir>.*/)?(?P<name>[^/]*)$")
    folders = pc.fill_null(pc.struct_field(parts, "dir"), "")
    names = pc.struct_field(parts, "name")
    odd = pc.or_(pc.is_in(names, value_set=pa.array(["", ".", ".."])), pc.invert(relative))
    encoded = pc.dictionary_encode(folders).combine_chunks()
    resolved_dirs = pa.array([storage.resolve(base, d or ".") for d in encoded.dictionary.to_pylist()], pa.string())
    joined = pc.binary_join_element_wise(pc.take(resolved_dirs, encoded.indices), names, "/")
    result = pc.if_else(odd, paths, joined)
    if pc.any(pc.and_(odd, relative)).as_py():  # "a/..", "a/": rare; resolved one by one
        py = result.to_pylist()
        for i in pc.indices_nonzero(pc.and_(odd, relative)).to_pylist():
            py[i] = storage.resolve(base, paths[i].as_py())
        return pa.chunked_array([pa.array(py, pa.string())])
    return result


def manifest_table(uri: str, columns: tuple[str, ...] = ("image_id", "category"), *, resolve: bool = True,
                   unique: bool = True, path: bool = True) -> pa.Table:
    """A manifest as an Arrow table with `path` (resolved like manifest_samples) and `columns`
    (text, null where empty or absent); image_id defaults to the path as written.

    The same rules and one-line errors as manifest_samples, without a Python object per row: a
    1,000,000-row manifest plans in seconds. Labels, masks and splits are not read (score needs none).
    A caller that resolves paths itself (`resolve=False`: only those it will read, resolve_paths)
    or checks image_ids itself (`unique=False`: duplicate_ids) saves ~400 MB and a hash pass per
    10,000,000 rows. `path=False`: no `path` column where every row has an image_id (the caller
    reads the paths later, for the rows it needs: ~300 MB less while it plans 10,000,000 rows).
    """
    if not path and "image_id" in columns:
        names, table = _read_manifest_arrow(uri, columns)
        if "path" in names and "image_id" in table.column_names:
            ids = _text_column(table["image_id"])
            if not ids.null_count:
                return pa.table({"image_id": ids, **{c: _text_column(table[c]) if c in table.column_names
                                                     else pa.nulls(table.num_rows, pa.string())
                                                     for c in columns if c != "image_id"}})
    names, table = _read_manifest_arrow(uri, ("path", *columns))
    if "path" not in names:
        raise UserError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(names) or 'none'}); "
            "add a 'path' column with each image's path or URI"
        )
    raw = _text_column(table["path"])
    empty = pc.is_null(raw)
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py() + 1
        raise UserError(f"manifest {uri} row {row}: empty 'path'; give every row an image path or drop the row")
    n = table.num_rows
    out = {"path": resolve_paths(uri, raw) if resolve else raw}
    for name in columns:
        out[name] = _text_column(table[name]) if name in table.column_names else pa.nulls(n, pa.string())
    if "image_id" in out:
        if out["image_id"].null_count:
            out["image_id"] = pc.coalesce(out["image_id"], raw)
        if unique and pc.count_distinct(out["image_id"]).as_py() != n:  # a hash pass; value_counts to name one
            duplicate_ids(uri, out["image_id"], "image_id" in table.column_names)
    return pa.table(out)


def resolve_paths(uri: str, paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """A manifest's `path` values (as manifest_table(resolve=False) gives them) resolved against its folder."""
    return _resolve_column(storage.parent(uri), paths)


def duplicate_ids(uri: str, ids: pa.ChunkedArray, has_image_id: bool) -> None:
    """Raise the one-line error for a manifest whose image_ids (paths, without an image_id column)
    repeat; returns when none does."""
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        column = "image_id" if has_image_id else "path"
        raise UserError(
            f"manifest {uri} has {len(repeated)} duplicate {column} value(s), e.g. "
            f"{repeated.field('values')[0].as_py()!r}; every image needs a unique image_id "
            "(or path when there is no image_id column)"
        )


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def _manifest_load(data_uri: str, categories: list[str] | None, split: str) -> list[Sample]:
    samples = manifest_samples(data_uri, split)
    if categories:
        has_column = any(s.category is not None for s in samples)
        if not has_column and len(categories) == 1:
            # A single-product manifest without a category column: the requested category names it.
            samples = [
                Sample(s.path, s.image_id, categories[0], s.label, s.defect, s.mask_path) for s in samples
            ]
        elif not has_column:
            raise UserError(
                f"manifest {data_uri} has no 'category' values; add a 'category' column "
                "or pass a single --category"
            )
        else:
            available = sorted({s.category for s in samples if s.category is not None})
            unknown = [c for c in categories if c not in available]
            if unknown:
                raise UserError(
                    f"unknown category {', '.join(unknown)} in manifest {data_uri}; "
                    f"available: {', '.join(available)}"
                )
            samples = [s for s in samples if s.category in categories]
    if not samples:
        raise UserError(
            f"manifest {data_uri} has no rows for split {split!r}; "
            "fill its 'split' column with train/test or drop the column"
        )
    return samples


def _mvtec_load(root: str, categories: list[str] | None, split: str) -> list[Sample]:
    available = mvtec_categories(root)
    if not available:
        if any(storage.is_dir(storage.join(root, s)) for s in SPLITS):
            name = posixpath.basename(root.rstrip("/"))
            raise UserError(
                f"{root} is a single category folder; pass its parent as --data and --category {name}"
            )
        raise UserError(
            f"{root} is not an MVTec AD layout (no CATEGORY/train or CATEGORY/test folders) and not a "
            "manifest (.parquet/.csv); point --data at the dataset root or a manifest file"
        )
    unknown = [c for c in categories or [] if c not in available]
    if unknown:
        raise UserError(
            f"unknown category {', '.join(unknown)} in {root}; available: {', '.join(available)}"
        )
    samples: list[Sample] = []
    for category in categories or available:
        found = mvtec_samples(root, category, split)
        if split == "train" and not any(s.label == 0 for s in found):
            raise UserError(
                f"category {category!r} has no normal training images; "
                f"put defect-free images in {storage.join(root, category, 'train', NORMAL_DEFECT)}"
            )
        if not found:
            raise UserError(
                f"category {category!r} has no {split} images; "
                f"put them in {storage.join(root, category, split)}/<defect>/"
            )
        samples.extend(found)
    return samples


def load_samples(data_uri: str, categories: list[str] | None, split: str) -> list[Sample]:
    """Samples of `categories` (None or empty: all) for `split` from an MVTec AD root or a manifest.

    Every mistake a user can make with --data / --category becomes a one-line UserError.
    """
    if not storage.exists(data_uri):
        raise UserError(
            f"data path does not exist: {data_uri}; pass --data an MVTec AD root "
            "(ROOT/CATEGORY/train|test) or a manifest (.parquet/.csv)"
        )
    if storage.is_dir(data_uri):
        return _mvtec_load(data_uri, categories, split)
    if _is_manifest(data_uri):
        return _manifest_load(data_uri, categories, split)
    raise UserError(
        f"{data_uri} is a file but not a manifest; pass a .parquet or .csv manifest "
        "or the root folder of an MVTec AD layout"
    )


def path_named(path: str, name: str) -> bool:
    """Whether `name` (from a flag such as fit --exclude) names the image at `path` (or with that
    image_id): the whole of it, or its end after a "/" (cookie/train/good/030.png, 030.png)."""
    name = name.strip()
    return bool(name) and (path == name or path.endswith("/" + name.lstrip("/")))
