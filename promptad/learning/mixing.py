"""How much the regional bank weighs in a category's map, chosen from its synthetic views.

The map is max(local, w * regional) of the two banks' distances, each divided by its normal
scale (models/model.py). The wide window of the regional bank (half the image) finds large
low-contrast regions that no single patch shows (magnetic_tile's uneven surfaces: pixel AUROC
0.820 -> 0.870 with it), but around a small defect it raises a halo of normal pixels, and on an
object whose parts differ from place to place its normal distances are noisy (tire: 0.985 -> 0.943
with it at full weight; an MVTec AD object and a metal plate lost about 0.05 the same way). No fixed weight serves both kinds of line
(benchmarks/RESULTS.md), and a line has no real defects to tell them apart when it is fitted.

What it has: the head's synthetic views (learning/evidence.py), normal training images with a
defect painted in, measured against the banks without their own image's entries, and the same
images clean. Each candidate weight's map is scored on them by its error, 1 - pixel AUROC over
the grid cells (cells a defect only grazes left out, as the head's loss leaves them out). The
views are small, sharp defects, the kind the local bank sees best, so they favour it everywhere:
on magnetic_tile, where the regional bank lifts real pixel AUROC from 0.820 to 0.870, the views
still err 2.97x more with it than without; on tire, where it costs real pixel AUROC 0.985 -> 0.943,
they err 8.6x more (cookie: 1.27x, where it makes no difference). So a weight is not judged
against the views' bias but against a cost beyond it: the category keeps the largest weight whose
error is at most MAX_ERROR_RATIO times the best candidate's, the regional bank's wide window is
cut back only where it multiplies the views' errors, the sign that it is noisy on this category's
normal images. The ratio's value comes from the three shared datasets (benchmarks/RESULTS.md has
the leave-one-dataset-out check); the figures behind each choice go into the artifact
(Calibration.map_choice) and `fit`'s summary.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from promptad.metrics.image import image_auroc

CANDIDATES = (0.0, 0.5, 0.75, 1.0)  # regional weights tried, relative to the local bank's 1
MAX_ERROR_RATIO = 5.0  # a weight is kept while its views' error is at most this times the best one's


def candidate_maps(inputs: torch.Tensor, weight: float) -> torch.Tensor:
    """(n, h, w) max(local, weight * regional) in units of each bank's normal scale, from the
    head's input rows (n, 2, h, w) = log(1 + d / scale) (model.head_evidence)."""
    local, regional = torch.expm1(inputs[:, 0].double()), torch.expm1(inputs[:, 1].double())
    return torch.maximum(local, weight * regional)


def choose_map(inputs: torch.Tensor, masks: torch.Tensor, candidates: Sequence[float] = CANDIDATES,
               max_ratio: float = MAX_ERROR_RATIO) -> dict:
    """The regional weight for one category from its evidence rows (`inputs` (n, 2, h, w) and
    `masks` (n, h, w): 1 defect, 0 normal, negative ignored; learning/evidence.Evidence).

    Returns {"regional": chosen weight, "auroc": {weight: synthetic pixel AUROC}, "cells": [defect,
    normal]}. Without both defect and normal cells nothing can be measured: the largest candidate
    (the banks as they were before the choice existed) is kept and "auroc" is empty."""
    keep = masks >= 0
    labels = masks[keep].numpy().astype(np.int64)
    cells = [int(labels.sum()), int((labels == 0).sum())]
    weights = sorted(float(w) for w in candidates)
    if min(cells) == 0:
        return {"regional": weights[-1], "auroc": {}, "cells": cells}
    auroc = {w: image_auroc(candidate_maps(inputs, w)[keep].numpy(), labels) for w in weights}
    best = min(1.0 - a for a in auroc.values())
    chosen = max(w for w in weights if 1.0 - auroc[w] <= max_ratio * best + 1e-12)
    return {"regional": chosen, "auroc": {f"{w:g}": round(float(a), 5) for w, a in auroc.items()}, "cells": cells}


def choice_line(choice: dict) -> str:
    """`map: local 1, regional 0.5 (synthetic pixel AUROC 0: 0.9961, 0.5: 0.9966, 1: 0.9820)`."""
    if not choice:
        return "map: local 1, regional 1 (fixed: no synthetic views without training)"
    figures = ", ".join(f"{w}: {a:.4f}" for w, a in choice.get("auroc", {}).items()) or "not measurable"
    return f"map: local 1, regional {choice['regional']:g} (synthetic pixel AUROC by regional weight {figures})"
