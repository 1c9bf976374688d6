"""The audit report's data: the report dict, its derived parts (drops, macro means),
report.json, and what the page needs beside the dict (curves, worst cases). The HTML page is page.py, the pictures plots.py, the sign-off
numbers (rates, intervals, targets, verdict) audit/verdict.py. No Ray, no torch.

Report dict (what `write_report_json` stores and `page.write_html_report` renders)::

    {
      "model_id": str,                  # content hash of the artifact
      "data_uri": str,                  # the labelled set that was audited
      "created_at": str,                # ISO 8601, UTC
      "targets": {"max_false_alarm": float | None, "min_recall": float | None, "judged_on": str},
      "verdict": {"decision": "go" | "no-go" | "not judged", "failed": [CATEGORY],
                  "summary": str},     # the go / no-go line (verdict.overall_verdict)
      "shifts": {SHIFT: {"group": str, "description": str,     # description: its strength
                         "tolerated_by_model": bool}},          # fit --tolerate named it
      "categories": {
        CATEGORY: {
          "counts": {"images": int, "normal": int, "anomalous": int,
                     "with_mask": int, "pixel_skipped": int,
                     "errors": int},                     # errors: images that failed to score
          "thresholds": {"image": float, "pixel": float},  # deployed, from the artifact
          "clean": {METRIC: float, ...},
          "shifts": {SHIFT: {METRIC: float, ..., "drop": {METRIC: clean - shifted}}},
          "per_defect": {DEFECT: {"count": int, "image_auroc_vs_good": float,
                                  "mean_score": float, "recall_at_threshold": float}},
          "rates": {"tp", "fp", "tn", "fn", "normal", "anomalous": int,
                    "false_alarm_rate", "miss_rate", "recall", "image_auroc": float,
                    "false_alarm_ci", "miss_ci", "recall_ci": [lo, hi],      # 95 % Wilson
                    "image_auroc_ci": [lo, hi]},                # 95 % stratified bootstrap
          "calibration": {"image_fpr_target": float, "n_normal": int,
                          "image_fpr_achievable": float, "threshold_rule": str | None,
                          "warnings": [str] | None},    # None: the artifact records none
          "what_if": [{"target_fpr", "threshold", "fpr", "recall": float}],
          "warnings": [str],            # where the sample is too small for a claim
          "verdict": {"decision": str, "checks": [{"target", "value", "bound", "passed",
                                                   "reason"}]},
        },
      },
      "overall": {"clean": {METRIC: float}, "shifts": {SHIFT: {METRIC: float, "drop": {...}}}},
      "pooled": {"clean": {METRIC: float}, "shifts": {...}, "rates": {...}},
    }

METRIC is one of `METRICS`: image_auroc, pixel_auroc, aupro, image_f1_max,
image_f1_max_threshold (a score, not a quality: it has no drop), precision, recall, f1,
accuracy (image level at the deployed threshold), pixel_f1 (at the deployed pixel
threshold) and pixel_f1_max (the best pixel F1 over thresholds, chosen on the audited masks). A metric that cannot be computed (one class only, no masks) is NaN in memory and
null in JSON. "overall" is the macro mean over categories (`overall_summary`), as in the
MVTec AD literature. `metrics.image_summary` and `metrics.per_defect` produce the image parts.
Shifts keep the order they were asked for, everywhere.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptad.metrics.image import binary_stats, pr_curve, roc_curve

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_max_threshold",
           "precision", "recall", "f1", "accuracy", "pixel_f1", "pixel_f1_max")
THRESHOLD_METRICS = frozenset({"image_f1_max_threshold"})


# --------------------------------------------------------------------------- report dict


def _number(value) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def with_drop(clean: dict, shifted: dict) -> dict:
    """A shift's metrics plus "drop" (clean - shifted) for every quality metric in both."""
    drop = {m: clean[m] - shifted[m] for m in METRICS
            if m in clean and m in shifted and m not in THRESHOLD_METRICS}
    return {**shifted, "drop": drop}


