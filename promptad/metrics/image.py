"""Image-level audit metrics: AUROC / F1 and the confidence a sample gives them (Wilson intervals
for rates, a seeded bootstrap for AUROC, recall at a false-alarm rate). Exact: sort-based, ties
handled as scikit-learn does. Pixel metrics (streamed, binned) are in pixel.py and reuse the
counting helpers here. Not sklearn.metrics: the same numbers (tested against it), 1.4-35x faster
(its input checks dominate at audit sizes: AUROC 0.06 ms here vs 1.2 ms on 1,000 images).
"""
from __future__ import annotations

import numpy as np


def _check_image_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; drop images that failed to score first")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0/1 (or bool)")
    return scores, labels.astype(bool)


def _cumulative_counts(scores: np.ndarray, labels: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, tp, fp) at each distinct score: predictions are score >= t."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.empty(0, int)
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return s[last_of_tie], tps, fps


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    """Trapezoid under the ROC given cumulative counts (descending thresholds); ties are
    straight segments, which is exactly the Mann-Whitney 1/2 credit for tied pairs."""
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _f1_from_counts(tps: np.ndarray, fps: np.ndarray, positives: int) -> np.ndarray:
    denom = 2 * tps + fps + (positives - tps)
    return np.divide(2.0 * tps, denom, out=np.zeros(tps.shape), where=denom > 0)


