"""Pixel-level audit metrics: pixel AUROC / F1 and AUPRO, streamed. Each `update` folds a batch of
maps into fixed-size per-bin histograms, so memory does not grow with the number of images. Maps
arrive normalized to [0, 1]; with the default 2**16 bins the binned results agree with exact
computation to well under 1e-3 (tested). Connected components are scipy.ndimage.label's. The metrics
are streamed histograms, not sklearn's exact curves: memory stays two histograms whatever the
number of pixels, where sklearn would sort all of them.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from promptad.metrics.image import _auroc_from_counts, _f1_from_counts

DEFAULT_BINS = 2**16


def _as_batch(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    masks = np.asarray(masks, dtype=bool)
    if maps.ndim == 2:  # a single map
        maps, masks = maps[None], masks.reshape((1,) + masks.shape[-2:])
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    if not np.all(np.isfinite(maps)):
        raise ValueError("anomaly maps contain NaN or inf")
    return maps, masks


class _Bins:
    """Uniform bins on [lo, hi]; bin k holds lo + k*w <= x < lo + (k+1)*w, values outside are
    clipped into the end bins. Thresholds are bin lower edges, where binned counts are exact."""

    def __init__(self, num_bins: int, lo: float, hi: float):
        if num_bins < 2 or not hi > lo:
            raise ValueError("need num_bins >= 2 and hi > lo")
        self.num_bins, self.lo, self.hi = int(num_bins), float(lo), float(hi)
        self.edges = lo + (hi - lo) * np.arange(num_bins) / num_bins

    def index(self, x: np.ndarray) -> np.ndarray:
        k = np.floor((x.astype(np.float64) - self.lo) * (self.num_bins / (self.hi - self.lo)))
        return np.clip(k, 0, self.num_bins - 1).astype(np.intp)

    def nearest_edge(self, threshold: float) -> int:
        k = round((threshold - self.lo) * self.num_bins / (self.hi - self.lo))
        return int(np.clip(k, 0, self.num_bins))

    @staticmethod
    def at_or_above(hist: np.ndarray) -> np.ndarray:
        """Counts with bin >= k for k = 0..num_bins (the last is 0: threshold above all)."""
        return np.r_[np.cumsum(hist[::-1])[::-1], 0]


class PixelMetrics:
    """Streamed pixel AUROC and F1: histograms of normal and anomalous pixel values."""

    def __init__(self, num_bins: int = DEFAULT_BINS, lo: float = 0.0, hi: float = 1.0):
        self._bins = _Bins(num_bins, lo, hi)
        self._normal = np.zeros(num_bins, dtype=np.int64)
        self._anomalous = np.zeros(num_bins, dtype=np.int64)

    def update(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Fold in a batch: maps (N, H, W) float in [lo, hi], masks (N, H, W) bool."""
        maps, masks = _as_batch(maps, masks)
        n = self._bins.num_bins
        counts = np.bincount(self._bins.index(maps).ravel() + n * masks.ravel(), minlength=2 * n)
        self._normal += counts[:n]
        self._anomalous += counts[n:]

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """(tp, fp) for thresholds at edges k = 0..num_bins."""
        return self._bins.at_or_above(self._anomalous), self._bins.at_or_above(self._normal)

    def auroc(self) -> float:
        """Pixel AUROC; NaN when all pixels seen so far are of one class."""
        tps, fps = self._cumulative()
        return _auroc_from_counts(tps[::-1], fps[::-1])

    def f1_at(self, threshold: float) -> dict:
        """Precision, recall, F1 of `map >= threshold`; the threshold is taken at the nearest
        bin edge (at most half a bin, 1/(2*num_bins) of the range, away)."""
        tps, fps = self._cumulative()
        k = self._bins.nearest_edge(threshold)
        tp, fp, positives = int(tps[k]), int(fps[k]), int(tps[0])
        fn = positives - tp
        return {
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / positives if positives else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        }

    def f1_max(self) -> tuple[float, float]:
        """Best pixel F1 over bin-edge thresholds and that threshold; (NaN, NaN) with no
        anomalous pixels."""
        tps, fps = self._cumulative()
        if tps[0] == 0:
            return float("nan"), float("nan")
        f1 = _f1_from_counts(tps[:-1], fps[:-1], int(tps[0]))
        best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # highest threshold among ties
        return float(f1[best]), float(self._bins.edges[best])


# --------------------------------------------------------------------------- AUPRO


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D bool mask, as MVTec AD's evaluation labels defects.

    Returns (labels int32 (H, W), 0 = background, 1..n in raster order of first pixel, n):
    scipy.ndimage.label with the 3 x 3 structure (3x faster than the union-find over runs it
    replaced, with identical labels).
    """
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), _EIGHT)
    return labels.astype(np.int32, copy=False), int(n)


_EIGHT = np.ones((3, 3), dtype=bool)


class AUPRO:
    """Streamed area under the per-region-overlap curve up to `fpr_limit`, normalized by it.

    PRO(t) is the mean over all defect regions (8-connected components of every mask) of the
    fraction of the region with map >= t; FPR(t) is over all normal pixels of all images.
    Each region contributes its pixels to a histogram with weight 1/region size, so the sum of
    per-region overlaps at every bin-edge threshold is a reverse cumulative sum: memory is two
    histograms whatever the number of images.
    """

    def __init__(self, num_thresholds: int = DEFAULT_BINS, fpr_limit: float = 0.3,
                 lo: float = 0.0, hi: float = 1.0):
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError("fpr_limit must be in (0, 1]")
        self.fpr_limit = float(fpr_limit)
        self._bins = _Bins(num_thresholds, lo, hi)
        self._normal = np.zeros(num_thresholds, dtype=np.int64)
        self._overlap = np.zeros(num_thresholds, dtype=np.float64)
        self._regions = 0

    def update(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Fold in a batch: maps (N, H, W) float in [lo, hi], masks (N, H, W) bool."""
        maps, masks = _as_batch(maps, masks)
        idx = self._bins.index(maps)
        n = self._bins.num_bins
        self._normal += np.bincount(idx[~masks], minlength=n)
        for i in range(maps.shape[0]):
            labels, n_regions = label_regions(masks[i])
            if n_regions == 0:
                continue
            region = labels[masks[i]] - 1
            weight = 1.0 / np.bincount(region, minlength=n_regions)
            self._overlap += np.bincount(idx[i][masks[i]], weights=weight[region], minlength=n)
            self._regions += n_regions

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr ascending, pro) at every bin-edge threshold, from (0, 0) to (1, 1)."""
        total = self._normal.sum()
        fpr = self._bins.at_or_above(self._normal)[::-1] / total
        pro = self._bins.at_or_above(self._overlap)[::-1] / self._regions
        return fpr, pro

    def compute(self) -> float:
        """AUPRO in [0, 1]; NaN without defect regions or without normal pixels."""
        if self._regions == 0 or self._normal.sum() == 0:
            return float("nan")
        fpr, pro = self.curve()
        inside = int(np.searchsorted(fpr, self.fpr_limit, side="right"))
        x, y = fpr[:inside], pro[:inside]
        if inside < fpr.size:  # close the area exactly at the limit, interpolating linearly
            t = (self.fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
            x = np.r_[x, self.fpr_limit]
            y = np.r_[y, pro[inside - 1] + t * (pro[inside] - pro[inside - 1])]
        return float(np.trapezoid(y, x) / self.fpr_limit)
