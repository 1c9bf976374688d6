"""`promptad fit`: the steps of pipeline.fit_in_process as Ray stages; the driver only plans,
checks, orchestrates and writes the artifact.

    driver   samples (data/datasets.py) -> rows (idx, path, category, image_id) -> checks -> run folder
    Ray Data decode (CPU tasks) -> predict.extract (actor pool, --workers actors of the workers'
             resources) -> feature blocks in the object store; an index task per block
    tasks    memory per category (pipeline.build_memory), categories in parallel (fit/categories.py)
    tasks    with training: the evidence head's rows per category (learning/evidence.py), each
             task started when its category's memory is in
    Train    TorchTrainer, --workers DDP workers over the trainable part; each loads only its
             rows, once (fit/train.py); one CPU worker trains in a plain task instead;
             a checkpoint once a minute and after the last epoch
    tasks    calibration per category (calibrate.calibrate_category) on the trained weights
    driver   artifact (artifact.save_artifact) from the tasks' small results

Why this shape. The driver of a GPU cluster is its head node, usually without a GPU and with
little memory; what grows with the data (images, features) stays in the object store and is read
by the tasks that need it, so the driver's memory does not grow with the number of images. The
evidence head learns from the memory's distances to synthetic views of the training images, so
memory comes before training. Its rows are a fixed number per category (TrainConfig.views, not
the number of images) and small, (2, h, w) maps and masks: the driver takes them and computes what
needs all of them (the pixel loss's pos_weight, the head's standardization), as
pipeline.fit_in_process does; their CLIP tokens stay in the object store (stages.category_evidence_rows).

Several categories in one run. Prompts and the localization head are SHARED across categories:
the category word in every prompt makes the text features category-specific, the head learns
generic local defect cues that transfer between products and gets more varied data when
categories are pooled, and the number of parameters does not grow with the number of categories.
What is specific to a product, its normal appearance and its deployment thresholds, is per
category: one memory and one calibration each (leave-one-out over all its normal images; there is
no held-out split).

Resources. Feature actors and training workers each take one worker's resources
(--cpus-per-worker, --gpus-per-worker). Memory, evidence and calibration tasks take a worker's
GPUs and, by default, the CPUs of the nodes that have those GPUs shared among the categories, at
most a node's (stages.category_cpus), as torch threads: their coreset and leave-one-out searches
use every core they get (at one thread they were most of a fit). None of them runs beside
training, so none keeps training's workers waiting. The feature actors are released when the features are materialized, before
training. GPU workers train in fp16 with a GradScaler; CPU workers in fp32, or in bf16
where the CPU does it natively (training.training_precision).

Runs live in --storage as fit-<UTC time>-<id>/ (fit/runs.py: flags, epoch checkpoints, finished
memories and calibrations). `--resume` continues the newest run there and redoes nothing it
holds but the evidence rows while training is unfinished (they are deterministic, so they come out
the same); after training it goes straight to the missing memories and calibrations (the evidence
head's input scales are in the training checkpoint), and it ends with the model_id an
uninterrupted run gives.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from promptad import console
from promptad.data import storage
from promptad.data.datasets import Sample, load_samples, path_named
from promptad.errors import UserError
from promptad.fit import runs, stages
from promptad.fit.categories import PAUSE_ENV, CategoryTasks, task_cpus  # noqa: F401 - PAUSE_ENV: tests
from promptad.fit.pipeline import evidence_shard, head_categories
from promptad.fit.runs import default_storage
from promptad.fit.train import (  # noqa: F401 - documented names
    CHECKPOINTS_KEPT,
    STATE_FILE,
    WORKER_RESTARTS,
    deal,
    newest_state,
    prune_checkpoints,
    rank_rows,
    read_state,
    state_digest,
    token_picks,
    train,
)
from promptad.learning.evidence import Evidence
from promptad.learning.mixing import choice_line
from promptad.learning.training import TrainConfig, check_trained
from promptad.models.artifact import check_out_folder, save_artifact
from promptad.models.model import Calibration, ModelConfig, PromptAD


@dataclass
class FitSummary:
    """What a fit produced, for callers of run() (the command itself prints progress lines)."""

    artifact: str
    model_id: str
    run_dir: str
    metrics: dict[str, Any]  # rank 0's report of the last epoch (train.train_worker)
    skipped_images: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (see run)
    restored: dict[str, Any] = field(default_factory=dict)  # what a resumed run took from its folder
    # memory | evidence | calibration -> {"cpus": reserved per task, "threads": torch threads a task ran on}
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- data
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
    by_cat = _excluded(by_cat, getattr(args, "exclude", []))
    return {c: sorted(v, key=lambda s: s.image_id) for c, v in by_cat.items()}


def named(sample: Sample, name: str) -> bool:
    """Whether --exclude's `name` names this image: its image_id or its path (datasets.path_named)."""
    return path_named(sample.image_id, name) or path_named(sample.path, name)


