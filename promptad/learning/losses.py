"""The six training losses (PromptAD, VAND 3.0), each a small pure function.

All take logits or L2-normalized embeddings and return a scalar tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def image_bce(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of image anomaly logits (N,) against image labels (N,) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(image_logits.float(), labels.float())


def dice(map_logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of pixel logits (N, 1, h, w) against masks (N, 1, h, w) in [0, 1].

    Computed over the whole batch, so normal images (empty masks) penalize false positives
    instead of producing 0/0.
    """
    p = torch.sigmoid(map_logits.float()).flatten()
    t = masks.float().flatten()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + eps) / (p.sum() + t.sum() + eps)


def pixel_focal(map_logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal BCE per pixel: Dice alone gives weak gradients on easy background pixels."""
    logits, t = map_logits.float(), masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


def contrastive_prompt(features: torch.Tensor, labels: torch.Tensor, normal: torch.Tensor,
                       anomalous: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Features (M, D) are pulled to their own state's prompts and pushed from the other's.

    normal (Kn, D), anomalous (Ka, D): L2-normalized prompt embeddings. Each feature is classified
    against all prompts (InfoNCE); the positives are the prompts of its label's state.
    """
    f = F.normalize(features.float(), dim=-1)
    prompts = torch.cat([normal, anomalous]).float()
    logits = f @ prompts.T / temperature
    is_anom = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))]).to(f.device)
    positive = (is_anom[None, :] == labels.float()[:, None]).float()
    log_p = logits.log_softmax(dim=1)
    return -((log_p * positive).sum(1) / positive.sum(1)).mean()


def anomaly_margin(features: torch.Tensor, normal: torch.Tensor, anomalous: torch.Tensor,
                   margin: float = 0.1) -> torch.Tensor:
    """Explicit anomaly margin: normal features closer to the normal prototype than to the
    anomalous one by at least `margin` (squared Euclidean on the unit sphere)."""
    f = F.normalize(features.float(), dim=-1)
    n = F.normalize(normal.float().mean(0), dim=-1)
    a = F.normalize(anomalous.float().mean(0), dim=-1)
    d_n = ((f - n) ** 2).sum(-1)
    d_a = ((f - a) ** 2).sum(-1)
    return F.relu(d_n - d_a + margin).mean()


def prompt_alignment(learned: torch.Tensor, handcrafted: torch.Tensor) -> torch.Tensor:
    """1 - cosine between learned prompt prototypes (2, D) and the hand-written ones (2, D):
    keeps learned prompts near language CLIP understands, so they do not overfit synthetic defects."""
    return (1.0 - F.cosine_similarity(learned.float(), handcrafted.float(), dim=-1)).mean()


def consistency(map_logits: torch.Tensor, aug_map_logits_aligned: torch.Tensor) -> torch.Tensor:
    """MSE between the probability maps of an image and of its augmented view mapped back."""
    return F.mse_loss(torch.sigmoid(map_logits.float()), torch.sigmoid(aug_map_logits_aligned.float()))
