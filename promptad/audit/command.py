"""`promptad audit`: the trained model over a labelled set -> metrics, report, visualizations.

Data flow (Ray Data, streaming: nothing on the driver grows with the images' pixels)::

    samples (MVTec AD root or manifest, local or s3://)
      -> stages.py (Ray: the stages that touch pixels)
         _load_rows   (CPU tasks) read + decode the image and its mask once, then for each
                      condition (clean, then every --shifts name) apply the seeded shift to the
                      full-resolution image and mask and resize: model input S x S, mask at the
                      metric resolution
         _Scorer      (actor pool) predict.predict -- the same inference path as `score` --
                      then the map resized to the metric resolution
         _render      (CPU tasks) the labelled visualization PNG of every clean image
      -> driver       this module: plan, checks, summary; results.py folds each row into
                      per-(category, condition) accumulators, writes the PNG and one
                      scores.csv row, and builds report.json; then report.html, and the
                      verdict against --max-false-alarm / --min-recall (exit 3 on no-go)

Decisions a reader of the numbers needs:
- Metric resolution: every map is compared with its mask at `images.map_shape(H, W)`, the
  input's aspect ratio with the long side capped at 256 -- exactly the map `score` stores.
  The model's S x S map is resized bilinearly (postprocess.resize_map), the mask by nearest
  neighbour (labels stay crisp).
- Pixel values are binned after `to_unit`: a strictly increasing map of raw values onto (0, 1)
  that puts the category's deployed pixel threshold at exactly 0.5. It never clips (a clipped
  map would tie the strongest pixels and bias AUROC/AUPRO), and pixel F1 "at the deployed
  threshold" counts exactly the pixels with raw value >= cal.pixel_threshold.
- Shifts are applied at the image's original resolution (blur, noise and JPEG act on camera
  pixels), seeded per (image_id, shift), so a rerun gives the same numbers.
- An image that cannot be read or decoded, or that the model returns a non-finite score or an
  empty / non-finite map for, is listed in report.json "errors" and counted, not scored. An
  anomalous image without a usable mask counts for image metrics and is skipped by pixel
  metrics ("pixel_skipped"); a mask that exists but cannot be read is also an error entry.
- The verdict (verdict.py) is judged on 95 % confidence bounds of the clean images' rates at
  the deployed threshold, per category; the pooled rates are for information.
- "overall" is the macro mean over categories (report.overall_summary, as in the MVTec AD
  literature); "pooled" holds image metrics over all images of all categories together, each
  score mapped by its category's `to_unit`, so its at-threshold numbers are the line's real
  decisions.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from promptad.audit.results import CSV_COLUMNS, CategoryResults, ConditionResults, build_report, fold
from promptad.audit.stages import CLEAN, LOAD_CPUS, RENDER_CPUS, dataset, model_actors
from promptad.audit.verdict import NO_GO, Targets, promise_line
from promptad.data import storage
from promptad.data.datasets import NORMAL_DEFECT, Sample, load_samples
from promptad.data.shifts import parse_shifts
from promptad.errors import UserError
from promptad.models.artifact import load_artifact
from promptad.report.page import write_html_report
from promptad.report.summary import CategoryCurves, write_report_json

VIS_DIR = "visualization_results"
ANOMALOUS_DEFECT = "anomalous"  # defect name of a manifest's anomalous row without one
EXIT_TARGETS_MISSED = 3  # `promptad audit` exit status when a category misses a target


def _safe_name(text: str) -> str:
    """A path component from a category, defect or file stem (no separators, no leading dot)."""
    return re.sub(r"[^\w.-]+", "_", text).lstrip(".") or "_"


def visualization_paths(samples: list[Sample]) -> dict[str, str]:
    """image_id -> visualization_results/<category>/<defect>/<stem>.png, relative to the report.

    The file's stem is kept (MVTec AD's 000.png -> 000.png); stems that repeat within one
    category/defect (possible in a manifest) get a hash of the image_id appended."""
    def key(s: Sample) -> tuple[str, str, str]:
        stem = os.path.splitext(s.path.rstrip("/").rsplit("/", 1)[-1])[0]
        return _safe_name(s.category or ""), _safe_name(s.defect or ""), _safe_name(stem)

    counts = Counter(key(s) for s in samples)
    out = {}
    for s in samples:
        cat, defect, stem = key(s)
        if counts[(cat, defect, stem)] > 1:
            stem = f"{stem}-{hashlib.sha1(s.image_id.encode()).hexdigest()[:8]}"
        out[s.image_id] = f"{VIS_DIR}/{cat}/{defect}/{stem}.png"
    return out


def _select_samples(data: str, requested: list[str] | None, model_categories: list[str]
                    ) -> list[Sample]:
    """Test samples of the requested categories (default: the model's), each with a label."""
    if requested:
        unknown = [c for c in requested if c not in model_categories]
        if unknown:
            raise UserError(f"the model has no category {', '.join(unknown)}; it knows "
                            f"{', '.join(model_categories)}")
        samples = load_samples(data, requested, "test")
    elif len(model_categories) == 1:
        samples = load_samples(data, model_categories, "test")
    else:
        samples = [s for s in load_samples(data, None, "test")
                   if s.category is None or s.category in model_categories]
        if not samples:
            raise UserError(f"{data} has no test images of the model's categories "
                            f"({', '.join(model_categories)}); pass --category")
    missing_category = sum(s.category is None for s in samples)
    if missing_category:
        raise UserError(f"{missing_category} rows of {data} have no category; fill the "
                        "manifest's 'category' column or pass a single --category")
    unlabelled = [s for s in samples if s.label is None]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} images in {data} have no label (e.g. "
                        f"{unlabelled[0].image_id}); an audit needs a 0/1 'label' for every row")
    # A normal image is "good" whatever a manifest calls it; an anomalous one needs a name.
    return [Sample(s.path, s.image_id, s.category, s.label,
                   NORMAL_DEFECT if s.label == 0 else (s.defect or ANOMALOUS_DEFECT), s.mask_path)
            for s in samples]