def roc_curve(scores: np.ndarray, labels: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold inf,
    as sklearn.metrics.roc_curve(drop_intermediate=False). A missing class gives NaN rates."""
    scores, labels = _check_image_inputs(scores, labels)
    thr, tps, fps = _cumulative_counts(scores, labels)
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] else np.full(tps.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve(scores: np.ndarray, labels: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds ascending) as sklearn.metrics.precision_recall_curve:
    the last point (1, 0) has no threshold; with no positives recall is 1 everywhere."""
    scores, labels = _check_image_inputs(scores, labels)
    thr, tps, fps = _cumulative_counts(scores, labels)
    if thr.size == 0:
        return np.ones(1), np.zeros(1), np.empty(0)
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros(tps.shape), where=ps > 0)
    recall = tps / tps[-1] if tps[-1] else np.ones(tps.shape)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC; NaN (not an exception) when only one class is present, because an audit
    of a category without anomalous images must still produce a report."""
    scores, labels = _check_image_inputs(scores, labels)
    _, tps, fps = _cumulative_counts(scores, labels)
    return _auroc_from_counts(tps, fps)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over the PR curve and the score threshold reaching it (predict score >= it).
    The literature's number for audits; never the deployed threshold. Ties in F1 resolve to
    the highest threshold. (NaN, NaN) without positives."""
    scores, labels = _check_image_inputs(scores, labels)
    thr, tps, fps = _cumulative_counts(scores, labels)
    positives = int(labels.sum())
    if positives == 0:
        return float("nan"), float("nan")
    f1 = _f1_from_counts(tps, fps, positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


def binary_stats(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates at a fixed threshold (score >= threshold is anomalous).
    Undefined ratios are 0, as sklearn's zero_division=0."""
    scores, labels = _check_image_inputs(scores, labels)
    pred = scores >= threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    tn = int(labels.size - tp - fp - fn)
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "accuracy": (tp + tn) / labels.size if labels.size else float("nan"),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def image_summary(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """The image-level metrics of one audit condition, keyed by the report's metric names."""
    f1, f1_thr = f1_max(scores, labels)
    stats = binary_stats(scores, labels, threshold)
    return {
        "image_auroc": image_auroc(scores, labels),
        "image_f1_max": f1,
        "image_f1_max_threshold": f1_thr,
        **{k: stats[k] for k in ("precision", "recall", "f1", "accuracy")},
    }


def per_defect(scores: np.ndarray, defects: list[str] | np.ndarray, threshold: float,
               good: str = "good") -> dict:
    """Per defect type: how many, how separable from good images (AUROC of that type against
    all good images), mean score, and recall at the deployed threshold, so a weak defect type
    is not hidden by an average."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    defects = np.asarray(defects).ravel()
    if scores.shape != defects.shape:
        raise ValueError(f"{scores.size} scores but {defects.size} defect names")
    is_good = defects == good
    out = {}
    for name in sorted(set(defects[~is_good].tolist())):
        sel = defects == name
        keep = sel | is_good
        out[name] = {
            "count": int(sel.sum()),
            "image_auroc_vs_good": image_auroc(scores[keep], sel[keep]),
            "mean_score": float(scores[sel].mean()),
            "recall_at_threshold": float(np.mean(scores[sel] >= threshold)),
        }
    return out


# --------------------------------------------------------------------------- confidence

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
WHAT_IF_FPRS = (0.001, 0.01, 0.05)  # false-alarm rates of the audit's what-if table


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95 % by default).

    Chosen over the normal approximation because audits live at its failure points: 0 false
    alarms in n normals gives a zero-width Wald interval, while Wilson's upper bound is
    z^2 / (n + z^2) (0.278 for n = 10). n = 0 gives (0, 1): nothing is known.
    """
    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, float(centre - half))  # exact ends, no rounding dust
    hi = 1.0 if k == n else min(1.0, float(centre + half))
    return lo, hi


def wilson_min_n(rate: float, z: float = Z95) -> int | None:
    """Fewest trials whose perfect record (no failure in n) bounds the failure rate at or below
    `rate` with Wilson's upper bound z^2 / (n + z^2): how many normal images it takes to show a
    false-alarm target, or defective ones to show 1 - a recall target. None for rate 0."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return None
    n = int(np.ceil(z * z * (1.0 - rate) / rate - 1e-9))
    return max(n, 0 if rate == 1.0 else 1)


def rates_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float,
                       z: float = Z95) -> dict:
    """The decision counts at a threshold and the rates a line cares about, each with its
    Wilson interval: false alarms among normal images, misses (and recall) among defective
    ones. A rate without images to measure it is NaN with interval (0, 1)."""
    stats = binary_stats(scores, labels, threshold)
    tp, fp, tn, fn = stats["tp"], stats["fp"], stats["tn"], stats["fn"]
    normal, anomalous = fp + tn, tp + fn
    miss_lo, miss_hi = wilson_interval(fn, anomalous, z)
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "normal": normal, "anomalous": anomalous,
        "false_alarm_rate": fp / normal if normal else float("nan"),
        "false_alarm_ci": list(wilson_interval(fp, normal, z)),
        "miss_rate": fn / anomalous if anomalous else float("nan"),
        "miss_ci": [miss_lo, miss_hi],
        "recall": tp / anomalous if anomalous else float("nan"),
        "recall_ci": [1.0 - miss_hi, 1.0 - miss_lo],  # Wilson is symmetric in k <-> n - k
    }


def _tied_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count 1/2) of `scores` under each row of `weights` (B, N):
    how many times each image appears in a resample. One sort serves every resample."""
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weights[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # first index of each distinct score
    normal = np.add.reduceat(np.where(y, 0, w), starts, axis=1)
    anomalous = np.add.reduceat(np.where(y, w, 0), starts, axis=1)
    below = np.cumsum(normal, axis=1) - normal  # normals strictly below each distinct score
    pairs = normal.sum(1) * anomalous.sum(1)
    return (anomalous * (below + 0.5 * normal)).sum(1) / pairs


def bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of image AUROC over `n_boot` stratified bootstrap resamples.

    Normals and defectives are resampled separately (each resample keeps both class sizes, so
    none lacks a class), from `numpy.random.default_rng(seed)`: the same inputs and seed give
    the same interval. (NaN, NaN) when a class is missing.
    """
    scores, labels = _check_image_inputs(scores, labels)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // scores.size)  # bounded memory for large audits
    aucs = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        weights = np.zeros((b, scores.size))
        weights[:, pos] = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=b)
        weights[:, neg] = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=b)
        aucs.append(_tied_auroc(scores, labels, weights))
    lo, hi = np.quantile(np.concatenate(aucs), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def recall_at_fpr(scores: np.ndarray, labels: np.ndarray, target: float) -> dict:
    """What-if: the lowest threshold whose false-alarm rate on these normals is <= target, and
    the recall it gives (the best recall such a threshold can have). threshold is +inf when
    only flagging nothing meets the target; rates are NaN without both classes."""
    scores, labels = _check_image_inputs(scores, labels)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    if labels.all() or not labels.any():
        return {"target_fpr": target, "threshold": float("nan"), "fpr": float("nan"),
                "recall": float("nan")}
    i = int(np.searchsorted(fpr, target * (1 + 1e-12), side="right")) - 1  # fpr is sorted
    return {"target_fpr": target, "threshold": float(thresholds[i]), "fpr": float(fpr[i]),
            "recall": float(tpr[i])}
