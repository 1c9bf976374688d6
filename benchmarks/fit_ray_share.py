"""Ray's share of a fit (issue 37, item 6): the real `promptad fit` command, start-up included,
against the same steps in one process (pipeline.fit_in_process, as quality.py times them).

    .venv/bin/python benchmarks/fit_ray_share.py [--data ../shared/datasets] [--category magnetic_tile] \
        [--skip-in-process] [--json out.json]

First the in-process steps in this process: decode, then fit_in_process (features, memory,
evidence rows, training, calibration) at the defaults, timed per step. Then the command as a
user runs it, `promptad fit --data D --category C --out TMP`, in a process of its own that
starts its own local Ray; its wall time from the shell, and each console line stamped with the
seconds since the command started, so that the gaps between its stages show where Ray's time goes.
Prints both, the ratio (command / in-process) and the model_id the command wrote.
"""
from __future__ import annotations

import argparse
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


def in_process(data: str, category: str) -> dict[str, float]:
    """Seconds of decode + fit_in_process at the defaults (quality.py's fit_s), per step."""
    import torch

    from promptad.data.datasets import load_samples
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.backbones import create_backbone
    from promptad.models.model import ModelConfig

    torch.set_num_threads(os.cpu_count() or 1)
    train = load_samples(data, [category], "train")
    cfg = ModelConfig(backbone="effnet-lite0")
    size = create_backbone(cfg.backbone).input_size
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    images = load_images(train, size)
    timings["decode"] = time.perf_counter() - t0
    fit_in_process({category: images}, cfg, TrainConfig(), log=None, timings=timings)
    timings["fit_s"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in timings.items()}


def command(data: str, category: str) -> dict:
    """The real command's wall time, its console lines stamped with seconds since its start, and
    the model_id it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        cli = Path(sys.executable).with_name("promptad")
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(cli), "fit", "--data", data, "--category", category, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(f"+{time.perf_counter() - t0:6.1f}s  {line.rstrip()}")
            print(lines[-1], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"promptad fit exited with {proc.returncode}")
        wall = time.perf_counter() - t0
        manifest = json.loads((out / "promptad.json").read_text())
    return {"wall_s": round(wall, 1), "model_id": manifest["model_id"], "lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--skip-in-process", action="store_true", help="time the command only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    load = os.getloadavg()
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "category": args.category, "load_before": [round(x, 2) for x in load]}
    if not args.skip_in_process:
        result["in_process"] = in_process(args.data, args.category)
        print(f"in-process steps: {result['in_process']}", flush=True)
    result["command"] = command(args.data, args.category)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    ours = result["command"]["wall_s"]
    if "in_process" in result:
        result["ratio"] = round(ours / result["in_process"]["fit_s"], 3)
    print(f"command {ours:.1f} s (model {result['command']['model_id']})"
          + (f", in-process {result['in_process']['fit_s']:.1f} s, ratio {result['ratio']:.3f}"
             if "ratio" in result else "") + f"; load {result['load_before']} -> {result['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
