"""Training rows of the evidence head: image-space synthetic defects, seen through the memory.

The evidence head (models/trainable.py, head_input "evidence") reads what the memory banks say
about each patch, its local and regional distances (model.head_evidence), and learns which shapes
of that evidence are defects. It learns from cached augmented views: normal training images with
a synthetic defect painted in (data/synthesis.py: cut-paste, texture blends, scratches; masks exact
to the pixel), passed once through the frozen backbone and measured against the category's banks
without their source image's entries, as calibration measures a held-out normal image. The same
images, clean and measured the same way, are its negatives. The banks must exist first, so a fit
that trains builds memory before training (fit/pipeline.py, fit/command.py).

Why not the local features and feature-space noise, as the paper's head: a head taught that way
learned the noise, not defects (pixel AUROC 0.59 alone on both shared sets), while one reading the
distances finds real defects on its own (0.80-0.98) and, fused, widens what the banks flag
(benchmarks/RESULTS.md). Reading distances only also keeps it from learning the training images
themselves: with the features as a third input it did.

Two synthetic views per training image, at most TrainConfig.views (100) per category: a large
category gives one each to a seeded draw of 100 of its images, so the cost stops growing with
its size (one backbone pass per view, one leave-one-out search per view and per chosen clean
image). On cookie one view per image did about as well as two, four or six, and on 200
magnetic_tile images 100 views as well as 200 (RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from promptad.actors import FIT_PRECISION
from promptad.data.synthesis import synthesize_anomaly
from promptad.models.backbones import Features
from promptad.models.model import PromptAD, head_evidence
from promptad.predict import components_of, extract

COVERED = 0.25  # a grid cell is a defect when a synthetic mask covers at least this much of it
VIEWS_PER_IMAGE = 2
IGNORED = -1.0  # grid_masks: a cell a defect touches but covers less: neither defect nor normal
# A row is measured without its own image's bank entries: with one image nothing is left, every
# distance is inf, and one inf in the head's standardization made every category's maps NaN.
MIN_IMAGES = 2


@dataclass
class Evidence:
    """One category's training rows for the evidence head: each chosen image clean, then its views."""

    inputs: torch.Tensor  # (n, 2, h, w) model.head_evidence of each row, float32
    masks: torch.Tensor  # (n, h, w) float32: 1 cells a synthetic defect covers (COVERED), 0 normal, IGNORED
    tokens: torch.Tensor | None  # (n, 1 + h*w, D) CLIP last-block inputs, for the prompts' losses
    scales: list[float]  # (local, regional) head input scales: the category's Calibration.head_scales

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def view_plan(n: int, views: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, sources): the training images (of n) that get views, sorted, and the image of
    each synthetic view: VIEWS_PER_IMAGE per image, at most `views` in all (the chosen cycled,
    so each gets at least one)."""
    if n < 1:
        raise ValueError("no training images to make views of")
    views = min(views, VIEWS_PER_IMAGE * n)
    rng = np.random.default_rng([seed, 7])
    chosen = np.sort(rng.choice(n, min(n, views), replace=False))
    return chosen, np.sort(np.resize(chosen, max(views, len(chosen))))


def synthesize_views(images: np.ndarray, which: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(views uint8 (V, S, S, 3), masks float32 (V, S, S)): one synthetic defect on images[k] for
    each k in `which`, the k-th view drawn from its own seeded generator (reproducible whichever
    images are loaded with it)."""
    views, masks = [], []
    for j, k in enumerate(which):
        view, mask = synthesize_anomaly(images[k], np.random.default_rng([seed, 11, j]))
        views.append(view)
        masks.append(mask)
    return np.stack(views), np.stack(masks).astype(np.float32)


def grid_masks(masks: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (V, S, S) -> (V, h, w): 1 where a defect covers at least COVERED of a cell,
    IGNORED where it covers less but something, 0 elsewhere. A thin scratch may fill no cell
    enough; calling its cells normal would teach the head that scratches are normal, so the loss
    leaves them out (training.loss_terms)."""
    covered = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], grid)[:, 0]
    return torch.where(covered >= COVERED, 1.0, torch.where(covered > 0, IGNORED, 0.0))


@torch.no_grad()
def category_evidence(model: PromptAD, category: str, n: int, load: Callable[[np.ndarray], np.ndarray],
                      clean: Callable[[np.ndarray], Features], views: int, seed: int = 0,
                      batch_size: int = 16) -> Evidence:
    """The evidence head's training rows for one category whose memory is in `model` (built from
    n images, row i = source i). `load(idx)`: those training images (uint8 (k, S, S, 3), in the
    order asked), so a Ray task reads only the chosen ones; `clean(idx)`: their cached backbone
    features (the fit has them: only the views need a backbone pass). The input scales come from
    the chosen images' own clean leave-one-out distances (calibrate.distance_scale)."""
    from promptad.fit.calibrate import distance_scale  # fit imports this module
    from promptad.numerics import non_finite

    if n < MIN_IMAGES:
        raise ValueError(f"category {category!r} has {n} training image(s): the evidence head's rows are measured "
                         f"leave-one-out and need at least {MIN_IMAGES}")
    chosen, sources = view_plan(n, views, seed)
    images = load(chosen)
    position = {int(c): k for k, c in enumerate(chosen)}
    synthetic, masks = synthesize_views(images, [position[int(s)] for s in sources], seed)
    del images
    mem, reg, tokens = [], [], []

    def measure(feats: Features, owners: np.ndarray) -> None:
        comps = components_of(model, feats, [category] * len(feats), FIT_PRECISION,
                              exclude=torch.from_numpy(owners).long().to(model.device))
        mem.append(comps["memory"].float().cpu())
        reg.append(comps["regional"].float().cpu())
        if feats.tokens is not None:
            tokens.append(feats.tokens.cpu().half())

    known = clean(chosen)
    for s in range(0, len(chosen), batch_size):
        measure(known.select(slice(s, s + batch_size)), chosen[s:s + batch_size])
    for s in range(0, len(sources), batch_size):
        measure(extract(model, synthetic[s:s + batch_size], FIT_PRECISION), sources[s:s + batch_size])
    memory, regional = torch.cat(mem), torch.cat(reg)
    k = len(chosen)
    scales = [distance_scale(memory[:k]), distance_scale(regional[:k])]
    grid = tuple(memory.shape[-2:])
    labels = torch.cat([torch.zeros(k, *grid), grid_masks(masks, grid)])
    out = Evidence(inputs=head_evidence(memory, regional, scales), masks=labels,
                   tokens=torch.cat(tokens) if tokens else None, scales=scales)
    bad = non_finite({"inputs": out.inputs, "scales": out.scales, "tokens": out.tokens})
    if bad:  # a NaN feature or bank entry: refused here, before it reaches the shared head
        raise ValueError(f"category {category!r}: non-finite evidence rows ({', '.join(bad)})")
    return out
