"""The per-worker training loop on cached rows: a plain function that Ray Train runs on each
worker and that runs in-process too.

The backbone is frozen, so a fit computes what the head reads once per row and trains the
trainable part (head, prompts) on it: no backbone pass per step. Two kinds of rows:
- the evidence head (the default): the memory's evidence of each clean image and synthetic view
  of learning/evidence.py, with its grid mask; a batch is those rows as they are, and the loss a
  pixel BCE weighted towards the rare defect cells (pos_weight);
- the features head: cached local features; each batch gets feature-space synthetic anomalies
  with exact masks (feature_anomalies.py) and a mirrored view for the consistency loss.
Either way the batches are seeded by (seed, rank, epoch, step) so that a resumed run replays the
same data. An exponential moving average of the weights is what the model keeps: the head's quality on
real defects swings from epoch to epoch, its average does not (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from promptad.learning import losses
from promptad.learning.feature_anomalies import add_anomalies

MIN_EPOCH_SAMPLES = 256  # an epoch visits at least this many samples (cycling a small category)


@dataclass
class TrainConfig:
    epochs: int = 20  # benchmarks/RESULTS.md, "Epochs": the evidence head's AUPRO levels off by 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ema: float = 0.98  # decay of the weight average kept as the trained model (per step)
    seed: int = 0
    p_anomaly: float = 0.5  # features head: share of a batch given feature-space anomalies
    views: int = 100  # evidence head: at most this many synthetic views per category (learning/evidence.py)
    precision: str = "auto"  # auto: see training_precision
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "image_bce": 1.0, "dice": 1.0, "focal": 1.0, "contrastive": 0.1, "margin": 0.1,
        "alignment": 0.1, "consistency": 0.5, "pixel_bce": 1.0})

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


def steps_per_epoch(num_images: int, batch_size: int, num_workers: int = 1) -> int:
    """Optimizer steps per epoch on every worker (the same on all: DDP needs that)."""
    return max(1, math.ceil(max(num_images, MIN_EPOCH_SAMPLES) / num_workers / batch_size))


def make_optimizer(trainable: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW with a cosine schedule over the whole run (per optimizer step)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return opt, sched


class WeightAverage:
    """Exponential moving average of a module's state (parameters and BatchNorm statistics), the
    weights a fit keeps. torch's AveragedModel would deep-copy the module, and with it the frozen
    backbone the trainable part holds by reference (600 MB for a CLIP ViT-B); this keeps tensors
    only. The decay ramps up as (1 + t) / (10 + t) so a short run is not dominated by its start."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.updates = int(saved["updates"])
        for k, v in saved["state"].items():
            self.state[k].copy_(v)


def make_ema(trainable: torch.nn.Module, cfg: TrainConfig) -> WeightAverage:
    return WeightAverage(trainable, cfg.ema)


def set_standardization(trainable: torch.nn.Module, local: torch.Tensor) -> None:
    """Per-channel mean and std of the training images' local features (N, C, h, w): the head's
    input scale, and the unit of the feature-space noise. Non-finite rows are refused: they would
    make the standardization, then the shared head and every category's maps, NaN."""
    x = local.float().transpose(0, 1).reshape(local.shape[1], -1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the head's training rows hold {int((~torch.isfinite(x)).sum())} non-finite values; "
                         "refusing to standardize (and train) on them")
    trainable.feat_mean.copy_(x.mean(1))
    trainable.feat_std.copy_(x.std(1).clamp(min=1e-6))


@dataclass
class Shard:
    """One worker's training rows, cached: standardized inputs are derived per batch."""

    local: torch.Tensor  # (n, C, h, w) the head's input: local embeddings, or evidence (masks given)
    tokens: torch.Tensor | None  # (n, 1 + h*w, D) CLIP last-block inputs, or None
    categories: list[str]
    # (n, h, w) evidence rows' defect cells (1, 0, or < 0: left out of the loss); None: features rows
    masks: torch.Tensor | None = None
    pos_weight: float = 1.0  # pixel BCE weight of a defect cell (evidence rows; pixel_pos_weight)

    def __len__(self) -> int:
        return int(self.local.shape[0])


