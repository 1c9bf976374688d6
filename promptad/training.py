"""The per-worker training loop: a plain function that Ray Train runs on each worker and that
runs in-process too.

Only normal images come in; each batch gets augmentations and synthetic anomalies with exact
masks on the fly, seeded by (seed, rank, epoch, step) so that a resumed run replays the same data.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import losses
from .synthesis import make_training_pair

Batch = tuple[np.ndarray, Sequence[str]]  # (B, S, S, 3) uint8 normal images, their categories


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    seed: int = 0
    p_anomaly: float = 0.5
    precision: str = "auto"  # auto: see training_precision
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "image_bce": 1.0, "dice": 1.0, "focal": 1.0, "contrastive": 0.1, "margin": 0.1,
        "alignment": 0.1, "consistency": 0.5})

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def training_precision(device: torch.device) -> str:
    """fp16 autocast on GPU. On CPU, bf16 autocast where the CPU has native bf16 arithmetic
    (AVX512-BF16 or AMX): there it measured about twice as fast as fp32 with the same losses
    (benchmarks/RESULTS.md); elsewhere oneDNN emulates bf16, which is slower, so fp32."""
    if device.type != "cpu":
        return resolve_precision("auto", device)
    native = any(getattr(torch.cpu, probe, lambda: False)()
                 for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(trainable: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW with a cosine schedule over the whole run (per optimizer step)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return opt, sched


def synthesize_batch(images: np.ndarray, rng: np.random.Generator, p_anomaly: float,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal uint8 images -> (x (B,3,S,S) in [0,1], masks (B,1,S,S), labels (B,))."""
    pairs = [make_training_pair(img, rng, p_anomaly=p_anomaly) for img in images]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().div_(255.0)
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).unsqueeze(1).float()
    labels = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
    return x.to(device), masks.to(device), labels.to(device)


def loss_terms(out, out_flip, masks: torch.Tensor, labels: torch.Tensor, categories: Sequence[str],
               handcrafted: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """All six losses (and pixel focal BCE) for one batch; text losses only with a text branch."""
    grid = out.head_logits.shape[-2:]
    target = F.adaptive_avg_pool2d(masks, grid)  # exact fraction of each patch that is defective
    terms = {
        "image_bce": losses.image_bce(out.image_logit, labels),
        "dice": losses.dice(out.head_logits, target),
        "focal": losses.pixel_focal(out.head_logits, target),
        "consistency": losses.consistency(out.head_logits, torch.flip(out_flip.head_logits, dims=[-1])),
    }
    if out.text_logits is not None:
        terms["dice"] = terms["dice"] + losses.dice(out.text_logits, target)
        terms["image_bce"] = terms["image_bce"] + losses.image_bce(out.image_text_logit, labels)
        patch = out.features.patch_embed.float()
        if patch.shape[-2:] != grid:
            patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
        contrastive, margin, align = [], [], []
        for cat, (normal, anomalous) in out.prompts.items():
            idx = [i for i, c in enumerate(categories) if c == cat]
            p = patch[idx].permute(0, 2, 3, 1).reshape(-1, patch.shape[1])
            p_lab = (target[idx].flatten() > 0.5).float()
            feats = torch.cat([out.features.image_embed[idx].float(), p])
            labs = torch.cat([labels[idx], p_lab])
            contrastive.append(losses.contrastive_prompt(feats, labs, normal, anomalous))
            normal_feats = feats[labs == 0]
            if len(normal_feats):
                margin.append(losses.anomaly_margin(normal_feats, normal, anomalous))
            learned = torch.stack([F.normalize(normal.mean(0), dim=-1), F.normalize(anomalous.mean(0), dim=-1)])
            align.append(losses.prompt_alignment(learned, handcrafted(cat)))
        terms["contrastive"] = torch.stack(contrastive).mean()
        terms["margin"] = torch.stack(margin).mean() if margin else torch.zeros((), device=labels.device)
        terms["alignment"] = torch.stack(align).mean()
    return terms


def train_epoch(trainable: torch.nn.Module, batches: Iterable[Batch], opt, sched, scaler, cfg: TrainConfig,
                epoch: int, rank: int, handcrafted: Callable[[str], torch.Tensor],
                device: torch.device) -> dict[str, float]:
    """One pass over this worker's shard. `trainable` may be wrapped in DDP."""
    precision = training_precision(device) if cfg.precision == "auto" else resolve_precision(cfg.precision, device)
    trainable.train()
    totals: dict[str, float] = {}
    steps = 0
    for step, (images, categories) in enumerate(batches):
        categories = list(categories)
        rng = np.random.default_rng([cfg.seed, rank, epoch, step])
        x, masks, labels = synthesize_batch(images, rng, cfg.p_anomaly, device)
        with autocast(precision, device):
            both = trainable(torch.cat([x, torch.flip(x, dims=[-1])]), categories + categories)
        n = x.shape[0]
        out, out_flip = _split(both, n)
        terms = loss_terms(out, out_flip, masks, labels, categories, handcrafted)
        loss = sum(cfg.loss_weights.get(k, 1.0) * v for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        steps += 1
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
    return {k: v / max(steps, 1) for k, v in totals.items()} | {"steps": steps}


def _split(out, n: int):
    """Split a forward over [x, flip(x)] into the two halves."""
    from .backbones import Features
    from .model import Outputs

    def half(t, sl):
        return None if t is None else t[sl]

    parts = []
    for sl in (slice(0, n), slice(n, None)):
        f = out.features
        feats = Features(layers=[t[sl] for t in f.layers], patch_embed=half(f.patch_embed, sl),
                         image_embed=half(f.image_embed, sl))
        parts.append(Outputs(features=feats, head_logits=out.head_logits[sl], image_logit=out.image_logit[sl],
                             text_logits=half(out.text_logits, sl),
                             image_text_logit=half(out.image_text_logit, sl), prompts=out.prompts))
    return parts


def steps_per_epoch(num_images: int, batch_size: int, num_workers: int = 1) -> int:
    return max(1, math.ceil(num_images / num_workers / batch_size))


def iterate_batches(images: np.ndarray, categories: Sequence[str], batch_size: int,
                    rng: np.random.Generator) -> Iterable[Batch]:
    """Shuffled in-process batches (Ray Train uses its dataset shard instead)."""
    order = rng.permutation(len(images))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield images[idx], [categories[i] for i in idx]
