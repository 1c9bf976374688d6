"""In-process fit: the same steps Ray Train runs, on one process (tests, benchmarks, small data).

    images -> train (training.py) -> memory banks (memory.py) -> calibration (calibrate.py)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import storage
from .calibrate import calibrate_category
from .datasets import Sample
from .images import decode_image, resize
from .memory import build_bank
from .model import ModelConfig, PromptAD
from .training import TrainConfig, iterate_batches, make_optimizer, steps_per_epoch, train_epoch


def load_images(samples: Sequence[Sample], size: int) -> np.ndarray:
    """(N, S, S, 3) uint8, decoded and resized to the model's input size."""
    if not samples:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([resize(decode_image(storage.read_bytes(s.path)), size) for s in samples])


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): held-out normals calibrate thresholds, so they must not
    be in the memory bank (a bank holding an image scores it ~0)."""
    order = np.random.default_rng([seed, 11]).permutation(n)
    k = 0 if n < 4 else max(2, int(round(fraction * n)))
    return np.sort(order[k:]), np.sort(order[:k])


@torch.no_grad()
def build_memory(model: PromptAD, category: str, images: np.ndarray, batch_size: int = 16,
                 ratio: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Coreset memory bank of one category's normal images; stored on the model."""
    model.eval()
    from .predict import as_input

    parts = []
    for s in range(0, len(images), batch_size):
        x = as_input(images[s:s + batch_size], model.device)
        feats = model.trainable.backbone(x)
        parts.append(model.memory_features(feats).cpu())
    model.banks[category] = build_bank(torch.cat(parts), ratio=ratio, seed=seed).to(model.device)
    return model.banks[category]


def finish_model(model: PromptAD, fit_images: dict[str, np.ndarray], holdout_images: dict[str, np.ndarray],
                 seed: int = 0, batch_size: int = 16, coreset_ratio: float = 0.01) -> PromptAD:
    """After training: memory bank and calibration per category."""
    for cat in model.categories:
        build_memory(model, cat, fit_images[cat], batch_size, coreset_ratio, seed)
        held = holdout_images.get(cat)
        calibrate_category(model, cat, held if held is not None and len(held) else fit_images[cat],
                           seed=seed, batch_size=batch_size)
    return model


def fit_in_process(images: dict[str, np.ndarray], model_cfg: ModelConfig, train_cfg: TrainConfig,
                   holdout_fraction: float = 0.2, device: str = "cpu",
                   coreset_ratio: float = 0.01, log=print) -> PromptAD:
    """Train, build memory banks and calibrate on normal images per category, in this process."""
    torch.manual_seed(train_cfg.seed)
    model_cfg.categories = sorted(images)
    model = PromptAD(model_cfg).to(device)
    fit, held = {}, {}
    for cat, imgs in images.items():
        f, h = split_holdout(len(imgs), holdout_fraction, train_cfg.seed)
        fit[cat], held[cat] = imgs[f], imgs[h]
    all_imgs = np.concatenate([fit[c] for c in model.categories])
    all_cats = [c for c in model.categories for _ in range(len(fit[c]))]
    steps = steps_per_epoch(len(all_imgs), train_cfg.batch_size)
    opt, sched = make_optimizer(model.trainable, train_cfg, steps * train_cfg.epochs)
    dev = torch.device(device)
    scaler = torch.amp.GradScaler() if dev.type == "cuda" else None
    for epoch in range(train_cfg.epochs):
        rng = np.random.default_rng([train_cfg.seed, epoch, 3])
        stats = train_epoch(model.trainable, iterate_batches(all_imgs, all_cats, train_cfg.batch_size, rng),
                            opt, sched, scaler, train_cfg, epoch, 0, model.handcrafted, dev)
        if log:
            log(f"epoch {epoch + 1}/{train_cfg.epochs} loss {stats['loss']:.4f}")
    return finish_model(model, fit, held, seed=train_cfg.seed, coreset_ratio=coreset_ratio)
