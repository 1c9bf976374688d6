"""The audit report: report.json, one self-contained HTML page, per-image visualizations.

Written for the quality engineer who decides whether a model may go to the line: headline
metrics per category, how much each robustness shift costs, which defect types are weak, and
the images the model gets most wrong. Plots are inline SVG built here (no plotting library);
visualizations are numpy + PIL. No Ray, no torch.

Report dict (what `write_report_json` stores and `write_html_report` renders)::

    {
      "model_id": str,                  # content hash of the artifact
      "data_uri": str,                  # the labelled set that was audited
      "created_at": str,                # ISO 8601, UTC
      "categories": {
        CATEGORY: {
          "counts": {"images": int, "normal": int, "anomalous": int,
                     "with_mask": int, "errors": int},     # errors: images that failed to score
          "thresholds": {"image": float, "pixel": float},  # deployed, from the artifact
          "clean": {METRIC: float, ...},
          "shifts": {SHIFT: {METRIC: float, ..., "drop": {METRIC: clean - shifted}}},
          "per_defect": {DEFECT: {"count": int, "image_auroc_vs_good": float,
                                  "mean_score": float, "recall_at_threshold": float}},
        },
      },
      "overall": {"clean": {METRIC: float}, "shifts": {SHIFT: {METRIC: float, "drop": {...}}}},
    }

METRIC is one of `METRICS`: image_auroc, pixel_auroc, aupro, image_f1_max,
image_f1_max_threshold (a score, not a quality: it has no drop), precision, recall, f1,
accuracy (image level at the deployed threshold) and pixel_f1 (at the deployed pixel
threshold). A metric that cannot be computed (one class only, no masks) is NaN in memory and
null in JSON. "overall" is the macro mean over categories (`overall_summary`), as in the
MVTec AD literature. `metrics.image_summary` and `metrics.per_defect` produce the image parts.
"""
from __future__ import annotations

