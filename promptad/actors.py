"""The model actors: score's predictors, audit's scorers and the fit's feature extractors are each a
Ray Data actor pool with one model per actor. What such an actor is (its device, torch threads,
precision, reserved resources and restarts) is defined here once, so the three cannot drift apart
(issue 37: audit's had no resource check, one thread whatever it reserved, and no restarts).

Precision (the contract the artifact's `feature_precision` records, models/artifact.py):
- a fit's backbone passes, whose features its memory banks, Gaussian, evidence rows and calibration
  are built from, run in FIT_PRECISION, fp32 on every device (TF32 off on GPUs: numerics.fp32_math),
  so a model is the same whether it was fitted on CPUs or GPUs;
- inference runs in INFERENCE_PRECISION: fp16 autocast for the backbone and head on a GPU (the
  memory search, fusion and blur stay fp32, TF32 off: numerics.float32_math), fp32 on a CPU.
  Scored on a GPU, an image's features differ from the CPU's by about fp16 rounding. The promise:
  fitted on either and scored on either, at least DECISION_AGREEMENT of the images get the same
  is_anomalous, the scores of at least SCORE_SHARE of them are within SCORE_TOLERANCE of the
  CPU's and every score within SCORE_BOUND (tests/test_precision.py with stand-ins for a GPU's
  features; benchmarks/gpu_check.sh on a GPU). Not every score within SCORE_TOLERANCE: a bank
  built from features a millionth apart can pick another, near-equal patch, and the few images
  whose nearest patch that was move further (2 of 1,000 synthetic images by up to 0.33, on this
  project's CI machine, with every decision the same).

Why the fit is not fp16 on GPUs, as it was: its calibration reads small differences (the local
score's robust spread over normal images can be 2 % of its median), so a fit on fp16-rounded
features moved scores by up to 1.1 robust standard deviations on the synthetic set of
tests/test_precision.py, where scoring fp16-rounded features moved them by 0.007.

Ray is imported only in `pool_args` and `check`, which run on the driver where Ray does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptad.raycluster import threads_for

if TYPE_CHECKING:
    import torch

FIT_PRECISION = "fp32"
INFERENCE_PRECISION = "auto"  # learning.training.resolve_precision: fp16 on CUDA, fp32 elsewhere
DECISION_AGREEMENT = 0.999  # share of images decided alike, fitted and scored on CPU or GPU
SCORE_TOLERANCE = 0.05  # score difference of most images, in robust standard deviations of normal scores
SCORE_SHARE = 0.99  # ... the share of images held to it
SCORE_BOUND = 0.5  # largest score difference of any image


@dataclass(frozen=True)
class ModelActors:
    """A pool of `actors` model actors, each reserving `cpus` CPUs and `gpus` GPUs and running its
    model in `precision`."""

    actors: int
    cpus: float
    gpus: float
    precision: str = INFERENCE_PRECISION

    @property
    def device(self) -> str:
        return device_for(self.gpus)

    @property
    def threads(self) -> int:
        """Torch threads: the whole CPUs reserved, at least one. More would fight the pipeline's
        read and commit tasks for cores, and OpenMP threads slow down badly when preempted."""
        return threads_for(self.cpus)

    def constructor_args(self) -> dict[str, object]:
        """What an actor class of the three takes besides its model: device, threads, precision."""
        return {"device": self.device, "threads": self.threads, "precision": self.precision}

    def pool_args(self) -> dict[str, object]:
        """map_batches keywords for the pool: its size, resources, and restarts without end (a
        killed actor is restarted, loads its model again, and its batch is redone). Passing the
        restarts also keeps Ray Data from fusing the CPU tasks before the pool into the actors when
        their CPU shares are equal."""
        import ray

        return {"compute": ray.data.ActorPoolStrategy(size=self.actors), "num_cpus": self.cpus,
                "num_gpus": self.gpus, "max_restarts": -1, "max_task_retries": -1}

    def check(self, what: str, fix: str, local: bool, cpus_flag: str, gpus_flag: str,
              beside: float = 0.0, beside_why: str = "") -> None:
        """raycluster.check_fits for one actor with the `beside` CPUs the stages around it need at
        the same time: a pool the cluster can never place would wait forever."""
        from promptad.raycluster import check_fits

        cpus_why = f"{cpus_flag} {self.cpus:g}" + (f" plus {beside:g} {beside_why}" if beside else "")
        check_fits({"CPU": (self.cpus + beside, cpus_why), "GPU": (self.gpus, f"{gpus_flag} {self.gpus:g}")},
                   what, fix, local)


def device_for(gpus: float) -> str:
    """cuda for an actor or task that holds a GPU (or a share of one), else cpu."""
    return "cuda" if gpus > 0 else "cpu"


def start_actor(device: str, threads: int) -> torch.device:
    """What every model actor does before loading its model: its torch threads (on a GPU too: the
    actor's CPU work is small and its CPUs are the ones it reserved); returns the device. (torch is
    imported here: the driver and the CPU tasks that import this module never need it.)"""
    import torch

    torch.set_num_threads(max(1, threads))
    return torch.device(device)
