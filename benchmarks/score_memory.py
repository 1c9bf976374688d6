"""Peak memory of a whole scoring job (issue 4, benchmark b): driver + every Ray process, for N and
SCALE x N images. Streaming means the second peak is about the first (target ratio <= 1.15).

Each job is `python jobs/score.py ... --address local` in its own session, so the processes of
that session are exactly the job: the driver, the Ray it starts (GCS, raylet, object store) and
every worker. They are sampled every 0.5 s from /proc; the figure is the peak of the summed PSS
(shared pages such as the object store counted once, split across the processes that map them);
summed RSS is printed too.

    .venv/bin/python benchmarks/score_memory.py [--images 500] [--scale 10] [--model ARTIFACT]

The larger run lists the same magnetic_tile images SCALE times under distinct image_ids (read in
place, never copied).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_throughput import dataset_images, fit_model, machine, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def session_pids(session: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == session:
                    pids.append(int(name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def session_memory(session: int) -> tuple[int, int, int]:
    """(summed PSS, summed RSS, process count) of the processes in `session`, in bytes."""
    pss = rss = count = 0
    for pid in session_pids(session):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("Pss:", "Rss:")))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if fields:
            pss += int(fields["Pss"].split()[0]) * 1024
            rss += int(fields["Rss"].split()[0]) * 1024
            count += 1
    return pss, rss, count


def run_job(model: str, manifest: str, out: str, batch_size: int) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", model, "--input", manifest, "--output", out,
           "--batch-size", str(batch_size), "--address", "local"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak = {"pss": 0, "rss": 0, "procs": 0}
    while proc.poll() is None:
        pss, rss, count = session_memory(proc.pid)
        peak = {"pss": max(peak["pss"], pss), "rss": max(peak["rss"], rss), "procs": max(peak["procs"], count)}
        time.sleep(0.5)
    reader.join()
    _kill_leftovers(proc.pid)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    return {**peak, "seconds": time.perf_counter() - start, "summary": [s.strip() for s in lines if "score: done" in s]}


def _kill_leftovers(session: int) -> None:
    """Processes the job left behind in its own session (none normally; Ray shuts itself down)."""
    for pid in session_pids(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="score-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or fit_model(workdir)
    paths = dataset_images(args.images)
    results = {}
    for copies in (1, args.scale):
        n = len(paths) * copies
        manifest = write_manifest(paths, str(workdir / f"inputs-{n}.parquet"), copies)
        results[n] = run_job(model, manifest, str(workdir / f"out-{n}"), args.batch_size)

    small, large = (results[k] for k in sorted(results))
    print(f"\n## score_memory {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"- command: {' '.join(sys.argv)}")
    for n, r in sorted(results.items()):
        print(f"- {n} images: peak PSS {r['pss'] / 2**20:.0f} MiB, peak RSS sum {r['rss'] / 2**20:.0f} MiB, "
              f"up to {r['procs']} processes, {r['seconds']:.0f} s; {' '.join(r['summary'])}")
    print(f"- ratio {max(results)}/{min(results)} images: PSS {large['pss'] / small['pss']:.2f}, "
          f"RSS {large['rss'] / small['rss']:.2f} (target <= 1.15)")


if __name__ == "__main__":
    main()