import html
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from promptad.metrics import pr_curve, roc_curve

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_max_threshold",
           "precision", "recall", "f1", "accuracy", "pixel_f1")
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
    metrics they have."""

    def mean_of(rows: list[dict]) -> dict:
        out = {}
        for m in METRICS:
            if m in THRESHOLD_METRICS or not any(m in r for r in rows):
                continue  # thresholds of different categories are on different scales
            values = [r[m] for r in rows if r.get(m) is not None and not math.isnan(r[m])]
            out[m] = float(np.mean(values)) if values else float("nan")
        return out

    shift_names = sorted({s for c in categories.values() for s in c.get("shifts", {})})
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


# --------------------------------------------------------------------------- HTML inputs


@dataclass
class CategoryCurves:
    """What the plots of one category need (clean condition, image level).

    fpr/tpr: ROC points; recall/precision: PR points; normal_scores/anomalous_scores: image
    scores by ground truth; threshold: the deployed image threshold on the same scale."""

    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    normal_scores: np.ndarray
    anomalous_scores: np.ndarray
    threshold: float

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray, threshold: float
                    ) -> "CategoryCurves":
        scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
        fpr, tpr, _ = roc_curve(scores, labels)
        precision, recall, _ = pr_curve(scores, labels)
        return cls(fpr, tpr, recall, precision, scores[~labels], scores[labels], threshold)


@dataclass
class Example:
    """One image shown as a thumbnail. png: its `side_by_side` PNG, relative to the directory
    of the HTML page (e.g. "vis/bottle/000.png"); defect: its ground-truth type ("good")."""

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


# --------------------------------------------------------------------------- SVG plots

_W, _H = 340, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 14, 28, 42
_COLORS = {"curve": "#1f5fbf", "normal": "#2a9d5c", "anomalous": "#d1495b", "threshold": "#222"}


def _ticks(lo: float, hi: float, n: int = 5, min_step: float = 0.0) -> np.ndarray:
    """Round-number ticks (steps 1, 2, 5 x 10^k, at least min_step) covering [lo, hi]."""
    raw = max((hi - lo) / n, min_step)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return np.arange(math.ceil(lo / step - 1e-9) * step, hi + step * 1e-6, step)


def _tick_label(t: float) -> str:
    return f"{round(t, 10):g}"


class _Plot:
    """A data-to-pixel frame with axes, ticks and labels; elements are SVG strings."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float],
                 title: str, xlabel: str, ylabel: str, y_min_step: float = 0.0):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.parts = [
            f'<text x="{_W / 2}" y="16" text-anchor="middle" font-weight="bold">'
            f"{html.escape(title)}</text>",
            f'<rect x="{_LEFT}" y="{_TOP}" width="{_W - _LEFT - _RIGHT}" '
            f'height="{_H - _TOP - _BOTTOM}" fill="none" stroke="#444"/>',
            f'<text x="{(_LEFT + _W - _RIGHT) / 2}" y="{_H - 6}" text-anchor="middle">'
            f"{html.escape(xlabel)}</text>",
            f'<text x="12" y="{(_TOP + _H - _BOTTOM) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(_TOP + _H - _BOTTOM) / 2})">{html.escape(ylabel)}</text>',
        ]
        for t in _ticks(self.x0, self.x1):
            x = self.sx(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{_H - _BOTTOM}" x2="{x:.1f}" '
                              f'y2="{_H - _BOTTOM + 4}" stroke="#444"/>'
                              f'<text x="{x:.1f}" y="{_H - _BOTTOM + 15}" '
                              f'text-anchor="middle">{_tick_label(t)}</text>')
        for t in _ticks(self.y0, self.y1, min_step=y_min_step):
            y = self.sy(t)
            self.parts.append(f'<line x1="{_LEFT - 4}" y1="{y:.1f}" x2="{_LEFT}" y2="{y:.1f}" '
                              f'stroke="#444"/><text x="{_LEFT - 6}" y="{y + 4:.1f}" '
                              f'text-anchor="end">{_tick_label(t)}</text>')

    def sx(self, x) -> np.ndarray:
        frac = (np.asarray(x, float) - self.x0) / (self.x1 - self.x0)
        return _LEFT + frac * (_W - _LEFT - _RIGHT)

    def sy(self, y) -> np.ndarray:
        frac = (np.asarray(y, float) - self.y0) / (self.y1 - self.y0)
        return _H - _BOTTOM - frac * (_H - _TOP - _BOTTOM)

    def line(self, xs: np.ndarray, ys: np.ndarray, color: str, dash: str = "",
             fill: bool = False, width: float = 2) -> None:
        """A polyline through the finite points; consecutive duplicate pixels are dropped to
        keep the page small for curves with thousands of points."""
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        pts = np.round(np.c_[self.sx(xs[ok]), self.sy(ys[ok])], 1)
        if len(pts) == 0:
            return
        keep = np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]
        coords = " ".join(f"{x:g},{y:g}" for x, y in pts[keep])
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        fill_attr = f'fill="{color}" fill-opacity="0.3"' if fill else 'fill="none"'
        self.parts.append(f'<polyline points="{coords}" {fill_attr} stroke="{color}" '
                          f'stroke-width="{width}"{dash_attr}/>')

    def note(self, text: str) -> None:
        self.parts.append(f'<text x="{(_LEFT + _W - _RIGHT) / 2}" y="{(_TOP + _H - _BOTTOM) / 2}" '
                          f'text-anchor="middle" fill="#888">{html.escape(text)}</text>')

    def legend(self, items: list[tuple[str, str, str]], corner: str = "lower-right") -> None:
        """items: (label, color, dash); boxed, in a corner ("lower-right", "lower-left",
        "upper-right") where the plot's curves rarely are."""
        width = 38 + 6 * max(len(label) for label, _, _ in items)
        x = _LEFT + 6 if corner.endswith("left") else _W - _RIGHT - width - 6
        y = _TOP + 6 if corner.startswith("upper") else _H - _BOTTOM - 12 - 16 * len(items)
        self.parts.append(f'<rect class="legend" x="{x}" y="{y}" width="{width}" '
                          f'height="{16 * len(items) + 6}" fill="white" fill-opacity="0.85" '
                          f'stroke="#bbb"/>')
        for i, (label, color, dash) in enumerate(items):
            cy = y + 12 + 16 * i
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            self.parts.append(f'<line x1="{x + 6}" y1="{cy - 4}" x2="{x + 26}" y2="{cy - 4}" '
                              f'stroke="{color}" stroke-width="3"{dash_attr}/>'
                              f'<text x="{x + 32}" y="{cy}">{html.escape(label)}</text>')

    def svg(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
                f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="11">'
                + "".join(self.parts) + "</svg>")


