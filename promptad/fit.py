"""`promptad fit`: Ray Train (TorchTrainer, DDP) around the per-worker loop in training.py.

    samples (datasets.py) -> held-out split (pipeline.split_holdout)
      -> Ray Data: read + decode + resize once, materialized in the object store
      -> TorchTrainer: N workers, DDP over the trainable part only, a checkpoint every epoch
      -> driver: trained weights from the last checkpoint, memory banks and calibration
         (pipeline.finish_model), artifact (artifact.save_artifact)

Several categories in one run. Prompts and the localization head are SHARED across categories:
the category word in every prompt makes the text features category-specific, the head learns
generic local defect cues (texture breaks, scratches, blobs) that transfer between products and
gets more varied data when categories are pooled, and the number of parameters does not grow with
the number of categories. What is specific to a product, its normal appearance and its
deployment thresholds, is per category: one memory bank and one calibration each, fitted on that
category's normal images only.

Data order. Each epoch's order is a pure function of (seed, epoch): a seeded permutation of the
training rows, padded so every worker runs the same number of steps (DDP needs that), and dealt
round-robin to the workers. Ray Data's streaming_split hands blocks to whichever worker asks
first, so a resumed run would not replay the same shards; instead every worker streams the
materialized dataset and keeps its own rows. Synthetic anomalies are seeded by
(seed, rank, epoch, step) in training.py. So a run resumed from a checkpoint (trainable state,
optimizer, scheduler, GradScaler, epoch) ends with the same artifact as an uninterrupted one.

Resources. Images are decoded before the workers start, so Ray Data needs no CPU while they
train: with the default 0.5 CPU per worker, two workers on a 2-CPU laptop leave a CPU free and
nothing can wait on anything. On a GPU cluster, --gpus-per-worker 1 --workers N gives N DDP
workers with fp16 autocast, a GradScaler and the frozen backbone in half precision. CPU workers
train in fp32, or in bf16 autocast where the CPU does bf16 natively (see training.training_precision).

Runs live in --storage as fit-<UTC time>-<id>/ with the run's flags (promptad-fit.json) and
epoch_NNNN/ checkpoints; `--resume` continues the newest run there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from . import storage
from .artifact import save_artifact
from .datasets import Sample, load_samples
from .errors import UserError
from .images import ImageDecodeError, decode_image, resize
from .model import ModelConfig, PromptAD
from .pipeline import finish_model, split_holdout
from .training import (TrainConfig, make_optimizer, resolve_precision, steps_per_epoch, train_epoch,
                       training_precision)

HOLDOUT_FRACTION = 0.2
RUN_PREFIX = "fit-"
RUN_FILE = "promptad-fit.json"
STATE_FILE = "state.pt"
CHECKPOINTS_KEPT = 2
WORKER_RESTARTS = 2  # a preempted or crashed worker group restarts from the last checkpoint
# Flags that change the trained weights: a resumed run must use the same ones.
RESUME_KEYS = ("data", "categories", "backbone", "input_size", "epochs", "batch_size", "seed", "workers")


@dataclass
class FitSummary:
    """What a fit produced, for callers of run() (the command itself prints progress lines)."""

    artifact: str
    model_id: str
    run_dir: str
    metrics: dict[str, Any]  # rank 0's report of the last epoch (see _train_worker)
    skipped_images: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- storage and runs
def default_storage(out: str) -> str:
    """Checkpoints next to the artifact (<out>-checkpoints), inside it when --out is a bucket root."""
    if out.startswith("s3://") and "/" not in out[len("s3://"):].strip("/"):
        return storage.join(out, "checkpoints")
    return out.rstrip("/") + "-checkpoints"


def _check_writable(uri: str, flag: str) -> None:
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


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"data": args.data, "categories": sorted(set(args.category)), "backbone": args.backbone,
            "input_size": args.input_size, "epochs": args.epochs, "batch_size": args.batch_size,
            "seed": args.seed, "workers": args.workers}


def _new_run(storage_uri: str, config: dict[str, Any]) -> str:
    """Create fit-<UTC time>-<id>/ holding the run's flags (what --resume checks); names sort by time."""
    name = RUN_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    run_dir = storage.join(storage_uri, name)
    record = dict(config, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.makedirs(run_dir)
    storage.write_bytes(storage.join(run_dir, RUN_FILE), json.dumps(record, indent=2).encode())
    return name


def _checkpoint_epochs(run_dir: str) -> list[int]:
    """Epochs with a complete checkpoint (its state file exists) in a run folder."""
    epochs = []
    for name in storage.list_dirs(run_dir):
        if name.startswith("epoch_") and name[6:].isdigit() and storage.exists(storage.join(run_dir, name, STATE_FILE)):
            epochs.append(int(name[6:]))
    return sorted(epochs)


def _resume_run(storage_uri: str, config: dict[str, Any]) -> str:
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
    if not _checkpoint_epochs(run_dir):
        raise UserError(f"nothing to resume: run {name} in {storage_uri} stopped before its first checkpoint; {hint}")
    saved = json.loads(storage.read_bytes(storage.join(run_dir, RUN_FILE)))
    changed = [k for k in RESUME_KEYS if saved.get(k) != config[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {config[k]} (run has {saved.get(k)})" for k in changed)
        raise UserError(f"cannot resume run {name}: {diffs}; resume with the flags it was started with")
    return name


# --------------------------------------------------------------------------- data
def _decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data map: read, decode and resize; a bad image becomes a zero image with its `error`."""
    images = np.zeros((len(batch["path"]), size, size, 3), np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = resize(decode_image(storage.read_bytes(str(path))), size)
            errors.append("")
        except (ImageDecodeError, OSError) as e:  # unreadable object, missing file, bad bytes
            errors.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])
    return {"idx": batch["idx"], "category": batch["category"], "path": batch["path"],
            "image": images, "error": np.asarray(errors, dtype=object)}


def _decoded_dataset(samples: Sequence[tuple[int, Sample]], size: int):
    """(idx, sample) pairs -> materialized Ray Dataset of decoded images at the model's input size
    (None for no samples: a category with under 4 images has no held-out split)."""
    import ray

    if not samples:
        return None
    rows = [{"idx": i, "path": s.path, "category": s.category} for i, s in samples]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(200, math.ceil(len(rows) / 32))))
    return ds.map_batches(_decode_batch, fn_kwargs={"size": size}, batch_size=32, batch_format="numpy").materialize()


def _decode_errors(ds) -> dict[int, tuple[str, str]]:
    """idx -> (path, error) of the rows that could not be decoded."""
    bad: dict[int, tuple[str, str]] = {}
    if ds is None:
        return bad
    for b in ds.select_columns(["idx", "path", "error"]).iter_batches(batch_size=4096, batch_format="numpy"):
        for i, p, e in zip(b["idx"], b["path"], b["error"]):
            if e:
                bad[int(i)] = (str(p), str(e))
    return bad


def _images_by_category(ds, categories: Sequence[str]) -> dict[str, np.ndarray]:
    """Decoded images of the good rows, per category that has any, in idx order (so results never
    depend on which block finished first)."""
    parts: dict[str, list[tuple[int, np.ndarray]]] = {c: [] for c in categories}
    for b in ds.iter_batches(batch_size=256, batch_format="numpy") if ds is not None else ():
        for i, c, img, e in zip(b["idx"], b["category"], b["image"], b["error"]):
            if not e:
                parts[str(c)].append((int(i), img))
    return {c: np.stack([img for _, img in sorted(p, key=lambda t: t[0])]) for c, p in parts.items() if p}


def epoch_shard(ids: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This worker's rows (dataset idx, in training order) for one epoch: a pure function of
    (seed, epoch, rank, world). The permutation is cycled to a multiple of `world` so that every
    worker runs the same number of steps (DDP would hang otherwise)."""
    order = ids[np.random.default_rng([seed, epoch, 3]).permutation(len(ids))]
    order = np.resize(order, math.ceil(len(order) / world) * world)
    return order[rank::world]


def _fetch(shard, wanted: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Stream the dataset once and keep the `wanted` rows, in that order (repeats allowed)."""
    need = set(wanted.tolist())
    got: dict[int, tuple[np.ndarray, str]] = {}
    for b in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for j in np.flatnonzero(np.isin(b["idx"], wanted)):
            got[int(b["idx"][j])] = (b["image"][j], str(b["category"][j]))
    missing = need - got.keys()
    if missing:
        raise RuntimeError(f"training rows {sorted(missing)[:5]} are missing from the dataset")
    return np.stack([got[i][0] for i in wanted.tolist()]), [got[i][1] for i in wanted.tolist()]


def _batches(images: np.ndarray, categories: list[str], batch_size: int) -> Iterable[tuple[np.ndarray, list[str]]]:
    for s in range(0, len(images), batch_size):
        yield images[s:s + batch_size], categories[s:s + batch_size]


# --------------------------------------------------------------------------- the worker
def param_digest(module: torch.nn.Module) -> str:
    """Short hash of every parameter: equal digests = identical weights on two ranks. (Buffers are
    left out: BatchNorm running stats are broadcast from rank 0 before each forward, then updated
    by each rank's own batch, so they legitimately differ after a step; rank 0's are checkpointed.)"""
    h = hashlib.sha256()
    for k, v in sorted(module.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _gather(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the model, DDP-wrap the trainable part, resume from the
    latest checkpoint if there is one, train, and report metrics + a checkpoint (rank 0) every epoch."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one "starting execution" line per epoch otherwise
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cfg = TrainConfig(**config["train"])
    precision = training_precision(device) if cfg.precision == "auto" else resolve_precision(cfg.precision, device)
    cfg = replace(cfg, precision=precision)
    torch.manual_seed(cfg.seed)
    model = PromptAD(ModelConfig(**config["model"])).to(device)
    if model.backbone.has_text:
        for cat in model.categories:  # hand-written prompt features, computed in fp32 before any halving
            model.handcrafted(cat)
    if precision == "fp16":
        model.backbone.half()  # frozen: half the memory and bandwidth; autocast runs the trainable part
    ids = np.asarray(config["train_ids"], dtype=np.int64)
    steps = steps_per_epoch(len(ids), cfg.batch_size, world)
    opt, sched = make_optimizer(model.trainable, cfg, steps * cfg.epochs)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.trainable.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
    initial = param_digest(model.trainable)
    # Only the trainable part is wrapped: the frozen backbone is held by reference, not as a
    # submodule, so DDP neither broadcasts nor all-reduces it.
    trainable = ray.train.torch.prepare_model(model.trainable, move_to_device=False)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        wanted = epoch_shard(ids, cfg.seed, epoch, rank, world)
        images, categories = _fetch(shard, wanted)
        stats = train_epoch(trainable, _batches(images, categories, cfg.batch_size), opt, sched, scaler, cfg,
                            epoch, rank, model.handcrafted, device)
        mine = hashlib.sha256(np.sort(wanted).tobytes()).hexdigest()[:16]
        digests = _gather(param_digest(model.trainable), world)
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "rank": rank, "world": world,
                   "seconds": time.time() - t0, "images": int(len(wanted)), "precision": precision,
                   "threads": torch.get_num_threads(),
                   "initial_digest": initial, "param_digests": digests, "shard_digests": _gather(mine, world),
                   **{k: float(v) for k, v in stats.items()}}
        if rank == 0:
            state = {"epoch": epoch + 1, "trainable": model.trainable.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(metrics)


def _progress_callback():
    """One line per epoch on the driver's console (the callback runs in the Ray Train controller;
    console.say relays the line to the driver, which does not forward Ray's own worker output)."""
    from ray.train import UserCallback

    from .console import say

    class Progress(UserCallback):
        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            if not metrics or "loss" not in metrics[0]:
                return
            m = metrics[0]
            loss = sum(x["loss"] for x in metrics) / len(metrics)
            say(f"epoch {m['epoch']}/{m['epochs']}  loss {loss:.4f}  {max(x['seconds'] for x in metrics):.1f}s  "
                f"({int(m['steps'])} steps x {m['world']} workers)")

    return Progress()


# --------------------------------------------------------------------------- the command
def _training_samples(args: argparse.Namespace, categories: list[str]) -> dict[str, list[Sample]]:
    """Normal training images per category, in a stable order. Unlabelled manifest rows count as
    normal (fit only ever sees normal images); rows labelled anomalous are left out."""
    samples = load_samples(args.data, categories, "train")
    by_cat: dict[str, list[Sample]] = {c: [] for c in categories}
    for s in samples:
        if s.label != 1 and s.category in by_cat:
            by_cat[s.category].append(s)
    for cat, found in by_cat.items():
        if not found:
            raise UserError(f"category {cat!r} has no normal training images in {args.data}; "
                            "fit needs train/good images (or manifest rows with label 0)")
    return {c: sorted(v, key=lambda s: s.image_id) for c, v in by_cat.items()}


@dataclass
class _Data:
    """Decoded training and held-out images, in the object store."""

    fit_ds: Any
    held_ds: Any
    train_ids: list[int]  # idx of the readable training rows
    bad: dict[int, tuple[str, str]]  # idx -> (path, error) of the unreadable ones


def _prepare_data(by_cat: dict[str, list[Sample]], size: int, seed: int) -> _Data:
    """Hold out normals for calibration, decode everything once with Ray Data, drop unreadable images.

    Row idx follows sorted categories, then image_id, so the training order is fixed by the data,
    not by which decode task finished first."""
    fit_rows, held_rows = [], []
    for cat in sorted(by_cat):
        fit_idx, held_idx = split_holdout(len(by_cat[cat]), HOLDOUT_FRACTION, seed)
        fit_rows += [by_cat[cat][i] for i in fit_idx]
        held_rows += [by_cat[cat][i] for i in held_idx]
    fit_ds = _decoded_dataset(list(enumerate(fit_rows)), size)
    fit_ds.context.enable_progress_bars = False  # every worker streams it every epoch: no bars for that
    held_ds = _decoded_dataset(list(enumerate(held_rows, start=len(fit_rows))), size)
    bad = _decode_errors(fit_ds) | _decode_errors(held_ds)
    # Training is not the scoring job: a bad image is left out with a warning, not a reason to stop.
    for path, err in list(bad.values())[:20]:
        print(f"promptad: warning: skipping unreadable training image {path}: {err}", file=sys.stderr)
    if len(bad) > 20:
        print(f"promptad: warning: ... and {len(bad) - 20} more unreadable images", file=sys.stderr)
    train_ids = [i for i in range(len(fit_rows)) if i not in bad]
    for cat in by_cat:
        if not any(fit_rows[i].category == cat for i in train_ids):
            i = next(i for i in bad if i < len(fit_rows) and fit_rows[i].category == cat)
            raise UserError(f"category {cat!r}: none of its train/good images could be read "
                            f"(e.g. {bad[i][0]}: {bad[i][1]}); fix or replace them")
    return _Data(fit_ds, held_ds, train_ids, bad)


def _train(args: argparse.Namespace, model: PromptAD, data: _Data, storage_uri: str, run_name: str):
    """The Ray Train run; returns its Result (metrics of the last epoch, latest checkpoint)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    fs, fs_path = storage.filesystem(storage_uri)
    use_gpu = args.gpus_per_worker > 0
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"model": model.cfg.to_dict(), "train": train_cfg.to_dict(), "train_ids": data.train_ids},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=fs_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=ray.train.FailureConfig(max_failures=WORKER_RESTARTS),
            callbacks=[_progress_callback()]),
        datasets={"train": data.fit_ds},
        # Not split by Ray: every worker takes its rows by epoch_shard (see the module docstring).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} in {storage_uri} ended without a checkpoint")
    return result


def run(args: argparse.Namespace) -> FitSummary:
    """`promptad fit`: train on normal images with Ray Train, then write the artifact to --out.

    Everything a user can get wrong (data, category, backbone, storage, --resume, resources) is
    checked before training starts."""
    from .raycluster import check_fits, connect, is_local

    t0 = time.time()
    categories = sorted(set(args.category))
    by_cat = _training_samples(args, categories)
    torch.manual_seed(args.seed)
    model = PromptAD(ModelConfig(backbone=args.backbone, categories=categories, input_size=args.input_size))
    storage_uri = args.storage or default_storage(args.out)
    config = _run_config(args)
    run_name = _resume_run(storage_uri, config) if args.resume else None
    if run_name is None:
        _check_writable(storage_uri, "--storage")
    _check_writable(args.out, "--out")
    connect(args.address)
    check_fits({"CPU": (args.cpus_per_worker * args.workers,
                        f"--workers {args.workers} x --cpus-per-worker {args.cpus_per_worker:g}"),
                "GPU": (args.gpus_per_worker * args.workers,
                        f"--workers {args.workers} x --gpus-per-worker {args.gpus_per_worker:g}")},
               "the training workers", "lower --workers or the per-worker resources",
               is_local(args.address))
    run_name = run_name or _new_run(storage_uri, config)
    run_dir = storage.join(storage_uri, run_name)

    data = _prepare_data(by_cat, model.cfg.input_size, args.seed)
    print(f"fit: {len(data.train_ids)} training images, {len(data.bad)} skipped, {len(categories)} "
          f"categor{'y' if len(categories) == 1 else 'ies'}, {args.workers} worker(s); run {run_dir}", flush=True)
    result = _train(args, model, data, storage_uri, run_name)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model.trainable.load_state_dict(state["trainable"])

    # Memory banks and calibration on the driver, from the same decoded images.
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    fit_images = _images_by_category(data.fit_ds, categories)
    held_images = _images_by_category(data.held_ds, categories)
    finish_model(model, fit_images, held_images, seed=args.seed)
    metrics = dict(result.metrics or {})
    training = {"data": args.data, "categories": categories, "epochs": args.epochs, "seed": args.seed,
                "batch_size": args.batch_size, "lr": TrainConfig.lr, "workers": args.workers,
                "precision": metrics.get("precision"), "final_loss": metrics.get("loss"),
                "train_images": {c: int(len(v)) for c, v in fit_images.items()},
                "holdout_images": {c: int(len(v)) for c, v in held_images.items()},
                "skipped_images": len(data.bad), "run": run_dir, "resumed": bool(args.resume),
                "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model_id = save_artifact(model, args.out, training=training)
    print(f"fit: wrote {args.out} (model {model_id})", flush=True)
    return FitSummary(artifact=args.out, model_id=model_id, run_dir=run_dir, metrics=metrics,
                      skipped_images=[p for p, _ in data.bad.values()])
