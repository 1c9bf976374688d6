"""Per-image cost of each scoring component, in-process, on one torch thread (a CPU score actor's).

    .venv/bin/python benchmarks/score_components.py MODEL [--images 64]

MODEL: an artifact with one category (score_throughput.py fits one into its --workdir). Images:
the first N magnetic_tile train images, read in place. Each step of predict is timed on its own
(the backbone pass, each bank's features and search, the Gaussian, the head, fusion with the map
blur) and the post-processing a commit task does per row (map to the image's aspect, PNG).
Prints a Markdown table for benchmarks/RESULTS.md ("Scoring").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from promptad.data import storage  # noqa: E402
from promptad.data.images import decode_image, resize  # noqa: E402
from promptad.memory.bank import nn_distance  # noqa: E402
from promptad.models.artifact import load_artifact  # noqa: E402
from promptad.postprocess import postprocess  # noqa: E402
from promptad.predict import extract  # noqa: E402

STEPS = ("decode + resize", "backbone", "local features + bank", "regional features + bank", "Gaussian",
         "evidence head", "fusion + map blur", "postprocess (PNG)")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_artifact(args.model)
    cat = model.categories[0]
    cal, mem_ = model.calibration[cat], model.memory[cat]
    paths = sorted((REPO.parent / "shared/datasets/magnetic_tile/train/good").glob("*.png"))[:args.images]
    clock = dict.fromkeys(STEPS, 0.0)

    def timed(step: str, fn):
        t = time.perf_counter()
        out = fn()
        clock[step] += time.perf_counter() - t
        return out

    raw = timed("decode + resize", lambda: [decode_image(storage.read_bytes(str(p))) for p in paths])
    images = timed("decode + resize", lambda: np.stack([resize(r, model.cfg.input_size) for r in raw]))
    for s in range(0, len(images), args.batch_size):
        x = images[s:s + args.batch_size]
        cats = [cat] * len(x)
        f = timed("backbone", lambda: extract(model, x))
        mem = timed("local features + bank", lambda: nn_distance(model.local_features(f), mem_.local.entries))
        reg = timed("regional features + bank", lambda: nn_distance(model.regional_features(f), mem_.regional.entries))
        glob = timed("Gaussian", lambda: mem_.gaussian.distances(model.pooled_features(f)).min(1).values.float())
        head = timed("evidence head", lambda: torch.sigmoid(model.trainable(
            model.trainable.standardize(model.head_inputs(mem, reg, cats)), f.tokens, cats).head_logits[:, 0].float()))
        comps = {"memory": mem, "regional": reg, "global": glob, "reference": torch.ones(len(x)), "head": head}
        fused = timed("fusion + map blur", lambda: model.fuse(comps, cats))
        for i in range(len(x)):
            h, w = raw[s + i].shape[:2]
            timed("postprocess (PNG)", lambda: postprocess(cal, float(fused.scores[i]), fused.maps[i].numpy(), h, w))
    total = sum(clock.values())
    print("| component | ms per image | share |\n|---|---|---|")
    for step, v in clock.items():
        print(f"| {step} | {1000 * v / len(images):.1f} | {100 * v / total:.0f} % |")
    print(f"| total | {1000 * total / len(images):.1f} | |")


if __name__ == "__main__":
    main()
