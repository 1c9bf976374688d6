"""Imaging drift vs whole-image defects: what `promptad fit --tolerate` buys and costs.

    python benchmarks/drift.py --data ../shared/datasets --category magnetic_tile [--tolerate noise,jpeg,blur]
        [--json out.json]

Two in-process fits (pipeline.fit_in_process, defaults) of the same images, the second with
their tolerated views (load_tolerated: what `promptad fit --tolerate` adds to the banks and the
Gaussian), each timed. On the test images under each tolerated condition (shifted at their own
resolution as an audit shifts them, labels unchanged) and clean, both are scored and it prints,
per model:

    bank entries         local and regional coreset sizes; and the seconds to score the clean test
                         images (a bigger bank costs nearest-neighbour search)
    image AUROC          defective vs normal test images under that condition
    false alarms         normal test images at or above the deployed threshold (target 1 %)
    whole-image defects  AUROC of clean test normals vs the same normals with a whole-image defect
                         (shifts.WHOLE_IMAGE_DEFECTS): the branch must still catch these
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptad.data import storage  # noqa: E402
from promptad.data.datasets import load_samples  # noqa: E402
from promptad.data.images import decode_image, resize  # noqa: E402
from promptad.data.shifts import WHOLE_IMAGE_DEFECTS, apply_shift, parse_shifts  # noqa: E402
from promptad.fit.pipeline import fit_in_process, load_images, load_tolerated  # noqa: E402
from promptad.learning.training import TrainConfig  # noqa: E402
from promptad.metrics.image import image_auroc  # noqa: E402
from promptad.models.model import ModelConfig  # noqa: E402
from promptad.predict import predict  # noqa: E402


def shifted(test, name: str | None, size: int) -> np.ndarray:
    out = []
    for i, s in enumerate(test):
        img = decode_image(storage.read_bytes(s.path))
        if name is not None:
            img, _ = apply_shift(name, img, None, i)
        out.append(resize(img, size))
    return np.stack(out)


def scores(model, images: np.ndarray, category: str, batch: int = 16) -> np.ndarray:
    return np.concatenate([predict(model, images[s:s + batch], [category] * len(images[s:s + batch])).scores
                           for s in range(0, len(images), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--backbone", default="effnet-lite0")
    ap.add_argument("--tolerate", default="noise,jpeg,blur", help="conditions, as promptad fit --tolerate (default: noise,jpeg,blur)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = parse_shifts(args.tolerate)
    cat = args.category
    train = sorted([s for s in load_samples(args.data, [cat], "train") if s.label != 1], key=lambda s: s.image_id)
    test = load_samples(args.data, [cat], "test")
    labels = np.array([s.label for s in test])
    t = time.perf_counter()
    plain = fit_in_process({cat: load_images(train, 256)}, ModelConfig(backbone=args.backbone),
                           TrainConfig(epochs=0), log=None)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    tolerant = fit_in_process({cat: load_images(train, 256)}, ModelConfig(backbone=args.backbone),
                              TrainConfig(epochs=0), log=None, tolerated={cat: load_tolerated(train, 256, names)})
    tolerant_s = time.perf_counter() - t
    size = plain.cfg.input_size
    models = {"plain": plain, "tolerant": tolerant}
    rows: dict[str, dict] = {}
    score_s: dict[str, float] = {}
    for cond in ["clean", *names]:
        x = shifted(test, None if cond == "clean" else cond, size)
        for key, m in models.items():
            t = time.perf_counter()
            s = scores(m, x, cat)
            if cond == "clean":
                score_s[key] = time.perf_counter() - t
            thr = m.calibration[cat].image_threshold
            rows.setdefault(cond, {})[key] = {"image_auroc": round(image_auroc(s, labels), 4),
                                              "false_alarms": round(float((s[labels == 0] >= thr).mean()), 4)}
        print(cond, rows[cond], flush=True)
    normals = shifted([s for s in test if s.label == 0], None, size)
    raw = [decode_image(storage.read_bytes(s.path)) for s in test if s.label == 0]
    whole = {}
    for name, fn in WHOLE_IMAGE_DEFECTS.items():
        bad = np.stack([resize(fn(img if img.ndim == 3 else np.stack([img] * 3, -1)), size) for img in raw])
        lab = np.r_[np.zeros(len(normals)), np.ones(len(bad))].astype(int)
        whole[name] = {k: round(image_auroc(np.r_[scores(m, normals, cat), scores(m, bad, cat)], lab), 4)
                       for k, m in models.items()}
    result = {"category": cat, "tolerate": names, "conditions": rows, "whole_image_defects": whole,
              "fit_s": round(fit_s, 1), "tolerant_fit_s": round(tolerant_s, 1),
              "clean_score_s": {k: round(v, 1) for k, v in score_s.items()},
              "bank_entries": {k: {"local": len(m.memory[cat].local.entries),
                                   "regional": len(m.memory[cat].regional.entries)} for k, m in models.items()},
              "date": time.strftime("%Y-%m-%d"), "train_images": len(train), "test_images": len(test)}
    print(f"\n{cat}: tolerate {','.join(names)}  (fit {fit_s:.0f} s; with the views {tolerant_s:.0f} s, "
          f"{tolerant_s / fit_s:.2f}x)")
    print(f"bank entries local / regional: plain {result['bank_entries']['plain']['local']} / "
          f"{result['bank_entries']['plain']['regional']}, tolerant {result['bank_entries']['tolerant']['local']} / "
          f"{result['bank_entries']['tolerant']['regional']}; scoring the clean test images "
          f"{score_s['plain']:.1f} s vs {score_s['tolerant']:.1f} s ({score_s['tolerant'] / score_s['plain']:.2f}x)")
    print(f"{'condition':14s} {'I-AUROC plain':>14s} {'tolerant':>9s} {'false alarms plain':>19s} {'tolerant':>9s}")
    for cond, r in rows.items():
        print(f"{cond:14s} {r['plain']['image_auroc']:14.3f} {r['tolerant']['image_auroc']:9.3f} "
              f"{r['plain']['false_alarms']:19.3f} {r['tolerant']['false_alarms']:9.3f}")
    for name, r in whole.items():
        print(f"whole-image {name:16s} plain {r['plain']:.3f}  tolerant {r['tolerant']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
