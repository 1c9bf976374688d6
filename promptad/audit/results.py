"""What the audit driver folds its result rows into, and the report built from them.

Each row (one image under one condition, from stages.py) goes into a per-(category, condition)
accumulator: scores and labels (O(images)) and fixed-size pixel histograms, plus per category the
defect names, counts and the worst cases shown in the report. Nothing here touches Ray.
"""
from __future__ import annotations

import argparse
import array
import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptad.audit.stages import CLEAN, unpack_mask
from promptad.audit.verdict import Targets, decision_summary, overall_verdict
from promptad.data.shifts import SHIFTS
from promptad.metrics.image import image_summary, per_defect
from promptad.metrics.pixel import AUPRO, PixelMetrics
from promptad.models.model import Calibration
from promptad.report.summary import Example, WorstCases, overall_summary, with_drop

WORST_K = 8  # worst false positives / negatives shown per category
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


@dataclass
class ConditionResults:
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
        # beside it the best case (the threshold chosen on these masks, never deployed): how much
        # of the attainable F1 the deployed pixel threshold, set on normal images only, reaches
        out["pixel_f1_max"] = self.pixel.f1_max()[0]
        return out


@dataclass
class CategoryResults:
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


def csv_value(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def fold(row: dict, calibration: dict[str, Calibration], accs: dict, cats: dict,
          errors: list[dict], report_dir: Path, made_dirs: set[Path], writer) -> None:
    """One result row into the accumulators, its visualization file and its CSV line."""
    cat, condition, image_id = str(row["category"]), str(row["condition"]), str(row["image_id"])
    label, defect = int(row["label"]), str(row["defect"])
    cal, info = calibration[cat], cats[cat]
    error = str(row["error"]) or row_problem(row)
    if error:
        if condition == CLEAN:  # counts are per image; a shifted row's failure is listed only
            info.counts["errors"] += 1
        errors.append({"image_id": image_id, "path": str(row["path"]), "category": cat,
                       "condition": condition,
                       "stage": "predict" if error.startswith("predict:") else "image",
                       "error": error})
        writer.writerow([image_id, row["path"], cat, condition, label, defect, False, "", "", "",
                         csv_value(cal.image_threshold), error])
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
                     csv_value(score), csv_value(float(cal.normalize_score(score))),
                     score >= cal.image_threshold, csv_value(cal.image_threshold), ""])


def row_problem(row: dict) -> str:
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


def pooled(categories: list[str], conditions: list[str], calibration: dict[str, Calibration],
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


def build_report(args: argparse.Namespace, model_id: str, created_at: str,
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
        "pooled": pooled(categories, conditions, calibration, accs),
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
