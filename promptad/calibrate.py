"""Deployment numbers per category from held-out normal images and synthetic anomalies.

Real anomalies are never used here: a line rarely has labelled defects when a model is deployed.
- memory scale: the 99th percentile of normal patch distances, so fused components share a scale;
- fusion weights are NOT tuned here: synthetic anomalies flatter the head that was trained on
  them, and a search on them picked mixtures that lost to the memory bank alone on real defects
  (benchmarks/RESULTS.md); the fixed rule in model.py is used, and how well it separates normals
  from synthetic anomalies is recorded in the stats;
- image threshold: the (1 - image_fpr) quantile of normal image scores (a target false-reject
  rate), pixel threshold: the (1 - pixel_fpr) quantile of normal map values.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .metrics import image_auroc
from .model import Calibration, PromptAD
from .predict import predict_components
from .synthesis import synthesize_anomaly


def _components(model: PromptAD, images: np.ndarray, category: str, batch_size: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        for k, v in predict_components(model, chunk, [category] * len(chunk)).items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _pixel_auroc(maps: torch.Tensor, masks: np.ndarray, rng: np.random.Generator, n: int = 200_000) -> float:
    flat, lab = maps.numpy().ravel(), masks.ravel()
    idx = rng.choice(flat.size, size=min(n, flat.size), replace=False)
    return float(image_auroc(flat[idx], lab[idx].astype(np.int64)))


def calibrate_category(model: PromptAD, category: str, normals: np.ndarray, seed: int = 0,
                       batch_size: int = 16, image_fpr: float = 0.01, pixel_fpr: float = 0.001) -> Calibration:
    """Calibration for one category from held-out normal images (N, S, S, 3) uint8."""
    if len(normals) == 0:
        raise ValueError(f"no held-out normal images to calibrate category {category!r}")
    rng = np.random.default_rng([seed, 7])
    pairs = [synthesize_anomaly(img, rng) for img in normals]
    synth = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] > 0.5 for p in pairs])
    normal_c = _components(model, normals, category, batch_size)
    synth_c = _components(model, synth, category, batch_size)
    mem_scale = float(np.quantile(normal_c["memory"].numpy(), 0.99))
    # ~0 when the calibration images are in the bank (tiny categories calibrate on their fit images)
    cal = replace(model.calibration[category], memory_scale=mem_scale if mem_scale > 1e-6 else 1.0)
    model.calibration[category] = cal
    cats = [category] * len(normals)

    s_n, m_n = model.fuse(normal_c, cats)
    s_a, m_a = model.fuse(synth_c, cats)
    labels = np.r_[np.zeros(len(s_n)), np.ones(len(s_a))].astype(np.int64)
    img = float(image_auroc(torch.cat([s_n, s_a]).numpy(), labels))
    pix = _pixel_auroc(torch.cat([m_n, m_a]), np.concatenate([np.zeros_like(masks), masks]), rng)
    scores = s_n.numpy()
    pixels = m_n.numpy().ravel()
    image_threshold = float(np.quantile(scores, 1 - image_fpr))
    pixel_threshold = float(np.quantile(pixels, 1 - pixel_fpr))
    cal = replace(cal, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                  image_center=float(np.median(scores)), pixel_center=float(np.median(pixels)),
                  stats={"n_normal": int(len(normals)), "synthetic_image_auroc": img,
                         "synthetic_pixel_auroc": pix, "image_fpr_target": image_fpr,
                         "pixel_fpr_target": pixel_fpr,
                         "synthetic_recall_at_threshold": float((s_a.numpy() >= image_threshold).mean())})
    model.calibration[category] = cal
    return cal
