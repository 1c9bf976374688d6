"""Training speed of `promptad fit` (Ray Train) on one category, for several worker counts.

    python benchmarks/train_speed.py --data ../shared/datasets --category magnetic_tile \
        [--workers 1,2] [--images N] [--json out.json]

Runs the real command (fit.run: Ray Data decoding, TorchTrainer, DDP, checkpoints) for one epoch
per worker count, with the default settings (effnet-lite0 at its 256 px input, batch 8 per worker,
0.5 CPU per worker) on a local Ray. "seconds per epoch" is the training epoch as a worker times it
(fetching its shard, synthesis, forward/backward, all-reduce), without Ray's start-up or the
memory bank and calibration that follow. With --images N only the first N train/good images are
used (a CSV manifest of them) and the full epoch is extrapolated from seconds per step: the step
count of a full epoch is known (steps_per_epoch), and every step costs the same.

It also times in-process training steps in fp32 and in bf16 autocast, the measurement behind
training.training_precision (bf16 on CPUs with native bf16, fp32 elsewhere).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from promptad import fit  # noqa: E402
from promptad.cli import build_parser  # noqa: E402
from promptad.datasets import load_samples  # noqa: E402
from promptad.model import ModelConfig, PromptAD  # noqa: E402
from promptad.pipeline import load_images, split_holdout  # noqa: E402
from promptad.training import TrainConfig, iterate_batches, make_optimizer, steps_per_epoch, train_epoch  # noqa: E402


def cpu_precision_steps(images: np.ndarray, category: str, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per in-process training step (batch 8, one thread like a 0.5-CPU worker), fp32 vs
    bf16 autocast, in alternating rounds so that a change in machine load hits both alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    setups = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=[category]))
        cfg = TrainConfig(epochs=1, precision=precision)
        opt, sched = make_optimizer(model.trainable, cfg, 100)
        setups[precision] = (model, cfg, opt, sched)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):  # round 0 warms up
        for precision in ("fp32", "bf16") if r % 2 else ("bf16", "fp32"):
            model, cfg, opt, sched = setups[precision]
            batches = iterate_batches(images[:16], [category] * 16, 8, np.random.default_rng(r))
            t0 = time.perf_counter()
            train_epoch(model.trainable, batches, opt, sched, None, cfg, r, 0, model.handcrafted, torch.device("cpu"))
            if r:
                times[precision].append(round((time.perf_counter() - t0) / 2, 2))
    torch.set_num_threads(threads)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets"))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--images", type=int, default=0, help="use the first N train/good images and extrapolate")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    samples = [s for s in load_samples(args.data, [args.category], "train") if s.label == 0]
    n_total = len(samples)
    n_fit_full = len(split_holdout(n_total, fit.HOLDOUT_FRACTION, 0)[0])
    work = tempfile.mkdtemp(prefix="train_speed_")
    data = args.data
    if args.images:
        samples = samples[: args.images]
        data = os.path.join(work, "subset.csv")
        with open(data, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "category", "label"])
            w.writerows([s.path, args.category, 0] for s in samples)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), {gpu}",
                    "load_average_before": os.getloadavg(),
                    "category": args.category, "train_good_images": n_total, "images_used": len(samples),
                    "runs": []}
    precision_images = load_images(samples[:16], 256)
    report["cpu_seconds_per_step"] = cpu_precision_steps(precision_images, args.category)
    print("in-process seconds/step:", report["cpu_seconds_per_step"], flush=True)

    ray.init(include_dashboard=False, log_to_driver=True)
    for workers in [int(w) for w in args.workers.split(",")]:
        out = os.path.join(work, f"model_{workers}")
        t0 = time.perf_counter()
        summary = fit.run(build_parser().parse_args(
            ["fit", "--data", data, "--category", args.category, "--out", out, "--workers", str(workers),
             "--epochs", "1"]))
        wall = time.perf_counter() - t0
        m = summary.metrics
        per_step = m["seconds"] / m["steps"]
        full_steps = steps_per_epoch(n_fit_full, 8, workers)
        run = {"workers": workers, "threads_per_worker": m["threads"], "steps": int(m["steps"]),
               "epoch_seconds_measured": round(m["seconds"], 1), "seconds_per_step": round(per_step, 2),
               "full_epoch_steps": full_steps, "full_epoch_seconds": round(per_step * full_steps, 1),
               "extrapolated": bool(args.images), "fit_wall_seconds": round(wall, 1)}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
