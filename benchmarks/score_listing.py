"""Listing an S3 prefix at scale (issue 38): storage.list_versions, page by page into Arrow, against
the s3fs `find` it replaced (every object's info dict in memory at once), on moto's loopback S3.

    .venv/bin/python benchmarks/score_listing.py [--objects 2000,20000]

Per size: wall time and peak memory of each listing (Python's, from tracemalloc, plus Arrow's pool
peak), run in a fresh process each so that one does not inherit the other's heap. moto holds
every object in memory, so the loopback store stops at tens of thousands; the per-object figures
are what scale to 10,000,000 (RESULTS.md argues it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEASURE = """
import json, sys, time, tracemalloc
import pyarrow as pa
from promptad.data import s3, storage
how, uri = sys.argv[1], sys.argv[2]
tracemalloc.start()
t = time.perf_counter()
if how == "paged":
    n = storage.list_versions(uri, storage.IMAGE_EXTENSIONS).num_rows
else:  # the listing before issue 38: s3fs find, every object's info dict at once
    found = s3.s3fs_for(False).find(uri[len("s3://"):], detail=True)
    n = len([i for i in found.values() if i.get("type") == "file"])
seconds = time.perf_counter() - t
print(json.dumps({"n": n, "seconds": seconds, "python_peak": tracemalloc.get_traced_memory()[1],
                  "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", default="2000,20000")
    args = p.parse_args()
    import boto3
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    os.environ.update(env)
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    s3.create_bucket(Bucket="archive")
    done = 0
    results = []
    for total in sorted(int(x) for x in args.objects.split(",")):
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket="archive", Key=f"line{i % 100:02d}/img{i:08d}.png",
                                                  Body=b"x"), range(done, total)))
        done = total
        put = time.perf_counter() - t
        for how in ("paged", "find"):
            out = subprocess.run([sys.executable, "-c", MEASURE, how, "s3://archive"], env=env, capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append((total, how, r))
            print(f"{total:>8,} objects ({put:.0f} s to put): {how:5s} {r['seconds']:6.1f} s, Python peak "
                  f"{r['python_peak'] / 2**20:7.1f} MiB ({r['python_peak'] / total:,.0f} B/object), Arrow peak "
                  f"{r['arrow_peak'] / 2**20:6.1f} MiB ({r['arrow_peak'] / total:,.0f} B/object)", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
