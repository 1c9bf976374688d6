"""The global branch: a Gaussian of whole-image feature statistics, scored by Mahalanobis distance
(Rippel et al., "Modeling the distribution of normal data in pre-trained deep features for anomaly
detection", ICPR 2020).

A defect can be the whole image: a colour cast, a texture at the wrong scale or orientation, the
wrong variant of a part. Every patch then resembles some normal patch and the memory bank misses
it, but the image's pooled features (features.pooled_stats) leave the normal distribution. One
Gaussian per backbone layer gives the metric; the score is the distance to the *nearest normal
image* under it (the sum over layers of the Mahalanobis distances to that image), not to the
mean: normal images come in modes (cookie: the tray edge at the top of most photos, at the bottom
of one), and a distance to the mean calls a rare but normal mode anomalous (cookie's test image
000 with the tray at the bottom scored 9 robust deviations from the mean, 2 from its nearest
normal). A whole-image defect is far from every normal image, so it still scores high. Covariances are
shrunk towards a scaled identity with the Ledoit-Wolf formula, so a category with fewer images
than feature dimensions (cookie: 31 images, 152 dimensions) still has a well-conditioned inverse.

Tolerated conditions (`promptad fit --tolerate`). Every layer's statistics move under sensor drift
(noise, JPEG, blur separate shifted normals from clean ones at every depth of EfficientNet-Lite:
benchmarks/RESULTS.md), so no choice of layers tells drift the line must accept from a whole-image
defect; only the user knows which is which. Shifted copies of the training images (`extra`) join
the normal images of the Gaussian (and the memory banks: pipeline.build_memory): the metric and
the nearest-normal search then treat those conditions as normal, while a colour cast or a wrong
texture stays far from every copy.

The same metric finds an image's most similar normal images (`nearest`), tolerated views
included: for un-normalized local features (local_norm "none") their held-out local scores are
the reference its local score is read against (models/model.py), so a drifted image is read
against drifted views of images like it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Gaussian:
    """Per layer: precision (C, C) and the normal images' pooled features (N, C), float64 for a
    stable inverse."""

    precisions: list[torch.Tensor]
    normals: list[torch.Tensor]

    @property
    def means(self) -> list[torch.Tensor]:
        return [x.mean(0) for x in self.normals]

    def distances(self, pooled: list[torch.Tensor], among: int | None = None) -> torch.Tensor:
        """(N, M) distance of each image to each normal image (the first `among` of them, default
        all): the sum over layers of the Mahalanobis distances of the pooled features."""
        total = None
        for x, prec, ref in zip(pooled, self.precisions, self.normals):
            ref = ref[:among]
            x = x.double().to(prec.device)
            xp, rp = x @ prec, ref @ prec  # (x - r)^T P (x - r) = x^T P x + r^T P r - 2 x^T P r
            sq = (xp * x).sum(1, keepdim=True) + (rp * ref).sum(1)[None] - 2 * xp @ ref.T
            m = sq.clamp(min=0).sqrt()
            total = m if total is None else total + m
        return total

    def score(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(N,) distance of each image to its nearest normal image."""
        return self.distances(pooled).min(1).values.float()

    def nearest(self, pooled: list[torch.Tensor], k: int, images: int, views: int = 0,
                exclude_self: bool = False, chunk: int = 256) -> torch.Tensor:
        """(N, k) each image's k nearest normal images, as indices into the normals (nearest_versions),
        in row chunks so a large category never holds N x M distances. `exclude_self`: image i is
        normal image i (calibration) and is not its own neighbour, in any of its versions."""
        n = int(pooled[0].shape[0])
        out = []
        for s in range(0, n, chunk):
            d = self.distances([x[s:s + chunk] for x in pooled], images * (1 + views))
            own = torch.arange(s, s + d.shape[0], device=d.device) if exclude_self else None
            out.append(nearest_versions(d, images, views, k, own))
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=self.precisions[0].device)

    def to(self, device: torch.device | str) -> "Gaussian":
        return Gaussian([t.to(device) for t in self.precisions], [t.to(device) for t in self.normals])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (prec, ref) in enumerate(zip(self.precisions, self.normals)):
            out[f"global_precision_{i}"], out[f"global_normals_{i}"] = prec, ref
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Gaussian":
        n = sum(1 for k in tensors if k.startswith("global_normals_"))
        return cls(*([tensors[f"global_{name}_{i}"].double() for i in range(n)] for name in ("precision", "normals")))


