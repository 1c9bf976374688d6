"""The audit's pictures, drawn with matplotlib: ROC, precision-recall and score histograms as
inline SVG (the report stays one file), and the per-image visualization as an RGB array.

matplotlib is used through `Figure` and explicit Agg / SVG canvases: no pyplot, no global
backend, no display, safe in Ray worker processes. Maps use `COLORMAP`, a perceptually
uniform colour map (equal steps in value look like equal steps in colour, also in grey), and
text stays text in the SVG (searchable, small). No Ray, no torch.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

COLORMAP = "inferno"  # black -> purple -> orange -> yellow: "hotter" reads as more anomalous
CONTOUR_COLOR = "#00e5ff"  # the pixel-threshold contour: cyan is far from every inferno colour
COLORS = {"curve": "#1f5fbf", "normal": "#2a9d5c", "anomalous": "#d1495b", "threshold": "#222222",
          "chance": "#999999", "operating": "#e07b00"}
_RC = {"svg.fonttype": "none", "svg.hashsalt": "promptad", "font.size": 8,
       "axes.titlesize": 9, "legend.fontsize": 7, "legend.framealpha": 0.85}
_SVG_SIZE = (3.6, 2.8)  # inches at 100 dpi: 360 x 280 px per plot


def _fmt(value: float, spec: str = ".3f") -> str:
    """A number for a label; never "-0.000", "n/a" when undefined."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    text = format(float(value), spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _svg(fig: Figure, prefix: str) -> str:
    """The figure as an inline <svg> element. Ids get a per-plot prefix so that several plots
    on one page never share an id (matplotlib numbers them per figure)."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        FigureCanvasSVG(fig).print_svg(buf, metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{prefix}-", text)


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, "matplotlib.axes.Axes"]:
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=_SVG_SIZE, dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig, ax


def _plot_id(kind: str, title: str) -> str:
    """A page-unique, run-stable id prefix for one plot."""
    return f"{kind}-{hashlib.sha1(title.encode()).hexdigest()[:10]}"


def _finite_area(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = x.size > 0 and np.all(np.isfinite(x) & np.isfinite(y))
    return float(np.trapezoid(y, x)) if ok else float("nan")


def roc_svg(fpr: np.ndarray, tpr: np.ndarray, title: str,
            operating_point: tuple[float, float] | None = None) -> str:
    """ROC curve with the chance diagonal; the legend carries the AUROC, and the deployed
    threshold's (false-alarm rate, recall) is marked, so the curve shows where the line sits."""
    fig, ax = _axes(title, "False positive rate (false alarms)", "True positive rate (recall)")
    with matplotlib.rc_context(_RC):
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color=COLORS["chance"], label="chance")
        auroc = _finite_area(fpr, tpr)
        ax.plot(fpr, tpr, lw=2, color=COLORS["curve"], label=f"ROC (AUROC {_fmt(auroc)})")
        if math.isnan(auroc):
            ax.text(0.5, 0.5, "n/a: needs normal and anomalous images", ha="center",
                    color="#888888", transform=ax.transAxes)
        _mark(ax, operating_point, "FPR {x}, TPR {y}")
        _finish(ax, "lower right")
    return _svg(fig, _plot_id("roc", title))


def pr_svg(recall: np.ndarray, precision: np.ndarray, title: str,
           operating_point: tuple[float, float] | None = None) -> str:
    """Precision-recall curve (recall on x, steps as sklearn draws it) with the deployed
    threshold's (recall, precision) marked."""
    fig, ax = _axes(title, "Recall", "Precision")
    with matplotlib.rc_context(_RC):
        recall = np.asarray(recall, float)
        ax.plot(recall, precision, lw=2, color=COLORS["curve"], drawstyle="steps-post",
                label="precision-recall")
        if recall.size < 2:
            ax.text(0.5, 0.5, "n/a: no scored images", ha="center", color="#888888",
                    transform=ax.transAxes)
        _mark(ax, operating_point, "recall {x}, precision {y}")
        _finish(ax, "lower left")
    return _svg(fig, _plot_id("pr", title))


