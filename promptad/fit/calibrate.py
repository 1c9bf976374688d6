"""Deployment numbers per category from held-out scores of normal images; real anomalies are never
used (a line rarely has labelled defects when a model is deployed).

Every normal training image informs the threshold without being in its own memory: it is scored
against the banks without the entries taken from it (leave-one-out, memory.nn_distance `exclude`)
and against a Gaussian fitted without its fold (gaussian.held_out_scores). Those held-out scores
stand for new normal images, and set
- the memory scales: the 99th percentile of normal local and regional patch distances;
- the local reference (models/model.py; only for un-normalized local features, local_norm
  "none"): every image's held-out local score is kept, and an
  image's reference is the mean of those of its nearest normal images (a held-out image's
  neighbours are the others). With tolerated views, each view's held-out local score (without
  its image's entries) is kept too, and each neighbour counts in its version (the image or one
  of its views) nearest to the image scored: a drifted image is then read against drifted views
  of images like it, not against clean images, whose maps peak lower;
- z(local / reference) and z(global) (models/model.py; the reference is 1 with the default
  image-normalized features): robust standard scores (median,
  1.4826 x MAD);
- the image threshold: the conformal order statistic. With n held-out scores and a target
  false-alarm rate a, the threshold is the k-th smallest score, k = ceil((n + 1)(1 - a)); a new
  normal image, exchangeable with them, then scores at or above it with probability
  (n + 1 - k) / (n + 1) <= a. When n < 1/a - 1 no k exists: the threshold is the largest score,
  which promises 1/(n + 1), and the calibration says so in `stats["warnings"]`. One outlier
  does not set it: when the highest score is the threshold and stands far above the others
  (lone_threshold), the threshold is the next highest instead, which promises 2/(n + 1) (cookie:
  one odd photo among 31 normals put the threshold above all 32 cracks of its test set; at the
  next score it catches them all). Below PASS_OVER_MIN images the highest is kept, with a warning. The image whose score is the threshold is named in
  `stats["threshold_image"]`, the one passed over in `stats["passed_over_image"]` and a warning;
- the pixel threshold: the same rule over normal map pixels at a 0.1 % target (a pixel grid of
  every 4th pixel; the maps are smooth at that scale);
- score_norm and map normalization: median normal value -> 0.25, threshold -> 0.5.

Leave-one-out against the coreset is slightly conservative: a left-out image also loses the
entries that covered it and that a bank built without it would have drawn from other images, so
its distances run a little high and the threshold errs towards fewer false alarms
(benchmarks/RESULTS.md compares the promised rate with the rate measured on test normals).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from promptad.actors import FIT_PRECISION
from promptad.memory.gaussian import held_out_scores
from promptad.models.backbones import Features
from promptad.models.features import group_views
from promptad.models.model import Calibration, PromptAD
from promptad.predict import components_of

IMAGE_FPR = 0.01  # target false-alarm rate on normal images
PIXEL_FPR = 0.001  # target false-positive rate on normal pixels
PIXEL_STRIDE = 4  # pixel grid for the pixel threshold
LONE_RATIO = 3.0  # lone_threshold: how far the highest normal score must stand above the rest
# Fewest normal images for passing a lone highest score over: lone_threshold's test fires on plain
# normal spread under 0.2 % of the time at 31 images but a few % at 10, and more below.
PASS_OVER_MIN = 10


def conformal_threshold(scores: np.ndarray, target: float) -> tuple[float, float]:
    """(threshold, promised false-alarm rate) from held-out normal scores (see module docstring).

    The threshold is one of the scores (the float32 values the model produced), so a reader of the
    stored float32 columns reaches the same decisions."""
    s = np.sort(np.asarray(scores, dtype=np.float32).ravel())
    n = s.size
    if n == 0:
        raise ValueError("no held-out normal scores to calibrate on")
    k = math.ceil((n + 1) * (1 - target))
    if k > n:
        return float(s[-1]), 1.0 / (n + 1)
    return float(s[k - 1]), (n + 1 - k) / (n + 1)


def lone_threshold(scores: np.ndarray, threshold: float, ratio: float = LONE_RATIO) -> bool:
    """Whether the held-out image whose score is the threshold sets it alone.

    It does when the threshold is the highest normal score (few images: conformal_threshold takes
    the largest) and that score stands apart: its gap to the next highest is more than `ratio`
    times the next highest's distance from the median. Such an image is a defect among the
    normals or a kind of normal image seen once; either way every decision at the deployed
    threshold rests on it (cookie's one photo with the tray edge: the threshold above every crack,
    benchmarks/RESULTS.md). Among normally distributed scores a gap that wide is rare (under 0.2 %
    at 31 images, a few % at 10)."""
    s = np.asarray(scores, dtype=np.float32).ravel()
    if s.size < 3 or np.float32(threshold) != s.max():
        return False
    second = float(np.partition(s, -2)[-2])
    spread = second - float(np.median(s))
    return float(s.max()) - second > ratio * max(spread, 1e-6)


def sample_warnings(scores: np.ndarray) -> list[str]:
    """What the held-out normal scores as a whole say about the sample: one image, or images that
    all score the same (identical or blank)."""
    n = len(scores)
    if n < 2:
        return [f"only {n} normal image: it is in its own memory bank, so its score is ~0 and the "
                "threshold flags almost everything; fit on more normal images"]
    if float(np.ptp(scores)) <= 1e-6 * max(1.0, abs(float(scores[0]))):
        return [f"all {n} normal images score the same held out ({float(scores[0]):.2f}): they are "
                "identical or blank, so nothing tells normal variation from a defect and the threshold "
                "flags almost any image that differs; fit on real, varied normal images"]
    return []


def image_threshold_of(scores: np.ndarray, image_fpr: float,
                       names: Sequence[str] | None = None) -> tuple[float, dict, list[str]]:
    """(threshold, stats, warnings) of the image threshold from held-out normal scores, one per image
    named by `names` (None: "training image #i"): the conformal order statistic, a lone highest score
    passed over from PASS_OVER_MIN images on, and what that promises. The stats keep every held-out
    score with its image, so `promptad recalibrate` can apply the same rule to another target, or
    to the scores without some images or with new ones, without refitting."""
    scores = np.asarray(scores, dtype=np.float32).ravel()
    n = scores.size
    names = list(names) if names is not None else [f"training image #{i}" for i in range(n)]
    image_threshold, promised = conformal_threshold(scores, image_fpr)
    passed_over = None
    lone = lone_threshold(scores, image_threshold)
    if lone and n >= PASS_OVER_MIN:
        passed_over = int(np.argmax(scores))
        image_threshold, promised = float(np.partition(scores, -2)[-2]), 2.0 / (n + 1)
    warnings = []
    if promised > image_fpr + 1e-12:
        need = math.ceil(1 / image_fpr) - 1
        warnings.append(f"{n} normal images cannot support a {image_fpr:.1%} false-alarm target: the threshold "
                        f"is their {'second ' if passed_over is not None else ''}highest score, which promises "
                        f"{promised:.1%}; at least {need} are needed")
    at = int(np.flatnonzero(scores == np.float32(image_threshold))[0])  # one of the scores
    outlier = None
    if passed_over is not None:
        outlier = names[passed_over]
        warnings.append(f"one normal image stands far above the rest and does not set the threshold: {outlier} "
                        f"scores {scores[passed_over]:.2f} held out, the next highest {scores[at]:.2f} "
                        f"(median {np.median(scores):.2f}); the threshold is that next score, so images like the "
                        "outlier will be flagged; if it is defective leave it out of the fit, if it is a kind of "
                        "normal image seen once add more like it")
    elif lone:
        warnings.append(f"the image threshold rests on one normal image, {names[at]}: held out it scores "
                        f"{scores[at]:.2f}, the next highest {np.delete(scores, at).max():.2f} "
                        f"(median {np.median(scores):.2f}); with under {PASS_OVER_MIN} images it is kept; "
                        "if it is defective leave it out of the fit, if it is a kind of normal image seen once "
                        "add more like it")
    stats = {"n_normal": int(n), "threshold_image": names[at], "passed_over_image": outlier,
             "image_fpr_target": image_fpr, "image_fpr_promised": promised, "image_fpr_achievable": 1.0 / (n + 1),
             "held_out_fpr_at_threshold": float((scores >= image_threshold).mean()),
             "threshold_rule": "conformal order statistic of leave-one-out normal scores"
                               + ("; the highest, a lone outlier, passed over" if passed_over is not None else ""),
             "held_out": {"images": names, "scores": [float(v) for v in scores]}}
    return image_threshold, stats, warnings


def _robust_z(values: torch.Tensor) -> tuple[float, float]:
    """(median, 1.4826 x median absolute deviation) of held-out normal values: the z() of models/model.py,
    a standard score that one outlying normal image among few cannot stretch (a 99th percentile of
    31 cookie images is their maximum, and one odd image set it 4x too wide). Not
    scipy.stats.median_abs_deviation: 25x slower here, and its median of an even count averages
    the middle two where torch's takes the lower, which would move every calibrated z."""
    v = values.float().flatten()
    center = float(v.median())
    spread = 1.4826 * float((v - center).abs().median())
    return center, spread if spread > 1e-6 else max(abs(center), 1.0)