def _area(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.trapezoid(y, x)) if x.size and np.all(np.isfinite(x) & np.isfinite(y)) \
        else float("nan")


def svg_roc(fpr: np.ndarray, tpr: np.ndarray, title: str) -> str:
    """ROC curve with the chance diagonal; the legend carries the AUROC."""
    plot = _Plot((0, 1), (0, 1), title, "False positive rate", "True positive rate")
    plot.line([0, 1], [0, 1], "#999", dash="4 3", width=1)
    auroc = _area(fpr, tpr)
    if math.isnan(auroc):
        plot.note("n/a: needs normal and anomalous images")
    plot.line(fpr, tpr, _COLORS["curve"])
    plot.legend([(f"ROC (AUROC {_fmt(auroc)})", _COLORS["curve"], ""), ("chance", "#999", "4 3")])
    return plot.svg()


def svg_pr(recall: np.ndarray, precision: np.ndarray, title: str) -> str:
    """Precision-recall curve (recall on x), as sklearn's precision_recall_curve returns it."""
    plot = _Plot((0, 1), (0, 1), title, "Recall", "Precision")
    recall = np.asarray(recall, float)
    if recall.size < 2:
        plot.note("n/a: no scored images")
    plot.line(recall, precision, _COLORS["curve"])
    plot.legend([("precision-recall", _COLORS["curve"], "")], corner="lower-left")
    return plot.svg()


