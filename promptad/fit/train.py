"""Training in `promptad fit`: DDP over the trainable part only (head, prompts), on the evidence
head's cached rows (learning/evidence.py, made by the evidence tasks). Several workers, or GPU
workers, train under Ray Train's TorchTrainer; one CPU worker trains in a plain Ray task
(train_task): the same loop (train_epochs) and checkpoints, without a worker group, a process
group and a controller to start and report to: a 761-image fit's training stage went from
55.6 s to 6.6 s, the same weights (benchmarks/RESULTS.md, "Ray's share of a fit").

Rows. The evidence rows of every category, in sorted-category order and each category's own row
order (pipeline.evidence_shard's), are dealt round-robin to the ranks: row k goes to rank k mod W,
so every rank sees every category. A row's head input and mask are small, (2, h, w) and (h, w):
the driver puts each rank's into the object store (rank_rows) and the worker fetches its own; a
row's CLIP tokens are not small and never pass through the driver: the worker gathers its rows'
from the evidence tasks' token objects with one tokens task (take_tokens: only its rows reach
it). Each worker holds its rows for the whole run; nothing streams per epoch. The pixel BCE's
pos_weight and the head's standardization are the fit's, computed by the driver over all rows,
the same on every rank. Within an epoch the order is training.epoch_order(seed, epoch, rank), so
a run resumed from a checkpoint replays what the uninterrupted run did. (Ray Data's
streaming_split hands blocks to whichever worker asks first, so a resumed run would not see the
same rows.) With one worker this is training.train_in_process on pipeline.evidence_shard.

Checkpoints. Rank 0 checkpoints the trainable state, optimizer, scheduler, GradScaler, the weight
average (WeightAverage.state_dict), the epoch, the epoch's metrics and the categories'
evidence-head input scales (what calibration needs with the trained state, when a resumed run
does not make the rows again) after the last epoch and, before it, once CHECKPOINT_SECONDS have
passed since its last (checkpoint_due; `--checkpoint-seconds`, 0: every epoch). The newest
CHECKPOINTS_KEPT are kept; a lost worker group (Ray Train) or training task (Ray's task retry)
restarts from the newest, WORKER_RESTARTS times. What the fit keeps is the weight average of the
last epoch's checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from promptad.data import storage
from promptad.fit.stages import INDEX_CPUS, Selection, remote
from promptad.learning.training import (
    Shard,
    TrainConfig,
    make_ema,
    make_optimizer,
    resolve_precision,
    steps_per_epoch,
    train_epoch,
    training_precision,
)
from promptad.models.model import ModelConfig, PromptAD

STATE_FILE = "state.pt"
CHECKPOINTS_KEPT = 2
WORKER_RESTARTS = 2  # a preempted or crashed worker group restarts from the last checkpoint
# Training checkpoints at most once this often (and after the last epoch): a kill loses at most
# this much training, where one every epoch cost ~2 s each on Ray Train against epochs of 0.15 s.
CHECKPOINT_SECONDS = 60.0


def deal(n_rows: int, world: int) -> list[np.ndarray]:
    """Positions (0..n_rows-1, in idx order) of each rank's rows: round-robin."""
    return [np.arange(rank, n_rows, world) for rank in range(world)]


def checkpoint_dir(run_dir: str, epoch: int) -> str:
    return storage.join(run_dir, f"epoch_{epoch:04d}")


def checkpoint_epochs(run_dir: str) -> list[int]:
    """Epochs with a complete checkpoint (its state file exists) in a run folder."""
    epochs = []
    for name in storage.list_dirs(run_dir):
        if name.startswith("epoch_") and name[6:].isdigit() and storage.exists(storage.join(run_dir, name, STATE_FILE)):
            epochs.append(int(name[6:]))
    return sorted(epochs)


