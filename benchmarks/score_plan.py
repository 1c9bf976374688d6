"""Planning at scale (issue 11): `promptad score --dry-run` over a 1,000,000-row Parquet manifest,
against an empty output and against one that already holds 900,000 of its rows; then the real run
against the latter, timed until it starts scoring (its first new file is committed) and to the end.

Targets: dry run vs an empty output under 60 s and 2 GB peak memory; the real run with 900,000
rows done starts scoring within 2 minutes.

    .venv/bin/python benchmarks/score_plan.py [--rows 1000000] [--done 900000] [--model ARTIFACT]
        [--workdir DIR] [--no-run]

The images need not exist for planning: the manifest lists relative paths under images/ that are
not there, so the real run's rows become `read: not found` error rows (it measures the plan,
Ray's start and the pipeline's overhead per row, not the model). The output is generated as score
writes it: files of rows_per_file(16) = 64 rows, OUTPUT_SCHEMA, each row with a 64-byte stand-in
for map_png (a real map is ~9.6 KiB; planning never reads that column). Each command runs as its own
process (`promptad score`, the console script); its peak RSS comes from wait4.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from promptad.models import artifact
from promptad.score import command as score  # noqa: E402
from promptad.score.output import OUTPUT_SCHEMA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTAD = Path(sys.executable).with_name("promptad")
# Measures a command's peak RSS from a small parent: a child forked from this process (which holds
# torch after fitting the model) would report this process's RSS as its own peak.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, r = os.wait4(p.pid, 0); "
            "sys.stderr.write(f'\\npeak_rss_kib {r.ru_maxrss}\\n'); sys.exit(os.waitstatus_to_exitcode(s))")


def machine() -> str:
    import platform

    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cpus} CPUs, {mem:.0f} GiB RAM"


def tiny_model(workdir: Path) -> str:
    """A 1-epoch effnet-lite0 model at 64 px on generated images: planning does not depend on it."""
    from promptad.data.datasets import load_samples
    from promptad.demo import make_dataset
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.model import ModelConfig

    data = make_dataset(workdir / "data", size=64, n_train=8, n_test_good=1, n_test_defect=1)
    images = {"tile": load_images(load_samples(str(data), ["tile"], "train"), 64)}
    model = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=64),
                           TrainConfig(epochs=1, batch_size=4), log=None)
    uri = str(workdir / "model")
    artifact.save_artifact(model, uri)
    return uri


def write_manifest(path: Path, rows: int) -> None:
    """image_id, path: 100 folders of relative image paths (resolved against the manifest's folder)."""
    ids = pc.binary_join_element_wise("img", pc.cast(pa.array(range(rows), pa.int64()), pa.string()), "")
    folders = pc.binary_join_element_wise("images/line", pc.cast(pa.array([i % 100 for i in range(rows)]), pa.string()),
                                          "")
    paths = pc.binary_join_element_wise(folders, pc.binary_join_element_wise(ids, ".png", ""), "/")
    pq.write_table(pa.table({"image_id": ids, "path": paths}), path)


def write_output(out: Path, manifest: Path, done: int, model_id: str, per_file: int) -> int:
    """The first `done` manifest rows as scored rows, `per_file` rows per file; returns files written."""
    out.mkdir(parents=True, exist_ok=True)
    m = pq.read_table(manifest).slice(0, done)
    base = str(manifest.parent)
    when = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)
    files = 0
    for start in range(0, done, per_file):
        chunk = m.slice(start, per_file)
        n = chunk.num_rows
        cols = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
        cols.update(image_id=chunk["image_id"].combine_chunks(),
                    path=pc.binary_join_element_wise(base, chunk["path"], "/").combine_chunks(),
                    category=pa.array(["tile"] * n), score=pa.array([1.0] * n, pa.float32()),
                    score_norm=pa.array([0.3] * n, pa.float32()), is_anomalous=pa.array([False] * n),
                    threshold=pa.array([2.0] * n, pa.float32()), map_png=pa.array([b"\x89PNG" + b"\0" * 60] * n),
                    model_id=pa.array([model_id] * n), run_id=pa.array(["generated"] * n),
                    scored_at=pa.array([when] * n, pa.timestamp("us", tz="UTC")))
        pq.write_table(pa.table([cols[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA),
                       out / f"part-{start // per_file:07d}.parquet")
        files += 1
    return files


def run(cmd: list[str], watch_out: Path | None = None, before: set[str] | None = None,
        stop_after: float | None = None) -> dict:
    """Run a command in its own session; wall time, peak RSS (wait4 in LAUNCHER), output, and (with
    watch_out) seconds until a file not in `before` is committed there; with stop_after, the
    command is killed that many seconds after that file (how many new files it had by then too)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for r in readers:
        r.start()
    first_file = None
    if watch_out is not None:
        while proc.poll() is None and first_file is None:
            try:
                names = {n for n in os.listdir(watch_out) if n.endswith(".parquet")}
            except FileNotFoundError:
                names = set()
            if names - before:
                first_file = time.perf_counter() - start
            time.sleep(0.5)
    new_files = None
    if stop_after is not None and first_file is not None:
        try:
            proc.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            new_files = len({n for n in os.listdir(watch_out) if n.endswith(".parquet")} - before)
            _kill_leftovers(proc.pid)
    proc.wait()
    seconds = time.perf_counter() - start
    for r in readers:
        r.join()
    _kill_leftovers(proc.pid)
    stderr = "".join(err)
    peak = [int(line.split()[1]) * 1024 for line in stderr.splitlines() if line.startswith("peak_rss_kib ")]
    return {"seconds": seconds, "peak_rss": peak[-1] if peak else float("nan"), "rc": proc.returncode,
            "stdout": "".join(out), "stderr": stderr, "first_file": first_file, "new_files": new_files}


def _kill_leftovers(session: int) -> None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == session:
                    os.kill(int(name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--done", type=int, default=900_000)
    p.add_argument("--model", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-run", action="store_true", help="only the two dry runs")
    p.add_argument("--run-for", type=float, default=60.0,
                   help="seconds the real run goes on after its first file before it is killed (default: %(default)s)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="score-plan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or tiny_model(workdir)
    model_id = artifact.read_manifest(model)["model_id"]
    manifest = workdir / "manifest.parquet"
    t = time.perf_counter()
    write_manifest(manifest, args.rows)
    per_file = score.rows_per_file(16)
    partial = workdir / "out-partial"
    files = write_output(partial, manifest, args.done, model_id, per_file)
    print(f"generated {args.rows:,}-row manifest and {args.done:,} rows in {files:,} files in "
          f"{time.perf_counter() - t:.0f} s ({workdir})", flush=True)
    load = os.getloadavg()[0]
    base = [str(PROMPTAD), "score", "--model", model, "--input", str(manifest)]
    empty = run([*base, "--output", str(workdir / "out-empty"), "--dry-run"])
    assert empty["rc"] == 0, empty["stderr"][-2000:]
    resumed = run([*base, "--output", str(partial), "--dry-run"])
    assert resumed["rc"] == 0, resumed["stderr"][-2000:]
    real = None
    if not args.no_run:
        before = {n for n in os.listdir(partial) if n.endswith(".parquet")}
        real = run([*base, "--output", str(partial), "--address", "local"], watch_out=partial, before=before,
                   stop_after=args.run_for)
    load_end = os.getloadavg()[0]

    print(f"\n## score_plan {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"- command: {' '.join(sys.argv)}; load average {load:.1f} at the start, {load_end:.1f} at the end")
    print(f"- manifest {args.rows:,} rows (relative paths in 100 folders, no version column); output "
          f"{args.done:,} rows in {files:,} files of {per_file}")
    print(f"- dry run, empty output: {empty['seconds']:.1f} s, peak RSS {empty['peak_rss'] / 2**20:.0f} MiB "
          "(target: under 60 s and 2 GB)")
    print(f"- dry run, {args.done:,} done: {resumed['seconds']:.1f} s, peak RSS {resumed['peak_rss'] / 2**20:.0f} MiB")
    for line in resumed["stdout"].splitlines()[1:8]:
        print(f"    {line.strip()}")
    if real is not None:
        planned = [line for line in real["stderr"].splitlines() if "planned in" in line]
        ended = (f"killed {args.run_for:g} s after it, with {real['new_files']:,} new files of {per_file} rows"
                 if real["new_files"] is not None else f"whole run {real['seconds']:.0f} s, rc {real['rc']}, "
                 f"driver peak RSS {real['peak_rss'] / 2**20:.0f} MiB")
        print(f"- real run, {args.done:,} done: first new file committed after {real['first_file'] or float('nan'):.1f} s "
              f"(target: scoring starts within 120 s); {ended}")
        print(f"    {planned[0].strip() if planned else real['stderr'][-500:]}")
        for line in real["stdout"].splitlines():
            print(f"    {line.strip()}")


if __name__ == "__main__":
    main()
