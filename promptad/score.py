"""`promptad score`: a Ray Data pipeline around predict.py that writes the Parquet table of
DESIGN.md (Scoring output), exactly once per input, resumable after a kill.

    input list (driver: listing or manifest, minus image_ids already in --output)
      -> read + decode + resize      CPU tasks; a failure becomes an `error` row, never an exception
      -> predict                     actor pool (--actors, --gpus-per-actor); the artifact loads once per actor
      -> postprocess + commit        CPU tasks: PNG map, defect area, decision; one Parquet file per bundle
      -> driver                      reads one small summary row per committed file: progress, summary

Exactly once. Every output file is committed atomically (local: written under `_tmp/`, then
renamed; S3: one PUT, which is atomic), so a killed run leaves only whole files. Its name is a
hash of the image_ids it holds, so a retried write task overwrites its own file instead of
adding a second one. A new run reads the image_ids already committed and scores only the others.
A completed run checks that every input has exactly one row (counts) and fails loudly if not.

run_id names one invocation. A resumed run gets a new run_id unless `--run-id` is given, so
each row records the invocation that actually scored it; pass the scheduler's job id as
`--run-id` to make all attempts of one nightly job share it.

Output of another model is refused: re-running into an output of the same model resumes it.
Duplicate image_ids in a manifest are refused up front (datasets.manifest_samples).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import posixpath
import sys
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import artifact, storage
from .datasets import MANIFEST_EXTENSIONS, manifest_samples
from .errors import UserError
from .images import ImageDecodeError, decode_image, resize
from .model import Calibration

OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("category", pa.string()),
    ("score", pa.float32()),
    ("score_norm", pa.float32()),
    ("is_anomalous", pa.bool_()),
    ("threshold", pa.float32()),
    ("map_png", pa.binary()),
    ("map_height", pa.int32()),
    ("map_width", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("defect_area", pa.float32()),
    ("error", pa.string()),
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
_INPUT_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("category", pa.string())])
_RESULT_FIELDS = ("score", "score_norm", "is_anomalous", "threshold", "map_png", "map_height", "map_width",
                  "defect_area")

# A decode task handles at least this many images: fewer, and Ray's per-task cost shows on small batches.
MIN_ROWS_PER_BLOCK = 32
# CPU share of a read/decode task and of a commit task. Fractional so that, with the actors' default
# 0.5 CPU, a 2-CPU machine still runs reads, the model and commits at the same time.
READ_CPUS = 0.5
COMMIT_CPUS = 0.25
PROGRESS_INTERVAL_S = 10.0
TMP_DIR = "_tmp"  # local commits are staged here; '_' folders are skipped by pyarrow, pandas and Spark
RUNS_DIR = "_runs"  # one JSON summary per run


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


# --------------------------------------------------------------------------- inputs and resume
def list_inputs(input_uri: str, categories: list[str]) -> pa.Table:
    """(image_id, path, category) of every input: a manifest's rows, or every image file under a
    folder/prefix (image_id = its URI). category is null where neither the manifest nor a
    single-category model names one (those become error rows)."""
    only = categories[0] if len(categories) == 1 else None
    try:
        if input_uri.lower().endswith(MANIFEST_EXTENSIONS):
            samples = manifest_samples(input_uri)
            return pa.table({
                "image_id": [s.image_id for s in samples],
                "path": [s.path for s in samples],
                "category": [s.category or only for s in samples],
            }, schema=_INPUT_SCHEMA)
        if storage.is_dir(input_uri):
            paths = storage.list_files(input_uri, storage.IMAGE_EXTENSIONS)
        elif storage.exists(input_uri):
            paths = [input_uri]
        else:
            raise UserError(f"--input {input_uri} does not exist; pass a folder/prefix of images or a "
                            "manifest (.parquet/.csv)")
    except FileNotFoundError as e:
        raise UserError(f"--input: {e}; pass a folder/prefix of images or a manifest (.parquet/.csv)") from None
    if only is None:
        raise UserError(f"the model scores several categories ({', '.join(categories)}) and a folder does not say "
                        "which each image is; pass a manifest with a 'category' column as --input")
    return pa.table({"image_id": paths, "path": paths, "category": [only] * len(paths)}, schema=_INPUT_SCHEMA)



def committed_files(output_uri: str) -> list[str]:
    """Parquet files committed to the output (not staged ones, not run summaries)."""
    try:
        files = storage.list_files(output_uri)
    except FileNotFoundError:
        return []
    return [f for f in files if f.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in storage.relative(f, output_uri).split("/"))]


def read_committed(output_uri: str) -> pa.Table:
    """image_id and model_id of every row already in the output."""
    files = committed_files(output_uri)
    if not files:
        return pa.table({"image_id": pa.array([], pa.string()), "model_id": pa.array([], pa.string())})
    fs, _ = storage.filesystem(output_uri)
    paths = [storage.filesystem(f)[1] for f in files]
    try:
        return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["image_id", "model_id"])
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise UserError(f"--output {output_uri} holds Parquet files that are not scoring output "
                        f"({' '.join(str(e).split())[:160]}); pass an empty or new --output") from None


def check_same_model(existing: pa.Table, model_id: str, output_uri: str) -> None:
    """One model per output: mixing models would make resume skip images scored by the other one."""
    others = sorted(set(pc.unique(existing["model_id"]).to_pylist()) - {model_id})
    if others:
        raise UserError(f"--output {output_uri} already holds scores of model {others[0]}, not of this model "
                        f"{model_id}; pass a new --output (re-running the same model into it resumes it)")


def clean_staging(output_uri: str) -> None:
    """Drop files a killed run left half-written in the staging folder (local outputs only)."""
    fs, path = storage.filesystem(output_uri)
    if isinstance(fs, pafs.S3FileSystem):
        return
    staging = posixpath.join(path, TMP_DIR)
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir_contents(staging)


# --------------------------------------------------------------------------- pipeline stages
def read_and_decode(batch: pa.Table, size: int, categories: list[str]) -> dict[str, np.ndarray]:
    """Input rows -> the model's (S, S, 3) uint8 image, the original size and an `error`.

    Every failure is a row: unknown or missing category (nothing is read), a missing or unreadable
    object (transient S3 errors were already retried by storage's S3 client), an undecodable file.
    The file's bytes live only inside this function. Between stages "" stands for null in `error`
    and `category`: a column of nulls only would lose its string type on the way.
    """
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
    return {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "path": np.asarray(batch["path"].to_pylist(), dtype=object),
        "category": np.asarray([c or "" for c in batch["category"].to_pylist()], dtype=object),
        "error": np.asarray(errors, dtype=object),
        "height": heights,
        "width": widths,
        "image": images,
    }


class Predictor:
    """The model stage: one artifact load per actor (and per restart), then predict() per batch."""

    def __init__(self, model_uri: str, device: str, threads: int):
        from .predict import load_for_worker

        self.model = load_for_worker(model_uri, device, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .predict import predict_rows

        pred = predict_rows(self.model, batch.pop("image"), batch["category"], batch["error"])
        batch["score"], batch["map"] = pred.scores, pred.maps
        return batch


def postprocess_and_commit(batch: dict[str, np.ndarray], output_uri: str, calibration: dict[str, Calibration],
                           model_id: str, run_id: str) -> pa.Table:
    """Output rows of one bundle -> one atomically committed Parquet file; returns its summary row."""
    from .postprocess import postprocess

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
        "model_id": [model_id] * n,
        "run_id": [run_id] * n,
        "scored_at": [datetime.now(timezone.utc)] * n,
    })
    table = pa.table([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
                      for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    name = "part-" + hashlib.sha256("\n".join(sorted(table["image_id"].to_pylist())).encode()).hexdigest()[:24]
    uri = commit_file(output_uri, f"{name}.parquet", table)
    return pa.table({"file": [uri], "rows": [n],
                     "errors": pa.array([[e for e in batch["error"] if e]], pa.list_(pa.string()))})


def commit_file(output_uri: str, name: str, table: pa.Table) -> str:
    """Write `table` so that the file appears whole or not at all; returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(output_uri, name)
    fs, path = storage.filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        storage.write_bytes(uri, buf.getvalue())  # one PUT: an S3 object appears whole or not at all
        return uri
    staged = storage.join(output_uri, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
    storage.write_bytes(staged, buf.getvalue())
    fs.move(storage.filesystem(staged)[1], path)
    return uri


# --------------------------------------------------------------------------- driver
@dataclass
class Summary:
    """What a run did; printed at the end and written to OUTPUT/_runs/<run_id>.json."""

    output: str
    run_id: str
    model_id: str
    inputs: int
    already_done: int
    scored: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    files: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return [
            f"score: done: {self.inputs} inputs, {self.already_done} were already in the output, "
            f"{self.scored} scored now in {self.seconds:.1f} s ({rate:.1f} rows/s), {self.files} files",
            f"score: errors this run: {self.errors} ({kinds})",
            f"score: output {self.output} (model {self.model_id}, run {self.run_id})",
        ]


class Progress:
    """Rows committed, rows/s and errors so far, printed to stderr every few seconds from a thread
    (so a slow stretch still shows the job is alive)."""

    def __init__(self, summary: Summary, interval: float = PROGRESS_INTERVAL_S):
        self.summary = summary
        self.interval = interval
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="score-progress", daemon=True)

    def add(self, rows: int, errors: list[str]) -> None:
        with self.lock:
            self.summary.scored += rows
            self.summary.files += 1
            self.summary.errors += len(errors)
            for e in errors:
                kind = e.split(":", 1)[0]
                self.summary.errors_by_kind[kind] = self.summary.errors_by_kind.get(kind, 0) + 1

    def line(self) -> str:
        with self.lock:
            s = self.summary
            elapsed = time.monotonic() - self.start
            todo = s.inputs - s.already_done
            return (f"score: {s.scored}/{todo} rows in {elapsed:.0f} s, {s.scored / max(elapsed, 1e-9):.1f} rows/s, "
                    f"{s.errors} errors")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.summary.seconds = time.monotonic() - self.start


def _warn_if_local_output_on_many_nodes(output_uri: str) -> None:
    """Commit tasks write where they run: a local --output on a multi-node cluster is only right on a
    filesystem every node shares (the final count would otherwise miss the other nodes' files)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not isinstance(storage.filesystem(output_uri)[0], pafs.S3FileSystem):
        print(f"score: warning: --output {output_uri} is a local path and the cluster has {nodes} nodes; "
              "it must be a filesystem they all share (else use s3://)", file=sys.stderr)


def score(model_uri: str, input_uri: str, output_uri: str, *, actors: int = 1, gpus_per_actor: float = 0.0,
          cpus_per_actor: float = 0.5, batch_size: int = 16, run_id: str | None = None,
          local_ray: bool = True) -> Summary:
    """Score every input that has no row in `output_uri` yet; Ray must be initialized."""
    manifest, _, _ = artifact.read_verified(model_uri)
    model_id = manifest["model_id"]
    categories = list(manifest["categories"])
    size = int(manifest["model"]["input_size"])
    run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    if storage.exists(output_uri) and not storage.is_dir(output_uri):
        raise UserError(f"--output {output_uri} is a file; pass a folder or prefix for the Parquet dataset")

    existing = read_committed(output_uri)  # before listing: a wrong --output fails fast
    check_same_model(existing, model_id, output_uri)
    inputs = list_inputs(input_uri, categories)
    if inputs.num_rows == 0:
        raise UserError(f"no images ({', '.join(sorted(storage.IMAGE_EXTENSIONS))}) under {input_uri}")
    done = pc.is_in(inputs["image_id"], value_set=existing["image_id"])
    todo = inputs.filter(pc.invert(done))
    summary = Summary(output=output_uri, run_id=run_id, model_id=model_id, inputs=inputs.num_rows,
                      already_done=inputs.num_rows - todo.num_rows)
    print(f"score: {summary.inputs} inputs, {summary.already_done} already in {output_uri}, scoring "
          f"{todo.num_rows} with model {model_id} (run {run_id})", file=sys.stderr, flush=True)
    if todo.num_rows:
        from .raycluster import check_fits

        check_fits({"CPU": (cpus_per_actor + READ_CPUS + COMMIT_CPUS,
                            f"--cpus-per-actor {cpus_per_actor:g} plus {READ_CPUS + COMMIT_CPUS:g} for reads and writes"),
                    "GPU": (gpus_per_actor, f"--gpus-per-actor {gpus_per_actor:g}")},
                   "one scoring actor", "lower the per-actor resources or pass --address of a bigger cluster",
                   local_ray)
        _warn_if_local_output_on_many_nodes(output_uri)
        clean_staging(output_uri)
        storage.makedirs(output_uri)
        _run_pipeline(todo, summary, model_uri, output_uri, manifest, size, categories, actors=actors,
                      gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size)
    _verify(inputs, output_uri)
    storage.write_bytes(storage.join(output_uri, RUNS_DIR, f"{run_id}.json"),
                        json.dumps(asdict(summary), indent=2).encode())
    return summary


def _run_pipeline(todo: pa.Table, summary: Summary, model_uri: str, output_uri: str, manifest: dict,
                  size: int, categories: list[str], *, actors: int, gpus_per_actor: float,
                  cpus_per_actor: float, batch_size: int) -> None:
    import ray

    step = max(batch_size, MIN_ROWS_PER_BLOCK)
    ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, todo.num_rows, step)])
    ds.context.enable_progress_bars = False  # our own progress line; this dataset's context only
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=object_store_budget(batch_size, actors, size))
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    ds = ds.map_batches(read_and_decode, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                        fn_kwargs={"size": size, "categories": categories})
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing these as keyword remote args but has no named form yet.
        # They are Ray Data's defaults for actor pools; stating them pins the contract (a killed
        # actor is restarted, loading the artifact again, and its batch is redone) and keeps Ray
        # from fusing the read/decode tasks into the actor when --cpus-per-actor equals READ_CPUS.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=batch_size,
                            fn_constructor_kwargs={"model_uri": model_uri, "device": device,
                                                   "threads": max(1, int(cpus_per_actor))},
                            compute=ray.data.ActorPoolStrategy(size=actors),  # --actors N means N: all start, one per slot
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                            max_restarts=-1, max_task_retries=-1)
    ds = ds.map_batches(postprocess_and_commit, batch_format="numpy", batch_size=rows_per_file(batch_size),
                        num_cpus=COMMIT_CPUS,
                        fn_kwargs={"output_uri": output_uri, "calibration": artifact.read_calibration(manifest),
                                   "model_id": summary.model_id, "run_id": summary.run_id})
    with Progress(summary) as progress:
        for row in ds.iter_rows():
            progress.add(int(row["rows"]), list(row["errors"]))


def _verify(inputs: pa.Table, output_uri: str) -> None:
    """Exactly once: every input has one row. Counted, not assumed: a mismatch fails the run."""
    rows = read_committed(output_uri)
    ids = rows.filter(pc.is_in(rows["image_id"], value_set=inputs["image_id"]))["image_id"]
    distinct = pc.count_distinct(ids).as_py()
    if len(ids) != distinct:
        raise RuntimeError(f"output {output_uri} has {len(ids) - distinct} duplicate rows; this is a bug, "
                           "please report it with the output's file list")
    if distinct != inputs.num_rows:
        raise RuntimeError(f"output {output_uri} has rows for {distinct} of {inputs.num_rows} inputs; "
                           "re-run the same command to score the missing ones")


def run(args: argparse.Namespace) -> Summary:
    """`promptad score` (and jobs/score.py)."""
    from .raycluster import connect, is_local

    local = is_local(args.address)
    connect(args.address)
    summary = score(args.model, args.input, args.output, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                    cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, run_id=args.run_id,
                    local_ray=local)
    for line in summary.lines():
        print(line)
    return summary
