"""`promptad score`: a Ray Data pipeline around predict.py that writes the Parquet table of
DESIGN.md (Scoring output), exactly once per (input, content version), resumable after a kill.

    plan (driver, plan.py: listing or manifest with versions, minus what the output holds)
      -> read + decode + resize      CPU tasks reading the plan's rows; a failure becomes an `error` row
      -> predict                     actor pool (--actors, --gpus-per-actor); the artifact loads once per actor
      -> postprocess + commit        CPU tasks: PNG map, defect area, decision; one Parquet file per bundle
      -> driver                      one small summary row per committed file: progress, summary;
                                     then superseded rows are dropped and every input counted
                                     (output.py)

Everything that can be checked before Ray starts is: the artifact (verified against its model
id), the output (a file, or another model's rows), the inputs (missing, empty); --dry-run stops
after the plan, and a run with nothing to score never starts Ray.

run_id names one invocation. A resumed run gets a new run_id unless `--run-id` is given, so
each row records the invocation that actually scored it; pass the scheduler's job id as
`--run-id` to make all attempts of one nightly job share it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from promptad.actors import INFERENCE_PRECISION, ModelActors
from promptad.data import storage
from promptad.models import artifact
from promptad.score.compact import AUTO_MIN_SMALL_FILES, compact, recover
from promptad.score.output import OUTPUT_SCHEMA, RUNS_DIR, TMP_DIR, clean_staging, commit_file, committed_files, verify  # noqa: F401 (API)
from promptad.score.plan import Plan, make_plan
from promptad.score.progress import Progress, Summary

if TYPE_CHECKING:
    from promptad.models.calibration import Calibration

INPUT_COLUMNS = ["image_id", "path", "category", "source_version"]  # what the pipeline gets of the plan
_RESULT_FIELDS = ("score", "score_norm", "is_anomalous", "threshold", "map_png", "map_height", "map_width",
                  "defect_area")

# A decode task handles at least this many images: fewer, and Ray's per-task cost shows on small batches.
MIN_ROWS_PER_BLOCK = 32
# The plan enters Ray Data as at most this many read tasks (each a slice of the plan, read in
# MIN_ROWS_PER_BLOCK batches). Ray puts every read task in the object store before the first runs
# (~2 ms each here), so one task per 32 rows of a 1,000,000-row plan would delay the start by a minute.
MAX_READ_TASKS = 1000
# CPU share of a read/decode task and of a commit task. Fractional so that, with the actors' default
# 0.5 CPU, a 2-CPU machine still runs reads, the model and commits at the same time.
READ_CPUS = 0.5
COMMIT_CPUS = 0.25


def object_store_budget(batch_size: int, actors: int, size: int) -> int:
    """Bytes of Ray's object store this job may fill. Without a cap, reads run ahead of the model
    until a fraction of the whole store holds decoded images (a 5,000-image run peaked ~1 GB above a
    500-image one); with it, Ray Data backpressures reads to what the actors will take soon.
    Eight batches per actor of decoded images (3 bytes/pixel) and maps (4 bytes/pixel) in flight."""
    return max(256 << 20, actors * 8 * batch_size * 7 * size * size)


def rows_per_file(batch_size: int) -> int:
    """Rows per committed file: a few model batches. Small enough that a killed run loses little and
    progress moves often; bounded because a commit task holds its rows' float maps in memory."""
    return min(512, max(64, 4 * batch_size))


# --------------------------------------------------------------------------- pipeline stages
def read_and_decode(batch: pa.Table, size: int, categories: list[str]) -> dict[str, np.ndarray]:
    """Input rows -> the model's (S, S, 3) uint8 image, the original size and an `error`.

    Every failure is a row: unknown or missing category (nothing is read), a missing or unreadable
    object (transient S3 errors were already retried by storage's S3 client), an undecodable file.
    The file's bytes live only inside this function. Between stages "" stands for null in `error`,
    `category` and `source_version`: a column of nulls only would lose its string type on the way.
    """
    from promptad.data.images import ImageDecodeError, decode_image, resize

    n = batch.num_rows
    images = np.zeros((n, size, size, 3), np.uint8)
    heights = np.zeros(n, np.int32)
    widths = np.zeros(n, np.int32)
    errors = [""] * n
    known = set(categories)
    for i, (path, cat) in enumerate(zip(batch["path"].to_pylist(), batch["category"].to_pylist())):
        if cat is None:
            errors[i] = f"category: none given (the model scores {', '.join(categories)})"
            continue
        if cat not in known:
            errors[i] = f"category: unknown {cat!r}"
            continue
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            errors[i] = "read: not found"
            continue
        except OSError as e:
            errors[i] = f"read: {' '.join(str(e).split())}"
            continue
        try:
            img = decode_image(data)
            del data
            heights[i], widths[i] = img.shape[:2]
            images[i] = resize(img, size)
        except ImageDecodeError as e:
            errors[i] = f"decode: {e}"
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a nightly job
            errors[i] = f"decode: {type(e).__name__}: {' '.join(str(e).split())}"
    versions = batch["source_version"].to_pylist() if "source_version" in batch.column_names else [None] * n
    return {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "path": np.asarray(batch["path"].to_pylist(), dtype=object),
        "category": np.asarray([c or "" for c in batch["category"].to_pylist()], dtype=object),
        "source_version": np.asarray([v or "" for v in versions], dtype=object),
        "error": np.asarray(errors, dtype=object),
        "height": heights,
        "width": widths,
        "image": images,
    }


