"""The run folder of `promptad fit` in --storage: what a fit has finished, and what --resume
checks before it continues one. Plain storage, no Ray.

    fit-<UTC time>-<id>/
      promptad-fit.json              the run's flags (MODEL_FLAGS, which must match on --resume)
      epoch_NNNN/state.pt            training checkpoints (fit/train.py), the newest CHECKPOINTS_KEPT,
                                     with the evidence head's input scales per category
      rows.json                      readable images per category, skipped files
      memory/<category>.safetensors  a finished category's memory (artifact.memory_tensors)
      calibration/<category>.json    a finished category's calibration, with the digest of the
                                     trained state it was computed with

A memory depends on the features only; the evidence rows on the images and the memory (they are
not kept: a resumed run that still trains makes them again); the trained state on the evidence
rows; a calibration on the features, the memory, the trained state and the head's input scales it
was trained with (kept in its checkpoint). Everything that produces them is deterministic, so what
a resumed run restores is what an uninterrupted run would have computed.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from promptad.data import storage
from promptad.errors import UserError
from promptad.fit.train import checkpoint_epochs, newest_state, state_digest
from promptad.models.artifact import _memory_name, memory_from_tensors, memory_tensors
from promptad.models.model import Calibration, CategoryMemory

RUN_PREFIX = "fit-"
RUN_FILE = "promptad-fit.json"
ROWS_FILE = "rows.json"
# Every flag of `promptad fit` (its argparse dest) is in exactly one of the two lists below, so a
# new flag cannot be forgotten (tests/test_fit.py checks them against the parser).
# MODEL_FLAGS shape the model (trained weights, memory or calibration): run_config records them in
# the run's flags and a resumed run must repeat them all, or it would mix two models' parts.
MODEL_FLAGS = ("data", "category", "backbone", "input_size", "epochs", "batch_size", "seed", "workers",
               "gpus_per_worker", "precision", "tolerate", "coreset_draws", "false_alarm_rate",
               "exclude")
# ... and those that do not, with why.
OTHER_FLAGS = {
    "out": "where the artifact is written, not what it holds",
    "storage": "where the run folder is; --resume looks there",
    "resume": "whether to continue a run",
    "cpus_per_worker": "CPUs Ray reserves for a worker (the work and its seeds do not depend on them)",
    "cpus_per_category": "CPUs Ray reserves for a per-category task (likewise)",
    "checkpoint_seconds": "how often training is checkpointed; a resumed run replays the same epochs",
    "address": "which Ray runs the work",
    "verbose": "console output only",
    "debug": "console output only",
}
# the run file's name of a flag whose value it keeps under another name
RUN_KEY = {"category": "categories"}
RESUME_KEYS = tuple(RUN_KEY.get(f, f) for f in MODEL_FLAGS)
# what a run folder written before a key existed did, as that key's value (a key missing here and
# there is not known, and such a run is not resumed)
BEFORE_KEY = {"coreset_draws": 1, "head": "features", "tolerate": [], "false_alarm_rate": 0.01, "exclude": []}
HEAD = "evidence"  # the head `promptad fit` trains (ModelConfig.head_input); in the run's flags


def default_storage(out: str) -> str:
    """Checkpoints next to the artifact (<out>-checkpoints), inside it when --out is a bucket root."""
    if out.startswith("s3://") and "/" not in out[len("s3://"):].strip("/"):
        return storage.join(out, "checkpoints")
    return out.rstrip("/") + "-checkpoints"


def check_writable(uri: str, flag: str) -> None:
    """Fail in seconds rather than after training: write and delete a probe file under `uri`."""
    probe = storage.join(uri, f".promptad-write-test-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(uri)
        storage.write_bytes(probe, b"")
        fs, path = storage.filesystem(probe)
        fs.delete_file(path)
    except UserError:
        raise
    except Exception as e:  # PermissionError, NotADirectoryError, S3 access errors (OSError)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{flag} {uri} is not writable ({reason}); pass a writable local folder or s3:// prefix") \
            from None


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags: every MODEL_FLAGS value (categories sorted and unique, lists as lists),
    and the head it trains."""
    def value(flag: str) -> Any:
        v = getattr(args, flag)
        if flag == "category":
            return sorted(set(v))
        return list(v) if isinstance(v, (list, tuple)) else v

    return {RUN_KEY.get(f, f): value(f) for f in MODEL_FLAGS} | {"head": HEAD}


