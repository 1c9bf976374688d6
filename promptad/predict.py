"""THE inference path. Fit-validation, calibration, `audit` and `score` all call `predict`, so a
score never depends on which command produced it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from promptad.learning.training import autocast, resolve_precision
from promptad.models.backbones import Features
from promptad.models.model import PromptAD
from promptad.numerics import exact_fp32


@dataclass
class Prediction:
    scores: np.ndarray  # (N,) float32 raw image anomaly scores
    maps: np.ndarray  # (N, S, S) float32 fused anomaly maps at the model's input size
    # predict_rows only: per row, why the model's output for it is unusable ("" when it is fine)
    errors: list[str] | None = None


def as_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1] on `device`; tensors pass through."""
    if isinstance(images, np.ndarray):
        # Ray hands blocks over as read-only arrays, which torch.from_numpy warns about; a uint8
        # batch is small next to the backbone pass, so a copy is the simple way out.
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = images.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def extract(model: PromptAD, images, precision: str = "auto") -> Features:
    """The frozen backbone pass: what a fit caches per image (in actors.FIT_PRECISION) and what
    every prediction starts from. "fp32" is fp32 on GPUs too (TF32 off: numerics.exact_fp32)."""
    model.eval()
    device = model.device
    x = as_input(images, device)
    precision = resolve_precision(precision, device)
    with autocast(precision, device), exact_fp32() if precision == "fp32" else contextlib.nullcontext():
        return model.backbone(x)


@torch.no_grad()
def components_of(model: PromptAD, feats: Features, categories: Sequence[str], precision: str = "auto",
                  exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Raw evidence from backbone features (calibration passes `exclude` for leave-one-out)."""
    model.eval()
    device = model.device
    precision = resolve_precision(precision, device)
    with autocast(precision, device), exact_fp32() if precision == "fp32" else contextlib.nullcontext():
        return model.components(feats.to(device), list(categories), exclude=exclude)


def predict_components(model: PromptAD, images, categories: Sequence[str],
                       precision: str = "auto") -> dict[str, torch.Tensor]:
    """The raw evidence before fusion (the quality benchmark fuses it more than one way)."""
    return components_of(model, extract(model, images, precision), categories, precision)


@torch.no_grad()
def predict(model: PromptAD, images, categories: Sequence[str], precision: str = "auto") -> Prediction:
    """Image scores and anomaly maps for a batch of images of the given categories.

    `images`: (N, S, S, 3) uint8 array at the model's input size (see images.resize), or a float
    tensor (N, 3, S, S) in [0, 1]. Unknown categories raise KeyError (callers make error rows).
    """
    unknown = sorted(set(categories) - set(model.categories))
    if unknown:
        raise KeyError(f"unknown category {unknown[0]!r}; the model knows {', '.join(model.categories)}")
    fused = model.fuse(predict_components(model, images, categories, precision), list(categories))
    return Prediction(scores=fused.scores.float().cpu().numpy(), maps=fused.maps.float().cpu().numpy())


def load_for_worker(model_uri: str, device: str, threads: int) -> PromptAD:
    """The artifact, loaded once by a score/audit actor (actors.start_actor first: torch gets as
    many threads as whole CPUs Ray gave the actor, at least 1; more would fight the read and commit
    tasks for cores, and OpenMP threads slow down badly when preempted: on the 2-CPU test machine,
    2 threads next to other work ran 1.5-4x slower than 1)."""
    from promptad.actors import start_actor
    from promptad.models.artifact import load_artifact

    return load_artifact(model_uri, start_actor(device, threads))


def predict_rows(model: PromptAD, images: np.ndarray, categories: Sequence[str],
                 errors: Sequence[str], precision: str = "auto") -> Prediction:
    """predict() over the rows of a batch that loaded; rows with an error get a NaN score and a
    zero map, so every input keeps its row.

    The shared model stage of `score` and `audit`, and the one place that checks what the model
    returned: a row whose score is not finite or whose map holds a non-finite value gets the
    reason in `errors` (score writes it as a `model: ...` error row, audit as a `predict: ...`
    error entry); the other rows of the batch are unaffected. Rows that came in with an error
    keep "" there (their own error stands)."""
    n, size = len(images), images.shape[1]
    out = Prediction(scores=np.full(n, np.nan, np.float32), maps=np.zeros((n, size, size), np.float32),
                     errors=[""] * n)
    ok = np.array([not e for e in errors], dtype=bool)
    if ok.any():
        pred = predict(model, images[ok], [str(c) for c in np.asarray(categories)[ok]], precision)
        out.scores[ok], out.maps[ok] = pred.scores, pred.maps
        for i in np.flatnonzero(ok):
            out.errors[i] = output_problem(out.scores[i], out.maps[i])
    return out


def output_problem(score: float, amap: np.ndarray) -> str:
    """Why one image's model output cannot be used ("" when it can)."""
    if not np.isfinite(score):
        return f"non-finite image score ({float(score)})"
    bad = amap.size - int(np.isfinite(amap).sum())
    if bad:
        return f"anomaly map has non-finite values ({bad} of {amap.size})"
    return ""
