"""Raw fused map -> what a user stores: normalized 8-bit PNG at the input's aspect ratio, defect
area and decision. Shared by `score` and `audit`."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from promptad.data.images import encode_png, map_shape
from promptad.models.model import Calibration


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) float map -> `shape` (bilinear): undoes the square resize of the input."""
    if amap.shape == tuple(shape):
        return amap.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


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