def distance_scale(values: torch.Tensor) -> float:
    """99th percentile of normal distances; 1 where it is ~0 (no left-out image to measure)."""
    v = values.float().flatten()
    v = v[torch.isfinite(v)]
    q = float(torch.quantile(v[:: max(1, v.numel() // 2_000_000)], 0.99)) if v.numel() else 0.0
    return q if q > 1e-6 else 1.0


def _left_out(model: PromptAD, category: str, feats: Features, owners: torch.Tensor | None,
              batch_size: int) -> dict[str, torch.Tensor]:
    """Components of each row of `feats` scored without the memory entries of training image
    owners[row] (leave-one-out; a tolerated view leaves with its image); None: with every entry."""
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(feats), batch_size):
        rows = slice(s, min(len(feats), s + batch_size))
        comps = components_of(model, feats.select(rows), [category] * (rows.stop - s), FIT_PRECISION,
                              exclude=None if owners is None else owners[rows])
        for k, v in comps.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def held_out_components(model: PromptAD, category: str, feats: Features, batch_size: int = 32,
                        tolerated: Features | None = None) -> dict[str, torch.Tensor]:
    """Components of every normal image of a category, each scored without its own memory entries
    (its row index is its source in the banks) and its global distance from a Gaussian of the
    other folds (with their tolerated views, as the memory's Gaussian holds them). Maps stay at
    their patch grids (small).

    "neighbours" (n, k): each image's nearest normal images for its reference, each as its image
    or tolerated view nearest to it (indices into the Gaussian's normals: gaussian.nearest_versions),
    never itself.
    With views, "views" holds their components, each view scored without its image's entries:
    their held-out local scores are what a drifted image's reference is made of."""
    n = len(feats)
    out = _left_out(model, category, feats, torch.arange(n) if n >= 2 else None, batch_size)
    pooled = model.pooled_features(feats)
    extra = None if tolerated is None else group_views(model.pooled_features(tolerated), n)
    out["global"] = held_out_scores(pooled, extra=extra) if n >= 3 else model.memory[category].gaussian.score(pooled).cpu()
    views, k = 0, min(model.reference_neighbours, n - 1)
    if tolerated is not None and n >= 2 and k > 0:  # the views' scores serve only the reference
        views = len(tolerated) // n
        owners = torch.arange(n).repeat_interleave(views)
        out["views"] = _left_out(model, category, tolerated, owners, batch_size)
    out["neighbours"] = model.memory[category].gaussian.nearest(pooled, k, n, views, exclude_self=True).cpu() \
        if k > 0 else torch.zeros(n, 0, dtype=torch.long)
    return out


def _fused(model: PromptAD, comps: dict[str, torch.Tensor], category: str, batch_size: int = 64):
    """model.fuse over the held-out components in batches: (scores, local, global, pixel sample)."""
    n = comps["memory"].shape[0]
    out: dict[str, list] = {"scores": [], "local": [], "relative": [], "global": [], "pixels": []}
    for s in range(0, n, batch_size):
        part = {k: v[s:s + batch_size] for k, v in comps.items() if k not in ("neighbours", "views")}
        f = model.fuse(part, [category] * part["memory"].shape[0])
        out["scores"].append(f.scores.cpu())
        out["local"].append(f.local.cpu())
        out["relative"].append(f.relative.cpu())
        out["global"].append(f.global_.cpu())
        out["pixels"].append(f.maps[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].reshape(-1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def calibrate_category(model: PromptAD, category: str, feats: Features, trained: bool,
                       image_fpr: float = IMAGE_FPR, pixel_fpr: float = PIXEL_FPR,
                       batch_size: int = 32, tolerated: Features | None = None,
                       names: Sequence[str] | None = None) -> Calibration:
    """Calibration of one category from the backbone features of all its normal training images,
    the same images (in the same order) its memory was built from, and the features of their
    tolerated views (pipeline.tolerated_features) if the memory holds them. Needs model.memory[category] and, when
    `trained`, the trained head (else the head and learned prompts get no weight). `names`: the
    images' paths, in the same order, for the warning that names an image (lone_threshold)."""
    n = len(feats)
    if n == 0:
        raise ValueError(f"no normal images to calibrate category {category!r}")
    # The fusion first: it decides which components the held-out pass computes.
    fusion = model.default_fusion(trained)
    choice = model.calibration[category].map_choice
    if choice:
        fusion["regional"] = float(choice["regional"])
    base = replace(model.calibration[category], fusion=fusion)
    model.calibration[category] = base
    comps = held_out_components(model, category, feats, batch_size, tolerated)
    cal = replace(base, memory_scale=distance_scale(comps["memory"]), regional_scale=distance_scale(comps["regional"]),
                  local_center=0.0, local_scale=1.0, global_center=0.0, global_scale=1.0,
                  neighbour_scores=[], neighbours=0, neighbour_views=0)
    model.calibration[category] = cal
    first = _fused(model, comps, category)
    neighbours = comps["neighbours"]
    if neighbours.shape[1]:
        # Each image's reference: its neighbours' held-out local scores (never its own), each
        # neighbour as its image or the tolerated view nearest to it.
        normal_local = first["local"]
        if "views" in comps:
            normal_local = torch.cat([normal_local, _fused(model, comps["views"], category)["local"]])
        comps["reference"] = normal_local[neighbours].mean(1)
        cal = replace(cal, neighbour_scores=[float(v) for v in normal_local], neighbours=int(neighbours.shape[1]),
                      neighbour_views=len(normal_local) // n - 1)
        model.calibration[category] = cal
        first = _fused(model, comps, category)
    lc, ls = _robust_z(first["relative"])
    gc, gs = _robust_z(first["global"])
    cal = replace(cal, local_center=lc, local_scale=ls, global_center=gc, global_scale=gs)
    model.calibration[category] = cal
    fused = _fused(model, comps, category)
    scores, pixels = fused["scores"].numpy(), fused["pixels"].numpy()
    image_threshold, image_stats, image_warnings = image_threshold_of(scores, image_fpr, names)
    pixel_threshold, _ = conformal_threshold(pixels, pixel_fpr)
    stats = {**image_stats, "pixel_fpr_target": pixel_fpr,
             "tolerated_views": 0 if tolerated is None else len(tolerated) // n,
             "warnings": sample_warnings(scores) + image_warnings}
    cal = replace(cal, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                  image_center=float(np.median(scores)), pixel_center=float(np.median(pixels)), stats=stats)
    model.calibration[category] = cal
    return cal