def svg_histogram(normal_scores: np.ndarray, anomalous_scores: np.ndarray, threshold: float,
                  title: str, bins: int = 30) -> str:
    """Overlaid score histograms of normal and anomalous images on shared bins, with the
    deployed threshold drawn: the overlap around it is what the line will see."""
    normal = np.asarray(normal_scores, float).ravel()
    anomalous = np.asarray(anomalous_scores, float).ravel()
    values = np.r_[normal, anomalous, threshold]
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or 0.5
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in (normal, anomalous)]
    top = max(1, int(max(c.max() for c in counts))) * 1.45  # headroom for the legend
    plot = _Plot((edges[0], edges[-1]), (0, top), title, "Image score", "Images", y_min_step=1)
    for c, key in zip(counts, ("normal", "anomalous")):
        if c.sum():
            xs = np.repeat(edges, 2)
            ys = np.r_[0, np.repeat(c, 2), 0]
            plot.line(xs, ys, _COLORS[key], fill=True, width=1.5)
    if math.isfinite(threshold):
        plot.line([threshold, threshold], [0, top], _COLORS["threshold"], dash="5 3")
    plot.legend([(f"normal (n={normal.size})", _COLORS["normal"], ""),
                 (f"anomalous (n={anomalous.size})", _COLORS["anomalous"], ""),
                 (f"threshold {_fmt_threshold(threshold)}", _COLORS["threshold"], "5 3")],
                corner="upper-right")
    return plot.svg()


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f2f2f2}
td.large-drop{background:#fbd5d5;font-weight:bold}
.drop{display:block;font-size:80%;color:#666}
td.large-drop .drop{color:#a00}
.plots svg{margin-right:12px;vertical-align:top}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:80%;max-width:420px}
figure img{max-width:420px;border:1px solid #ccc}
section{border-top:2px solid #ddd;margin-top:24px}
.meta{color:#555}
"""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.3f}"


def _fmt_threshold(value) -> str:
    """Thresholds are raw scores of any magnitude: significant digits, not decimals."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.4g}"


def _cell(metric: str, value, condition: str, drop=None, large_drop: float = 0.05) -> str:
    text = _fmt_threshold(value) if metric in THRESHOLD_METRICS else _fmt(value)
    attrs = f' data-metric="{metric}" data-condition="{html.escape(condition)}"'
    if drop is None or (isinstance(drop, float) and math.isnan(drop)):
        return f"<td{attrs}>{text}</td>"
    cls = ' class="large-drop"' if round(float(drop), 3) >= large_drop else ""  # as displayed
    return (f'<td{cls}{attrs} data-drop="{float(drop):.6g}">{text}'
            f'<span class="drop">{-float(drop):+.3f}</span></td>')


def _metrics_table(clean: dict, shifts: dict, large_drop: float) -> str:
    metrics = [m for m in METRICS if m in clean or any(m in s for s in shifts.values())]
    head = "".join(f"<th>{m}</th>" for m in metrics)
    rows = ["<tr><td>clean</td>" + "".join(
        _cell(m, clean.get(m), "clean") for m in metrics) + "</tr>"]
    for name, values in shifts.items():
        drops = values.get("drop", {})
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(
            _cell(m, values.get(m), name, drops.get(m), large_drop) for m in metrics) + "</tr>")
    return (f'<table class="metrics"><tr><th>condition</th>{head}</tr>' + "".join(rows)
            + "</table>")


def _per_defect_table(per_defect: dict) -> str:
    if not per_defect:
        return "<p>No anomalous images.</p>"
    keys = ("count", "image_auroc_vs_good", "mean_score", "recall_at_threshold")
    fmt = {"mean_score": _fmt_threshold}  # a raw score: any magnitude
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(
            f'<td data-defect="{html.escape(name)}" data-field="{k}">'
            f"{fmt.get(k, _fmt)(stats.get(k))}</td>" for k in keys) + "</tr>"
        for name, stats in per_defect.items())
    return ('<table class="per-defect"><tr><th>defect</th>'
            + "".join(f"<th>{k}</th>" for k in keys) + "</tr>" + rows + "</table>")


def _thumbs(kind: str, examples: list[Example]) -> str:
    if not examples:
        return f"<p>No {kind}.</p>"
    figures = "".join(
        f'<figure><img src="{html.escape(urllib.parse.quote(e.png))}" loading="lazy" '
        f'alt="{html.escape(e.image_id)}"><figcaption>{html.escape(e.image_id)}'
        f"{' (' + html.escape(e.defect) + ')' if e.defect else ''}: score "
        f"{_fmt_threshold(e.score)}</figcaption></figure>"
        for e in examples)
    return f'<div class="thumbs {kind.replace(" ", "-")}">{figures}</div>'


def _category_section(name: str, cat: dict, curves: CategoryCurves | None,
                      worst: WorstCases | None, large_drop: float) -> str:
    counts = ", ".join(f"{k}: {_fmt(v)}" for k, v in cat.get("counts", {}).items())
    thresholds = ", ".join(f"{k} {_fmt_threshold(v)}" for k, v in cat.get("thresholds", {}).items())
    parts = [f'<section id="cat-{html.escape(name)}"><h2>{html.escape(name)}</h2>',
             f'<p class="meta">{html.escape(counts)}'
             f"{' | deployed thresholds: ' + html.escape(thresholds) if thresholds else ''}</p>",
             "<h3>Metrics (clean, and per shift with change vs clean)</h3>",
             _metrics_table(cat.get("clean", {}), cat.get("shifts", {}), large_drop)]
    if curves is not None:
        parts += ['<div class="plots">',
                  svg_roc(curves.fpr, curves.tpr, f"{name}: ROC (image)"),
                  svg_pr(curves.recall, curves.precision, f"{name}: precision-recall (image)"),
                  svg_histogram(curves.normal_scores, curves.anomalous_scores, curves.threshold,
                                f"{name}: image scores"),
                  "</div>"]
    parts += ["<h3>Per defect type</h3>", _per_defect_table(cat.get("per_defect", {}))]
    worst = worst or WorstCases()
    parts += ["<h3>Worst false positives (normal images, highest scores)</h3>",
              _thumbs("false positives", worst.false_positives),
              "<h3>Worst false negatives (anomalous images, lowest scores)</h3>",
              _thumbs("false negatives", worst.false_negatives), "</section>"]
    return "".join(parts)


def render_html_report(report: dict, curves: dict[str, CategoryCurves],
                       worst: dict[str, WorstCases], large_drop: float = 0.05) -> str:
    """The HTML page as a string (see write_html_report)."""
    meta = (f"model {html.escape(str(report.get('model_id', '')))} | data "
            f"{html.escape(str(report.get('data_uri', '')))} | created "
            f"{html.escape(str(report.get('created_at', '')))}")
    overall = report.get("overall")
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
             f"<title>PromptAD audit {html.escape(str(report.get('model_id', '')))}</title>",
             f"<style>{_CSS}</style></head><body><h1>PromptAD audit</h1>",
             f'<p class="meta">{meta}</p>',
             f"<p>Changes under a shift are shifted minus clean; drops of {large_drop:.2f} "
             "or more are highlighted. F1-max is the literature's best case; precision, recall, "
             "F1, accuracy and pixel F1 are at the deployed thresholds.</p>"]
    if overall:
        parts += ['<section id="overall"><h2>Overall (mean over categories)</h2>',
                  _metrics_table(overall.get("clean", {}), overall.get("shifts", {}), large_drop),
                  "</section>"]
    for name, cat in report.get("categories", {}).items():
        parts.append(_category_section(name, cat, curves.get(name), worst.get(name), large_drop))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: str | Path, report: dict, curves: dict[str, CategoryCurves],
                      worst: dict[str, WorstCases], large_drop: float = 0.05) -> None:
    """One self-contained page per audit: per category the metrics table (clean, each shift
    with its change; drops >= large_drop highlighted), ROC, PR and score histograms, the
    per-defect table and thumbnails of the worst false positives/negatives. Only the
    thumbnails are external: PNGs referenced by the relative paths in `worst`.

    curves: category -> CategoryCurves (categories without one get no plots);
    worst: category -> WorstCases."""
    Path(path).write_text(render_html_report(report, curves, worst, large_drop), encoding="utf-8")


# --------------------------------------------------------------------------- visualization


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colormap (blue -> cyan -> yellow -> red) of values in [0, 1] to RGB uint8."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    centers = np.array([3.0, 2.0, 1.0], np.float32)  # red, green, blue peaks at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centers), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def side_by_side(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None,
                 alpha: float = 0.5) -> np.ndarray:
    """(H, 3W, 3) uint8: the input | the anomaly map (resized to the input) in jet blended over
    it | the ground-truth mask in white (black with "no mask" when there is none), so a
    reviewer sees what the model flagged next to what is actually wrong."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    amap = np.asarray(amap, np.float32)
    if amap.shape != (h, w):
        amap = np.asarray(Image.fromarray(amap).resize((w, h), Image.Resampling.BILINEAR))
    overlay = np.round((1 - alpha) * image + alpha * jet(amap)).astype(np.uint8)
    if mask is None:
        panel = Image.new("RGB", (w, h))
        ImageDraw.Draw(panel).text((4, 4), "no mask", fill=(200, 200, 200))
        truth = np.asarray(panel)
    else:
        m = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
        if m.size != (w, h):
            m = m.resize((w, h), Image.Resampling.NEAREST)
        truth = np.repeat(np.asarray(m)[..., None], 3, axis=2)
    return np.concatenate([image, overlay, truth], axis=1)
