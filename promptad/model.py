"""The PromptAD model: frozen backbone, learned prompts, localization head, memory banks, fusion.

Three anomaly maps at the backbone's patch grid are fused into one pixel map:
- memory: distance of each patch to its nearest normal patch (per-category memory bank);
- head:   the localization head's probability (trained on synthetic anomalies);
- text:   probability that a patch matches the anomaly prompts rather than the normal ones (CLIP).

    map = memory * (memory distance / memory_scale) * (1 + head * head_probability) + text * text_probability

The head modulates the memory evidence instead of being added to it: a patch that looks like
normal data stays normal whatever the head says, where the head confirms a deviation it is
amplified. On real magnetic-tile defects this beat both the memory bank alone and additive
mixtures, whose pixel ranking the head (trained on synthetic defects) degraded
(benchmarks/RESULTS.md). The image score is the maximum of the smoothed fused map, plus the
weighted text image score for CLIP.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import Backbone, Features, create_backbone
from .memory import nn_distance, patch_features
from .numerics import float32_math
from .prompts import TextPromptLearner, handcrafted_text_features


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

    def to_dict(self) -> dict:
        return asdict(self)


# Fusion weights (see the module docstring). {"memory": 1, "head": 0, "text": 0} is plain PatchCore.
FUSION_NO_TEXT = {"memory": 1.0, "head": 1.0, "text": 0.0}
FUSION_TEXT = {"memory": 1.0, "head": 1.0, "text": 0.5}


@dataclass
class Calibration:
    """Per-category deployment numbers, fitted on held-out normal images (never on real anomalies)."""

    memory_scale: float = 1.0  # divides memory distances so normal patches sit below ~1
    fusion: dict[str, float] = field(default_factory=lambda: dict(FUSION_NO_TEXT))
    image_threshold: float = float("inf")
    pixel_threshold: float = float("inf")
    image_center: float = 0.0  # median normal image score: maps to score_norm 0.25
    pixel_center: float = 0.0  # median normal pixel value: maps to map value 0.25
    stats: dict[str, float] = field(default_factory=dict)  # what calibration measured (for the record)

    def normalize_score(self, score):
        return _normalize(score, self.image_center, self.image_threshold)

    def normalize_map(self, amap):
        return _normalize(amap, self.pixel_center, self.pixel_threshold)


def _normalize(x, center: float, threshold: float):
    """Piecewise-linear map to [0, 1] with center -> 0.25 and threshold -> 0.5 (decision boundary)."""
    span = max(threshold - center, 1e-12)
    y = 0.25 + 0.25 * (x - center) / span
    return y.clip(0.0, 1.0) if hasattr(y, "clip") else min(max(y, 0.0), 1.0)


class LocalizationHead(nn.Module):
    """The paper's head: 3x3 conv 256 + BN + ReLU, 3x3 conv 128 + BN + ReLU, 1x1 conv (logits)."""

    def __init__(self, in_channels: int, widths: tuple[int, int] = (256, 128)):
        super().__init__()
        a, b = widths
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
            nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Outputs:
    """One forward pass of the trainable part, at the patch grid."""

    features: Features
    head_logits: torch.Tensor  # (N, 1, h, w)
    image_logit: torch.Tensor  # (N,)
    text_logits: torch.Tensor | None = None  # (N, 1, h, w) anomaly-vs-normal logit per patch
    image_text_logit: torch.Tensor | None = None  # (N,)
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def topk_mean(logits: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    flat = logits.flatten(1)
    k = max(1, int(math.ceil(frac * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


class Trainable(nn.Module):
    """Everything that learns: head, vision prompts, text prompts. The only part DDP wraps.

    The frozen backbone is held by reference, not as a submodule, so it is neither saved with the
    weights nor synchronized across workers.
    """

    def __init__(self, backbone: Backbone, cfg: ModelConfig):
        super().__init__()
        self._backbone = [backbone]
        self.head = LocalizationHead(sum(backbone.channels))
        self.vision_prompts = None
        self.text = None
        if backbone.has_text:
            if cfg.n_vision_prompts and backbone.num_vision_prompt_dims:
                self.vision_prompts = nn.Parameter(torch.randn(cfg.n_vision_prompts,
                                                               backbone.num_vision_prompt_dims) * 0.02)
            self.text = TextPromptLearner(backbone, cfg.categories, cfg.n_ctx, cfg.n_anomaly_ctx)

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    def forward(self, x: torch.Tensor, categories: list[str]) -> Outputs:
        bb = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_prompts is not None):
            feats = bb(x, vision_prompts=self.vision_prompts)
        layers = feats.layers
        h, w = max((t.shape[-2], t.shape[-1]) for t in layers)
        stacked = torch.cat([t.float() if t.shape[-2:] == (h, w) else
                             F.interpolate(t.float(), size=(h, w), mode="bilinear", align_corners=False)
                             for t in layers], dim=1)
        head_logits = self.head(stacked)
        image_logit = topk_mean(head_logits)
        out = Outputs(features=feats, head_logits=head_logits, image_logit=image_logit)
        if self.text is not None:
            scale = bb.logit_scale
            patch = F.normalize(feats.patch_embed.float(), dim=1)
            img = F.normalize(feats.image_embed.float(), dim=-1)
            text_logits = torch.empty(x.shape[0], 1, h, w, device=x.device)
            image_text = torch.empty(x.shape[0], device=x.device)
            for cat in sorted(set(categories)):
                idx = torch.tensor([i for i, c in enumerate(categories) if c == cat], device=x.device)
                normal, anomalous = self.text(cat)
                out.prompts[cat] = (normal, anomalous)
                n_proto = F.normalize(normal.mean(0), dim=-1)
                a_proto = F.normalize(anomalous.mean(0), dim=-1)
                diff = (a_proto - n_proto).float().view(1, -1, 1, 1)
                pl = scale * (patch[idx] * diff).sum(1, keepdim=True)
                if pl.shape[-2:] != (h, w):
                    pl = F.interpolate(pl, size=(h, w), mode="bilinear", align_corners=False)
                text_logits[idx] = pl.float()
                image_text[idx] = scale * (img[idx] * (a_proto - n_proto).float()).sum(-1)  # no bf16 matmul under autocast
            out.text_logits = text_logits
            out.image_text_logit = image_text
            out.image_logit = 0.5 * (image_logit + image_text)
        return out


@float32_math
def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) separable Gaussian blur, reflect-padded; fp32 under any autocast."""
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


class PromptAD(nn.Module):
    """Backbone + trainable part + per-category memory banks and calibration."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.backbone = backbone or create_backbone(cfg.backbone, layers=cfg.layers, input_size=cfg.input_size)
        cfg.input_size = self.backbone.input_size
        cfg.layers = list(self.backbone.layers)
        self.cfg = cfg
        self.trainable = Trainable(self.backbone, cfg)
        self.banks: dict[str, torch.Tensor] = {}
        default = FUSION_TEXT if self.backbone.has_text else FUSION_NO_TEXT
        self.calibration: dict[str, Calibration] = {c: Calibration(fusion=dict(default)) for c in cfg.categories}
        self._handcrafted: dict[str, torch.Tensor] = {}

    @property
    def categories(self) -> list[str]:
        return self.cfg.categories

    def _apply(self, fn, *args, **kwargs):
        # Memory banks are plain tensors (not buffers: their size is data-dependent); move them too.
        super()._apply(fn, *args, **kwargs)
        self.banks = {k: fn(v) for k, v in self.banks.items()}
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

    def memory_features(self, feats: Features) -> torch.Tensor:
        return patch_features(feats.layers, self.cfg.memory_dim)

    def components(self, x: torch.Tensor, categories: list[str]) -> dict[str, torch.Tensor]:
        """Raw maps at the patch grid (N, h, w) and the image text score, before fusion."""
        out = self.trainable(x, categories)
        head = torch.sigmoid(out.head_logits[:, 0].float())
        mem = torch.zeros_like(head)
        patches = self.memory_features(out.features)
        for cat in sorted(set(categories)):
            idx = torch.tensor([i for i, c in enumerate(categories) if c == cat], device=x.device)
            if cat in self.banks:
                d = nn_distance(patches[idx], self.banks[cat])
                if d.shape[-2:] != head.shape[-2:]:
                    d = F.interpolate(d.unsqueeze(1), size=head.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0]
                mem[idx] = d
        comps = {"memory": mem, "head": head}
        if out.text_logits is not None:
            comps["text"] = torch.sigmoid(out.text_logits[:, 0].float())
            comps["image_text"] = torch.sigmoid(out.image_text_logit.float())
        return comps

    @float32_math
    def fuse(self, comps: dict[str, torch.Tensor], categories: list[str],
             fusion: dict[str, dict[str, float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (N,), maps (N, S, S)) from components; `fusion` overrides the calibrated weights.
        fp32 under any autocast (numerics.float32_math): the map that decides is never rounded to fp16."""
        head = comps["head"]

        def per_row(values: list[float]) -> torch.Tensor:  # one weight per image, broadcast over (h, w)
            return torch.tensor(values, dtype=head.dtype, device=head.device).view(-1, 1, 1)

        weights = [(fusion or {}).get(c, self.calibration[c].fusion) for c in categories]
        w_mem = per_row([w.get("memory", 0.0) / self.calibration[c].memory_scale for c, w in zip(categories, weights)])
        w_head = per_row([w.get("head", 0.0) for w in weights])
        grid = w_mem * comps["memory"] * (1.0 + w_head * head)
        img_text = torch.zeros(head.shape[0], dtype=head.dtype, device=head.device)
        if "text" in comps:
            w_text = per_row([w.get("text", 0.0) for w in weights])
            grid = grid + w_text * comps["text"]
            img_text = w_text.view(-1) * comps["image_text"]
        size = self.cfg.input_size
        maps = F.interpolate(grid.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.cfg.blur_sigma)
        scores = maps.flatten(1).max(1).values + img_text
        return scores, maps