def pixel_pos_weight(masks: torch.Tensor) -> float:
    """sqrt(normal cells / defect cells) over all evidence rows of a fit (every rank uses the
    fit's one value): defect cells are ~2 % of a grid, and a full inverse-frequency weight made
    the head flag whole images, the square root keeps the map sharp. Cells left out of the loss
    (negative) do not count."""
    counted = masks[masks >= 0].float()
    pos = float(counted.mean()) if counted.numel() else 0.0
    return math.sqrt((1 - pos) / pos) if 0 < pos < 1 else 1.0


def shard_from_evidence(rows: Sequence, categories: Sequence[str], pos_weight: float) -> Shard:
    """One shard from learning.evidence.Evidence rows of several categories (in that order)."""
    tokens = None if rows[0].tokens is None else torch.cat([r.tokens for r in rows])
    return Shard(torch.cat([r.inputs for r in rows]), tokens,
                 [c for r, c in zip(rows, categories) for _ in range(len(r))],
                 masks=torch.cat([r.masks for r in rows]), pos_weight=pos_weight)


def epoch_order(n: int, steps: int, batch_size: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """This worker's row order for one epoch: a seeded permutation, cycled to steps * batch_size rows
    (a pure function of its arguments, so a resumed run replays it)."""
    rng = np.random.default_rng([seed, epoch, rank, 3])
    need = steps * batch_size
    reps = math.ceil(need / max(n, 1))
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:need]


def loss_terms(trainable, out, out_flip, masks: torch.Tensor, labels: torch.Tensor, categories: Sequence[str],
               handcrafted: Callable[[str], torch.Tensor], pos_weight: float | None = None) -> dict[str, torch.Tensor]:
    """All losses for one batch; text losses only with a text branch. `pos_weight` given: evidence
    rows (no mirrored forward, `out_flip` None), the head's loss is the weighted pixel BCE."""
    if pos_weight is not None:
        known = (masks >= 0).float()  # evidence.grid_masks: cells a defect barely touches are left out
        masks = masks.clamp(min=0)
        bce = F.binary_cross_entropy_with_logits(out.head_logits[:, 0].float(), masks, reduction="none",
                                                 pos_weight=torch.tensor(pos_weight, device=masks.device))
        terms = {"pixel_bce": (bce * known).sum() / known.sum().clamp(min=1)}
    else:
        terms = {
            "image_bce": losses.image_bce(out.image_logit, labels),
            "dice": losses.dice(out.head_logits, masks),
            "focal": losses.pixel_focal(out.head_logits, masks),
            "consistency": losses.consistency(out.head_logits, torch.flip(out_flip.head_logits, dims=[-1])),
        }
    if out.text_logits is not None:
        grid = out.head_logits.shape[-2:]
        terms["dice"] = terms.get("dice", 0.0) + losses.dice(out.text_logits, masks)
        patch = out.patch_embed.float()
        if patch.shape[-2:] != grid:
            patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
        contrastive, margin, align = [], [], []
        for cat, (normal, anomalous) in out.prompts.items():
            idx = [i for i, c in enumerate(categories) if c == cat]
            p = patch[idx].permute(0, 2, 3, 1).reshape(-1, patch.shape[1])
            p_lab = (masks[idx].flatten() > 0.5).float()
            feats = torch.cat([out.image_embed[idx].float(), p])
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


