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

import pyarrow.parquet as pq

from promptad import storage
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