def overall_summary(categories: dict) -> dict:
    """Macro mean over categories of clean and per-shift metrics, ignoring NaN (a category
    without masks must not erase the pixel metrics of the others). A shift's drop is the mean
    of the per-category drops, so it compares like with like when categories differ in which
    metrics they have. Shifts keep the categories' order (the order they were asked for)."""

    def mean_of(rows: list[dict]) -> dict:
        out = {}
        for m in METRICS:
            if m in THRESHOLD_METRICS or not any(m in r for r in rows):
                continue  # thresholds of different categories are on different scales
            values = [r[m] for r in rows if r.get(m) is not None and not math.isnan(r[m])]
            out[m] = float(np.mean(values)) if values else float("nan")
        return out

    shift_names = list(dict.fromkeys(s for c in categories.values() for s in c.get("shifts", {})))
    shifts = {}
    for s in shift_names:
        rows = [c["shifts"][s] for c in categories.values() if s in c.get("shifts", {})]
        shifts[s] = {**mean_of(rows), "drop": mean_of([r.get("drop", {}) for r in rows])}
    return {"clean": mean_of([c["clean"] for c in categories.values()]), "shifts": shifts}


def _jsonable(obj):
    """Plain JSON: numpy scalars and arrays to Python, NaN/inf to null (bare NaN is not JSON
    and breaks strict readers such as browsers and DuckDB)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _number(obj)
    return obj


def write_report_json(path: str | Path, report: dict) -> None:
    """Store the report dict (structure in the module docstring) as strict JSON."""
    Path(path).write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- page inputs


@dataclass
class CategoryCurves:
    """What the plots of one category need (clean condition, image level).

    fpr/tpr: ROC points; recall/precision: PR points; normal_scores/anomalous_scores: image
    scores by ground truth; threshold: the deployed image threshold on the same scale;
    roc_point / pr_point: where that threshold sits on each curve (None without both classes)."""

    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    normal_scores: np.ndarray
    anomalous_scores: np.ndarray
    threshold: float
    roc_point: tuple[float, float] | None = None
    pr_point: tuple[float, float] | None = None

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray, threshold: float
                    ) -> "CategoryCurves":
        scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
        fpr, tpr, _ = roc_curve(scores, labels)
        precision, recall, _ = pr_curve(scores, labels)
        roc_point = pr_point = None
        if labels.any() and not labels.all():
            s = binary_stats(scores, labels, threshold)
            tpr_at = s["tp"] / (s["tp"] + s["fn"])
            roc_point = (s["fp"] / (s["fp"] + s["tn"]), tpr_at)
            # with nothing flagged precision is undefined; the PR curve ends at (0, 1) there
            pr_point = (tpr_at, s["tp"] / (s["tp"] + s["fp"]) if s["tp"] + s["fp"] else 1.0)
        return cls(fpr, tpr, recall, precision, scores[~labels], scores[labels], threshold,
                   roc_point, pr_point)


@dataclass
class Example:
    """One image shown as a thumbnail. png: its visualization, relative to the directory of
    the HTML page (e.g. "visualization_results/bottle/good/000.png"); defect: its
    ground-truth type ("good" for normal images)."""

    image_id: str
    score: float
    png: str
    defect: str = ""


@dataclass
class WorstCases:
    """The most confidently wrong images of one category at the deployed threshold: false
    positives by descending score, false negatives by ascending score (`worst_indices`)."""

    false_positives: list[Example] = field(default_factory=list)
    false_negatives: list[Example] = field(default_factory=list)


def worst_indices(scores: np.ndarray, labels: np.ndarray, threshold: float, k: int = 8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k worst false positives (normal, highest score >= threshold) and false
    negatives (anomalous, lowest score < threshold), so only those need visualizing."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    fp = np.flatnonzero(~labels & (scores >= threshold))
    fn = np.flatnonzero(labels & (scores < threshold))
    return (fp[np.argsort(-scores[fp], kind="stable")[:k]],
            fn[np.argsort(scores[fn], kind="stable")[:k]])
