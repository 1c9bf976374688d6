"""Raw fused map -> what a user stores: normalized 8-bit PNG at the input's aspect ratio, defect
area and decision. Shared by `score` and `audit`.

Torch-free: it runs in score's commit tasks and audit's CPU tasks, whose worker processes would
otherwise import torch for one resize (2.5 s of start-up each on this machine, and ~0.3 GiB)."""
from __future__ import annotations

import numpy as np

from promptad.data.images import encode_png, map_shape
from promptad.models.calibration import Calibration


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a linear resize n_in -> n_out with half-pixel centres and edge
    clamping: torch's interpolate(mode="bilinear", align_corners=False), rounded as its CPU kernel
    rounds (a float32 scale, the position computed in float64 and stored in float32)."""
    scale = float(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    i0 = src.astype(np.int64)  # floor: src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) float map -> `shape` (bilinear, as torch's interpolate without corner alignment):
    undoes the square resize of the input."""
    a = np.ascontiguousarray(amap, dtype=np.float32)
    if a.shape == tuple(shape):
        return a
    r0, r1, rw0, rw1 = _linear_taps(a.shape[0], shape[0])
    c0, c1, cw0, cw1 = _linear_taps(a.shape[1], shape[1])
    cols = a[:, c0] * cw0 + a[:, c1] * cw1
    return cols[r0] * rw0[:, None] + cols[r1] * rw1[:, None]


def is_anomalous(score: float, threshold: float) -> bool:
    """score >= threshold, decided on the float32 values the output stores, so that a reader who
    compares the `score` and `threshold` columns gets `is_anomalous` exactly. Compared in float64,
    a threshold that float32 cannot hold and rounds down when stored would pass a score equal
    to the stored threshold."""
    return bool(np.float32(score) >= np.float32(threshold))


def postprocess(cal: Calibration, score: float, amap: np.ndarray, height: int, width: int) -> dict:
    """Output fields of one scored image (see DESIGN.md, Scoring output)."""
    mh, mw = map_shape(height, width)
    m = resize_map(amap, (mh, mw))
    norm = np.asarray(cal.normalize_map(m), dtype=np.float32)
    return {
        "score": np.float32(score),
        "score_norm": np.float32(cal.normalize_score(float(score))),
        "is_anomalous": is_anomalous(score, cal.image_threshold),
        "threshold": np.float32(cal.image_threshold),
        "map_png": encode_png(np.round(norm * 255).astype(np.uint8)),
        "map_height": np.int32(mh),
        "map_width": np.int32(mw),
        "defect_area": np.float32((m >= cal.pixel_threshold).mean()),
    }
