"""Per-category deployment numbers (Calibration) and the fusion weights they start from.

Torch-free on purpose: score's and audit's CPU tasks (postprocess, commit) read a model's
calibration from its manifest and need nothing else of the model, so a worker process that runs
only those tasks never imports torch (seconds of start-up and ~0.3 GiB per process).
"""
from __future__ import annotations

from dataclasses import dataclass, field

FUSION_NO_TEXT = {"memory": 1.0, "regional": 1.0, "head": 1.0, "text": 0.0, "global": 1.0}
FUSION_TEXT = {"memory": 1.0, "regional": 1.0, "head": 1.0, "text": 0.5, "global": 1.0}
FUSION_UNTRAINED = {"memory": 1.0, "regional": 1.0, "head": 0.0, "text": 0.0, "global": 1.0}


@dataclass
class Calibration:
    """Per-category deployment numbers, fitted on held-out scores of normal images (never on real
    anomalies): each normal image scored against memory without its own entries (fit/calibrate.py)."""

    memory_scale: float = 1.0  # divides local memory distances: normal patches sit below ~1
    regional_scale: float = 1.0  # the same for regional distances
    fusion: dict[str, float] = field(default_factory=lambda: dict(FUSION_UNTRAINED))
    local_center: float = 0.0  # z(local): median of normal local scores ...
    local_scale: float = 1.0  # ... and 1.4826 x their median absolute deviation
    global_center: float = 0.0  # z(global), the same for the global distance
    global_scale: float = 1.0
    image_threshold: float = float("inf")
    pixel_threshold: float = float("inf")
    image_center: float = 0.0  # median normal image score: maps to score_norm 0.25
    pixel_center: float = 0.0  # median normal pixel value: maps to map value 0.25
    # held-out local score of each of the Gaussian's normals in its order (the training images,
    # then their tolerated views, image-major), and how many nearest of them make an image's
    # reference (0: no reference, local score as is)
    neighbour_scores: list[float] = field(default_factory=list)
    neighbours: int = 0
    neighbour_views: int = 0  # tolerated views per image among neighbour_scores
    # the evidence head's input scales (local, regional): 99th percentile of the leave-one-out
    # distances of the normal images its training views came from; set before training, so a
    # fit without training (or a features head) has none
    head_scales: list[float] = field(default_factory=list)
    # the regional bank's weight in the map, chosen on the head's synthetic views with the figures
    # behind it (learning/mixing.choose_map); empty: no views (no training), the fixed weights
    map_choice: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # what calibration measured and warns about

    def normalize_score(self, score):
        return _normalize(score, self.image_center, self.image_threshold)

    def normalize_map(self, amap):
        return _normalize(amap, self.pixel_center, self.pixel_threshold)


def _normalize(x, center: float, threshold: float):
    """Piecewise-linear map to [0, 1] with center -> 0.25 and threshold -> 0.5 (decision boundary)."""
    span = max(threshold - center, 1e-12)
    y = 0.25 + 0.25 * (x - center) / span
    return y.clip(0.0, 1.0) if hasattr(y, "clip") else min(max(y, 0.0), 1.0)