def nearest_versions(d: torch.Tensor, images: int, views: int, k: int,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) indices into the normals of each row's k nearest normal *images*, each in its version
    (the image itself or one of its `views` tolerated views) nearest to the row.

    `d` (N, >= images * (1 + views)): distances to the normals in the Gaussian's order, the images
    first, then their views image-major. Ranking images by their nearest version keeps the k
    neighbours k different images, as without views, and a clean image's neighbours are clean
    images while a drifted one's are drifted views. `exclude` (N,): an image each row must not
    pick (calibration: itself)."""
    best = d[:, :images]
    version = torch.zeros_like(best, dtype=torch.long)
    if views:
        versions = torch.cat([best[..., None], d[:, images:images * (1 + views)].reshape(-1, images, views)], -1)
        best, version = versions.min(-1)
    if exclude is not None:
        best = best.clone()
        best[torch.arange(best.shape[0], device=best.device), exclude.to(best.device)] = float("inf")
    top = best.topk(k, dim=1, largest=False).indices
    v = version.gather(1, top)
    return torch.where(v == 0, top, images + top * views + v - 1)


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Shrunk covariance of (n, p) samples: (1 - s) S + s mu I, with the Ledoit-Wolf (2004) s.
    sklearn.covariance's shrinkage gives the same s (to 3e-16) but 3x slower, CPU numpy only."""
    x = x.double()
    n, p = x.shape
    xc = x - x.mean(0)
    cov = xc.T @ xc / n
    mu = torch.trace(cov) / p
    eye = torch.eye(p, dtype=x.dtype, device=x.device)
    delta = ((cov - mu * eye) ** 2).sum() / p
    x2 = xc ** 2
    beta = ((x2.T @ x2) / n - cov ** 2).sum() / (n * p)
    shrink = 1.0 if delta <= 0 else float(min(beta, delta) / delta)
    return (1 - shrink) * cov + shrink * mu * eye


def fit_gaussian(pooled: list[torch.Tensor], extra: list[torch.Tensor] | None = None) -> Gaussian:
    """Gaussian per layer of (N, C_l) pooled features (N >= 2), keeping the N images; `extra`
    (N, T, C_l) per layer: T tolerated-condition copies of each image, kept as normals too."""
    precisions = []
    pooled = _with_extra(pooled, extra)
    for x in pooled:
        x = x.double()
        cov = ledoit_wolf(x)
        eps = 1e-9 * float(torch.trace(cov)) / cov.shape[0] + 1e-12  # a single image has cov = 0
        cov = cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        precisions.append(torch.linalg.inv(cov))
    return Gaussian(precisions, [x.double() for x in pooled])


def _with_extra(pooled: list[torch.Tensor], extra: list[torch.Tensor] | None) -> list[torch.Tensor]:
    if extra is None or extra[0].shape[1] == 0:
        return pooled
    return [torch.cat([x.double(), e.double().reshape(-1, e.shape[-1])]) for x, e in zip(pooled, extra)]


def held_out_scores(pooled: list[torch.Tensor], folds: int = 10,
                    extra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(N,) each image's score under a Gaussian fitted without it (nor its tolerated copies in
    `extra`): k-fold (k = min(N, folds), images dealt to folds in turn), so calibration sees how a
    new normal image scores."""
    n = int(pooled[0].shape[0])
    k = min(n, folds)
    fold = torch.arange(n, device=pooled[0].device) % k
    out = torch.empty(n, device=pooled[0].device)
    for f in range(k):
        held = fold == f
        rest = None if extra is None else [e[~held] for e in extra]
        out[held] = fit_gaussian([x[~held] for x in pooled], rest).score([x[held] for x in pooled])
    return out
