"""The PromptAD model: frozen backbone, memory banks, fusion; the trainable part (localization head,
learned prompts) is in trainable.py.

Evidence per image, all computed from one frozen backbone pass (backbones.Features):
- memory:   distance of each local patch (features.local_embedding, each layer normalized by its
            own image's feature statistics: features.image_normalized) to its nearest normal
            patch in the category's local bank, divided by the calibrated `memory_scale`;
- regional: the same for wide-window features (features.regional_embedding) and the regional bank;
- head:     the localization head's probability. By default (head_input "evidence") the head reads
            the memory's own evidence, log(1 + distance / scale) of the local and regional maps
            (head_evidence), and learned from image-space synthetic defects seen through the
            banks (learning/evidence.py); artifacts of head_input "features" read the local
            features and learned from feature-space noise;
- text:     for CLIP, how much a patch matches the anomaly prompts rather than the normal ones;
- global:   Mahalanobis distance of the pooled features to the nearest normal image's, under the
            category's Gaussian (memory/gaussian.py);
- reference: with un-normalized local features only (local_norm "none", artifacts written before
            normalization): the mean held-out local score of the image's K most similar normal
            training images (nearest under the same Gaussian metric; K = 10, fewer in a smaller
            category), each in its version nearest to the image: itself or one of its tolerated
            views. Otherwise 1.

    map    = max(memory, regional) * (1 + head^k * p_head) + text * p_text          (pixel map)
    local  = max over the blurred map of memory * m + text * p_text (+ image text)

(evidence head: k = 2 and m = 1; features head: k = 1 and m = 1 + head * p_head.)
    score  = max(z(local / reference), global * (z(global) - 3))

z() is a robust standard score against held-out normal images (median, 1.4826 x MAD).
Why this shape (benchmarks/RESULTS.md has the measurements):
- local patches are measured relative to their own image: how high a normal image's map peaks
  depends on what it shows (magnetic_tile's crops with bevelled edges and corners peak well above
  its flat crops, bright or strongly textured tiles above dull ones), so one scale for all lets
  busy normal images outrank subtle defects on plain ones. Each layer centred on the image's own
  channel means and divided by its own spread, a patch is as anomalous as it stands out from its
  image in a way normal patches do not stand out from theirs; whole-image properties are left to
  the global branch, whose pooled features keep them. The earlier remedy, dividing the local
  score by what similar normal images reach when held out (the reference), then cost image AUROC
  and is kept only for un-normalized features;
- the two memory scales are combined by max: either scale's evidence counts, and small defects
  keep the fine-scale map (a mean of the two blurred them on cookie's thin cracks);
- the image score keeps the fine scale only: the wide window flags large regions in the map but
  its maximum over normal images is noisy, and adding it cost image AUROC on magnetic_tile;
- the head modulates memory evidence instead of being added to it: a patch that looks like normal
  data stays normal whatever the head says; where the head confirms a deviation it is amplified.
  The evidence head's probability is squared: a confident head doubles a patch's distance, an
  unsure one barely moves it, which kept magnetic_tile's pixel AUROC while the defects' extent
  (AUPRO) grew on both shared sets. It shapes the map only, not the image score: there it moved
  no image AUROC, and on cookie it lifted two normal test images' local scores above those of
  whole-image defects that only the global branch sees (benchmarks/RESULTS.md);
- the global branch is a second detector beside the local one (the score is the larger of the
  two), shifted by three robust standard deviations of its normal values: it decides an image's
  rank only when the image is globally far more unusual than it is locally, so it catches
  whole-image anomalies without lending normal images' global variation to the ranking of local
  defects (a sum did: cookie's one normal photo with the tray edge at the bottom, unusual both
  locally and globally, then outranked cracked cookies).
Fusion weights {memory: 1, regional: 1, head: 0, text: 0, global: 0} are the memory banks alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptad.memory.bank import Bank, nn_distance
from promptad.memory.gaussian import Gaussian, nearest_versions
from promptad.models.backbones import Backbone, Features, create_backbone
from promptad.models.calibration import FUSION_NO_TEXT, FUSION_TEXT, FUSION_UNTRAINED, Calibration  # noqa: F401 (API)
from promptad.models.features import local_embedding, pooled_stats, regional_embedding
from promptad.models.prompts import handcrafted_text_features
from promptad.models.trainable import Trainable, by_category
from promptad.numerics import float32_math


LOCAL_NORMS = ("image", "none")
HEAD_INPUTS = ("evidence", "features")


@dataclass
class ModelConfig:
    """Architecture; stored in the artifact so a load rebuilds the same model."""

    backbone: str = "effnet-lite0"
    categories: list[str] = field(default_factory=list)
    input_size: int | None = None  # None: the backbone's default
    layers: list[int] | None = None  # None: the backbone's default
    n_ctx: int = 8
    n_anomaly_ctx: int = 4
    n_vision_prompts: int = 4
    memory_dim: int = 1024
    blur_sigma: float = 4.0  # pixels at input size; smooths the map before the max (image score)
    # "image": local patch features relative to their own image (features.image_normalized);
    # "none": as the backbone gives them (artifacts written before this option existed)
    local_norm: str = "image"
    # coresets whose union makes each bank (memory.bank.build_bank's `draws`); fit time only
    coreset_draws: int = 3
    # what the localization head reads: "evidence", the memory's local and regional distance maps
    # (head_evidence); "features", the standardized local features (artifacts written before
    # "evidence" existed)
    head_input: str = "evidence"

    def __post_init__(self) -> None:
        if self.local_norm not in LOCAL_NORMS:
            raise ValueError(f"local_norm must be one of {', '.join(LOCAL_NORMS)}, not {self.local_norm!r}")
        if self.head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {', '.join(HEAD_INPUTS)}, not {self.head_input!r}")
        if self.coreset_draws < 1:
            raise ValueError(f"coreset_draws must be at least 1, not {self.coreset_draws}")

    def to_dict(self) -> dict:
        return asdict(self)


GLOBAL_HINGE = 3.0  # robust standard deviations of normal global distances before they count
NEIGHBOURS = 10  # normal images whose held-out local scores make an image's reference (local_norm "none")
MEMORY_ONLY = {"memory": 1.0, "regional": 1.0, "head": 0.0, "text": 0.0, "global": 0.0}


@dataclass
class CategoryMemory:
    """What a category keeps of its normal images: two coreset banks and a Gaussian."""

    local: Bank
    regional: Bank
    gaussian: Gaussian

    def to(self, device) -> "CategoryMemory":
        return CategoryMemory(self.local.to(device), self.regional.to(device), self.gaussian.to(device))


@float32_math
def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) separable Gaussian blur, reflect-padded; fp32 under any autocast (numerics).
    torchvision's gaussian_blur gives the same numbers (to 2e-6) but 3.6-9x slower: one 2-D kernel."""
    if sigma <= 0:
        return maps
    radius = max(1, int(round(4 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, -1)
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.unsqueeze(2))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.unsqueeze(3))
    return x.squeeze(1)


