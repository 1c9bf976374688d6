"""`promptad fit` at scale (issue 12): the driver's peak memory against the number of images, and
where a fit's wall time goes, for 1 and 2 workers.

    .venv/bin/python benchmarks/fit_scale.py [--data ../shared/datasets] [--category magnetic_tile] \
        [--runs 150:2,1200:2,1200:1] [--epochs 1] [--input-size N] [--json out.json]

A run IMAGES:WORKERS:C also passes --cpus-per-category C (the per-category tasks' CPUs and torch
threads), e.g. `--runs 761:1:0.5,761:1 --epochs 0` compares one-thread tasks with the default.

Each run (IMAGES:WORKERS) is the real command (fit.run: Ray Data decode + feature actors, memory
tasks, evidence tasks, Ray Train, calibration tasks, artifact) in a driver process of its own, connected to
one Ray cluster that a helper process started beforehand, so the driver's peak RSS (VmHWM, read by
the driver itself when it is done) is the driver alone: no raylet, object store or worker of a Ray
it started is counted. Manifests list the category's train/good images in sorted order; past the
761 that magnetic_tile has they are listed again under distinct image_ids (read in place).

Wall time per stage comes from FitSummary.timings: features (decode + extract + index, one
streaming pipeline; decode and extract task-seconds summed over tasks), memory and evidence
(wall from the start of the memory tasks until the last memory, and until the last evidence rows:
the evidence head's views are measured against the memory, and training waits for them), training
(Ray Train), the per-category task-seconds, the wall time from the end of training until every
calibration is in, write.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLUSTER = """
import json, sys
import ray
ctx = ray.init(address="local", include_dashboard=False, num_cpus={cpus})
print(json.dumps({{"address": ctx.address_info["gcs_address"]}}), flush=True)
sys.stdin.read()
"""


def manifest(data: Path, category: str, n: int, path: Path) -> Path:
    """CSV manifest of n train/good images of `category`, repeating the list under new image_ids."""
    images = sorted((data / category / "train" / "good").glob("*.png"))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "image_id", "category"])
        for k in range(n):
            p = images[k % len(images)]
            writer.writerow([str(p), f"{category}/{k // len(images)}/{p.name}", category])
    return path


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(argv: list[str], out: str) -> None:
    """One fit in this process (the driver); writes its timings and peak RSS to `out`."""
    from promptad.cli import build_parser
    from promptad.fit import command as fit

    summary = fit.run(build_parser().parse_args(argv))
    Path(out).write_text(json.dumps({"timings": summary.timings, "peak_rss": peak_rss(),
                                     "model_id": summary.model_id, "metrics": summary.metrics,
                                     "tasks": summary.tasks}))


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cpus} CPUs, {mem:.0f} GiB RAM"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--runs", default="150:2,1200:2,1200:1",
                   help="IMAGES:WORKERS[:CPUS_PER_CATEGORY],... (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--input-size", type=int, default=None, help="default: the backbone's (256 for effnet-lite0)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("ARGV_JSON", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child[0]), args.child[1])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    work = Path(tempfile.mkdtemp(prefix="fit_scale-"))
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER.format(cpus=len(os.sched_getaffinity(0)))],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(work / "ray.log", "w"),
                               text=True, env=env)
    address = json.loads(cluster.stdout.readline())["address"]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}; Ray at {address}; work {work}", flush=True)
    results = []
    try:
        for spec in args.runs.split(","):
            n, workers, *per_category = spec.split(":")
            n, workers = int(n), int(workers)
            data = manifest(Path(args.data), args.category, n, work / f"train-{n}.csv")
            out = work / f"run-{n}-{workers}-{len(results)}"
            argv = ["fit", "--data", str(data), "--category", args.category, "--out", str(out / "model"),
                    "--storage", str(out / "ckpt"), "--workers", str(workers), "--epochs", str(args.epochs),
                    "--address", address] + (["--input-size", str(args.input_size)] if args.input_size else []) \
                + (["--cpus-per-category", per_category[0]] if per_category else [])
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv), str(out) + ".json"],
                                  env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"fit of {n} images, {workers} workers failed:\n{proc.stderr[-3000:]}")
            r = json.loads(Path(str(out) + ".json").read_text()) | {
                "images": n, "workers": workers, "wall": time.time() - t0,
                "cpus_per_category": float(per_category[0]) if per_category else None}
            results.append(r)
            t = r["timings"]
            cpus = f", --cpus-per-category {per_category[0]}" if per_category else ""
            print(f"{n:5d} images, {workers} worker(s){cpus}: driver peak RSS {r['peak_rss'] / 2**20:7.1f} MiB; "
                  f"process wall {r['wall']:6.1f}s, fit {t['total']:6.1f}s = features {t['features']:.1f}s "
                  f"(task-s: decode {t.get('decode_task_s', 0):.1f}, extract {t.get('extract_task_s', 0):.1f}), "
                  f"memory {t.get('memory_wait', 0):.1f}s, evidence {t.get('evidence', 0):.1f}s, "
                  f"training {t['training']:.1f}s, then calibration {t['after_training']:.1f}s "
                  f"(task-s: memory {t['memory_task_s']:.1f}, evidence {t.get('evidence_task_s', 0):.1f}, "
                  f"calibration {t['calibration_task_s']:.1f}), write {t['write']:.1f}s", flush=True)
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
    base = next((r for r in results if r["images"] == min(x["images"] for x in results) and r["workers"] == 2), None)
    for r in results:
        same = [x for x in results if x is not r and x["cpus_per_category"] is not None
                and (x["images"], x["workers"]) == (r["images"], r["workers"])]
        if r["cpus_per_category"] is None and same:
            print(f"fit wall, default / --cpus-per-category {same[0]['cpus_per_category']:g} ({r['images']} images): "
                  f"{r['timings']['total'] / same[0]['timings']['total']:.3f}x")
    for r in results:
        if base and r is not base and r["workers"] == 2:
            print(f"driver peak RSS {r['images']} / {base['images']} images (2 workers): "
                  f"{r['peak_rss'] / base['peak_rss']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
