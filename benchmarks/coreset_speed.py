"""Seconds to reduce 200 images' patch features to a coreset (the memory bank's build cost).

    python benchmarks/coreset_speed.py --data ../shared/datasets --category magnetic_tile

Features are real effnet-lite0 local patch embeddings (features.local_embedding: 256 px -> 32x32
patches, 152 dims) of the first 200 train/good images; the coreset is 1 % (min 1000) as one draw
and as the default union of `ModelConfig.coreset_draws` draws, and a 10 % one (one draw).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from promptad.data.datasets import load_samples  # noqa: E402
from promptad.fit.pipeline import extract_all, load_images  # noqa: E402
from promptad.memory.bank import build_bank  # noqa: E402
from promptad.models.model import ModelConfig, PromptAD  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    model = PromptAD(ModelConfig(backbone="effnet-lite0"))
    images = load_images(load_samples(args.data, [args.category], "train")[: args.images], model.cfg.input_size)
    with torch.no_grad():
        feats = model.local_features(extract_all(model, images))
    n = feats.shape[0] * feats.shape[2] * feats.shape[3]
    print(f"{len(images)} images -> {n} patches x {feats.shape[1]} dims")
    for ratio, draws in ((0.01, 1), (0.01, model.cfg.coreset_draws), (0.1, 1)):
        t0 = time.perf_counter()
        bank = build_bank(feats, ratio=ratio, draws=draws)
        print(f"coreset ratio {ratio}, {draws} draw(s): {bank.entries.shape[0]} entries in "
              f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