def _excluded(by_cat: dict[str, list[Sample]], names: list[str]) -> dict[str, list[Sample]]:
    """by_cat without the images --exclude names; a name that matches nothing is a typo, not a no-op,
    and a category left with no image cannot be fitted: both are one-line errors."""
    if not names:
        return by_cat
    unmatched = [n for n in names if not any(named(s, n) for v in by_cat.values() for s in v)]
    if unmatched:
        raise UserError(f"--exclude {', '.join(unmatched)}: no training image of "
                        f"{', '.join(sorted(by_cat))} has that name (give an image_id, a path or its end)")
    kept = {c: [s for s in v if not any(named(s, n) for n in names)] for c, v in by_cat.items()}
    for c, v in kept.items():
        if not v:
            raise UserError(f"--exclude leaves category {c!r} without training images")
        if len(v) < len(by_cat[c]):
            print(f"fit: {c}: left out {len(by_cat[c]) - len(v)} of {len(by_cat[c])} training images (--exclude)",
                  flush=True)
    return kept


def _rows(by_cat: dict[str, list[Sample]]) -> list[dict[str, Any]]:
    """One row per image; idx follows sorted categories, then image_id, so every order downstream
    (memory sources, training ranks) is fixed by the data, not by which task finished first."""
    rows = []
    for cat in sorted(by_cat):
        rows += [{"idx": len(rows) + k, "path": s.path, "category": cat, "image_id": s.image_id}
                 for k, s in enumerate(by_cat[cat])]
    return rows


def _readable(rows: list[dict[str, Any]], feats: stages.FeatureSet) -> tuple[dict[str, list[int]], dict[str, list]]:
    """(idx of the readable rows per category, in idx order; skipped [path, error] per category),
    with a warning per skipped file: training is not the scoring job, a bad image is left out."""
    errors = feats.errors()
    ok: dict[str, list[int]] = {}
    skipped: dict[str, list] = {}
    for r in rows:
        if r["idx"] in errors:
            skipped.setdefault(r["category"], []).append([r["path"], errors[r["idx"]]])
        else:
            ok.setdefault(r["category"], []).append(r["idx"])
    flat = [s for c in sorted(skipped) for s in skipped[c]]
    for path, err in flat[:20]:
        print(f"promptad: warning: skipping unreadable training image {path}: {err}", file=sys.stderr)
    if len(flat) > 20:
        print(f"promptad: warning: ... and {len(flat) - 20} more unreadable images", file=sys.stderr)
    for cat in sorted({r["category"] for r in rows} - set(ok)):
        path, err = skipped[cat][0]
        raise UserError(f"category {cat!r}: none of its train/good images could be read "
                        f"(e.g. {path}: {err}); fix or replace them")
    return ok, skipped


