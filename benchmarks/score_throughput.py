"""Scoring throughput (issue 4, benchmarks a and c): the Ray Data job vs a plain in-process loop
with the same model, batch size and images, plus output bytes per image.

The plain loop runs the pipeline's own stage functions (read_and_decode, Predictor,
postprocess_and_commit) one after the other in this process, so the ratio measures what Ray adds
or costs, not a different implementation. It runs before Ray starts and again after Ray is shut
down, and the ratio uses the mean of the two, so load that drifts during the run (a shared
machine) weighs on both sides alike; the load averages are printed with the figures.

    .venv/bin/python benchmarks/score_throughput.py [--images 500] [--batch-size 16]
        [--model ARTIFACT] [--gpus-per-actor 1]      # GPU: plain loop on cuda too, fp16 both ways
        [--json PATH]                                # the figures as JSON too (benchmarks/gpu_check.py)

Without --model, an effnet-lite0 model is fitted (1 epoch, 32 images) into --workdir first.
Images are read in place from ../shared/datasets/magnetic_tile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from promptad.actors import ModelActors  # noqa: E402
from promptad.data import storage  # noqa: E402
from promptad.models import artifact  # noqa: E402
from promptad.score import command as score  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


def dataset_images(n: int) -> list[str]:
    """The first n train/test images of magnetic_tile (masks excluded), sorted: the same for every run."""
    paths = [p for p in storage.list_files(str(DATA), storage.IMAGE_EXTENSIONS) if "/ground_truth/" not in p]
    if len(paths) < n:
        raise SystemExit(f"only {len(paths)} images under {DATA}")
    return paths[:n]


def fit_model(workdir: Path) -> str:
    """A small effnet-lite0 model (default input size) for benchmarks: speed does not depend on training."""
    from promptad.data.datasets import mvtec_samples
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.model import ModelConfig

    train = mvtec_samples(str(DATA.parent), "magnetic_tile", "train")[:32]
    model = fit_in_process({"magnetic_tile": load_images(train, 256)}, ModelConfig(backbone="effnet-lite0"),
                           TrainConfig(epochs=1, batch_size=8), log=None)
    uri = str(workdir / "model")
    artifact.save_artifact(model, uri)
    return uri


def write_manifest(paths: list[str], uri: str, copies: int = 1) -> str:
    """A Parquet manifest listing `paths` `copies` times under distinct image_ids."""
    rows = [(f"{k:07d}", paths[k % len(paths)]) for k in range(len(paths) * copies)]
    pq.write_table(pa.table({"image_id": [r[0] for r in rows], "path": [r[1] for r in rows]}), uri)
    return uri


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cpus} CPUs, {mem:.0f} GiB RAM"


def plain_loop(model_uri: str, paths: list[str], out: str, batch_size: int, pool: ModelActors) -> float:
    """Seconds for the in-process loop (model load excluded, as the Ray figure's steady state excludes it),
    its model built as the pool's actors build theirs (device, threads, precision)."""
    manifest = artifact.read_manifest(model_uri)
    size, cats = int(manifest["model"]["input_size"]), list(manifest["categories"])
    cal = artifact.read_calibration(manifest)
    predictor = score.Predictor(model_uri, **pool.constructor_args())
    table = pa.table({"image_id": paths, "path": paths, "category": [cats[0]] * len(paths)})
    per_file = score.rows_per_file(batch_size)
    start = time.perf_counter()
    for f in range(0, len(paths), per_file):
        chunk = table.slice(f, per_file)
        parts = [predictor(score.read_and_decode(chunk.slice(b, batch_size), size, cats))
                 for b in range(0, chunk.num_rows, batch_size)]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        score.postprocess_and_commit(merged, out, cal, manifest["model_id"], "plain")
    return time.perf_counter() - start


def steady_rate(out: str) -> tuple[float, int]:
    """rows/s between the first and the last committed file (startup excluded), and files seen."""
    t = pq.read_table(out, columns=["scored_at"])["scored_at"].to_pylist()
    stamps = sorted(set(t))
    first_rows = t.count(stamps[0])
    span = (stamps[-1] - stamps[0]).total_seconds()
    return ((len(t) - first_rows) / span if span > 0 else float("nan")), len(stamps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--model", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="score-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_uri = args.model or fit_model(workdir)
    paths = dataset_images(args.images)
    pool = ModelActors(args.actors, args.cpus_per_actor, args.gpus_per_actor)  # the actors', on both sides
    device, threads = pool.device, pool.threads
    n = len(paths)

    load0 = os.getloadavg()[0]
    plain_before = plain_loop(model_uri, paths, str(workdir / "plain-before"), args.batch_size, pool)
    load1 = os.getloadavg()[0]

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    manifest = write_manifest(paths, str(workdir / "inputs.parquet"))
    out = str(workdir / "ray")
    start = time.perf_counter()
    summary = score.score(model_uri, manifest, out, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                          cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size)
    ray_s = time.perf_counter() - start
    load2 = os.getloadavg()[0]
    ray.shutdown()
    plain_after = plain_loop(model_uri, paths, str(workdir / "plain-after"), args.batch_size, pool)
    load3 = os.getloadavg()[0]
    plain_s = (plain_before + plain_after) / 2
    assert summary.scored == n and summary.errors == 0, summary
    steady, files = steady_rate(out)
    plain_rate, ray_rate = n / plain_s, n / ray_s
    out_bytes = sum(os.path.getsize(f) for f in score.committed_files(out))

    print(f"\n## score_throughput {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, device {device}")
    print(f"- command: {' '.join(sys.argv)}")
    print(f"- model {summary.model_id} (effnet-lite0, input {artifact.read_manifest(model_uri)['model']['input_size']}),"
          f" {n} magnetic_tile images, batch {args.batch_size}, {args.actors} actor(s), {threads} torch thread(s)")
    print(f"- plain loop: {plain_before:.1f} s before Ray (load avg {load0:.1f} -> {load1:.1f}), {plain_after:.1f} s "
          f"after (load avg {load3:.1f}); mean {plain_rate:.2f} img/s")
    print(f"- Ray Data job, end to end (actor start, artifact load, {files} files): {ray_s:.1f} s, "
          f"{ray_rate:.2f} img/s (load avg {load2:.1f})")
    print(f"- Ray Data job, steady state (first to last committed file): {steady:.2f} img/s")
    print(f"- ratio Ray/plain: end to end {ray_rate / plain_rate:.2f}, steady state {steady / plain_rate:.2f}"
          " (target >= 0.85)")
    print(f"- output: {out_bytes / n / 1024:.1f} KiB per image ({out_bytes / 2**20:.1f} MiB for {n} rows)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device, "images": n, "batch_size": args.batch_size, "actors": args.actors, "threads": threads,
            "plain_img_s": plain_rate, "ray_img_s": ray_rate, "steady_img_s": steady,
            "ratio": ray_rate / plain_rate, "steady_ratio": steady / plain_rate}, indent=1))


if __name__ == "__main__":
    main()
