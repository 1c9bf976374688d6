"""The steps of a fit as plain functions, and all of them in one process (tests, benchmarks, small
data). `promptad fit` runs the same functions as Ray stages (fit/command.py).

    images -> features (predict.extract, once per image)
           -> memory per category (build_memory: local + regional coreset banks, global Gaussian;
              with --tolerate, each image's tolerated views join both)
           -> with training, the evidence head's rows per category (learning/evidence.py:
              synthetic views measured against that memory) and training on them
              (learning/training.py)
           -> calibration per category (calibrate.py, leave-one-out)

Memory does not depend on training (the backbone is frozen and the banks hold its features); the
evidence head's rows depend on memory, so memory comes first. (A features head, head_input
"features", trains on the cached local features and needs no memory.)
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch

from promptad.actors import FIT_PRECISION
from promptad.data import storage
from promptad.data.datasets import Sample
from promptad.data.images import decode_image, resize
from promptad.data.shifts import tolerated_views
from promptad.errors import UserError
from promptad.fit.calibrate import IMAGE_FPR, calibrate_category
from promptad.learning.evidence import MIN_IMAGES, Evidence, category_evidence
from promptad.learning.mixing import choose_map
from promptad.learning.training import (
    Shard,
    TrainConfig,
    pixel_pos_weight,
    set_standardization,
    shard_from_evidence,
    train_in_process,
)
from promptad.memory.bank import Bank, build_bank
from promptad.memory.gaussian import fit_gaussian
from promptad.models.backbones import Features
from promptad.models.features import group_views
from promptad.models.model import Calibration, CategoryMemory, ModelConfig, PromptAD
from promptad.numerics import non_finite
from promptad.predict import extract

# The evidence head's input scales of a category that gives it no training rows (head_categories):
# its fusion gives the head no weight, but a scoring batch that mixes it with trained categories
# still runs the head on every row.
NO_HEAD_SCALES = [1.0, 1.0]


def head_categories(images: dict[str, int], epochs: int) -> tuple[list[str], list[str]]:
    """(categories whose images train the evidence head, warnings for the others), from the
    readable images per category. The head's rows are measured leave-one-out, so a category of
    fewer than MIN_IMAGES images has none: it keeps its memory and calibration, gives the shared
    head no rows and its own maps no head (fusion as without training), so it can change no other
    category's model. With training asked for and no category able to train, the fit is refused."""
    if not epochs:
        return [], []
    ok = sorted(c for c, n in images.items() if n >= MIN_IMAGES)
    if not ok:
        raise UserError(f"--epochs {epochs} trains the localization head on leave-one-out evidence, which needs "
                        f"at least {MIN_IMAGES} readable normal images in a category, and every category has fewer; "
                        "add normal images or pass --epochs 0")
    warnings = [f"{c}: only {images[c]} readable normal image(s): too few for the localization head's "
                f"leave-one-out training rows (at least {MIN_IMAGES}); it is left out of training and its maps "
                "are the memory's alone" for c in sorted(images) if c not in ok]
    return ok, warnings


def check_calibration(category: str, calibration: Calibration) -> Calibration:
    """`calibration`, refused (ValueError naming the category and the values) if any number in it
    is not finite: a NaN threshold would reach the artifact and turn every image into an error row."""
    bad = non_finite(asdict(calibration))
    if bad:
        raise ValueError(f"category {category!r}: calibration has non-finite values ({', '.join(bad[:5])})")
    return calibration


def read_images(paths: Sequence[str], size: int) -> np.ndarray:
    """(N, S, S, 3) uint8: the images at `paths`, decoded and resized to the model's input size
    (as the Ray feature stage's decode_block does, so Ray and in-process fits see the same pixels)."""
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        out[i] = resize(decode_image(storage.read_bytes(str(path))), size)
    return out


def load_images(samples: Sequence[Sample], size: int) -> np.ndarray:
    """read_images of the samples' paths."""
    return read_images([s.path for s in samples], size)


def load_tolerated(samples: Sequence[Sample], size: int, names: list[str]) -> np.ndarray:
    """(N, T, S, S, 3) uint8: each image under the T tolerated conditions (shifted at its own
    resolution, as an audit shifts it, then resized)."""
    out = np.zeros((len(samples), len(names), size, size, 3), np.uint8)
    for i, s in enumerate(samples):
        img = decode_image(storage.read_bytes(s.path))
        for t, view in enumerate(tolerated_views(img, names, s.image_id)):
            out[i, t] = resize(view, size)
    return out


def tolerated_features(model: PromptAD, views: np.ndarray, batch_size: int = 16) -> Features:
    """Backbone features of (N, T, S, S, 3) tolerated views as N * T images, image-major (the
    views of image i are rows i*T ... i*T + T - 1), on the CPU. Extracted one condition at a time,
    in the batches the plain images run in (as the fit's feature actors do)."""
    n, t = views.shape[:2]
    per = [extract_all(model, views[:, k], batch_size) for k in range(t)]
    return Features([torch.stack([p.layers[i] for p in per], 1).flatten(0, 1) for i in range(len(per[0].layers))])


def extract_all(model: PromptAD, images: np.ndarray, batch_size: int = 16) -> Features:
    """Backbone features of (N, S, S, 3) uint8 images in FIT_PRECISION (as the fit's feature
    actors extract them), on the CPU."""
    return Features.cat([extract(model, images[s:s + batch_size], FIT_PRECISION).to("cpu", torch.float32)
                         for s in range(0, len(images), batch_size)])