# --------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> FitSummary:
    """`promptad fit`: features, memory, training and calibration on the cluster, then the artifact
    at --out. Everything a user can get wrong (data, category, backbone, storage, --resume,
    resources) is checked before anything runs. `timings` (seconds): features (decode + extract +
    index, wall) with decode_task_s and extract_task_s (summed over tasks); memory_wait and
    evidence (wall from the start of the memory tasks until the last memory, and with training
    until the last evidence rows, are in); training (wall); after_training (wall until every
    calibration, and any memory not yet in, is in); memory_task_s, evidence_task_s and
    calibration_task_s (summed over tasks); write; total."""
    from promptad.raycluster import check_fits, connect, is_local, node_resources

    t_start = time.time()
    clock: dict[str, float] = {}
    storage.preflight({"--data": args.data, "--out": args.out, "--storage": args.storage})
    check_out_folder(args.out)
    categories = sorted(set(args.category))
    by_cat = _training_samples(args, categories)
    head_categories({c: len(v) for c, v in by_cat.items()}, args.epochs)  # no category can train: one line now
    torch.manual_seed(args.seed)
    model = PromptAD(ModelConfig(backbone=args.backbone, categories=categories, input_size=args.input_size,
                                 coreset_draws=args.coreset_draws))
    storage_uri = args.storage or default_storage(args.out)
    config = runs.run_config(args)
    run_name = runs.resume_run(storage_uri, config) if args.resume else None
    if run_name is None:
        runs.check_writable(storage_uri, "--storage")
    runs.check_writable(args.out, "--out")
    connect(args.address)
    check_fits({"CPU": (args.cpus_per_worker * args.workers,
                        f"--workers {args.workers} x --cpus-per-worker {args.cpus_per_worker:g}"),
                "GPU": (args.gpus_per_worker * args.workers,
                        f"--workers {args.workers} x --gpus-per-worker {args.gpus_per_worker:g}")},
               "the training workers", "lower --workers or the per-worker resources",
               is_local(args.address))
    if args.cpus_per_category is not None:
        one_task = {"CPU": (args.cpus_per_category, f"--cpus-per-category {args.cpus_per_category:g}")}
        if args.gpus_per_worker > 0:
            one_task["GPU"] = (args.gpus_per_worker, f"--gpus-per-worker {args.gpus_per_worker:g}")
        check_fits(one_task, "the per-category tasks", "lower --cpus-per-category or leave it out",
                   is_local(args.address), per_node=True)
    run_name = run_name or runs.new_run(storage_uri, config)
    run_dir = storage.join(storage_uri, run_name)
    done = runs.read_done(run_dir, args.epochs, categories, model.trainable.state_dict())
    restored = {"trained": done.trained is not None, "memory": sorted(done.memory),
                "calibration": sorted(done.calibration)}
    if args.resume:
        print(f"fit: resuming {run_dir}: training {'done' if done.trained is not None else 'continues'}, "
              f"memory of {len(done.memory)} and calibration of {len(done.calibration)} of "
              f"{len(categories)} categories restored", flush=True)

    # Features of the categories that still need them (all of them while training is to come).
    need_memory = [c for c in categories if c not in done.memory]
    wanted = set(categories) if done.trained is None else \
        set(need_memory) | {c for c in categories if c not in done.calibration}
    rows = [r for r in _rows(by_cat) if r["category"] in wanted]
    t = time.time()
    feats, ok = _features(args, model.cfg.to_dict(), rows, run_dir, done, clock) if rows else (None, {})
    clock["features"] = time.time() - t

    # every category is done when no rows are left: then nothing below asks which train the head
    heads, warnings = head_categories(done.rows["images"], args.epochs) if rows else ([], [])
    for w in warnings:
        print(f"fit: warning: {w}", flush=True)
    cpus = task_cpus(args, len(categories), node_resources())
    stage = CategoryTasks(args, model.cfg.to_dict(), feats, ok, {r["idx"]: r["path"] for r in rows}, run_dir, done,
                          clock, cpus, heads)
    if args.tolerate:
        print(f"fit: tolerating {', '.join(args.tolerate)}: each image's views under them join the memory banks "
              f"and the global branch ({len(args.tolerate)} extra backbone pass(es) per image)", flush=True)
    stage.start_memory(need_memory)
    t = time.time()
    if args.epochs == 0:
        print("fit: no training (--epochs 0): memory banks and global branch only", flush=True)
    elif done.trained is None:
        evidence, tokens = stage.evidence(heads)  # waits for the memories it is made against
        t = time.time()
        _train(args, model, heads, evidence, tokens, storage_uri, run_name)
        del evidence, tokens  # the last refs to the rows' CLIP tokens: their objects go before calibration
        final = read_state(run_dir, args.epochs)
        check_trained(final["ema"]["state"])
        done.trained, done.metrics = final["ema"]["state"], dict(final.get("metrics") or {})
        done.head_scales = dict(final["head_scales"])
        done.map_choice = dict(final.get("map_choice") or {})
    clock["training"] = time.time() - t
    stage.finish()

    t = time.time()
    model.trainable.load_state_dict(done.trained)
    model.memory = {c: done.memory[c] for c in categories}
    model.calibration.update({c: done.calibration[c] for c in categories})
    skipped = [p for c in categories for p, _ in done.rows["skipped"].get(c, [])]
    training = {"data": args.data, "categories": categories, "epochs": args.epochs, "seed": args.seed,
                "tolerate": list(args.tolerate),
                "batch_size": args.batch_size, "lr": TrainConfig.lr, "workers": args.workers,
                "precision": done.metrics.get("precision"), "final_loss": done.metrics.get("loss"),
                "train_images": {c: int(done.rows["images"].get(c, 0)) for c in categories},
                "skipped_images": len(skipped), "run": run_dir, "resumed": bool(args.resume),
                "seconds": round(time.time() - t_start, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model_id = save_artifact(model, args.out, training=training)
    clock["write"] = time.time() - t
    clock["total"] = time.time() - t_start
    print(f"fit: wrote {args.out} (model {model_id})", flush=True)
    for c in categories:
        print(calibration_line(c, model.calibration[c]), flush=True)
        print(f"fit: {c}: {choice_line(model.calibration[c].map_choice)}", flush=True)
        for w in model.calibration[c].stats.get("warnings", []):
            print(f"fit: warning: {c}: {w}", flush=True)
    return FitSummary(artifact=args.out, model_id=model_id, run_dir=run_dir, metrics=done.metrics,
                      skipped_images=skipped, timings=clock, restored=restored, tasks=stage.tasks)


def calibration_line(category: str, cal: Calibration) -> str:
    """What the deployed image threshold promises, from the calibration's own record."""
    st = cal.stats
    return (f"fit: {category}: image threshold {cal.image_threshold:.3f} from {st['n_normal']} held-out normal "
            f"images, promising at most {st['image_fpr_promised']:.1%} false alarms "
            f"(target {st['image_fpr_target']:.1%})")


def _features(args: argparse.Namespace, model_cfg: dict[str, Any], rows: list[dict[str, Any]], run_dir: str,
              done: runs.Done, clock: dict[str, float]) -> tuple[stages.FeatureSet, dict[str, list[int]]]:
    """The feature stage and its index; records the readable images per category in the run folder."""
    import ray

    from promptad.raycluster import node_resources

    t = time.time()
    actors = stages.feature_actor_count(args.workers, args.cpus_per_worker, args.gpus_per_worker, node_resources())
    blocks = stages.feature_blocks(rows, model_cfg, actors, args.cpus_per_worker, args.gpus_per_worker,
                                   tolerate=args.tolerate)
    index_task = stages.remote(stages.index_block).options(num_cpus=stages.INDEX_CPUS)
    feats = stages.FeatureSet(blocks, ray.get([index_task.remote(b) for b in blocks]))
    ok, skipped = _readable(rows, feats)
    clock["decode_task_s"], clock["extract_task_s"] = feats.seconds()
    images = {c: len(ok[c]) for c in ok}
    print(f"fit: features of {sum(images.values())} images ({len(feats.errors())} skipped) in "
          f"{time.time() - t:.1f}s; run {run_dir}", flush=True)
    done.rows["images"].update(images)
    done.rows["skipped"].update(skipped)
    storage.write_bytes(storage.join(run_dir, runs.ROWS_FILE), json.dumps(done.rows, indent=1).encode())
    return feats, ok


def _train(args: argparse.Namespace, model: PromptAD, heads: list[str], evidence: list[Evidence], tokens: list,
           storage_uri: str, run_name: str) -> None:
    """Training (Ray Train, or one task for one CPU worker: train.train) over the evidence rows of the categories that train the head (`heads`, sorted;
    `evidence` and their `tokens` refs in that order: pipeline.head_categories), from the newest
    checkpoint of the run if any. The fit's shard
    (pipeline.evidence_shard, as in-process: the head's standardization and input scales set on
    `model`, the pixel loss's pos_weight), built without tokens, is dealt to the workers."""
    import ray

    categories = model.categories
    shard = evidence_shard(model, dict(zip(heads, evidence)))
    n = len(shard)
    if n < args.workers:
        raise UserError(f"--workers {args.workers} is more than the {n} training rows; lower --workers")
    ranks = rank_rows(shard, args.workers)
    run_dir = storage.join(storage_uri, run_name)
    config = {"model": model.cfg.to_dict(), "rows": n, "run_dir": run_dir,
              "feat_mean": model.trainable.feat_mean.tolist(), "feat_std": model.trainable.feat_std.tolist(),
              "pos_weight": shard.pos_weight,
              "head_scales": {c: list(model.calibration[c].head_scales) for c in categories},
              "map_choice": {c: dict(model.calibration[c].map_choice) for c in categories},
              "train": TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                   precision=args.precision).to_dict(),
              "checkpoint_seconds": args.checkpoint_seconds,
              "rows_refs": [ray.put(r) for r in ranks],
              # CLIP: each rank's tokens, gathered from the evidence tasks' token objects by a tokens task
              "tokens": [stages.Selection(tokens, token_picks([len(e) for e in evidence], r["positions"]))
                         for r in ranks] if model.backbone.has_text else None}
    del ranks
    print(f"fit: training on {n} evidence rows of {console.counted(len(heads), 'category', 'categories')}, "
          f"{console.counted(args.workers, 'worker')}, {console.counted(args.epochs, 'epoch')}", flush=True)
    train(config, workers=args.workers, cpus=args.cpus_per_worker, gpus=args.gpus_per_worker,
          storage_uri=storage_uri, run_name=run_name)
    prune_checkpoints(run_dir)