def train_epoch(trainable: torch.nn.Module, shard: Shard, opt, sched, scaler, ema, cfg: TrainConfig,
                epoch: int, rank: int, steps: int, handcrafted: Callable[[str], torch.Tensor],
                device: torch.device) -> dict[str, float]:
    """One epoch of `steps` optimizer steps over this worker's shard. `trainable` may be DDP-wrapped;
    `ema` (make_ema) is updated after every step."""
    precision = training_precision(device) if cfg.precision == "auto" else resolve_precision(cfg.precision, device)
    module = getattr(trainable, "module", trainable)
    trainable.train()
    totals: dict[str, float] = {}
    order = epoch_order(len(shard), steps, cfg.batch_size, cfg.seed, epoch, rank)
    for step in range(steps):
        idx = torch.from_numpy(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        categories = [shard.categories[i] for i in idx.tolist()]
        z = module.standardize(shard.local[idx].to(device))
        tokens = None if shard.tokens is None else shard.tokens[idx].to(device).float()
        if shard.masks is not None:  # evidence rows: the synthetic defects are already in them
            masks = shard.masks[idx].to(device)
            labels = (masks != 0).flatten(1).any(1).float()  # a view is anomalous even where no cell is filled
            with autocast(precision, device):
                out = trainable(z, tokens, categories)
            terms = loss_terms(module, out, None, masks, labels, categories, handcrafted, shard.pos_weight)
        else:  # features rows: this step's feature-space anomalies, seeded by (seed, rank, epoch, step)
            gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rank, epoch, step]).integers(2**62)))
            z, tokens, masks, labels = add_anomalies(z, cfg.p_anomaly, gen, tokens)
            flip_tokens = None if tokens is None else _flip_tokens(tokens, z.shape[-2:])
            with autocast(precision, device):
                out = trainable(torch.cat([z, torch.flip(z, dims=[-1])]),
                                None if tokens is None else torch.cat([tokens, flip_tokens]), categories + categories)
            out, out_flip = _split(out, z.shape[0])
            terms = loss_terms(module, out, out_flip, masks, labels, categories, handcrafted)
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
        ema.update(module)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
    return {k: v / max(steps, 1) for k, v in totals.items()} | {"steps": steps}


def _flip_tokens(tokens: torch.Tensor, grid) -> torch.Tensor:
    """CLIP tokens of the mirrored patch grid (class token first)."""
    h, w = grid
    patches = tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).flip(2).reshape(tokens.shape[0], h * w, -1)
    return torch.cat([tokens[:, :1], patches], 1)


def _split(out, n: int):
    """Split a forward over [x, flip(x)] into the two halves."""
    from promptad.models.trainable import Outputs

    def half(t, sl):
        return None if t is None else t[sl]

    return [Outputs(head_logits=out.head_logits[sl], image_logit=out.image_logit[sl],
                    text_logits=half(out.text_logits, sl), image_text_logit=half(out.image_text_logit, sl),
                    patch_embed=half(out.patch_embed, sl), image_embed=half(out.image_embed, sl),
                    prompts=out.prompts)
            for sl in (slice(0, n), slice(n, None))]


def train_in_process(model, shard: Shard, cfg: TrainConfig, device: torch.device,
                     log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Train `model.trainable` on one shard in this process; the EMA weights end up in the model."""
    trainable = model.trainable
    torch.manual_seed(cfg.seed)
    steps = steps_per_epoch(len(shard), cfg.batch_size)
    opt, sched = make_optimizer(trainable, cfg, steps * cfg.epochs)
    ema = make_ema(trainable, cfg)
    scaler = torch.amp.GradScaler(device.type) if resolve_precision(cfg.precision, device) == "fp16" else None
    history = []
    for epoch in range(cfg.epochs):
        stats = train_epoch(trainable, shard, opt, sched, scaler, ema, cfg, epoch, 0, steps, model.handcrafted, device)
        history.append(stats)
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {stats['loss']:.4f}")
    check_trained(ema.state)
    trainable.load_state_dict(ema.state)
    return history


def check_trained(state: dict[str, torch.Tensor]) -> None:
    """Refuse a trained state with a NaN or inf in it (ValueError): it would be calibrated and
    saved, and every category's maps would be NaN."""
    from promptad.numerics import non_finite

    bad = non_finite(state)
    if bad:
        raise ValueError(f"training ended with non-finite weights ({', '.join(bad[:5])}); nothing is calibrated "
                         "or saved from them")