@torch.no_grad()
def build_memory(model: PromptAD, feats: Features, seed: int = 0, tolerated: Features | None = None) -> CategoryMemory:
    """One category's memory from the features of its normal images; entry sources are row indices,
    so calibration can leave each image out. `tolerated` (tolerated_features): each image's views
    under the conditions a line must accept join the banks, with their image as source (a
    left-out image leaves with its views), and the Gaussian's normals. The images keep the bank
    they would have alone; a view adds an entry only where it looks like none of the images'
    patches (memory.bank.build_bank's `plain`), so the bank grows only as much as the drift needs."""
    n = len(feats)
    bad = non_finite({"features": feats.layers, "tolerated": None if tolerated is None else tolerated.layers})
    if bad:  # the Ray feature stage skips such images; here they are refused
        raise ValueError(f"non-finite backbone features ({', '.join(bad)}); refusing to build memory on them")
    local, regional = model.local_features(feats), model.regional_features(feats)
    source = torch.arange(n, device=local.device)
    extra = None
    if tolerated is not None:
        local = torch.cat([local, model.local_features(tolerated).to(local.device)])
        regional = torch.cat([regional, model.regional_features(tolerated).to(regional.device)])
        source = torch.cat([source, source.repeat_interleave(len(tolerated) // n)])
        extra = group_views(model.pooled_features(tolerated), n)

    def bank(x: torch.Tensor) -> Bank:
        return build_bank(x, source, seed=seed, plain=n, draws=model.cfg.coreset_draws)

    return CategoryMemory(local=bank(local), regional=bank(regional),
                          gaussian=fit_gaussian(model.pooled_features(feats), extra))


def training_shard(model: PromptAD, feats: dict[str, Features]) -> Shard:
    """Every category's cached local features (and CLIP tokens) as one training shard."""
    cats = sorted(feats)
    local = torch.cat([model.local_features(feats[c]) for c in cats])
    tokens = None if feats[cats[0]].tokens is None else torch.cat([feats[c].tokens for c in cats])
    return Shard(local, tokens, [c for c in cats for _ in range(len(feats[c]))])


def evidence_shard(model: PromptAD, evidence: dict[str, Evidence]) -> Shard:
    """Every category's evidence rows as one training shard; sets each category's head input
    scales (NO_HEAD_SCALES for a category without rows: head_categories), its map's regional weight
    (learning/mixing.py) and the head's standardization (over all rows) on the model."""
    cats = sorted(evidence)
    for c in model.categories:
        model.calibration[c].head_scales = list(evidence[c].scales) if c in evidence else list(NO_HEAD_SCALES)
        model.calibration[c].map_choice = choose_map(evidence[c].inputs, evidence[c].masks) if c in evidence else {}
    rows = [evidence[c] for c in cats]
    shard = shard_from_evidence(rows, cats, pixel_pos_weight(torch.cat([r.masks for r in rows])))
    set_standardization(model.trainable, shard.local)
    return shard


def fit_in_process(images: dict[str, np.ndarray], model_cfg: ModelConfig, train_cfg: TrainConfig,
                   device: str = "cpu", log: Callable[[str], None] | None = print,
                   timings: dict[str, float] | None = None,
                   tolerated: dict[str, np.ndarray] | None = None, image_fpr: float = IMAGE_FPR) -> PromptAD:
    """Features, memory, training and calibration on normal images per category, in this process.
    `timings`, when given, receives the seconds of each step; `tolerated` per category, the
    (N, T, S, S, 3) views of load_tolerated (`promptad fit --tolerate`); `image_fpr`, the
    false-alarm target of the image threshold (`promptad fit --false-alarm-rate`)."""
    clock = timings if timings is not None else {}
    torch.manual_seed(train_cfg.seed)
    model_cfg.categories = sorted(images)
    model = PromptAD(model_cfg).to(device)
    t = time.perf_counter()
    feats = {c: extract_all(model, images[c]) for c in model.categories}
    extra = {c: tolerated_features(model, v) for c, v in (tolerated or {}).items()}
    clock["features"] = time.perf_counter() - t
    t = time.perf_counter()
    model.memory = {c: build_memory(model, feats[c], train_cfg.seed, extra.get(c)).to(model.device)
                    for c in model.categories}
    clock["memory"] = time.perf_counter() - t
    t = time.perf_counter()
    heads, warnings = head_categories({c: len(v) for c, v in images.items()}, train_cfg.epochs) \
        if model.cfg.head_input == "evidence" else (model.categories, [])
    for w in warnings if log else []:
        log(f"warning: {w}")
    if model.cfg.head_input == "evidence":
        evidence = {}
        for c in heads:
            cached = feats[c]
            evidence[c] = category_evidence(model, c, len(images[c]), images[c].__getitem__,
                                            lambda idx: cached.select(torch.from_numpy(idx)),
                                            train_cfg.views, train_cfg.seed)
        clock["evidence"] = time.perf_counter() - t
        t = time.perf_counter()
        shard = evidence_shard(model, evidence) if evidence else None
    else:
        shard = training_shard(model, feats)
        set_standardization(model.trainable, shard.local)
    if train_cfg.epochs:
        train_in_process(model, shard, train_cfg, torch.device(device), log)
    clock["training"] = time.perf_counter() - t
    t = time.perf_counter()
    for c in model.categories:
        trained = train_cfg.epochs > 0 and c in heads
        check_calibration(c, calibrate_category(model, c, feats[c], trained=trained, image_fpr=image_fpr,
                                                tolerated=extra.get(c)))
    clock["calibration"] = time.perf_counter() - t
    return model
