"""Quality per training epoch, to choose TrainConfig.epochs from measurements.

    python benchmarks/epoch_curve.py --data ../shared/datasets --category magnetic_tile \
        [--epochs 1,2,4,8] [--train-limit 200] [--json out.json]

Runs benchmarks/quality.py (without the reference) once per epoch count, each a separate fit with
the same seed and data, and prints one row per count: the full model's and the memory-only
variant's I-AUROC / P-AUROC / AUPRO and the fit time. Memory-only does not depend on the epochs;
it is the row the learned parts have to beat; "model without global" is the model's image AUROC
with the global branch's weight set to 0 (the head's effect alone).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--epochs", default="1,2,4,8")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in (int(e) for e in args.epochs.split(",")):
            out = Path(tmp) / f"e{epochs}.json"
            cmd = [sys.executable, str(HERE / "quality.py"), "--data", args.data, "--category", args.category,
                   "--epochs", str(epochs), "--no-reference", "--no-whole-image", "--json", str(out)]
            if args.train_limit:
                cmd += ["--train-limit", str(args.train_limit)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            rows.append({"epochs": epochs, "model": r["model"], "memory_only": r["memory_only"],
                         "timings": r.get("timings", {})})
            m, b = r["model"], r["memory_only"]
            print(f"epochs {epochs:2d}  model {m['image_auroc']:.4f} (without global "
                  f"{m['image_auroc_without_global']:.4f}) / {m.get('pixel_auroc') or float('nan'):.4f} / "
                  f"{m.get('aupro') or float('nan'):.4f}  memory-only {b['image_auroc']:.4f} / "
                  f"{b.get('pixel_auroc') or float('nan'):.4f} / {b.get('aupro') or float('nan'):.4f}  "
                  f"fit {m['fit_s']:.1f}s (training {r.get('timings', {}).get('training', float('nan')):.1f}s)",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"category": args.category, "train_limit": args.train_limit,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
