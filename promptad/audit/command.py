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
      -> driver       (this module: plan, checks, summary) fold each row into per-(category, condition) accumulators, write the
                      PNG and one scores.csv row; then report.json and report.html, and the
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
import array
import csv
import hashlib
import heapq
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from promptad.audit.stages import CLEAN, dataset, unpack_mask
from promptad.audit.verdict import NO_GO, Targets, decision_summary, overall_verdict
from promptad.data.datasets import NORMAL_DEFECT, Sample, load_samples
from promptad.data.shifts import SHIFTS, parse_shifts
from promptad.errors import UserError
from promptad.metrics.image import image_summary, per_defect
from promptad.metrics.pixel import AUPRO, PixelMetrics
from promptad.models.artifact import load_artifact
from promptad.models.model import Calibration
from promptad.report.page import write_html_report
from promptad.report.summary import CategoryCurves, Example, WorstCases, overall_summary, with_drop, write_report_json

VIS_DIR = "visualization_results"
WORST_K = 8  # worst false positives / negatives shown per category
ANOMALOUS_DEFECT = "anomalous"  # defect name of a manifest's anomalous row without one
EXIT_TARGETS_MISSED = 3  # `promptad audit` exit status when a category misses a target
CSV_COLUMNS = ("image_id", "path", "category", "condition", "label", "defect", "has_mask",
               "score", "score_norm", "is_anomalous", "threshold", "error")
_BELOW_HALF = float(np.nextafter(0.5, 0.0))


def to_unit(values, center: float, threshold: float) -> np.ndarray:
    """Raw scores or map values -> (0, 1), non-decreasing, `threshold` exactly at 0.5.

    z = (x - threshold) / (threshold - center) goes through 0.5 + 0.5 z / (1 + |z|): no
    clipping, so rankings (AUROC, AUPRO) are those of the raw values, and the resolution of
    uniform bins is finest near the threshold where decisions are made. x >= threshold if and
    only if the result >= 0.5, even at float64 rounding. An uncalibrated (infinite) threshold
    flags nothing: everything lands below 0.5.
    """
    x = np.asarray(values, dtype=np.float64)
    if not math.isfinite(threshold):
        z = x - center
        return 0.25 + 0.25 * z / (1.0 + np.abs(z))
    span = threshold - center if threshold > center else max(abs(threshold), 1.0)
    z = (x - threshold) / span
    y = 0.5 + 0.5 * z / (1.0 + np.abs(z))
    return np.where(x >= threshold, np.maximum(y, 0.5), np.minimum(y, _BELOW_HALF))


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


# --------------------------------------------------------------------------- driver side


@dataclass
class _Condition:
    """Everything one (category, condition) needs for its metrics; memory is O(images) for the
    scores and fixed-size histograms for the pixels."""

    scores: array.array = field(default_factory=lambda: array.array("d"))
    labels: array.array = field(default_factory=lambda: array.array("b"))
    pixel: PixelMetrics = field(default_factory=PixelMetrics)
    aupro: AUPRO = field(default_factory=AUPRO)

    def metrics(self, cal: Calibration) -> dict:
        scores, labels = np.asarray(self.scores), np.asarray(self.labels)
        out = image_summary(scores, labels, cal.image_threshold)
        out["pixel_auroc"] = self.pixel.auroc()
        out["aupro"] = self.aupro.compute()
        # 0.5 is cal.pixel_threshold after to_unit; above 1 nothing is flagged (uncalibrated)
        out["pixel_f1"] = self.pixel.f1_at(0.5 if math.isfinite(cal.pixel_threshold) else 2.0)["f1"]
        return out


@dataclass
class _Category:
    """Clean-only extras of one category: defect names, counts, worst-case heaps."""

    defects: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    top_normals: list = field(default_factory=list)  # min-heap of (score, id, png, defect)
    low_anomalies: list = field(default_factory=list)  # min-heap of (-score, id, png, defect)

    def keep_worst(self, score: float, label: int, image_id: str, png: str, defect: str) -> None:
        heap, key = (self.low_anomalies, -score) if label else (self.top_normals, score)
        item = (key, image_id, png, defect)
        if len(heap) < WORST_K:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def worst(self, threshold: float) -> WorstCases:
        fps = sorted((t for t in self.top_normals if t[0] >= threshold), reverse=True)
        fns = sorted((t for t in self.low_anomalies if -t[0] < threshold), reverse=True)
        return WorstCases(
            false_positives=[Example(i, s, png, d) for s, i, png, d in fps],
            false_negatives=[Example(i, -s, png, d) for s, i, png, d in fns])


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