def _check_report_dir(report: str) -> Path:
    if "://" in report and not report.startswith("file://"):
        raise UserError(f"--report {report}: the report is written to a local folder; "
                        "pass a local path and copy it to object storage afterwards")
    path = Path(report[len("file://"):] if report.startswith("file://") else report)
    if path.exists() and not path.is_dir():
        raise UserError(f"--report {report} is a file; pass a folder")
    return path


def run(args: argparse.Namespace) -> int:
    """The `promptad audit` command (flags in cli.py). Returns the exit status: 0, or
    EXIT_TARGETS_MISSED when a category misses --max-false-alarm / --min-recall."""
    started = time.time()
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    report_dir = _check_report_dir(args.report)
    storage.preflight({"--model": args.model, "--data": args.data})
    conditions = [CLEAN, *parse_shifts(args.shifts or "")]
    targets = Targets(getattr(args, "max_false_alarm", None), getattr(args, "min_recall", None))
    model = load_artifact(args.model)  # fails fast (UserError) before Ray starts
    model_id, calibration = model.model_id, dict(model.calibration)
    tolerated = set((model.manifest.get("training") or {}).get("tolerate") or [])
    input_size, model_categories = int(model.cfg.input_size), list(model.categories)
    del model  # the actors load their own; the driver keeps only the calibration
    samples = _select_samples(args.data, args.category, model_categories)
    categories = sorted({s.category for s in samples})
    vis = visualization_paths(samples)

    from promptad.raycluster import connect, is_local

    connect(args.address)
    model_actors(args).check("one audit actor", "lower the per-actor resources or pass --address of a bigger cluster",
                             is_local(args.address), "--cpus-per-actor", "--gpus-per-actor",
                             LOAD_CPUS + RENDER_CPUS, "for reads and visualizations")
    report_dir.mkdir(parents=True, exist_ok=True)
    accs = {(c, k): ConditionResults() for c in categories for k in conditions}
    cats = {c: CategoryResults() for c in categories}
    for s in samples:
        cats[s.category].counts["images"] += 1
    errors: list[dict] = []
    made_dirs: set[Path] = set()
    with open(report_dir / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        ds = dataset(samples, vis, args, args.model, input_size, conditions, calibration)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["image_id"])):
                row = {k: batch[k][i] for k in batch}
                fold(row, calibration, accs, cats, errors, report_dir, made_dirs, writer)

    report = build_report(args, model_id, created_at, categories, conditions, calibration,
                           accs, cats, errors, targets, tolerated)
    report["duration_s"] = round(time.time() - started, 1)
    write_report_json(report_dir / "report.json", report)
    curves = {c: CategoryCurves.from_scores(np.asarray(accs[(c, CLEAN)].scores),
                                            np.asarray(accs[(c, CLEAN)].labels),
                                            calibration[c].image_threshold) for c in categories}
    worst = {c: cats[c].worst(calibration[c].image_threshold) for c in categories}
    write_html_report(report_dir / "report.html", report, curves, worst)
    _print_summary(report, report_dir)
    return EXIT_TARGETS_MISSED if report["verdict"]["decision"] == NO_GO else 0


def _print_summary(report: dict, report_dir: Path) -> None:
    cols = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1", "pixel_f1", "pixel_f1_max")
    lines = [f"{'category':<16}{'condition':<13}" + "".join(f"{c:>13}" for c in cols)]
    for name, cat in report["categories"].items():
        rows = [(CLEAN, cat["clean"])] + list(cat["shifts"].items())
        for cond, values in rows:
            cells = "".join(f"{values.get(c, float('nan')):>13.3f}" for c in cols)
            lines.append(f"{name:<16}{cond:<13}{cells}")
    counts = report["counts"]
    lines.append(f"{counts.get('images', 0)} images, {counts.get('errors', 0)} errors, "
                 f"{counts.get('pixel_skipped', 0)} anomalous without mask; "
                 f"report: {report_dir / 'report.html'}")
    for name, cat in report["categories"].items():
        lines += [f"warning: {name}: {w}" for w in cat.get("warnings", [])]
    lines += [f"threshold: {promise_line(name, cat)}" for name, cat in report["categories"].items()]
    lines.append(f"verdict: {report['verdict']['summary']}")
    print("\n".join(lines))
