"""Detection quality and fit cost, side by side with the reference PatchCore, same weights and data.

    python benchmarks/quality.py --data ../shared/datasets --category magnetic_tile [--backbone effnet-lite0]
        [--epochs E] [--train-limit N] [--json out.json]

Fits on ROOT/NAME/train/good in-process (pipeline.fit_in_process: the steps `promptad fit`
distributes: decode, features, memory, training, calibration; its fit time counts all of them) and
evaluates on ROOT/NAME/test. Then runs the reference, `../shared/tools/ref_patchcore.py`, unchanged,
as a subprocess on the same images (with --train-limit, a seeded random draw of N, on a temporary MVTec layout of links to
the same subset) and prints one table:

    model        the full model at its defaults
    memory-only  the same fit, fusion {memory: 1, regional: 1, head: 0, text: 0, global: 0}
    regional-1   the same fit with the regional bank at full weight (the fixed recipe before the
                 per-category choice of learning/mixing.py) ...
    regional-0   ... and without it (the local bank alone), the other fixed recipe
    reference    ref_patchcore.py (it reports no AUPRO)

Pixel metrics are computed at the model's input size over every test pixel (exact, sorted), as the
reference does at the same size (quality.py hands it our backbone's blocks and input size). Also
reported: the false-alarm rate of the deployed threshold on the test normals against its target,
and image AUROC of normal test images vs whole-image defects made from them
(shifts.WHOLE_IMAGE_DEFECTS), with and without the global branch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptad.data import storage  # noqa: E402
from promptad.data.datasets import load_samples  # noqa: E402
from promptad.data.images import decode_mask, resize_mask  # noqa: E402
from promptad.data.shifts import WHOLE_IMAGE_DEFECTS  # noqa: E402
from promptad.fit.pipeline import fit_in_process, load_images  # noqa: E402
from promptad.learning.mixing import choice_line  # noqa: E402
from promptad.learning.training import TrainConfig  # noqa: E402
from promptad.metrics.image import f1_max, image_auroc  # noqa: E402
from promptad.metrics.pixel import AUPRO  # noqa: E402
from promptad.models.backbones import create_backbone  # noqa: E402
from promptad.models.model import LOCAL_NORMS, MEMORY_ONLY, ModelConfig  # noqa: E402
from promptad.predict import predict_components  # noqa: E402

REFERENCE = REPO.parent / "shared" / "tools" / "ref_patchcore.py"


def run_reference(root: str, category: str, lite: int, taps: list[int], size: int) -> dict:
    """The reference's one JSON line (its own fit timing included), on the blocks and input size
    our backbone uses: its defaults (blocks 4,10 at 256 px) are lite0's stride-8 and stride-16
    stage ends; lite2 has more blocks and runs at 288 px."""
    out = subprocess.run([sys.executable, str(REFERENCE), root, category, "--lite", str(lite),
                          "--taps", ",".join(map(str, taps)), "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def subset_root(data: str, category: str, train: list, tmp: str) -> str:
    """A temporary MVTec layout: links to the chosen train images, the whole test and ground truth."""
    base = Path(tmp) / category
    (base / "train" / "good").mkdir(parents=True)
    for s in train:
        os.symlink(os.path.abspath(s.path), base / "train" / "good" / os.path.basename(s.path))
    for sub in ("test", "ground_truth"):
        src = Path(data) / category / sub
        if src.exists():
            os.symlink(src.resolve(), base / sub)
    return tmp


def evaluate(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None, masks: np.ndarray | None) -> dict:
    out = {"image_auroc": image_auroc(scores, labels), "image_f1_max": f1_max(scores, labels)[0],
           "pixel_auroc": float("nan"), "aupro": float("nan")}
    if maps is not None:
        out["pixel_auroc"] = image_auroc(maps.ravel().astype(np.float64), masks.ravel().astype(np.int64))
        lo, hi = float(maps.min()), float(maps.max())
        pro = AUPRO()
        for s in range(0, len(maps), 32):
            pro.update((maps[s:s + 32] - lo) / max(hi - lo, 1e-12), masks[s:s + 32])
        out["aupro"] = pro.compute()
    return out


def false_alarms(scores: np.ndarray, labels: np.ndarray, threshold: float, target: float) -> dict:
    """Measured false-alarm rate on test normals and the 95 % range a rate of `target` would give."""
    from scipy.stats import binom

    normal = scores[labels == 0].astype(np.float32)
    n = int(normal.size)
    flagged = int((normal >= np.float32(threshold)).sum())
    lo, hi = binom.ppf(0.025, n, target), binom.ppf(0.975, n, target)
    return {"normals": n, "flagged": flagged, "rate": flagged / max(n, 1), "target": target,
            "expected_range": [lo / n, hi / n], "within": bool(lo <= flagged <= hi)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--backbone", default="effnet-lite0")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=TrainConfig.views,
                    help="synthetic views per category for the evidence head (with --epochs)")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="fit on N train images drawn at random (seeded by --seed), in their sorted order")
    ap.add_argument("--local-norm", default=ModelConfig.local_norm, choices=LOCAL_NORMS,
                    help="'none': the local features as the backbone gives them, read against similar "
                         "normal images (the model before image normalization)")
    ap.add_argument("--coreset-draws", type=int, default=ModelConfig.coreset_draws,
                    help="coresets whose union makes each bank (1: a single draw, the model before 2026-12-04)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-whole-image", action="store_true", help="skip the whole-image defects")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    train = load_samples(args.data, [args.category], "train")
    if args.train_limit and args.train_limit < len(train):
        # A random draw, not the first N: sorted names can group one kind of image (magnetic_tile's
        # first 200 miss kinds its test normals have: 10 % false alarms, and the global branch flags them).
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train), args.train_limit, replace=False))
        train = [train[i] for i in keep]
    test = load_samples(args.data, [args.category], "test")
    backbone = create_backbone(args.backbone)
    reference = None
    if not args.no_reference:
        lite = int(args.backbone[-1]) if args.backbone.startswith("effnet-lite") else 0
        with tempfile.TemporaryDirectory() as tmp:
            root = subset_root(args.data, args.category, train, tmp) if args.train_limit else args.data
            reference = run_reference(root, args.category, lite, getattr(backbone, "taps", [4, 10]),
                                      backbone.input_size)

    cfg = ModelConfig(backbone=args.backbone, local_norm=args.local_norm, coreset_draws=args.coreset_draws)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    size = backbone.input_size
    images = load_images(train, size)
    timings["decode"] = time.perf_counter() - t0
    model = fit_in_process({args.category: images}, cfg, TrainConfig(epochs=args.epochs, seed=args.seed, views=args.views),
                           log=lambda m: print(m, file=sys.stderr), timings=timings)
    fit_s = time.perf_counter() - t0
    cal = model.calibration[args.category]

    t0 = time.perf_counter()
    labels = np.array([s.label for s in test], dtype=np.int64)
    cats = [args.category]
    variants = {"model": None, "memory-only": {args.category: MEMORY_ONLY},
                "model-no-global": {args.category: {**cal.fusion, "global": 0.0}},
                # the two fixed recipes the per-category choice is between (learning/mixing.py)
                "regional-1": {args.category: {**cal.fusion, "regional": 1.0}},
                "regional-0": {args.category: {**cal.fusion, "regional": 0.0}}}
    mapped = ("model", "memory-only", "regional-1", "regional-0")
    scores = {k: [] for k in variants}
    maps = {k: [] for k in mapped}
    has_masks = any(s.mask_path for s in test)
    masks, normals = [], []
    for start in range(0, len(test), 16):
        chunk = test[start:start + 16]
        x = load_images(chunk, size)
        normals.extend(x[labels[start:start + 16] == 0])
        comps = predict_components(model, x, cats * len(chunk))
        for name, fusion in variants.items():
            fused = model.fuse(comps, cats * len(chunk), fusion)
            scores[name].append(fused.scores.numpy())
            if has_masks and name in maps:
                maps[name].append(fused.maps.numpy().astype(np.float32))
        if has_masks:
            masks.extend(resize_mask(decode_mask(storage.read_bytes(s.mask_path)), size) if s.mask_path
                         else np.zeros((size, size), bool) for s in chunk)
    test_s = time.perf_counter() - t0
    masks_arr = np.stack(masks) if has_masks else None
    result: dict = {}
    for name in mapped:
        r = evaluate(np.concatenate(scores[name]), labels,
                     np.concatenate(maps[name]) if has_masks else None, masks_arr)
        result[name.replace("-", "_")] = {**r, "fit_s": round(fit_s, 1), "test_s": round(test_s, 1)}
    result["model"]["image_auroc_without_global"] = image_auroc(np.concatenate(scores["model-no-global"]), labels)
    if reference:
        result["reference"] = {k: reference.get(k) for k in ("image_auroc", "pixel_auroc", "image_f1_max", "fit_s")}
        result["reference"]["aupro"] = None
        result["fit_cost_ratio"] = round(fit_s / reference["fit_s"], 2)
    result["false_alarms"] = false_alarms(np.concatenate(scores["model"]), labels, cal.image_threshold,
                                          cal.stats.get("image_fpr_target", 0.01))
    result["false_alarms"]["promised"] = cal.stats.get("image_fpr_promised")

    # Whole-image defects made from the normal test images: memory alone vs with the global branch.
    normal_imgs = np.stack(normals)
    whole = {}
    for name, fn in ({} if args.no_whole_image else WHOLE_IMAGE_DEFECTS).items():
        shifted = np.stack([fn(img) for img in normal_imgs])
        lab = np.r_[np.zeros(len(normal_imgs)), np.ones(len(shifted))].astype(np.int64)
        both = np.concatenate([normal_imgs, shifted])
        names = ("memory-only", "model-no-global", "model")
        s = {v: [] for v in names}
        for start in range(0, len(both), 16):
            part = both[start:start + 16]
            comps = predict_components(model, part, cats * len(part))
            for v in names:
                s[v].append(model.fuse(comps, cats * len(part), variants[v]).scores.numpy())
        row = {v: image_auroc(np.concatenate(s[v]), lab) for v in names}
        whole[name] = row
    result["whole_image_defects"] = whole
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    result["settings"] = {"data": args.data, "category": args.category, "backbone": args.backbone,
                          "epochs": args.epochs, "views": args.views, "seed": args.seed, "coreset_draws": args.coreset_draws,
                          "local_norm": args.local_norm, "train_images": len(train),
                          "test_images": len(test), "calibration": cal.stats, "map_choice": cal.map_choice,
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "cpus": os.cpu_count(), "load_avg": os.getloadavg()}

    def cell(v):
        return "   n/a" if v is None or v != v else f"{v:6.3f}"

    print(f"{args.category} ({len(train)} train, {len(test)} test, {args.backbone}, {args.epochs} epochs)")
    print(f"{'':12s} {'I-AUROC':>8s} {'P-AUROC':>8s} {'AUPRO':>8s} {'F1-max':>8s} {'fit s':>8s}")
    for name in ("model", "memory_only", "regional_1", "regional_0", "reference"):
        r = result.get(name)
        if r:
            print(f"{name:12s} {cell(r['image_auroc']):>8s} {cell(r['pixel_auroc']):>8s} {cell(r['aupro']):>8s} "
                  f"{cell(r['image_f1_max']):>8s} {r['fit_s']:8.1f}")
    print(choice_line(cal.map_choice))
    fa = result["false_alarms"]
    print(f"false alarms on {fa['normals']} test normals: {fa['flagged']} ({fa['rate']:.3f}; target {fa['target']}, "
          f"95 % range {fa['expected_range'][0]:.3f}-{fa['expected_range'][1]:.3f})")
    for name, row in whole.items():
        print(f"whole-image {name:16s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print("fit steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
