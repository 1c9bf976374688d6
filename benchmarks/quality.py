"""Detection quality of the full model vs a plain PatchCore-style baseline, same backbone and data.

    python benchmarks/quality.py --data ../shared/datasets --category magnetic_tile \
        --backbone effnet-lite0 [--epochs 30] [--json out.json]

Fits on ROOT/NAME/train/good (in-process: the same steps `promptad fit` distributes) and evaluates
on ROOT/NAME/test. The baseline is the memory bank alone (same backbone, layers, fit images,
coreset and nearest neighbour, same map smoothing; image score = map maximum), computed from the
same forward pass: it is the model with fusion weights {memory: 1, head: 0, text: 0}.
Pixel metrics are computed at the model's input resolution over all test pixels (exact, sorted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from promptad.datasets import load_samples  # noqa: E402
from promptad.images import decode_mask, resize_mask  # noqa: E402
from promptad.metrics import f1_max, image_auroc  # noqa: E402
from promptad.model import ModelConfig  # noqa: E402
from promptad.pipeline import fit_in_process, load_images  # noqa: E402
from promptad.predict import predict_components  # noqa: E402
from promptad import storage  # noqa: E402
from promptad.training import TrainConfig  # noqa: E402


def evaluate(scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    out = {"image_auroc": image_auroc(scores, labels), "image_f1_max": f1_max(scores, labels)[0]}
    if masks:
        out["pixel_auroc"] = image_auroc(np.concatenate([m.ravel() for m in maps]),
                                         np.concatenate([m.ravel() for m in masks]).astype(np.int64))
    else:
        out["pixel_auroc"] = float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--backbone", default="effnet-lite0")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    train = load_samples(args.data, [args.category], "train")
    test = load_samples(args.data, [args.category], "test")
    cfg = ModelConfig(backbone=args.backbone)
    t0 = time.perf_counter()
    from promptad.backbones import create_backbone

    size = create_backbone(args.backbone).input_size
    images = load_images(train, size)
    model = fit_in_process({args.category: images}, cfg, TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                                     seed=args.seed),
                           log=lambda m: print(m, file=sys.stderr))
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = np.array([s.label for s in test], dtype=np.int64)
    variants = {"model": None, "baseline": {args.category: {"memory": 1.0, "head": 0.0, "text": 0.0}}}
    scores = {k: [] for k in variants}
    maps = {k: [] for k in variants}
    masks: list[np.ndarray] = []
    has_masks = any(s.mask_path for s in test)
    for start in range(0, len(test), 16):
        chunk = test[start:start + 16]
        x = load_images(chunk, size)
        comps = predict_components(model, x, [args.category] * len(chunk))
        for name, fusion in variants.items():
            s, m = model.fuse(comps, [args.category] * len(chunk), fusion)
            scores[name].append(s.numpy())
            if has_masks:
                maps[name].extend(m.numpy().astype(np.float32))
        if has_masks:
            for smp in chunk:
                if smp.mask_path:
                    masks.append(resize_mask(decode_mask(storage.read_bytes(smp.mask_path)), size))
                else:
                    masks.append(np.zeros((size, size), bool))
    test_s = time.perf_counter() - t0

    result = {}
    for name in variants:
        result[name] = evaluate(np.concatenate(scores[name]), labels, maps[name], masks if has_masks else [])
        result[name].update(fit_s=round(fit_s, 1), test_s=round(test_s, 1))
    result["settings"] = {"data": args.data, "category": args.category, "backbone": args.backbone,
                          "epochs": args.epochs, "seed": args.seed, "train_images": len(train),
                          "test_images": len(test), "fusion": model.calibration[args.category].fusion,
                          "calibration": model.calibration[args.category].stats}
    print(f"{'':10s} {'image_auroc':>12s} {'pixel_auroc':>12s} {'image_f1_max':>13s}")
    for name in variants:
        r = result[name]
        print(f"{name:10s} {r['image_auroc']:12.4f} {r['pixel_auroc']:12.4f} {r['image_f1_max']:13.4f}")
    print(f"fit {fit_s:.0f} s (shared by both), test {test_s:.0f} s (one forward for both)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
