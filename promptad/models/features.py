"""What the model compares, derived from the frozen backbone layers (`backbones.Features`).

Three views of one image, each at the scale of the anomalies it is meant to see:

- local:    every patch with its 3x3 neighbourhood, all layers at the finest grid (PatchCore's
            locally aware patch features): small defects such as cracks, holes and scratches;
- regional: every cell of the coarsest grid averaged over a window about half the image wide:
            large low-contrast regions (uneven surfaces, stains, discoloured areas) whose inside
            looks normal patch by patch and shows only in the statistics of a wider area;
- pooled:   per-layer channel means of the whole image (Rippel et al. 2020): whole-image changes
            (a colour cast, a texture at the wrong scale or orientation, the wrong variant).

They are cheap functions of the cached layers, so a fit stores the layers once per image and
derives these wherever it needs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REGIONAL_FRACTION = 0.28  # regional window half-width as a fraction of the grid: ~56 % of the image


def image_normalized(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, C, h, w) layer of N images, each centred on its own channel means and divided by its own
    spread (the mean over channels of each channel's spatial SD: one number per image and layer).

    What is left is how each patch stands out from the rest of its image. Properties of the whole
    image (exposure, the tone of the material, how busy its texture is) leave the local view; the
    pooled view, which keeps them, is where whole-image anomalies are judged.

    Reduced in one memory layout (contiguous NCHW): a conv may hand back channels-last tensors,
    whose sums round differently in the last bit, and a score must not depend on the path its
    features took (the fit's Ray stages and the in-process fit build the same banks)."""
    t = t.float().contiguous()
    t = t - t.mean(dim=(2, 3), keepdim=True)
    spread = t.flatten(2).std(dim=2, unbiased=False).mean(dim=1)
    return t / spread.clamp(min=eps).view(-1, 1, 1, 1)


def local_embedding(layers: list[torch.Tensor], max_dim: int = 1024, normalize: bool = False) -> torch.Tensor:
    """(N, C, h, w): each layer 3x3-averaged, resized to the finest grid, concatenated; with
    `normalize`, each layer first image_normalized.

    The average counts the zero padding at the border, as PatchCore's unfold-based aggregation
    does; excluding it cost 0.03 image AUROC on magnetic_tile (benchmarks/RESULTS.md)."""
    h, w = max((t.shape[-2], t.shape[-1]) for t in layers)
    parts = []
    for t in layers:
        t = image_normalized(t) if normalize else t.float()
        t = F.avg_pool2d(t, 3, stride=1, padding=1)
        if t.shape[-2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(t)
    return _cap_channels(torch.cat(parts, dim=1), max_dim)


def regional_kernel(grid: int) -> int:
    """Odd window size (in cells of the coarsest grid) covering about 56 % of the image side."""
    return 2 * max(1, int(round(REGIONAL_FRACTION * grid))) + 1


def regional_embedding(layers: list[torch.Tensor], max_dim: int = 1024) -> torch.Tensor:
    """(N, C, H, W) at the coarsest grid: each layer area-pooled to it, then averaged over a wide
    window (border cells average what lies inside the image, so a border is not an anomaly)."""
    h, w = min((t.shape[-2], t.shape[-1]) for t in layers)
    k = regional_kernel(min(h, w))
    parts = []
    for t in layers:
        t = t.float()
        if t.shape[-2:] != (h, w):
            t = F.adaptive_avg_pool2d(t, (h, w))
        parts.append(F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False))
    return _cap_channels(torch.cat(parts, dim=1), max_dim)


def pooled_stats(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, (N, C_l) channel means over the whole image (one Gaussian per layer later)."""
    return [t.float().mean(dim=(2, 3)) for t in layers]


def group_views(stats: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Pooled stats of n images' views, (n * T, C) image-major per layer -> (n, T, C)."""
    return [t.reshape(n, -1, t.shape[-1]) for t in stats]


def _cap_channels(feats: torch.Tensor, max_dim: int) -> torch.Tensor:
    """Average neighbouring channels down to max_dim (keeps wide CLIP layers affordable)."""
    if feats.shape[1] <= max_dim:
        return feats.contiguous()
    n, c, h, w = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, max_dim).reshape(n, h, w, max_dim).permute(0, 3, 1, 2).contiguous()


def flatten_patches(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C), image-major (rows of image i are i*h*w ... (i+1)*h*w - 1)."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