def _csv_value(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def run(args: argparse.Namespace) -> int:
    """The `promptad audit` command (flags in cli.py). Returns the exit status: 0, or
    EXIT_TARGETS_MISSED when a category misses --max-false-alarm / --min-recall."""
    started = time.time()
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    report_dir = _check_report_dir(args.report)
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

    from promptad.raycluster import connect

    connect(args.address)
    report_dir.mkdir(parents=True, exist_ok=True)
    accs = {(c, k): _Condition() for c in categories for k in conditions}
    cats = {c: _Category() for c in categories}
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
                _fold(row, calibration, accs, cats, errors, report_dir, made_dirs, writer)

    report = _build_report(args, model_id, created_at, categories, conditions, calibration,
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


def _fold(row: dict, calibration: dict[str, Calibration], accs: dict, cats: dict,
          errors: list[dict], report_dir: Path, made_dirs: set[Path], writer) -> None:
    """One result row into the accumulators, its visualization file and its CSV line."""
    cat, condition, image_id = str(row["category"]), str(row["condition"]), str(row["image_id"])
    label, defect = int(row["label"]), str(row["defect"])
    cal, info = calibration[cat], cats[cat]
    error = str(row["error"]) or _row_problem(row)
    if error:
        if condition == CLEAN:  # counts are per image; a shifted row's failure is listed only
            info.counts["errors"] += 1
        errors.append({"image_id": image_id, "path": str(row["path"]), "category": cat,
                       "condition": condition,
                       "stage": "predict" if error.startswith("predict:") else "image",
                       "error": error})
        writer.writerow([image_id, row["path"], cat, condition, label, defect, False, "", "", "",
                         _csv_value(cal.image_threshold), error])
        return
    score = float(row["score"])
    acc = accs[(cat, condition)]
    acc.scores.append(score)
    acc.labels.append(label)
    has_mask = bool(row["has_mask"])
    if has_mask:
        h, w = int(row["height"]), int(row["width"])
        amap = to_unit(np.frombuffer(row["map"], np.float32).reshape(h, w),
                       cal.pixel_center, cal.pixel_threshold)
        mask = unpack_mask(row["mask"], h, w)
        acc.pixel.update(amap, mask)
        acc.aupro.update(amap, mask)
    if condition == CLEAN:
        info.counts["anomalous" if label else "normal"] += 1
        if label:
            info.counts["with_mask" if has_mask else "pixel_skipped"] += 1
        if row["mask_error"]:
            errors.append({"image_id": image_id, "path": str(row["path"]), "category": cat,
                           "stage": "mask", "error": str(row["mask_error"])})
        info.defects.append(defect)
        info.keep_worst(score, label, image_id, str(row["vis"]), defect)
        png_path = report_dir / str(row["vis"])
        if png_path.parent not in made_dirs:
            png_path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(png_path.parent)
        png_path.write_bytes(row["png"])
    writer.writerow([image_id, row["path"], cat, condition, label, defect, has_mask,
                     _csv_value(score), _csv_value(float(cal.normalize_score(score))),
                     score >= cal.image_threshold, _csv_value(cal.image_threshold), ""])


def _row_problem(row: dict) -> str:
    """The driver's own check of a result row that claims no error: a non-finite score or a
    map that is not height x width float32 is an error entry, never an exception or a
    reshape of an empty buffer (whatever the stages upstream let through)."""
    score = float(row["score"])
    if not math.isfinite(score):
        return f"predict: non-finite image score ({score})"
    expected = 4 * int(row["height"]) * int(row["width"])
    if expected == 0 or len(row["map"]) != expected:
        return (f"predict: anomaly map has {len(row['map'])} bytes, expected {expected} "
                f"({int(row['height'])}x{int(row['width'])} float32)")
    if not np.all(np.isfinite(np.frombuffer(row["map"], np.float32))):
        return "predict: anomaly map has non-finite values"
    return ""


def _pooled(categories: list[str], conditions: list[str], calibration: dict[str, Calibration],
            accs: dict) -> dict:
    """Image metrics over all categories' images together, scores mapped by to_unit; "rates"
    are the line's real decisions (each image at its category's threshold) with intervals."""
    def scores_labels(condition: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [(to_unit(np.asarray(accs[(c, condition)].scores),
                          calibration[c].image_center, calibration[c].image_threshold),
                  np.asarray(accs[(c, condition)].labels)) for c in categories]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    clean = image_summary(*scores_labels(CLEAN), 0.5)
    rates = decision_summary(*scores_labels(CLEAN), 0.5, None, Targets(), what_if=False)["rates"]
    return {"clean": clean, "rates": rates,
            "shifts": {k: with_drop(clean, image_summary(*scores_labels(k), 0.5))
                       for k in conditions[1:]}}


def _build_report(args: argparse.Namespace, model_id: str, created_at: str,
                  categories: list[str], conditions: list[str],
                  calibration: dict[str, Calibration], accs: dict, cats: dict,
                  errors: list[dict], targets: Targets, tolerated: set[str] = frozenset()) -> dict:
    per_category = {}
    for c in categories:
        cal, info = calibration[c], cats[c]
        clean = accs[(c, CLEAN)].metrics(cal)
        counts = {k: int(info.counts[k]) for k in ("images", "normal", "anomalous", "with_mask",
                                                   "pixel_skipped", "errors")}
        scores, labels = np.asarray(accs[(c, CLEAN)].scores), np.asarray(accs[(c, CLEAN)].labels)
        per_category[c] = {
            "counts": counts,
            "thresholds": {"image": cal.image_threshold, "pixel": cal.pixel_threshold},
            "clean": clean,
            "shifts": {k: with_drop(clean, accs[(c, k)].metrics(cal)) for k in conditions[1:]},
            "per_defect": per_defect(scores, info.defects, cal.image_threshold),
            **decision_summary(scores, labels, cal.image_threshold, cal.stats, targets),
        }
    totals = Counter()
    for c in categories:
        totals.update(per_category[c]["counts"])
    return {
        "model_id": model_id,
        "data_uri": args.data,
        "created_at": created_at,
        "targets": targets.as_dict(),
        "verdict": overall_verdict(per_category, targets),
        "counts": dict(totals),
        "shifts": {k: {"group": SHIFTS[k].group, "description": SHIFTS[k].description,
                       "tolerated_by_model": k in tolerated}  # fit --tolerate: trained as normal
                   for k in conditions[1:]},
        "categories": per_category,
        "overall": overall_summary(per_category),
        "pooled": _pooled(categories, conditions, calibration, accs),
        "errors": errors,
        "notes": {
            "overall": "macro mean over categories of each metric",
            "pooled": "image metrics over all categories' images together; scores mapped per "
                      "category so that its deployed threshold is 0.5",
            "counts": "images = normal + anomalous + errors; pixel_skipped: anomalous images "
                      "without a usable mask (image metrics only)",
            "pixel_metrics": "maps vs masks at the input's aspect ratio, long side <= 256 "
                             "(the map `score` stores); binned in 65536 bins, exact to 1e-3",
            "shifts": "applied at the original resolution, seeded per image and shift",
            "scores_csv": "scores.csv: one row per image and condition",
            "rates": "at the deployed image threshold, clean images; intervals are 95 %: Wilson "
                     "score intervals for rates, percentile intervals of 2000 stratified "
                     "bootstrap resamples (seed 0) for image AUROC",
            "verdict": "per category, on the bounds: go when the false-alarm upper bound <= "
                       "max_false_alarm and the recall lower bound >= min_recall",
            "what_if": "lowest threshold whose false-alarm rate on the audited normals is <= "
                       "the budget (null: only flagging nothing is), and its recall",
        },
    }


def _print_summary(report: dict, report_dir: Path) -> None:
    cols = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1", "pixel_f1")
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
    lines.append(f"verdict: {report['verdict']['summary']}")
    print("\n".join(lines))