@dataclass
class Fused:
    """fuse()'s result: what predict returns, and the raw parts calibration fits z() on."""

    scores: torch.Tensor  # (N,) image anomaly score
    maps: torch.Tensor  # (N, S, S) pixel map at input size
    local: torch.Tensor  # (N,) raw local image score (before the reference and z)
    global_: torch.Tensor  # (N,) raw global distance (before z)
    relative: torch.Tensor  # (N,) local / reference (what z(local) standardizes)


def _up(grid: torch.Tensor, size) -> torch.Tensor:
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def head_evidence(memory: torch.Tensor, regional: torch.Tensor, scales) -> torch.Tensor:
    """The evidence head's input (N, 2, h, w): log(1 + d / scale) of the local distances (N, h, w)
    and of the regional ones (N, h', w') brought to the local grid. The log keeps the far tail of
    a defect's distances from swamping the convolutions; the scales make one unit "as far as the
    farthest normal patches" in every category."""
    local_scale, regional_scale = (float(s) for s in scales)
    grid = memory.shape[-2:]
    return torch.stack([torch.log1p(memory.float().clamp(min=0) / local_scale),
                        torch.log1p(_up(regional.float(), grid).clamp(min=0) / regional_scale)], 1)


class PromptAD(nn.Module):
    """Backbone + trainable part + per-category memory and calibration."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.backbone = backbone or create_backbone(cfg.backbone, layers=cfg.layers, input_size=cfg.input_size)
        cfg.input_size = self.backbone.input_size
        cfg.layers = list(self.backbone.layers)
        self.cfg = cfg
        self.local_dim = min(sum(self.backbone.channels), cfg.memory_dim)
        self.trainable = Trainable(self.backbone, cfg, self.local_dim)
        self.memory: dict[str, CategoryMemory] = {}
        self.calibration: dict[str, Calibration] = {c: Calibration(fusion=self.default_fusion(False))
                                                    for c in cfg.categories}
        self._handcrafted: dict[str, torch.Tensor] = {}

    def default_fusion(self, trained: bool) -> dict[str, float]:
        """Fusion weights: untrained parts (head, learned prompts) get none, so a fit without
        training (the default, --epochs 0) is the memory banks and the global branch alone."""
        if not trained:
            return dict(FUSION_UNTRAINED)
        return dict(FUSION_TEXT if self.backbone.has_text else FUSION_NO_TEXT)

    @property
    def reference_neighbours(self) -> int:
        """How many nearest normal images make an image's reference (calibration stores the count
        it used). Only for un-normalized local features: what the reference corrects, normal
        images whose maps peak at different heights, image normalization already removes, and on
        normalized features the reference cost image AUROC (benchmarks/RESULTS.md)."""
        return NEIGHBOURS if self.cfg.local_norm == "none" else 0

    @property
    def categories(self) -> list[str]:
        return self.cfg.categories

    def _apply(self, fn, *args, **kwargs):
        # Memory is plain tensors (not buffers: their size is data-dependent); move it too.
        super()._apply(fn, *args, **kwargs)
        if self.memory:
            device = fn(torch.zeros(1)).device
            self.memory = {k: v.to(device) for k, v in self.memory.items()}
        self._handcrafted = {}
        return self

    @property
    def device(self) -> torch.device:
        return next(self.trainable.parameters()).device

    def handcrafted(self, category: str) -> torch.Tensor:
        """(2, D) hand-written normal/anomalous prompt embeddings, computed once per category."""
        if category not in self._handcrafted:
            self._handcrafted[category] = handcrafted_text_features(self.backbone, category).to(self.device)
        return self._handcrafted[category]

    # -- the three views of an image (features.py)
    def local_features(self, feats: Features) -> torch.Tensor:
        return local_embedding(feats.layers, self.cfg.memory_dim, normalize=self.cfg.local_norm == "image")

    def regional_features(self, feats: Features) -> torch.Tensor:
        return regional_embedding(feats.layers, self.cfg.memory_dim)

    def pooled_features(self, feats: Features) -> list[torch.Tensor]:
        return pooled_stats(feats.layers)

    def components(self, feats: Features, categories: list[str],
                   exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw evidence before fusion: maps at their grids (N, h, w), image-level values (N,).

        `exclude` (N,): score image i without the memory entries of training image exclude[i]
        (leave-one-out calibration); the global distance and the reference are then left to the
        caller (k-fold and neighbours other than the image itself: fit/calibrate.py).
        The trainable part (head, CLIP's prompted last block and text) runs only when a category
        of the batch weighs it: a fit without training weighs none, and then "head" and "text"
        are absent (fuse refuses weights on them)."""
        local = self.local_features(feats)
        n, (h, w) = local.shape[0], local.shape[-2:]
        regional = self.regional_features(feats)
        mem = torch.zeros(n, h, w, device=local.device)
        reg = torch.zeros(n, *regional.shape[-2:], device=local.device)
        glob = torch.zeros(n, device=local.device)
        reference = torch.ones(n, device=local.device)
        pooled = self.pooled_features(feats)
        if exclude is not None:  # indexed with device indices below (calibration makes it on the CPU)
            exclude = torch.as_tensor(exclude, device=local.device)
        for cat, idx in by_category(list(categories), local.device).items():
            m = self.memory.get(cat)
            if m is None:
                continue
            ex = None if exclude is None else exclude[idx]
            mem[idx] = nn_distance(local[idx], m.local.entries, bank_source=m.local.source, exclude=ex)
            reg[idx] = nn_distance(regional[idx], m.regional.entries, bank_source=m.regional.source, exclude=ex)
            if exclude is None:
                dists = m.gaussian.distances([p[idx] for p in pooled])
                glob[idx] = dists.min(1).values.float().to(glob.device)
                cal = self.calibration[cat]
                if cal.neighbours:
                    ref = torch.tensor(cal.neighbour_scores, dtype=torch.float32, device=dists.device)
                    images = len(ref) // (1 + cal.neighbour_views)
                    nearest = nearest_versions(dists, images, cal.neighbour_views, cal.neighbours)
                    reference[idx] = ref[nearest].mean(1).to(reference.device)
        comps = {"memory": mem, "regional": reg, "global": glob, "reference": reference}
        if not self.weighs_trainable(categories):
            return comps
        head_in = self.head_inputs(mem, reg, categories) if self.cfg.head_input == "evidence" else local
        out = self.trainable(self.trainable.standardize(head_in), feats.tokens, list(categories))
        comps["head"] = torch.sigmoid(out.head_logits[:, 0].float())
        if out.text_logits is not None:
            comps["text"] = torch.sigmoid(out.text_logits[:, 0].float())
            comps["image_text"] = torch.sigmoid(out.image_text_logit.float())
        return comps

    def head_inputs(self, memory: torch.Tensor, regional: torch.Tensor, categories: list[str]) -> torch.Tensor:
        """The evidence head's input for a batch (head_evidence with each row's category scales)."""
        out = torch.zeros(memory.shape[0], 2, *memory.shape[-2:], device=memory.device)
        for cat, idx in by_category(list(categories), memory.device).items():
            scales = self.calibration[cat].head_scales if cat in self.calibration else []
            if len(scales) != 2:
                raise ValueError(f"category {cat!r} has no evidence-head scales: its head was never trained")
            out[idx] = head_evidence(memory[idx], regional[idx], scales)
        return out

    def weighs_trainable(self, categories: list[str]) -> bool:
        """Whether the calibrated fusion of any of these categories gives the head or the text
        branch weight (not for a category the model does not hold: components skips those)."""
        return any(self.calibration[c].fusion.get("head", 0.0) or self.calibration[c].fusion.get("text", 0.0)
                   for c in set(categories) if c in self.calibration)

    @float32_math
    def fuse(self, comps: dict[str, torch.Tensor], categories: list[str],
             fusion: dict[str, dict[str, float]] | None = None) -> Fused:
        """Image scores and pixel maps from components (module docstring); `fusion` overrides the
        calibrated weights per category. fp32 under any autocast (numerics.float32_math)."""
        cals = [self.calibration[c] for c in categories]
        weights = [(fusion or {}).get(c, cal.fusion) for c, cal in zip(categories, cals)]
        if "head" not in comps and any(w.get("head", 0.0) or w.get("text", 0.0) for w in weights):
            raise ValueError("fusion weighs the head or text, but the components were computed without them")
        head = comps.get("head", torch.zeros_like(comps["memory"]))

        def per_row(values: list[float], dims: int = 2) -> torch.Tensor:  # one value per image, broadcast
            return torch.tensor(values, dtype=head.dtype, device=head.device).view(-1, *([1] * dims))

        local = per_row([w.get("memory", 0.0) / c.memory_scale for w, c in zip(weights, cals)]) * comps["memory"]
        regional = per_row([w.get("regional", 0.0) / c.regional_scale for w, c in zip(weights, cals)]) \
            * _up(comps["regional"], head.shape[-2:])
        power = 2 if self.cfg.head_input == "evidence" else 1
        modulation = 1.0 + per_row([w.get("head", 0.0) for w in weights]) * head ** power
        pixel = torch.maximum(local, regional) * modulation
        fine = local if self.cfg.head_input == "evidence" else local * modulation
        image_text = torch.zeros(head.shape[0], dtype=head.dtype, device=head.device)
        if "text" in comps:
            w_text = per_row([w.get("text", 0.0) for w in weights])
            pixel, fine = pixel + w_text * comps["text"], fine + w_text * comps["text"]
            image_text = w_text.view(-1) * comps["image_text"]
        size = (self.cfg.input_size, self.cfg.input_size)
        maps = gaussian_blur(_up(pixel, size), self.cfg.blur_sigma)
        local_score = gaussian_blur(_up(fine, size), self.cfg.blur_sigma).flatten(1).max(1).values + image_text
        reference = comps.get("reference")
        relative = local_score if reference is None else local_score / reference.to(local_score).clamp(min=1e-6)
        z_local = (relative - per_row([c.local_center for c in cals], 0)) / per_row([c.local_scale for c in cals], 0)
        z_global = (comps["global"] - per_row([c.global_center for c in cals], 0)) / per_row(
            [c.global_scale for c in cals], 0)
        w_global = per_row([w.get("global", 0.0) for w in weights], 0)
        scores = torch.where(w_global > 0, torch.maximum(z_local, w_global * (z_global - GLOBAL_HINGE)), z_local)
        return Fused(scores=scores, maps=maps, local=local_score, global_=comps["global"], relative=relative)