def new_run(storage_uri: str, config: dict[str, Any]) -> str:
    """Create fit-<UTC time>-<id>/ holding the run's flags (what --resume checks); names sort by time."""
    name = RUN_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    run_dir = storage.join(storage_uri, name)
    record = dict(config, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.makedirs(run_dir)
    storage.write_bytes(storage.join(run_dir, RUN_FILE), json.dumps(record, indent=2).encode())
    return name


def memory_path(run_dir: str, category: str) -> str:
    return storage.join(run_dir, _memory_name(category))


def calibration_path(run_dir: str, category: str) -> str:
    return storage.join(run_dir, _memory_name(category).replace("memory/", "calibration/", 1)
                        .replace(".safetensors", ".json"))


def has_checkpoint(run_dir: str) -> bool:
    """A run folder worth resuming: an epoch checkpoint or a finished category's memory."""
    if checkpoint_epochs(run_dir):
        return True
    try:
        return bool(storage.list_files(storage.join(run_dir, "memory")))
    except FileNotFoundError:
        return False


def resume_run(storage_uri: str, config: dict[str, Any]) -> str:
    """The newest run in --storage, checked to have a checkpoint and the same training flags."""
    hint = "run without --resume to start training"
    try:
        names = [n for n in storage.list_dirs(storage_uri)
                 if n.startswith(RUN_PREFIX) and storage.exists(storage.join(storage_uri, n, RUN_FILE))]
    except FileNotFoundError:
        names = []
    if not names:
        raise UserError(f"nothing to resume: no fit run in --storage {storage_uri}; {hint}")
    name = max(names)
    run_dir = storage.join(storage_uri, name)
    if not has_checkpoint(run_dir):
        raise UserError(f"nothing to resume: run {name} in {storage_uri} stopped before its first checkpoint; {hint}")
    saved = json.loads(storage.read_bytes(storage.join(run_dir, RUN_FILE)))
    head = saved.get("head", BEFORE_KEY["head"])
    if config["epochs"] and head != config["head"]:
        raise UserError(f"cannot resume run {name}: it trains a {head} head and this promptad fit trains the "
                        f"{config['head']} head; {hint}")
    flag = {RUN_KEY.get(f, f): f for f in MODEL_FLAGS}
    missing = object()
    was = {k: saved.get(k, BEFORE_KEY.get(k, missing)) for k in RESUME_KEYS}
    changed = [k for k in RESUME_KEYS if was[k] != config[k]]
    if changed:
        def shown(v: Any) -> str:
            if v is missing:
                return "not recorded"
            return (",".join(map(str, v)) or "none") if isinstance(v, list) else str(v)

        diffs = ", ".join(f"--{flag[k].replace('_', '-')} {shown(config[k])} (run has {shown(was[k])})"
                          for k in changed)
        raise UserError(f"cannot resume run {name}: {diffs}; resume with the flags it was started with")
    return name


@dataclass
class Done:
    """What a run folder already holds; a resumed fit redoes none of it."""

    trained: dict[str, torch.Tensor] | None  # the weight average of the last epoch, once training ended
    metrics: dict[str, Any]  # the last epoch's metrics (rank 0), once training ended
    memory: dict[str, CategoryMemory]
    calibration: dict[str, Calibration]  # only those computed with `trained`
    head_scales: dict[str, list[float]]  # per category, the evidence head's input scales `trained` was trained with
    rows: dict[str, Any]  # ROWS_FILE: readable images per category, skipped files
    # per category, the map's regional weight chosen on the views `trained` was trained on (mixing.py)
    map_choice: dict[str, dict] = field(default_factory=dict)


def read_done(run_dir: str, epochs: int, categories: list[str], initial: dict[str, torch.Tensor]) -> Done:
    """What `run_dir` holds for a fit of `epochs` epochs (nothing, for a new run). With no
    training (epochs 0) the trainable state is `initial`, the seeded model's, from the start."""
    from safetensors.torch import load as st_load

    newest = newest_state(run_dir)
    final = newest[1] if newest and newest[0] == epochs else None
    trained = initial if epochs == 0 else None if final is None else final["ema"]["state"]
    memory, calibration = {}, {}
    for c in categories:
        if storage.exists(memory_path(run_dir, c)):
            memory[c] = memory_from_tensors(st_load(storage.read_bytes(memory_path(run_dir, c))))
        if trained is not None and storage.exists(calibration_path(run_dir, c)):
            saved = json.loads(storage.read_bytes(calibration_path(run_dir, c)))
            if saved["trained"] == state_digest(trained):
                calibration[c] = Calibration(**saved["calibration"])
    rows_uri = storage.join(run_dir, ROWS_FILE)
    rows = json.loads(storage.read_bytes(rows_uri)) if storage.exists(rows_uri) else {"images": {}, "skipped": {}}
    return Done(trained, dict((final or {}).get("metrics") or {}), memory, calibration,
                dict((final or {}).get("head_scales") or {}), rows, dict((final or {}).get("map_choice") or {}))


def save_memory(run_dir: str, category: str, memory: CategoryMemory) -> None:
    from safetensors.torch import save as st_save

    storage.write_bytes(memory_path(run_dir, category), st_save(memory_tensors(memory)))


def save_calibration(run_dir: str, category: str, calibration: Calibration, trained_digest: str) -> None:
    # Python's JSON keeps inf (an uncalibrated threshold) and every float exactly.
    record = {"trained": trained_digest, "calibration": asdict(calibration)}
    storage.write_bytes(calibration_path(run_dir, category), json.dumps(record, indent=1).encode())