def _mark(ax, point: tuple[float, float] | None, what: str) -> None:
    if point is None or not all(math.isfinite(v) for v in point):
        return
    x, y = point
    (line,) = ax.plot([x], [y], "o", ms=7, mfc=COLORS["operating"], mec="black", zorder=5,
                      label="deployed threshold (" + what.format(x=_fmt(x), y=_fmt(y)) + ")")
    line.set_gid("operating-point")


def _finish(ax, legend_corner: str) -> None:
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_corner)


def histogram_svg(normal_scores: np.ndarray, anomalous_scores: np.ndarray, threshold: float,
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
    fig, ax = _axes(title, "Image score", "Images")
    with matplotlib.rc_context(_RC):
        for scores, key in ((normal, "normal"), (anomalous, "anomalous")):
            ax.hist(scores[np.isfinite(scores)], bins=edges, histtype="stepfilled", alpha=0.45,
                    color=COLORS[key], ec=COLORS[key], label=f"{key} (n={scores.size})")
        if math.isfinite(threshold):
            ax.axvline(threshold, ls="--", color=COLORS["threshold"],
                       label=f"threshold {_fmt(threshold, '.4g')}")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) * 1.35)  # headroom for the legend
        ax.legend(loc="upper right")
    return _svg(fig, _plot_id("hist", title))


# --------------------------------------------------------------------------- visualization

PANEL_TITLES = ("input", "anomaly map over the input", "ground truth")
_MIN_PANEL = 192  # small images are enlarged (whole pixels) so that titles fit above them
_ONE_LINE_TITLES = 230  # px: narrower panels (portrait images) get the long title on two lines
_MARGIN, _GAP, _BOTTOM, _BAR, _BAR_LABELS = 8, 8, 40, 12, 110


@dataclass(frozen=True)
class VisualizationLayout:
    """Where everything sits in a visualization, in pixels (x0, y0, x1, y1), origin top-left.

    Panels show the image at `scale` whole pixels per map pixel (1 for MVTec-sized maps)."""

    width: int
    height: int
    scale: int
    panels: tuple[tuple[int, int, int, int], ...]  # input, overlay, ground truth
    colorbar: tuple[int, int, int, int]
    titles: tuple[str, ...] = PANEL_TITLES

    @classmethod
    def of(cls, h: int, w: int) -> "VisualizationLayout":
        scale = max(1, math.ceil(_MIN_PANEL / max(h, w)))
        ph, pw = h * scale, w * scale
        titles = PANEL_TITLES if pw >= _ONE_LINE_TITLES else \
            tuple(t.replace(" over ", "\nover ") for t in PANEL_TITLES)
        top = 10 + 17 * max(t.count("\n") + 1 for t in titles)
        panels = tuple((_MARGIN + i * (pw + _GAP), top, _MARGIN + i * (pw + _GAP) + pw, top + ph)
                       for i in range(3))
        bar_x = panels[-1][2] + _GAP + 4
        return cls(width=bar_x + _BAR + _BAR_LABELS, height=top + ph + _BOTTOM, scale=scale,
                   panels=panels, colorbar=(bar_x, top, bar_x + _BAR, top + ph), titles=titles)


def map_norm(amap: np.ndarray, center: float, threshold: float) -> Normalize:
    """Colour scale of a map: linear, threshold at the middle and the median normal value a
    quarter up -- the scale of score's map_png (model.Calibration.normalize_map). Without a
    calibrated threshold, the map's own range."""
    if math.isfinite(threshold):
        span = max(threshold - center, 1e-12)
        return Normalize(vmin=threshold - 2 * span, vmax=threshold + 2 * span, clip=True)
    finite = np.asarray(amap, float)[np.isfinite(amap)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0, clip=True)


