"""Planning at archive scale (issue 38; issue 11 before it): `promptad score --dry-run` and a
real run's plan against an output that holds HISTORY rows, with a manifest of HISTORY + NEW inputs
of which CHANGED have a new version and ERRORS were read errors (to retry); then `promptad compact`
of COMPACT rows written as score writes them (512-row files, a year of nights' worth of files).

Targets (issue 38): at 10,000,000 rows of history and a 10,500,000-row manifest, the dry run and
the real run's plan within 60 s and 2 GB of driver memory, and the same at 1,000,000 rows of
history no more than about 1.5x faster.

    .venv/bin/python benchmarks/score_plan.py --history 10000000 --workdir /tmp/bp38-10m [--model ARTIFACT]
        [--new 500000 --changed 1000 --errors 1000] [--per-file 13000] [--compact 1000000] [--no-run]

The generated data is kept in --workdir and reused by the next call with the same sizes (10 M rows
take minutes to write). The images do not exist (planning never reads them): a real run's rows
would be `read: not found` rows; it is killed once its first file is committed. The output is the
layout compaction leaves: files of --per-file rows (13,000 rows of ~10 KB, a real map as PNG, are
128 MB, compact.TARGET_MB), OUTPUT_SCHEMA, with a 64-byte stand-in for each map (planning reads no
map). The compaction part writes COMPACT rows in 512-row files (rows_per_file(128), the most a
commit holds) and compacts them with a target of 13,000 such rows. Each command runs as its own
process (the console script); its peak RSS comes from wait4.
"""
from __future__ import annotations

import argparse
import json
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from promptad.models import artifact  # noqa: E402
from promptad.score.output import OUTPUT_SCHEMA, listing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTAD = Path(sys.executable).with_name("promptad")
# Measures a command's peak RSS from a small parent: a child forked from this process (which holds
# torch after fitting the model) would report this process's RSS as its own peak.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, r = os.wait4(p.pid, 0); "
            "sys.stderr.write(f'\\npeak_rss_kib {r.ru_maxrss} cpu_s {r.ru_utime + r.ru_stime:.1f}\\n'); "
            "sys.exit(os.waitstatus_to_exitcode(s))")


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


def _ids(start: int, stop: int) -> pa.Array:
    return pc.binary_join_element_wise("img", pc.cast(pa.array(np.arange(start, stop)), pa.string()), "")


