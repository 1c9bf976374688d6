"""The per-category tasks of `promptad fit` as its driver runs them (fit/command.py): memory,
the evidence head's rows (with training) and calibration, one Ray task per category each
(stages.category_memory, category_evidence_rows, category_calibration), their CPUs, and the
checkpoints of their results in the run folder (fit/runs.py).

Order. An evidence task reads its category's memory, so it is started on the memory task's ref
and Ray runs it once that memory is in; training waits for every category's evidence rows; a
calibration needs the trained weights, and the memory's evidence head input scales with them.
None of these tasks runs beside training, so each reserves its full share of the cluster's CPUs
(task_cpus).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

from promptad import console
from promptad.fit import runs, stages
from promptad.fit.train import state_digest
from promptad.learning.evidence import Evidence
from promptad.learning.training import TrainConfig
from promptad.raycluster import threads_for

# Test hook: the driver stops for good right after the first category's result of this stage is
# in (memory | evidence | calibration; memories and calibrations are then checkpointed), so a test
# can kill it at a known point (tests/test_fit.py).
PAUSE_ENV = "PROMPTAD_FIT_PAUSE_AFTER"


def pause_hook(stage: str, category: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"fit: paused after the {stage} checkpoint of {category} ({PAUSE_ENV})", flush=True)
        while True:
            time.sleep(60)


def task_cpus(args: argparse.Namespace, categories: int, nodes: list[dict[str, float]]) -> float:
    """CPUs of every memory, evidence and calibration task: --cpus-per-category, or by default
    stages.category_cpus (none of them runs beside training, so each may have its share)."""
    if args.cpus_per_category is not None:
        return args.cpus_per_category
    return stages.category_cpus(nodes, categories, args.cpus_per_worker, args.gpus_per_worker)


class CategoryTasks:
    """The per-category tasks: memory, evidence (with training; each on its category's memory) and
    calibration (after training), memories and calibrations checkpointed in the run folder as they
    arrive; `heads`: the categories calibrated with the trained head (the others have no head
    rows and no head in their fusion); `cpus`: what each reserves (task_cpus), which is also its torch threads (rounded
    down, at least one)."""

    def __init__(self, args: argparse.Namespace, model_cfg: dict[str, Any], feats: stages.FeatureSet | None,
                 ok: dict[str, list[int]], paths: dict[int, str], run_dir: str, done: runs.Done,
                 clock: dict[str, float], cpus: float, heads: list[str]):
        self.model_cfg, self.feats, self.ok, self.paths, self.run_dir, self.done, self.clock = \
            model_cfg, feats, ok, paths, run_dir, done, clock
        self.seed, self.was_trained, self.views = args.seed, args.epochs > 0, TrainConfig.views
        self.gpus, self.cpus = args.gpus_per_worker, cpus
        self.image_fpr = args.false_alarm_rate
        self.heads = set(heads)  # the categories whose rows train the head (pipeline.head_categories)
        self.device = stages.device_for(args.gpus_per_worker)
        self.memory_refs: dict[str, tuple[Any, Any]] = {}  # built in this run: (memory, report)
        self.pending: dict[Any, tuple[str, str, Any]] = {}  # result ref -> (kind, category, report ref)
        self._memory_args: dict[str, Any] = {}
        self.tasks: dict[str, dict[str, float]] = {}
        self.digest = ""
        self.t0 = time.time()
        clock.update(memory_task_s=0.0, evidence_task_s=0.0, calibration_task_s=0.0, memory_wait=0.0, evidence=0.0)

    def _task(self, fn, returns: int = 2):
        """`fn` as a Ray task with the per-category CPUs, and the torch threads it is to run on."""
        task = stages.remote(fn).options(num_returns=returns, num_cpus=self.cpus, num_gpus=self.gpus)
        return task, threads_for(self.cpus)

    def _rows(self, category: str) -> tuple:
        """Task arguments for a category's readable rows in idx order: picks, then their blocks."""
        selection = self.feats.select(self.ok[category])
        return (selection.picks, *selection.blocks)

    def _memory(self, category: str):
        """A task's memory argument: the ref of the memory task, or the restored memory put once."""
        import ray

        if category in self.memory_refs:
            return self.memory_refs[category][0]
        if category not in self._memory_args:
            self._memory_args[category] = ray.put(self.done.memory[category])
        return self._memory_args[category]

    def start_memory(self, categories: list[str]) -> None:
        self.t0 = time.time()
        task, threads = self._task(stages.category_memory)
        self.memory_refs = {c: task.remote(self.model_cfg, self.seed, self.device, threads, *self._rows(c))
                            for c in categories}
        self.pending.update({mem: ("memory", c, report) for c, (mem, report) in self.memory_refs.items()})
        if categories:
            self._announce("building the memory of", categories, threads)

    def _announce(self, what: str, categories: list[str], threads: int) -> None:
        print(f"fit: {what} {console.counted(len(categories), 'category', 'categories')} on Ray, "
              f"{console.counted(self.cpus, 'CPU')} per task (torch on {console.counted(threads, 'thread')})",
              flush=True)

    def evidence(self, categories: list[str]) -> tuple[list[Evidence], list]:
        """The evidence head's rows of `categories` (sorted), each task started on its category's
        memory, and every memory of the run in (checkpointed as it comes): (the rows without their
        tokens, fetched; the refs of their tokens, never fetched here), both in `categories` order."""
        task, threads = self._task(stages.category_evidence_rows, returns=3)
        refs = {c: task.remote(self.model_cfg, self.seed, self.views, self.device, threads, c, self._memory(c),
                               [self.paths[i] for i in self.ok[c]], *self._rows(c)) for c in categories}
        self._announce(f"synthetic views (at most {self.views} per category) for the evidence head of", categories,
                       threads)
        self.pending.update({rows: ("evidence", c, report) for c, (rows, _, report) in refs.items()})
        rows = self._collect(lambda kind: kind != "calibration")
        self.clock["evidence"] = time.time() - self.t0
        return [rows[c] for c in categories], [refs[c][1] for c in categories]

    def _collect(self, wanted: Callable[[str], bool]) -> dict[str, Evidence]:
        """Wait for the pending results of the kinds `wanted(kind)` is true for, checkpointing
        memories and calibrations as they arrive; the evidence rows that came, per category."""
        import ray

        rows: dict[str, Evidence] = {}
        while waiting := [ref for ref, (kind, _, _) in self.pending.items() if wanted(kind)]:
            (ref,), _ = ray.wait(waiting, num_returns=1)
            kind, c, report_ref = self.pending.pop(ref)
            value, report = ray.get([ref, report_ref])
            self.clock[f"{kind}_task_s"] += report["seconds"]
            self.tasks[kind] = {"cpus": self.cpus, "threads": report["threads"]}
            if kind == "memory":
                self.done.memory[c] = value
                runs.save_memory(self.run_dir, c, value)
                self.clock["memory_wait"] = time.time() - self.t0
            elif kind == "calibration":
                self.done.calibration[c] = value
                runs.save_calibration(self.run_dir, c, value, self.digest)
            else:
                rows[c] = value
            pause_hook(kind, c)
        return rows

    def finish(self) -> None:
        """Calibrate every category not yet calibrated, once its memory is there; collect."""
        import ray

        t0 = time.time()
        done = self.done
        self.digest = state_digest(done.trained)
        trained = ray.put(done.trained)
        task, threads = self._task(stages.category_calibration)
        memories = sum(kind == "memory" for kind, _, _ in self.pending.values())
        need = [c for c in sorted(done.memory.keys() | self.memory_refs.keys()) if c not in done.calibration]
        for c in need:
            scales = done.head_scales[c] if self.was_trained else []
            with_head = self.was_trained and c in self.heads
            choice = done.map_choice.get(c, {}) if with_head else {}
            cal, report = task.remote(self.model_cfg, trained, with_head, scales, choice, c, self._memory(c),
                                      self.device, threads, [self.paths[i] for i in self.ok[c]], self.image_fpr,
                                      *self._rows(c))
            self.pending[cal] = ("calibration", c, report)
        if need:
            self._announce("calibrating", need, threads)
        self._collect(lambda kind: True)
        self.clock["after_training"] = time.time() - t0
        done_what = (f"memory of {memories} and " if memories else "") + \
            f"calibration of {console.counted(len(need), 'category', 'categories')}"
        print(f"fit: {done_what} done {self.clock['after_training']:.1f}s after training", flush=True)