MODEL_ERROR = "model: "  # prefix of the error of a row the model returned a non-finite score or map for


class RowCounter:
    """Rows the model stage has scored, for the driver's progress line (a Ray actor of no CPU; the
    actors tell it after each batch, without waiting for an answer)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


class Predictor:
    """The model stage: one artifact load per actor (and per restart), then predict() per batch.
    A row whose model output is not finite becomes a `model: ...` error row (results null), never
    an exception: the rest of its batch is written as usual. Built from actors.ModelActors, as
    audit's scorers are. `counter` (a RowCounter actor) hears of every batch scored; `delay_s`
    slows each batch down (tests of a slow stage only)."""

    def __init__(self, model_uri: str, device: str, threads: int, precision: str = INFERENCE_PRECISION,
                 counter=None, delay_s: float = 0.0):
        from promptad.predict import load_for_worker

        self.model = load_for_worker(model_uri, device, threads)
        self.precision = precision
        self.counter, self.delay_s = counter, delay_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from promptad.predict import predict_rows

        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        pred = predict_rows(self.model, batch.pop("image"), batch["category"], batch["error"], self.precision)
        if self.counter is not None:
            self.counter.add.remote(len(batch["image_id"]))
        batch["score"], batch["map"] = pred.scores, pred.maps
        batch["error"] = np.asarray([str(e) or (MODEL_ERROR + why if why else "")
                                     for e, why in zip(batch["error"], pred.errors)], dtype=object)
        return batch


def postprocess_and_commit(batch: dict[str, np.ndarray], output_uri: str, calibration: dict[str, Calibration],
                           model_id: str, run_id: str, nonce: str = "", run_seq: int = 1) -> pa.Table:
    """Output rows of one bundle -> one atomically committed Parquet file; returns its summary row.
    `run_seq`: the run's sequence number from the driver's plan (output.next_run_seq), what decides
    which row of an image is current; `scored_at` is this worker's clock, for people only.

    The file name hashes this invocation's `nonce` with the bundle's image_ids: a retried task
    rewrites its own file, and no file another run left is ever overwritten (output.py)."""
    from promptad.postprocess import postprocess

    n = len(batch["image_id"])
    cols: dict[str, list] = {name: [None] * n for name in _RESULT_FIELDS}
    for i in range(n):
        if batch["error"][i]:
            continue
        amap = np.array(batch["map"][i])  # a writable copy: the batch is a read-only view of the block
        out = postprocess(calibration[batch["category"][i]], float(batch["score"][i]), amap,
                          int(batch["height"][i]), int(batch["width"][i]))
        for name in _RESULT_FIELDS:
            cols[name][i] = out[name]
    decoded = batch["height"] > 0
    cols.update({
        "image_id": list(batch["image_id"]),
        "path": list(batch["path"]),
        "category": [c or None for c in batch["category"]],
        "height": pa.array(batch["height"], pa.int32(), mask=~decoded),
        "width": pa.array(batch["width"], pa.int32(), mask=~decoded),
        "error": [e or None for e in batch["error"]],
        "source_version": [v or None for v in batch["source_version"]] if "source_version" in batch else [None] * n,
        "model_id": [model_id] * n,
        "run_id": [run_id] * n,
        "scored_at": [datetime.now(timezone.utc)] * n,
        "run_seq": [run_seq] * n,
    })
    table = pa.table([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
                      for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    key = nonce + "\n" + "\n".join(sorted(table["image_id"].to_pylist()))
    name = "part-" + hashlib.sha256(key.encode()).hexdigest()[:24]
    uri = commit_file(output_uri, f"{name}.parquet", table)
    failed = [i for i in range(n) if batch["error"][i]]
    return pa.table({"file": [uri], "rows": [n],
                     "errors": pa.array([[batch["error"][i] for i in failed]], pa.list_(pa.string())),
                     "failed": pa.array([[batch["path"][i] for i in failed]], pa.list_(pa.string()))})


def _plan_source(todo: pa.Table):
    """The plan's rows as a Ray Data source: read tasks that each hand out one slice of the plan
    (the image reads happen in read_and_decode, fused into the same task)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    rows = max(MIN_ROWS_PER_BLOCK, -(-todo.num_rows // MAX_READ_TASKS))
    source_rows = todo.select(INPUT_COLUMNS)

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return source_rows.nbytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            tasks = []
            for start in range(0, todo.num_rows, rows):
                # A compact copy (take): a zero-copy slice may carry the whole plan's buffers with it.
                chunk = source_rows.take(pa.array(range(start, min(start + rows, source_rows.num_rows)), pa.int64()))
                meta = BlockMetadata(num_rows=chunk.num_rows, size_bytes=chunk.nbytes, input_files=None,
                                     exec_stats=None)
                tasks.append(ReadTask(lambda c=chunk: [c], meta, schema=chunk.schema))
            return tasks

        def get_name(self) -> str:
            return "Plan"

    return PlanSource(), -(-todo.num_rows // rows)


# --------------------------------------------------------------------------- driver
def _warn_if_local_output_on_many_nodes(output_uri: str) -> None:
    """Commit tasks write where they run: a local --output on a multi-node cluster is only right on a
    filesystem every node shares (the final count would otherwise miss the other nodes' files)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not isinstance(storage.filesystem(output_uri)[0], pafs.S3FileSystem):
        print(f"score: warning: --output {output_uri} is a local path and the cluster has {nodes} nodes; "
              "it must be a filesystem they all share (else use s3://)", file=sys.stderr)


def plan(model_uri: str, input_uri: str, output_uri: str) -> tuple[Plan, dict]:
    """The artifact (verified: a damaged one is one line here, not a dead actor pool) and the plan.
    No Ray: every mistake in --model, --input and --output surfaces here, in seconds."""
    from promptad.score.plan import check_output_location

    storage.preflight({"--model": model_uri, "--input": input_uri, "--output": output_uri})
    check_output_location(output_uri)
    manifest, _, _ = artifact.read_verified(model_uri)
    return make_plan(input_uri, output_uri, manifest["model_id"], list(manifest["categories"])), manifest


def score(model_uri: str, input_uri: str, output_uri: str, *, actors: int = 1, gpus_per_actor: float = 0.0,
          cpus_per_actor: float = 0.5, batch_size: int = 16, run_id: str | None = None,
          local_ray: bool = True, address: str | None = None, compact_after: bool = True) -> Summary:
    """Score every input the plan says needs it (new, changed, to retry) into `output_uri`; Ray is
    joined (raycluster.connect(address)) only when there is something to score."""
    the_plan, manifest = plan(model_uri, input_uri, output_uri)
    return execute(the_plan, model_uri, manifest, actors=actors, gpus_per_actor=gpus_per_actor,
                   cpus_per_actor=cpus_per_actor, batch_size=batch_size, run_id=run_id, local_ray=local_ray,
                   address=address, compact_after=compact_after)


def execute(the_plan: Plan, model_uri: str, manifest: dict, *, actors: int = 1, gpus_per_actor: float = 0.0,
            cpus_per_actor: float = 0.5, batch_size: int = 16, run_id: str | None = None,
            local_ray: bool = True, address: str | None = None, stage_delay_s: float = 0.0,
            compact_after: bool = True) -> Summary:
    """Run the plan: the pipeline over its todo rows, then drop superseded rows and count, then
    (compact_after) merge small files once there are compact.AUTO_MIN_SMALL_FILES of them.
    `stage_delay_s`: seconds added to each model batch (tests of the progress line only)."""
    output_uri = the_plan.output_uri
    run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    todo = the_plan.todo
    summary = Summary(output=output_uri, run_id=run_id, model_id=the_plan.model_id,
                      inputs=the_plan.inputs.num_rows, already_done=the_plan.done, new=the_plan.new,
                      changed=the_plan.changed, retried=the_plan.retry, plan_seconds=round(the_plan.seconds, 2),
                      run_seq=the_plan.run_seq)
    print(f"score: {summary.inputs:,} inputs: {summary.already_done:,} already in {output_uri}, {the_plan.new:,} new, "
          f"{the_plan.changed:,} changed, {the_plan.retry:,} to retry; scoring {todo.num_rows:,} with model "
          f"{the_plan.model_id} (run {run_id}; planned in {the_plan.seconds:.1f} s)", file=sys.stderr, flush=True)
    if todo.num_rows:
        from promptad.raycluster import connect

        connect(address)
        ModelActors(actors, cpus_per_actor, gpus_per_actor).check(
            "one scoring actor", "lower the per-actor resources or pass --address of a bigger cluster", local_ray,
            "--cpus-per-actor", "--gpus-per-actor", READ_CPUS + COMMIT_CPUS, "for reads and writes")
        _warn_if_local_output_on_many_nodes(output_uri)
        clean_staging(output_uri)
        storage.makedirs(output_uri)
        _run_pipeline(todo, summary, model_uri, output_uri, manifest, actors=actors, gpus_per_actor=gpus_per_actor,
                      cpus_per_actor=cpus_per_actor, batch_size=batch_size, run_seq=the_plan.run_seq,
                      stage_delay_s=stage_delay_s)
    recover(output_uri)  # a compaction a kill interrupted: finished (or rolled back) before rows are dropped
    checked = verify(the_plan.inputs, output_uri)
    summary.superseded_dropped = checked.superseded_dropped
    if compact_after:
        done = compact(output_uri, min_small_files=AUTO_MIN_SMALL_FILES, drop=False)
        summary.files_compacted = done.merged
        summary.files_written_compacted = done.targets
    storage.write_bytes(storage.join(output_uri, RUNS_DIR, f"{run_id}.json"),
                        json.dumps(asdict(summary), indent=2).encode())
    return summary


def _run_pipeline(todo: pa.Table, summary: Summary, model_uri: str, output_uri: str, manifest: dict, *,
                  actors: int, gpus_per_actor: float, cpus_per_actor: float, batch_size: int, run_seq: int,
                  stage_delay_s: float = 0.0) -> None:
    import ray


    counter = ray.remote(num_cpus=0)(RowCounter).remote()

    size = int(manifest["model"]["input_size"])
    categories = list(manifest["categories"])
    step = max(batch_size, MIN_ROWS_PER_BLOCK)
    source, tasks = _plan_source(todo)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args but has no named form for read_datasource yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.read_datasource(source, override_num_blocks=tasks, ray_remote_args={"num_cpus": READ_CPUS})
    ctx = ds.context
    ctx.enable_progress_bars = False  # our own progress line; this dataset's context only
    ctx.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=object_store_budget(batch_size, actors, size))
    # One read batch of decoded images per block, as when each block held one batch: read tasks
    # over long plan slices then hand the model its images as they decode, not 128 MiB at a time.
    ctx.target_max_block_size = max(1 << 20, step * size * size * 3)
    pool = ModelActors(actors, cpus_per_actor, gpus_per_actor)
    ds = ds.map_batches(read_and_decode, batch_format="pyarrow", batch_size=step, num_cpus=READ_CPUS,
                        fn_kwargs={"size": size, "categories": categories})
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the restarts as keyword remote args (ModelActors.pool_args) but has
        # no named form yet. --actors N means N: all start, one per slot.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=batch_size,
                            fn_constructor_kwargs={"model_uri": model_uri, **pool.constructor_args(),
                                                   "counter": counter, "delay_s": stage_delay_s},
                            **pool.pool_args())
    ds = ds.map_batches(postprocess_and_commit, batch_format="numpy", batch_size=rows_per_file(batch_size),
                        num_cpus=COMMIT_CPUS,
                        fn_kwargs={"output_uri": output_uri, "calibration": artifact.read_calibration(manifest),
                                   "model_id": summary.model_id, "run_id": summary.run_id,
                                   "nonce": uuid.uuid4().hex, "run_seq": run_seq})
    def through() -> int:
        return ray.get(counter.get.remote(), timeout=5)

    with Progress(summary, todo.num_rows, through=through) as progress:
        for row in ds.iter_rows():
            progress.add(int(row["rows"]), list(row["errors"]), list(row["failed"]))


def run(args: argparse.Namespace) -> Summary | Plan:
    """`promptad score` (and jobs/score.py): plan without Ray; then --dry-run prints the plan, a
    real run joins Ray (only if there is something to score) and runs it."""
    from promptad.raycluster import check_address, is_local

    if not getattr(args, "dry_run", False):
        check_address(args.address)  # before the plan line: a wrong address is the only line
    the_plan, manifest = plan(args.model, args.input, args.output)
    if getattr(args, "dry_run", False):
        for line in the_plan.lines():
            print(line)
        print("score: dry run: nothing was read, scored or written")
        return the_plan
    summary = execute(the_plan, args.model, manifest, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                      cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, run_id=args.run_id,
                      local_ray=is_local(args.address), address=args.address,
                      compact_after=not getattr(args, "no_compact", False))
    for line in summary.lines():
        print(line)
    return summary