def write_manifest(path: Path, history: int, new: int, changed: int) -> None:
    """image_id, path (relative, 100 folders), version: "v1", and "v2" for `changed` of the history
    rows spread over it (they were scored at v1)."""
    rows = history + new
    ids = _ids(0, rows)
    folders = pc.binary_join_element_wise("images/line", pc.cast(pa.array(np.arange(rows) % 100), pa.string()), "")
    paths = pc.binary_join_element_wise(folders, pc.binary_join_element_wise(ids, ".png", ""), "/")
    step = max(1, history // max(changed, 1))
    version = np.full(rows, "v1", object)
    version[np.arange(0, history, step)[:changed]] = "v2"
    pq.write_table(pa.table({"image_id": ids, "path": paths, "version": pa.array(version, pa.string())}), path)


def write_output(out: Path, base: str, rows: int, errors: int, model_id: str, per_file: int, prefix: str) -> int:
    """`rows` scored rows (image ids 0..rows-1, version v1, run_seq 1), `errors` of them `read:`
    errors spread over them, `per_file` rows per file; returns files written."""
    out.mkdir(parents=True, exist_ok=True)
    when = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)
    step = max(1, rows // max(errors, 1))
    files = 0
    for start in range(0, rows, per_file):
        stop = min(rows, start + per_file)
        n = stop - start
        ids = _ids(start, stop)
        k = np.arange(start, stop)
        failed = ((k % step) == 1) & (k // step < errors)
        error = pa.array(np.where(failed, "read: timeout", None), pa.string())
        folders = pc.binary_join_element_wise(base + "/images/line", pc.cast(pa.array(k % 100), pa.string()), "")
        cols = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
        names = pc.binary_join_element_wise(ids, ".png", "")
        cols.update(image_id=ids, path=pc.binary_join_element_wise(folders, names, "/"),
                    category=pa.array(["tile"] * n), score=pa.array(np.where(failed, np.nan, 1.0), pa.float32(),
                                                                        mask=failed),
                    error=error, source_version=pa.array(["v1"] * n), map_png=pa.array([b"\x89PNG" + b"\0" * 60] * n),
                    model_id=pa.array([model_id] * n), run_id=pa.array(["generated"] * n),
                    scored_at=pa.array([when] * n, pa.timestamp("us", tz="UTC")), run_seq=pa.array([1] * n, pa.int64()))
        pq.write_table(pa.table([cols[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA),
                       out / f"{prefix}-{start // per_file:07d}.parquet")
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
    hwm = float("nan")
    if stop_after is not None and first_file is not None:
        try:
            proc.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            new_files = len({n for n in os.listdir(watch_out) if n.endswith(".parquet")} - before)
            hwm = _driver_hwm(proc.pid)
            _kill_leftovers(proc.pid)
    proc.wait()
    seconds = time.perf_counter() - start
    for r in readers:
        r.join()
    _kill_leftovers(proc.pid)
    stderr = "".join(err)
    peak = [int(line.split()[1]) * 1024 for line in stderr.splitlines() if line.startswith("peak_rss_kib ")]
    cpu = [float(line.split()[3]) for line in stderr.splitlines() if line.startswith("peak_rss_kib ")]
    return {"seconds": seconds, "peak_rss": peak[-1] if peak else hwm, "cpu": cpu[-1] if cpu else float("nan"),
            "rc": proc.returncode,
            "stdout": "".join(out), "stderr": stderr, "first_file": first_file, "new_files": new_files}


def _driver_hwm(launcher: int) -> float:
    """Peak RSS (VmHWM) so far of the launcher's child, the command's driver, before it is killed."""
    try:
        with open(f"/proc/{launcher}/task/{launcher}/children") as f:
            child = int(f.read().split()[0])
        with open(f"/proc/{child}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, IndexError, ValueError, StopIteration):
        return float("nan")


def _kill_leftovers(session: int) -> None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == session:
                    os.kill(int(name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def build(workdir: Path, args, model_id: str) -> dict:
    """The manifest and the output (reused when the sizes match)."""
    spec = {"history": args.history, "new": args.new, "changed": args.changed, "errors": args.errors,
            "per_file": args.per_file, "model_id": model_id}
    marker = workdir / "built.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    import shutil

    shutil.rmtree(workdir / "out", ignore_errors=True)
    t = time.perf_counter()
    write_manifest(workdir / "manifest.parquet", args.history, args.new, args.changed)
    files = write_output(workdir / "out", str(workdir), args.history, args.errors, model_id, args.per_file, "part-c")
    done = {"spec": spec, "files": files, "seconds": round(time.perf_counter() - t)}
    marker.write_text(json.dumps(done))
    return done


def compaction(workdir: Path, rows: int, model_id: str) -> dict:
    """`rows` in 512-row files as nightly commits leave them, then `promptad compact` with a
    target of 13,000 such rows (what 128 MB holds of real rows)."""
    import shutil

    out = workdir / f"nightly-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    files = write_output(out, str(workdir), rows, 0, model_id, 512, "part-n")
    sizes = listing(str(out))[0]
    per_row = sum(sizes.values()) / rows
    target_mb = 13_000 * per_row / 2**20
    res = run([str(PROMPTAD), "compact", "--output", str(out), "--target-mb", f"{target_mb:.3f}"])
    assert res["rc"] == 0, res["stderr"][-2000:]
    after = listing(str(out))[0]
    again = run([str(PROMPTAD), "compact", "--output", str(out), "--target-mb", f"{target_mb:.3f}"])
    return {"files": files, "after": len(after), "bytes": sum(after.values()), "target_mb": target_mb, "res": res,
            "again": again, "again_after": len(listing(str(out))[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--new", type=int, default=500_000)
    p.add_argument("--changed", type=int, default=1_000)
    p.add_argument("--errors", type=int, default=1_000)
    p.add_argument("--per-file", type=int, default=13_000)
    p.add_argument("--compact", type=int, default=0, help="rows of the compaction part (default: none)")
    p.add_argument("--model", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-run", action="store_true", help="only the dry run")
    p.add_argument("--repeat", type=int, default=1, help="dry runs; the fastest is reported (default: 1)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="score-plan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or (str(workdir / "model") if (workdir / "model" / "promptad.json").exists()
                           else tiny_model(workdir))
    model_id = artifact.read_manifest(model)["model_id"]
    built = build(workdir, args, model_id)
    out = workdir / "out"
    print(f"data: {args.history:,} rows in {built['files']:,} files, manifest {args.history + args.new:,} rows "
          f"(built in {built['seconds']} s, {workdir})", flush=True)
    load = os.getloadavg()[0]
    base = [str(PROMPTAD), "score", "--model", model, "--input", str(workdir / "manifest.parquet"),
            "--output", str(out)]
    tries = [run([*base, "--dry-run"]) for _ in range(args.repeat)]
    assert all(t["rc"] == 0 for t in tries), tries[-1]["stderr"][-2000:]
    dry = min(tries, key=lambda t: t["seconds"])
    real = None
    if not args.no_run:
        before = {n for n in os.listdir(out) if n.endswith(".parquet")}
        real = run([*base, "--address", "local", "--run-id", "bench"], watch_out=out, before=before, stop_after=0.0)
        for name in {n for n in os.listdir(out) if n.endswith(".parquet")} - before:
            os.remove(out / name)  # the killed run's files: the next call starts from the same data
    comp = compaction(workdir, args.compact, model_id) if args.compact else None
    load_end = os.getloadavg()[0]

    print(f"\n## score_plan {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"- command: {' '.join(sys.argv)}; load average {load:.1f} at the start, {load_end:.1f} at the end")
    print(f"- output: {args.history:,} rows in {built['files']:,} files of {args.per_file:,}; manifest "
          f"{args.history + args.new:,} rows ({args.new:,} new, {args.changed:,} changed, {args.errors:,} read errors)")
    print(f"- dry run (fastest of {args.repeat}): {dry['seconds']:.1f} s ({dry['cpu']:.1f} s of CPU), peak RSS "
          f"{_mib(dry['peak_rss'])}; all: " + ", ".join(f"{t['seconds']:.1f} s / {t['cpu']:.1f} s CPU" for t in tries))
    for line in dry["stdout"].splitlines()[1:10]:
        print(f"    {line.strip()}")
    if real is not None:
        planned = [line for line in real["stderr"].splitlines() if "planned in" in line]
        print(f"- real run: first new file after {real['first_file'] or float('nan'):.1f} s, then killed; "
              f"driver peak RSS {_mib(real['peak_rss'])}")
        print(f"    {planned[0].strip() if planned else real['stderr'][-800:]}")
    if comp is not None:
        r = comp["res"]
        print(f"- compact: {args.compact:,} rows in {comp['files']:,} files of 512 -> {comp['after']:,} files "
              f"(target {comp['target_mb']:.2f} MB = 13,000 rows; {_mib(comp['bytes'])} in all) "
              f"in {r['seconds']:.1f} s "
              f"({r['cpu']:.1f} s of CPU), "
              f"peak RSS {_mib(r['peak_rss'])}; again: {comp['again']['seconds']:.1f} s, {comp['again_after']:,} files")
        print(f"    {r['stdout'].strip()}")


if __name__ == "__main__":
    main()