def read_state(run_dir: str, epoch: int) -> dict[str, Any]:
    """The checkpoint of `epoch` (tensors and plain values only: loaded with weights_only)."""
    import io

    data = storage.read_bytes(storage.join(checkpoint_dir(run_dir, epoch), STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def newest_state(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    """(epoch, state) of the newest checkpoint in a run folder that reads back whole.

    The driver finds it itself rather than leaving it to Ray Train: Ray Train restores a run from
    the snapshot its controller writes after registering a checkpoint, so a driver killed between
    a checkpoint's upload and that snapshot would retrain from the start; and a kill during an
    upload leaves a partial state file, which is skipped here."""
    for epoch in reversed(checkpoint_epochs(run_dir)):
        try:
            return epoch, read_state(run_dir, epoch)
        except Exception:  # noqa: BLE001 - truncated by a kill mid-upload: not a checkpoint
            continue
    return None


def prune_checkpoints(run_dir: str) -> None:
    """Keep the newest CHECKPOINTS_KEPT epoch checkpoints. Ray Train prunes those it reported;
    a resumed run also leaves the killed run's older ones, which it never registered."""
    for epoch in checkpoint_epochs(run_dir)[:-CHECKPOINTS_KEPT]:
        fs, path = storage.filesystem(checkpoint_dir(run_dir, epoch))
        fs.delete_dir(path)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a trainable state: what a calibration was computed with."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode() + str(v.dtype).encode() + str(tuple(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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


def rank_rows(shard: Shard, world: int) -> list[dict[str, Any]]:
    """Each rank's rows of the fit's evidence shard (pipeline.evidence_shard, built on the driver
    without tokens), dealt round-robin: positions, head inputs, masks and categories, what
    load_shard needs besides the tokens."""
    return [{"positions": pos, "inputs": shard.local[pos], "masks": shard.masks[pos],
             "categories": [shard.categories[k] for k in pos]} for pos in deal(len(shard), world)]


def token_picks(sizes: Sequence[int], positions: np.ndarray) -> list[tuple[int, int]]:
    """(category j, row r within it) of each position in the rows of categories of `sizes` rows."""
    starts = np.cumsum([0, *sizes])
    which = np.searchsorted(starts, positions, side="right") - 1
    return [(int(j), int(p - starts[j])) for j, p in zip(which, positions)]


def take_tokens(picks: list[tuple[int, int]], *tokens: torch.Tensor) -> torch.Tensor:
    """Ray task body (the categories' token objects arrive as arguments): the picked rows' CLIP
    tokens, in the order picked."""
    return torch.stack([tokens[j][r] for j, r in picks])


def load_shard(rows: dict[str, Any], tokens: Selection | None, pos_weight: float) -> Shard:
    """This rank's training shard: its rows from rank_rows, and its CLIP tokens gathered by one
    tokens task (None without a text branch)."""
    import ray

    gathered = None
    if tokens is not None:
        gathered = ray.get(remote(take_tokens).options(num_cpus=INDEX_CPUS).remote(tokens.picks, *tokens.blocks))
    return Shard(rows["inputs"], gathered, list(rows["categories"]), masks=rows["masks"], pos_weight=pos_weight)


def checkpoint_due(now: float, last: float, epoch: int, epochs: int, every: float) -> bool:
    """Whether rank 0 checkpoints after `epoch` (1-based): after the last epoch always, otherwise
    once `every` seconds have passed since its last checkpoint (or the start of training). A
    checkpoint is not free (a state file written, and on Ray Train a report the controller
    registers: ~2 s each, most of a 761-image fit's training when written every epoch); a kill
    loses at most `every` seconds of training, and a resumed run replays the same epochs."""
    return epoch >= epochs or now - last >= every


def _load_state(model: PromptAD, opt, sched, ema, scaler, state: dict[str, Any] | None) -> int:
    """Load a checkpoint's state into the run; the epoch it ends (0 without one)."""
    if state is None:
        return 0
    model.trainable.load_state_dict(state["trainable"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])


def train_epochs(config: dict[str, Any], rank: int, world: int, device: torch.device,
                 restored: dict[str, Any] | None, checkpoint: Callable[[dict[str, Any], dict[str, Any] | None], None],
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> None:
    """One rank's training, on Ray Train's workers and in the one-worker task alike: build the
    model, load this rank's rows, go on from `restored` (a checkpoint's state) if any, train, print
    each epoch's line (rank 0), and where rank 0's checkpoint_due says so call `checkpoint(metrics,
    state)` on every rank, `state` what to keep on rank 0 and None on the others. Nothing is
    reported to Ray Train between checkpoints: a report waits for the controller to poll the
    worker (every 2 s) however small the epoch. `wrap`: the DDP wrapper of the trainable part."""
    import ray

    from promptad.console import say

    cfg = TrainConfig(**config["train"])
    precision = training_precision(device) if cfg.precision == "auto" else resolve_precision(cfg.precision, device)
    cfg = replace(cfg, precision=precision)
    torch.manual_seed(cfg.seed)  # as pipeline.fit_in_process: the head's initialization
    model = PromptAD(ModelConfig(**config["model"])).to(device)
    model.trainable.feat_mean.copy_(torch.tensor(config["feat_mean"], dtype=torch.float32, device=device))
    model.trainable.feat_std.copy_(torch.tensor(config["feat_std"], dtype=torch.float32, device=device))
    if model.backbone.has_text:
        for cat in model.categories:  # hand-written prompt features, computed in fp32 before any halving
            model.handcrafted(cat)
    tokens = config["tokens"][rank] if config.get("tokens") else None
    shard = load_shard(ray.get(config["rows_refs"][rank]), tokens, float(config["pos_weight"]))
    if precision == "fp16":
        model.backbone.half()  # frozen: half the memory and bandwidth; autocast runs the trainable part
    steps = steps_per_epoch(int(config["rows"]), cfg.batch_size, world)
    torch.manual_seed(cfg.seed)  # as training.train_in_process
    opt, sched = make_optimizer(model.trainable, cfg, steps * cfg.epochs)
    ema = make_ema(model.trainable, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    start = _load_state(model, opt, sched, ema, scaler, restored)
    initial = param_digest(model.trainable)
    trainable = wrap(model.trainable)
    mine = hashlib.sha256(shard.local.numpy().tobytes()).hexdigest()[:16]
    every = CHECKPOINT_SECONDS if config.get("checkpoint_seconds") is None else float(config["checkpoint_seconds"])
    last = time.time()
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        stats = train_epoch(trainable, shard, opt, sched, scaler, ema, cfg, epoch, rank, steps, model.handcrafted,
                            device)
        # One exchange per epoch: what the metrics record of every rank, and rank 0's decision to
        # checkpoint, which every rank follows (each must report to Ray Train the same times).
        ranks = _gather({"params": param_digest(model.trainable), "shard": mine, "loss": float(stats["loss"]),
                         "seconds": time.time() - t0,
                         "due": rank == 0 and checkpoint_due(time.time(), last, epoch + 1, cfg.epochs, every)}, world)
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "rank": rank, "world": world,
                   "seconds": time.time() - t0, "images": len(shard), "precision": precision,
                   "threads": torch.get_num_threads(), "initial_digest": initial,
                   "param_digests": [r["params"] for r in ranks], "shard_digests": [r["shard"] for r in ranks],
                   **{k: float(v) for k, v in stats.items()}}
        if rank == 0:
            say(progress_line(metrics, ranks))
        if ranks[0]["due"]:
            state = None
            if rank == 0:
                state = {"epoch": epoch + 1, "trainable": model.trainable.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "ema": ema.state_dict(), "metrics": metrics, "head_scales": config["head_scales"],
                         "map_choice": config["map_choice"]}
            checkpoint(metrics, state)
            last = time.time()


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train_epochs from the newest checkpoint, reporting rank 0's
    checkpoints (and every rank's metrics with them) to Ray Train."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    state = None
    checkpoint = ray.train.get_checkpoint()  # after a worker-group restart within this job
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    # The newest checkpoint in the run folder wins over Ray Train's: Ray Train hands a restarted
    # group the checkpoint its controller registered last, and a worker killed after rank 0 had
    # uploaded the next one but before the controller registered it restarted the group from
    # scratch (tested: a Train worker SIGKILLed right after the first epoch's upload). This also
    # covers --resume: the newest checkpoint of the run folder is where a resumed run goes on.
    newest = newest_state(config["run_dir"])
    if newest is not None and (state is None or int(state["epoch"]) < newest[0]):
        state = newest[1]

    def checkpoint(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:  # the other ranks: Ray Train takes a report from every worker
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{int(state['epoch']):04d}")

    # Only the trainable part is wrapped: the frozen backbone is held by reference, not as a
    # submodule, so DDP neither broadcasts nor all-reduces it.
    train_epochs(config, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), state, checkpoint,
                 wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


def train_task(config: dict[str, Any], threads: int) -> None:
    """Ray task body: one CPU worker's training without Ray Train (no process group, no worker
    group to start, no controller to report to: on a 761-image fit these took ~49 s of a 55.6 s
    training stage). It writes rank 0's checkpoints into the run folder itself, in Ray Train's
    layout, keeping the newest CHECKPOINTS_KEPT, and goes on from the newest there: a task
    retried after its worker died, or a --resume, replays what the uninterrupted run did.
    `threads`: the torch threads a Ray Train worker of the same CPUs ran on (the same rounding,
    the same weights)."""
    import io

    from promptad.actors import start_actor

    device = start_actor("cpu", threads)
    newest = newest_state(config["run_dir"])

    def checkpoint(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(checkpoint_dir(config["run_dir"], int(state["epoch"])), STATE_FILE),
                            buf.getvalue())
        prune_checkpoints(config["run_dir"])

    train_epochs(config, 0, 1, device, None if newest is None else newest[1], checkpoint)


def progress_line(metrics: dict[str, Any], ranks: list[dict[str, Any]]) -> str:
    """The console's line for an epoch: rank 0's metrics, the loss averaged over the ranks and
    the slowest rank's seconds."""
    from promptad.console import counted

    loss = sum(r["loss"] for r in ranks) / len(ranks)
    return (f"epoch {metrics['epoch']}/{metrics['epochs']}  loss {loss:.4f}  {max(r['seconds'] for r in ranks):.1f}s  "
            f"({counted(int(metrics['steps']), 'step')} x {counted(int(metrics['world']), 'worker')})")


def uses_ray_train(workers: int, gpus: float) -> bool:
    """Ray Train (TorchTrainer, DDP) for several workers or GPU workers; one CPU worker trains in
    a plain Ray task (train_task), which computes the same weights without Ray Train's start."""
    return workers > 1 or gpus > 0


def train(config: dict[str, Any], *, workers: int, cpus: float, gpus: float, storage_uri: str,
          run_name: str) -> None:
    """The training run; its checkpoints land in <storage_uri>/<run_name>/epoch_NNNN/."""
    import ray

    if not uses_ray_train(workers, gpus):
        # Ray gives a worker of fractional CPUs one thread, and an integer number that many (Ray
        # Train's workers ran so); a task's process may have been set otherwise by an earlier task.
        task = remote(train_task).options(num_cpus=cpus, max_retries=WORKER_RESTARTS)
        ray.get(task.remote(config, max(1, int(cpus))))
        return
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, fs_path = storage.filesystem(storage_uri)
    use_gpu = gpus > 0
    resources = {"CPU": cpus} | ({"GPU": gpus} if use_gpu else {})
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=fs_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=ray.train.FailureConfig(max_failures=WORKER_RESTARTS)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} in {storage_uri} ended without a checkpoint")
