"""Synthetic anomalies in feature space (after SimpleNet, Liu et al. CVPR 2023, and GLASS): the
training signal of the features head (head_input "features", the head of artifacts written
before the evidence head; learning/evidence.py says why that one replaced it), made from cached
normal features with exact masks.

The backbone is frozen, so every training image's features are computed once; an anomaly is then
Gaussian noise added to the standardized local features inside a smooth random blob of patches.
The head learns where normal features end, patch by patch and from their neighbourhood, without
a picture of any defect. Measured, it learned the noise, not defects (its map's pixel AUROC 0.59
on both shared sets; benchmarks/RESULTS.md, fourteenth round).
Every function takes a torch.Generator: the same seed gives the same anomalies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AREA = (0.02, 0.30)  # fraction of the patch grid a blob covers
NOISE = (0.5, 2.0)  # noise standard deviation, in units of each channel's normal standard deviation


def blob_masks(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) {0, 1} masks: smooth random fields thresholded at a random area in AREA."""
    cells = max(2, min(h, w) // 8)
    field = torch.randn(n, 1, cells, cells, generator=gen)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).flatten(1)
    area = torch.empty(n).uniform_(*AREA, generator=gen)
    k = (area * h * w).round().clamp(min=1).long()
    thresholds = torch.stack([field[i].topk(int(k[i])).values[-1] for i in range(n)])
    return (field >= thresholds[:, None]).float().view(n, 1, h, w)


def add_anomalies(z: torch.Tensor, p_anomaly: float, gen: torch.Generator,
                  tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Standardized local features (B, C, h, w) -> (features, tokens, masks (B, 1, h, w), labels (B,)).

    Each image becomes anomalous with probability `p_anomaly`. CLIP's cached last-block tokens
    (B, 1 + h*w, D), when given, get noise at the same patches (scaled by their own spread), so the
    prompts learn from the same defects as the head.
    """
    b, c, h, w = z.shape
    labels = (torch.rand(b, generator=gen) < p_anomaly).float()
    masks = blob_masks(b, h, w, gen) * labels.view(-1, 1, 1, 1)
    sigma = torch.empty(b, 1, 1, 1).uniform_(*NOISE, generator=gen)
    noise = torch.randn(b, c, h, w, generator=gen) * sigma
    z = z + (noise * masks).to(z.device, z.dtype)
    if tokens is not None:
        patches = tokens[:, 1:]
        if patches.shape[1] == h * w:
            spread = patches.float().std()
            tnoise = torch.randn(patches.shape, generator=gen) * sigma.view(-1, 1, 1) * float(spread)
            where = masks.view(b, h * w, 1)
            tokens = torch.cat([tokens[:, :1], patches + (tnoise * where).to(patches.device, patches.dtype)], 1)
    return z, tokens, masks.to(z.device), labels.to(z.device)
