"""Audit metrics against scikit-learn and an independent brute-force AUPRO."""
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from promptad.metrics.image import (
    _tied_auroc,
    binary_stats,
    bootstrap_auroc,
    f1_max,
    image_auroc,
    image_summary,
    per_defect,
    pr_curve,
    rates_at_threshold,
    recall_at_fpr,
    roc_curve,
    wilson_interval,
    wilson_min_n,
)
from promptad.metrics.pixel import AUPRO, PixelMetrics, label_regions

EIGHT = np.ones((3, 3), dtype=int)


def tied_scores(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal so that many ties straddle both classes."""
    labels = rng.random(n) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)
    return scores, labels.astype(int)


def smooth_maps(rng: np.random.Generator, n: int = 12, size: int = 64, peaked: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Realistic audit data: smooth noise maps in [0, 1], elliptic defect blobs that raise the
    map (some faintly), every third image defect-free."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(6, size - 6, 2)
            ry, rx = rng.uniform(1.5, 9, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 3, 3))
    signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    raw = noise / noise.std() + 2.0 * signal * rng.uniform(0.2, 1.5, (n, 1, 1))
    maps = (raw - raw.min()) / (raw.max() - raw.min())
    return (maps**4 if peaked else maps).astype(np.float32), masks


def sklearn_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


# --------------------------------------------------------------------------- image level


def test_roc_and_pr_curves_match_sklearn_with_ties():
    s, y = tied_scores(np.random.default_rng(0))
    fpr, tpr, thr = roc_curve(s, y)
    e_fpr, e_tpr, e_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, e_fpr)
    np.testing.assert_allclose(tpr, e_tpr)
    np.testing.assert_allclose(thr[1:], e_thr[1:])
    assert thr[0] == np.inf
    for got, expected in zip(pr_curve(s, y), skm.precision_recall_curve(y, s)):
        np.testing.assert_allclose(got, expected)


def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(5):
        s, y = tied_scores(rng, int(rng.integers(20, 300)))
        assert image_auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    s = rng.random(50)
    y = (s > 0.5).astype(int)
    assert image_auroc(s, y) == 1.0
    assert image_auroc(-s, y) == 0.0
    assert image_auroc(np.zeros(10), np.r_[np.zeros(5), np.ones(5)]) == 0.5


def test_one_class_gives_nan_not_an_exception():
    s = np.array([0.1, 0.4, 0.3])
    assert math.isnan(image_auroc(s, np.zeros(3)))
    assert math.isnan(image_auroc(s, np.ones(3)))
    assert math.isnan(image_auroc([], []))
    assert all(math.isnan(v) for v in f1_max(s, np.zeros(3)))
    assert f1_max(s, np.ones(3)) == (1.0, pytest.approx(0.1))  # everything flagged is right
    fpr, tpr, _ = roc_curve(s, np.ones(3))
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.precision_recall_curve(np.zeros(3), s)
    for got, exp in zip(pr_curve(s, np.zeros(3)), expected):
        np.testing.assert_allclose(got, exp)


def test_f1_max_is_the_best_f1_and_its_threshold_reproduces_it():
    rng = np.random.default_rng(2)
    for _ in range(5):
        s, y = tied_scores(rng)
        f1, thr = f1_max(s, y)
        assert f1 == pytest.approx(sklearn_f1_max(y, s), abs=1e-12)
        assert skm.f1_score(y, s >= thr) == pytest.approx(f1, abs=1e-12)
        assert thr in s


def test_binary_stats_match_sklearn():
    s, y = tied_scores(np.random.default_rng(3))
    for thr in (-5.0, 0.0, 0.5, float(np.max(s)), 99.0):
        pred = s >= thr
        got = binary_stats(s, y, thr)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
        assert got["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert got["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
        assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


def test_image_inputs_are_validated():
    with pytest.raises(ValueError, match="labels"):
        image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0.1, 0.2], [0, 2])


def test_image_summary_and_per_defect():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.7])
    defects = ["good", "good", "good", "crack", "crack", "scratch", "scratch"]
    labels = np.array([d != "good" for d in defects])
    summary = image_summary(scores, labels, threshold=0.5)
    assert summary["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert summary["recall"] == pytest.approx(3 / 4) and summary["precision"] == 1.0
    assert summary["image_f1_max"] == pytest.approx(sklearn_f1_max(labels, scores))
    table = per_defect(scores, defects, threshold=0.5)
    assert set(table) == {"crack", "scratch"}
    assert table["crack"] == {"count": 2, "image_auroc_vs_good": 1.0,
                              "mean_score": pytest.approx(0.85), "recall_at_threshold": 1.0}
    assert table["scratch"]["recall_at_threshold"] == 0.5
    assert table["scratch"]["image_auroc_vs_good"] == pytest.approx(
        skm.roc_auc_score([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.25, 0.7]))


# --------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("peaked", [False, True])
def test_pixel_metrics_match_sklearn_to_1e3(peaked):
    maps, masks = smooth_maps(np.random.default_rng(4), peaked=peaked)
    pm = PixelMetrics()
    for i in range(0, len(maps), 5):  # streamed in uneven batches
        pm.update(maps[i:i + 5], masks[i:i + 5])
    y, s = masks.ravel(), maps.ravel()
    assert abs(pm.auroc() - skm.roc_auc_score(y, s)) < 1e-3
    f1, thr = pm.f1_max()
    assert abs(f1 - sklearn_f1_max(y, s)) < 1e-3
    assert abs(skm.f1_score(y, s >= thr) - f1) < 1e-3
    for t in (0.25, 0.5, 0.75):  # bin edges: exact
        got = pm.f1_at(t)
        assert got["f1"] == pytest.approx(skm.f1_score(y, s >= t), abs=1e-9)
        assert got["precision"] == pytest.approx(skm.precision_score(y, s >= t, zero_division=0))
        assert got["recall"] == pytest.approx(skm.recall_score(y, s >= t), abs=1e-9)
    assert abs(pm.f1_at(0.3337)["f1"] - skm.f1_score(y, s >= 0.3337)) < 1e-3  # off-edge


def test_pixel_metrics_edge_cases():
    pm = PixelMetrics(num_bins=100)
    pm.update(np.random.default_rng(5).random((2, 8, 8)), np.zeros((2, 8, 8), bool))
    assert math.isnan(pm.auroc())
    assert all(math.isnan(v) for v in pm.f1_max())
    assert pm.f1_at(0.5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}

    flat = PixelMetrics()
    masks = np.zeros((3, 4, 4), bool)
    masks[1, :2] = True
    flat.update(np.zeros((3, 4, 4)), masks)  # all-zero maps: every pixel tied
    assert flat.auroc() == pytest.approx(skm.roc_auc_score(masks.ravel(), np.zeros(48)))
    assert flat.f1_max()[0] == pytest.approx(skm.f1_score(masks.ravel(), np.ones(48)))

    clipped = PixelMetrics(num_bins=10)
    clipped.update(np.array([[[-3.0, 7.0]]]), np.array([[[False, True]]]))
    assert clipped.auroc() == 1.0
    assert clipped.f1_at(1.0)["recall"] == 0.0 and clipped.f1_at(0.9)["f1"] == 1.0
    with pytest.raises(ValueError):
        clipped.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))
    with pytest.raises(ValueError):
        clipped.update(np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2), bool))


# --------------------------------------------------------------------------- AUPRO


def test_label_regions_by_hand():
    """8-connected components labelled by hand: diagonal neighbours join, a U joins at its
    bottom row, labels count up in raster order of each region's first pixel."""
    mask = np.array([[1, 0, 0, 1, 0, 1],
                     [0, 1, 0, 1, 0, 1],
                     [0, 0, 0, 1, 1, 1],
                     [1, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 1]], dtype=bool)
    expected = np.array([[1, 0, 0, 2, 0, 2],
                         [0, 1, 0, 2, 0, 2],
                         [0, 0, 0, 2, 2, 2],
                         [3, 3, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 4]], dtype=np.int32)
    labels, n = label_regions(mask)
    assert n == 4 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
    assert label_regions(np.eye(5, dtype=bool)[::-1])[1] == 1  # the anti-diagonal: one region
    assert label_regions(np.zeros((3, 4), bool))[1] == 0
    assert label_regions(np.ones((3, 4), bool))[1] == 1
    checker = (np.arange(4)[:, None] + np.arange(4)) % 2 == 0  # touching only at corners
    assert label_regions(checker)[1] == 1 and label_regions(~checker)[1] == 1


def aupro_reference(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Brute force on raw pixels: the (FPR, PRO) point at every distinct map value as a
    threshold, regions labelled by scipy, curve cut at `limit` by linear interpolation."""
    normal = np.sort(maps[~masks])
    regions = []
    for amap, mask in zip(maps, masks):
        labels, n = ndimage.label(mask, EIGHT)
        regions += [np.sort(amap[labels == r]) for r in range(1, n + 1)]
    thresholds = np.unique(maps)[::-1]

    def share_at_or_above(values: np.ndarray) -> np.ndarray:
        return 1.0 - np.searchsorted(values, thresholds, side="left") / values.size

    fpr = np.r_[0.0, share_at_or_above(normal)]
    pro = np.r_[0.0, np.mean([share_at_or_above(r) for r in regions], axis=0)]
    area = 0.0
    for i in range(1, fpr.size):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x1 > limit:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("peaked", [False, True])
def test_aupro_matches_brute_force(peaked):
    maps, masks = smooth_maps(np.random.default_rng(7), peaked=peaked)
    aupro = AUPRO()
    for i in range(0, len(maps), 4):
        aupro.update(maps[i:i + 4], masks[i:i + 4])
    expected = aupro_reference(maps.astype(np.float64), masks)
    assert 0.05 < expected < 0.99  # neither trivial nor saturated
    assert abs(aupro.compute() - expected) < 1e-3


def test_aupro_edge_cases():
    maps, masks = smooth_maps(np.random.default_rng(8), n=4, size=32)
    perfect = AUPRO()
    perfect.update(masks.astype(float), masks)
    assert perfect.compute() == pytest.approx(1.0)

    flat = AUPRO()  # all-zero maps: one tied threshold, curve (0,0) -> (1,1)
    flat.update(np.zeros_like(maps), masks)
    assert flat.compute() == pytest.approx(aupro_reference(np.zeros_like(maps), masks))
    assert flat.compute() == pytest.approx(0.15)

    no_regions = AUPRO()
    no_regions.update(maps, np.zeros_like(masks))
    assert math.isnan(no_regions.compute())

    no_normal = AUPRO()
    no_normal.update(maps, np.ones_like(masks))
    assert math.isnan(no_normal.compute())


# --------------------------------------------------------------------------- confidence


def test_wilson_interval_hand_computed():
    # z = 1.96: 0/10 -> (0, z^2 / (10 + z^2)); 5/10 and 1/3 worked by hand from the formula
    # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n); 10/10 mirrors 0/10.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_interval(5, 10) == (pytest.approx(0.23659, abs=1e-5),
                                      pytest.approx(0.76341, abs=1e-5))
    assert wilson_interval(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    assert wilson_interval(1, 3) == (pytest.approx(0.06149, abs=1e-5),
                                     pytest.approx(0.79235, abs=1e-5))
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured, nothing known
    # scipy.stats.binomtest(k, 7).proportion_ci(method="wilson"): k = 3 and k = 4 mirror each other
    assert wilson_interval(3, 7) == (pytest.approx(0.15822, abs=1e-5), pytest.approx(0.74954, abs=1e-5))
    assert wilson_interval(4, 7) == (pytest.approx(0.25046, abs=1e-5), pytest.approx(0.84178, abs=1e-5))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_wilson_min_n_is_the_first_sample_that_shows_the_rate():
    # upper bound of 0/n is z^2 / (n + z^2) <= rate  <=>  n >= z^2 (1 - rate) / rate
    assert wilson_min_n(0.01) == 381  # 3.8415 * 99 = 380.3
    assert wilson_min_n(0.05) == 73  # 3.8415 * 19 = 72.99
    assert wilson_interval(0, 381)[1] <= 0.01 < wilson_interval(0, 380)[1]
    assert wilson_min_n(1.0) == 0 and wilson_min_n(0.0) is None
    with pytest.raises(ValueError):
        wilson_min_n(1.5)


def test_rates_at_threshold_counts_and_intervals():
    # 10 normals, none flagged; 10 defectives, 5 flagged
    scores = np.r_[np.linspace(0.0, 0.4, 10), np.linspace(0.1, 1.0, 10)]
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    r = rates_at_threshold(scores, labels, 0.55)  # flags 0.6 .. 1.0
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["normal"], r["anomalous"]) == (5, 0, 10, 5, 10, 10)
    assert r["false_alarm_rate"] == 0.0 and r["miss_rate"] == 0.5 and r["recall"] == 0.5
    assert r["false_alarm_ci"] == [0.0, pytest.approx(0.27753, abs=1e-5)]
    for key in ("miss_ci", "recall_ci"):
        assert r[key] == [pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5)]
    only_defects = rates_at_threshold([0.9, 0.2], [1, 1], 0.5)
    assert math.isnan(only_defects["false_alarm_rate"]) and only_defects["false_alarm_ci"] == [0, 1]
    assert only_defects["recall"] == 0.5


def test_resampled_auroc_equals_sklearn_with_sample_weights():
    """A bootstrap resample is the data with integer weights: each resample's AUROC must be
    sklearn's weighted AUROC, ties included."""
    rng = np.random.default_rng(11)
    s, y = tied_scores(rng, 120)
    weights = rng.multinomial(s.size, np.full(s.size, 1 / s.size), size=6).astype(float)
    got = _tied_auroc(s, y.astype(bool), weights)
    for w, value in zip(weights, got):
        assert value == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def delong_se(scores: np.ndarray, labels: np.ndarray) -> float:
    """DeLong's standard error of AUROC from its structural components (written here, not
    taken from the code under test)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


def test_bootstrap_auroc_interval_is_seeded_contains_the_estimate_and_has_delong_width():
    rng = np.random.default_rng(12)
    labels = (rng.random(300) < 0.4).astype(int)
    scores = rng.normal(labels * 1.0, 1.0)
    auroc = image_auroc(scores, labels)
    lo, hi = bootstrap_auroc(scores, labels, n_boot=2000, seed=0)
    assert lo < auroc < hi
    assert bootstrap_auroc(scores, labels, n_boot=2000, seed=0) == (lo, hi)  # deterministic
    assert bootstrap_auroc(scores, labels, n_boot=2000, seed=1) != (lo, hi)
    assert (hi - lo) == pytest.approx(2 * 1.96 * delong_se(scores, labels), rel=0.15)
    # more resamples than one chunk holds give the same kind of interval
    assert bootstrap_auroc(np.tile(scores, 40), np.tile(labels, 40), n_boot=50)[1] - \
        bootstrap_auroc(np.tile(scores, 40), np.tile(labels, 40), n_boot=50)[0] < (hi - lo) / 3


def test_bootstrap_auroc_edge_cases():
    assert bootstrap_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (1.0, 1.0)  # separable
    assert all(math.isnan(v) for v in bootstrap_auroc([0.1, 0.2], [0, 0]))
    assert bootstrap_auroc(np.zeros(6), [0, 0, 0, 1, 1, 1]) == (0.5, 0.5)  # all tied


def test_recall_at_fpr_hand_cases():
    normals = np.round(np.arange(1, 11) / 10, 2)  # 0.1 .. 1.0
    defects = np.array([0.55, 0.95, 1.5, 2.0])
    scores = np.r_[normals, defects]
    labels = np.r_[np.zeros(10), np.ones(4)].astype(int)
    # one false alarm allowed (10 %): lowest threshold above the 9 lowest normals is 0.95
    assert recall_at_fpr(scores, labels, 0.1) == {"target_fpr": 0.1, "threshold": 0.95,
                                                  "fpr": 0.1, "recall": 0.75}
    # none allowed (5 % of 10 normals < 1): the threshold must clear 1.0
    assert recall_at_fpr(scores, labels, 0.05) == {"target_fpr": 0.05, "threshold": 1.5,
                                                   "fpr": 0.0, "recall": 0.5}
    # half allowed: 0.55 flags 5 normals (0.6 .. 1.0) and every defect
    assert recall_at_fpr(scores, labels, 0.5) == {"target_fpr": 0.5, "threshold": 0.55,
                                                  "fpr": 0.5, "recall": 1.0}
    top_is_normal = recall_at_fpr([0.9, 0.1, 0.2], [0, 1, 1], 0.0)
    assert top_is_normal["threshold"] == math.inf and top_is_normal["recall"] == 0.0
    assert math.isnan(recall_at_fpr([0.1, 0.2], [0, 0], 0.01)["recall"])