def visualization(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *,
                  pixel_center: float, pixel_threshold: float, caption: str,
                  alpha: float = 0.5) -> np.ndarray:
    """(H', W', 3) uint8 figure of one image: input | anomaly map blended over the input, with
    the pixel-threshold contour | ground-truth mask (white; "no mask" when there is none), each
    panel titled, a colour bar whose middle is the pixel threshold, and `caption` below (score,
    threshold, decision). `amap` holds raw map values at the image's size; the layout is
    `VisualizationLayout.of(H, W)`."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    amap = np.asarray(amap, np.float32)
    if amap.shape != (h, w):
        raise ValueError(f"map {amap.shape} must match the image {(h, w)}")
    if mask is not None and np.shape(mask) != (h, w):
        raise ValueError(f"mask {np.shape(mask)} must match the image {(h, w)}")
    lay = VisualizationLayout.of(h, w)
    norm = map_norm(amap, pixel_center, pixel_threshold)
    with matplotlib.rc_context({**_RC, "font.size": 10, "axes.titlesize": 10}):
        fig = Figure(figsize=(lay.width / 100, lay.height / 100), dpi=100)
        fig.patch.set_facecolor("white")
        axes = [fig.add_axes(_fraction(box, lay)) for box in lay.panels]
        for ax, title, (x0, y0, x1, _) in zip(axes, lay.titles, lay.panels):
            ax.set_axis_off()  # titles as figure text: an axes title costs a layout pass
            fig.text((x0 + x1) / 2 / lay.width, 1 - (y0 - 5) / lay.height, title,
                     ha="center", va="bottom")
        axes[0].imshow(image, interpolation="nearest")
        axes[1].imshow(image, interpolation="nearest")
        heat = axes[1].imshow(amap, cmap=COLORMAP, norm=norm, alpha=alpha, interpolation="nearest")
        finite = amap[np.isfinite(amap)]
        if math.isfinite(pixel_threshold) and finite.size and \
                finite.min() < pixel_threshold <= finite.max():
            axes[1].contour(amap, levels=[pixel_threshold], colors=CONTOUR_COLOR, linewidths=1.2)
        if mask is None:
            axes[2].imshow(np.zeros((h, w)), cmap="gray", vmin=0, vmax=1)
            axes[2].text(w / 2, h / 2, "no mask", color="#cccccc", ha="center", va="center")
        else:
            axes[2].imshow(np.asarray(mask, bool), cmap="gray", vmin=0, vmax=1,
                           interpolation="nearest")
        bar = fig.colorbar(heat, cax=fig.add_axes(_fraction(lay.colorbar, lay)))
        bar.solids.set_alpha(1.0)  # the legend of the colours, not of the blend
        _threshold_ticks(bar, norm, pixel_threshold)
        fig.text(_MARGIN / lay.width, 6 / lay.height, caption, ha="left", va="bottom",
                 fontsize=9, wrap=False)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _fraction(box: tuple[int, int, int, int], lay: VisualizationLayout) -> list[float]:
    """Pixel box (origin top-left) -> matplotlib's [left, bottom, width, height] fractions."""
    x0, y0, x1, y1 = box
    return [x0 / lay.width, 1 - y1 / lay.height, (x1 - x0) / lay.width, (y1 - y0) / lay.height]


def _threshold_ticks(bar, norm: Normalize, threshold: float) -> None:
    ticks = [norm.vmin, (norm.vmin + norm.vmax) / 2, norm.vmax]
    bar.set_ticks(ticks)
    labels = [_fmt(t, ".3g") for t in ticks]
    labels[1] = (f"{_fmt(threshold, '.3g')} threshold" if math.isfinite(threshold)
                 else f"{labels[1]} (uncalibrated)")
    bar.set_ticklabels(labels)
    bar.ax.tick_params(labelsize=8)
