"""The trainable part of PromptAD: the localization head, the vision prompts and the text prompt
learner, in one module that DDP wraps (learning/training.py) and that the artifact saves.

Apart from model.py because it is the only part with parameters: the backbone is frozen and the
memory banks, the Gaussian and the calibration are fitted statistics (models/model.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptad.models.backbones import Backbone
from promptad.models.prompts import TextPromptLearner

if TYPE_CHECKING:  # model.py imports this module
    from promptad.models.model import ModelConfig


class LocalizationHead(nn.Module):
    """The paper's head: 3x3 conv 256 + BN + ReLU, 3x3 conv 128 + BN + ReLU, 1x1 conv (logits).
    On the memory's two evidence channels it is narrower and has no BatchNorm (EVIDENCE_WIDTHS):
    two standardized input channels need neither the width nor the renormalization."""

    def __init__(self, in_channels: int, widths: tuple[int, int] = (256, 128), batch_norm: bool = True):
        super().__init__()
        a, b = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            if batch_norm:
                return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(in_channels, a), *block(a, b), nn.Conv2d(b, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Outputs:
    """One forward pass of the trainable part, at the local patch grid."""

    head_logits: torch.Tensor  # (N, 1, h, w)
    image_logit: torch.Tensor  # (N,)
    text_logits: torch.Tensor | None = None  # (N, 1, h, w) anomaly-vs-normal logit per patch
    image_text_logit: torch.Tensor | None = None  # (N,)
    patch_embed: torch.Tensor | None = None  # (N, E, h', w') joint-space patch embeddings (CLIP)
    image_embed: torch.Tensor | None = None  # (N, E)
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


EVIDENCE_CHANNELS = 2  # model.head_evidence: local and regional memory distances
EVIDENCE_WIDTHS = (64, 32)


def topk_mean(logits: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    flat = logits.flatten(1)
    k = max(1, int(math.ceil(frac * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def by_category(categories: list[str], device) -> dict[str, torch.Tensor]:
    """Row indices of each category in a batch (a batch mixes categories; memory is per category)."""
    return {c: torch.tensor([i for i, x in enumerate(categories) if x == c], device=device)
            for c in sorted(set(categories))}


class Trainable(nn.Module):
    """Everything that learns: head, vision prompts, text prompts. The only part DDP wraps.

    The head reads its input standardized per channel (`feat_mean`, `feat_std`, set from the
    training rows before training): the memory's evidence maps (head_input "evidence") or the local
    embedding ("features", so feature-space anomalies have one scale for every backbone). The frozen backbone is held by reference, not as a submodule, so it is neither saved
    with the weights nor synchronized across workers.
    """

    def __init__(self, backbone: Backbone, cfg: ModelConfig, in_channels: int):
        super().__init__()
        self._backbone = [backbone]
        if cfg.head_input == "evidence":
            in_channels = EVIDENCE_CHANNELS
            self.head = LocalizationHead(in_channels, EVIDENCE_WIDTHS, batch_norm=False)
        else:
            self.head = LocalizationHead(in_channels)
        self.register_buffer("feat_mean", torch.zeros(in_channels))
        self.register_buffer("feat_std", torch.ones(in_channels))
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

    def standardize(self, local: torch.Tensor) -> torch.Tensor:
        return (local.float() - self.feat_mean.view(1, -1, 1, 1)) / self.feat_std.view(1, -1, 1, 1)

    def forward(self, z: torch.Tensor, tokens: torch.Tensor | None, categories: list[str]) -> Outputs:
        """z: the standardized head input (N, C, h, w); tokens: CLIP's cached last-block input."""
        head_logits = self.head(z)
        out = Outputs(head_logits=head_logits, image_logit=topk_mean(head_logits))
        if self.text is None:
            return out
        bb = self.backbone
        patch, image = bb.joint(tokens, self.vision_prompts)
        out.patch_embed, out.image_embed = patch, image
        h, w = head_logits.shape[-2:]
        scale = bb.logit_scale
        patch_n, img_n = F.normalize(patch.float(), dim=1), F.normalize(image.float(), dim=-1)
        text_logits = torch.empty(z.shape[0], 1, h, w, device=z.device)
        image_text = torch.empty(z.shape[0], device=z.device)
        for cat, idx in by_category(categories, z.device).items():
            normal, anomalous = self.text(cat)
            out.prompts[cat] = (normal, anomalous)
            diff = (F.normalize(anomalous.mean(0), dim=-1) - F.normalize(normal.mean(0), dim=-1)).float()
            pl = scale * (patch_n[idx] * diff.view(1, -1, 1, 1)).sum(1, keepdim=True)
            if pl.shape[-2:] != (h, w):
                pl = F.interpolate(pl, size=(h, w), mode="bilinear", align_corners=False)
            text_logits[idx] = pl.float()
            image_text[idx] = scale * (img_n[idx] * diff).sum(-1)  # no bf16 matmul under autocast
        out.text_logits, out.image_text_logit = text_logits, image_text
        out.image_logit = 0.5 * (out.image_logit + image_text)
        return out
