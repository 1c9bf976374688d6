"""The Ray stages of `promptad fit`: what runs on the cluster, so that the driver never holds an
image or a feature map.

    rows (idx, path, category, image_id: strings, from the driver)
      -> Ray Data, CPU tasks: read + decode + resize (one block = one batch of FEATURE_BATCH rows),
         and the image under each --tolerate condition (shifts.tolerated_views)
      -> Ray Data, actor pool: predict.extract, the frozen backbone loaded once per actor
         (--gpus-per-worker GPUs each on a GPU cluster), and the layers of each image's tolerated
         views (memory takes them into its banks and Gaussian; training does not see them)
      -> materialized feature blocks in the object store: idx, error, layer_<k> (CLIP: tokens),
         tolerated_layer_<k> (N, T, C_k, H_k, W_k) with --tolerate
      -> one index task per block: which rows it holds, which failed
    then, per category, as plain Ray tasks:
      memory       pipeline.build_memory (coreset banks, Gaussian) over the category's block refs
      evidence     with training: learning.evidence.category_evidence against that memory: the
                   chosen images' clean features from the blocks, their pixels read again from
                   storage for the synthetic views; its rows are small, its CLIP tokens are not
                   and stay in the object store for the training workers
      calibration  calibrate.calibrate_category, after training, on the trained weights

Every task sees its category's rows in idx order (sorted categories, then image_id), which is the
order the memory was built in: row i of the category is source i of its banks, what calibration's
leave-one-out and the evidence rows' leave-one-out need. Nothing here depends on which block or
task finished first, so a resumed fit rebuilds exactly what an uninterrupted one built.

One block is one extraction batch (batch_size=None on both stages) and blocks are cut by the row
count alone, so an image is always extracted with the same neighbours: a score on a GPU must not
depend on which images shared its batch (cuDNN picks kernels by batch shape).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from promptad.data import storage
from promptad.data.images import ImageDecodeError, decode_image, resize
from promptad.data.shifts import tolerated_views
from promptad.models.backbones import Features
from promptad.actors import FIT_PRECISION, INFERENCE_PRECISION, ModelActors, device_for, start_actor  # noqa: F401

FEATURE_BATCH_CPU = 16  # images per block and extraction batch on CPU actors
FEATURE_BATCH_GPU = 64  # ... and on GPU actors
DECODE_CPUS = 0.5  # per decode task: two run beside two 0.5-CPU feature actors on a 2-CPU machine
INDEX_CPUS = 0.25  # index and rows tasks only move small arrays or copy rows


# --------------------------------------------------------------------------- models in tasks
@functools.lru_cache(maxsize=1)
def _backbone(spec: str, layers: tuple[int, ...], input_size: int, device: str):
    from promptad.models.backbones import create_backbone

    return create_backbone(spec, layers=list(layers), input_size=input_size).to(device)


def stage_model(model_cfg: dict[str, Any], device: str, threads: int):
    """The model in a task or actor; the frozen backbone is loaded once per worker process (Ray
    reuses processes across tasks), the rest is cheap to build."""
    from promptad.models.model import ModelConfig, PromptAD

    start_actor(device, threads)
    cfg = ModelConfig(**model_cfg)
    backbone = _backbone(cfg.backbone, tuple(cfg.layers), int(cfg.input_size), device)
    return PromptAD(cfg, backbone=backbone).to(device)


# --------------------------------------------------------------------------- decode and extract
def decode_block(batch: dict[str, np.ndarray], size: int, tolerate: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Ray Data map: read, decode and resize, and the tolerated views (shifted at the image's own
    resolution, then resized); a bad image becomes a zero image with its `error`."""
    t0 = time.perf_counter()
    n = len(batch["path"])
    images = np.zeros((n, size, size, 3), np.uint8)
    views = np.zeros((n, len(tolerate), size, size, 3), np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            img = decode_image(storage.read_bytes(str(path)))
            images[i] = resize(img, size)
            for t, view in enumerate(tolerated_views(img, list(tolerate), str(batch["image_id"][i]))):
                views[i, t] = resize(view, size)
            errors.append("")
        except (ImageDecodeError, OSError) as e:  # unreadable object, missing file, bad bytes
            errors.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])
    out = {"idx": batch["idx"], "image": images, "error": np.asarray(errors, dtype=object),
           "decode_s": np.full(n, (time.perf_counter() - t0) / max(n, 1))}
    if tolerate:
        out["tolerated"] = views
    return out


class FeatureExtractor:
    """The feature stage: one model per actor (actors.ModelActors, as score's and audit's), then
    predict.extract per block in the pool's precision."""

    def __init__(self, model_cfg: dict[str, Any], device: str, threads: int, precision: str = INFERENCE_PRECISION):
        self.model = stage_model(model_cfg, device, threads)
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from promptad.predict import extract

        t0 = time.perf_counter()
        views = batch.pop("tolerated", None)
        feats = extract(self.model, batch.pop("image"), self.precision)
        n = len(batch["idx"])
        out = {"idx": batch["idx"], "error": _non_finite_errors(batch["error"], feats.layers),
               "decode_s": batch["decode_s"]}
        for i, t in enumerate(feats.layers):
            out[f"layer_{i}"] = t.cpu().numpy()
        if feats.tokens is not None:
            out["tokens"] = feats.tokens.cpu().numpy()
        if views is not None:  # T batches of the block's size: the shapes the images ran in
            t = views.shape[1]
            vf = Features.cat([extract(self.model, views[:, k], self.precision) for k in range(t)])  # condition-major
            for i, layer in enumerate(vf.layers):
                out[f"tolerated_layer_{i}"] = layer.cpu().view(t, n, *layer.shape[1:]).transpose(0, 1).numpy()
        out["extract_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out


def _non_finite_errors(errors: np.ndarray, layers: Sequence[torch.Tensor]) -> np.ndarray:
    """The block's errors, with a decoded image whose features hold NaN or inf marked as one:
    the fit then skips it like an unreadable image, and it never reaches a bank, a Gaussian or
    the head's standardization (where one NaN spreads to every category)."""
    finite = torch.stack([torch.isfinite(t.flatten(1)).all(1).cpu() for t in layers]).all(0)
    out = errors.copy()
    for i in np.flatnonzero(~finite.numpy()):
        if not out[i]:
            out[i] = "features: the backbone returned non-finite values (NaN or inf) for this image"
    return out


def feature_actor_count(workers: int, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> int:
    """Feature actors of a fit: on GPUs one per training worker; on CPUs one per whole CPU of each
    node, as many as fit beside a decode task with `cpus` each (at least one per worker). The
    feature stage runs before anything else of the fit, and one single-threaded actor left a 2-CPU
    machine's second core idle (features took 2.1x the in-process loop's, which uses both cores).
    Each actor keeps its torch threads (threads_for(cpus)), so every image's features, and the
    model, are the same whatever the count."""
    if gpus > 0:
        return workers
    fit = sum(min(int(n.get("CPU", 0.0)), max(0, int((n.get("CPU", 0.0) - DECODE_CPUS) // max(cpus, 1e-9))))
              for n in nodes)
    return max(workers, fit)


def feature_actors(actors: int, cpus: float, gpus: float) -> ModelActors:
    """The feature stage's actors: the workers' resources, and FIT_PRECISION (fp32 on GPUs too),
    since the memory, evidence rows and calibration are built from these features."""
    return ModelActors(actors, cpus, gpus, precision=FIT_PRECISION)


def feature_blocks(rows: list[dict[str, Any]], model_cfg: dict[str, Any], actors: int, cpus: float,
                   gpus: float, tolerate: Sequence[str] = ()) -> list:
    """Decode and extract `rows` (with the views of the `tolerate` conditions) with Ray Data; the
    refs of the materialized feature blocks (Arrow tables in the object store, owned by the
    driver, never fetched by it)."""
    import warnings

    import ray

    batch = FEATURE_BATCH_GPU if gpus > 0 else FEATURE_BATCH_CPU
    pool = feature_actors(actors, cpus, gpus)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch)))
    ds.context.enable_progress_bars = False  # fit prints its own lines
    ds = ds.map_batches(decode_block, batch_size=None, batch_format="numpy", num_cpus=DECODE_CPUS,
                        fn_kwargs={"size": int(model_cfg["input_size"]), "tolerate": list(tolerate)})
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the restarts as keyword remote args (ModelActors.pool_args) but has
        # no named form yet; they also keep Ray from fusing the decode tasks into the actors when
        # --cpus-per-worker equals DECODE_CPUS.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(FeatureExtractor, batch_size=None, batch_format="numpy",
                            fn_constructor_kwargs={"model_cfg": model_cfg, **pool.constructor_args()},
                            **pool.pool_args())
    return ds.materialize().to_arrow_refs()


# --------------------------------------------------------------------------- index
@dataclass
class BlockIndex:
    """What the driver knows of a feature block: small arrays, never features."""

    idx: np.ndarray  # (n,) int64 dataset idx of each row, in block order
    errors: list[str]  # "" for rows that decoded
    decode_s: float  # task seconds spent decoding this block's images
    extract_s: float  # ... and extracting their features


def _column(table, name: str) -> np.ndarray:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table.select([name])).to_batch_format("numpy")[name]


def index_block(table) -> BlockIndex:
    """Ray task: a feature block's rows and errors, and the seconds its stages took."""
    idx = _column(table, "idx").astype(np.int64)
    errors = [str(e) for e in _column(table, "error")]
    return BlockIndex(idx=idx, errors=errors,
                      decode_s=float(_column(table, "decode_s").sum()),
                      extract_s=float(_column(table, "extract_s").sum()))


# --------------------------------------------------------------------------- rows of blocks
@dataclass
class Selection:
    """Rows to gather from feature blocks, in order: `picks[i]` = (j, r) is row r of blocks[j]."""

    blocks: list  # ObjectRefs of the blocks that hold the rows
    picks: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.picks)


class FeatureSet:
    """The materialized features of a fit: block refs and their index (on the driver; small)."""

    def __init__(self, blocks: list, index: list[BlockIndex]):
        self.blocks = blocks
        self.index = index
        self._where = {int(i): (b, r) for b, ix in enumerate(index) for r, i in enumerate(ix.idx)}

    def errors(self) -> dict[int, str]:
        """idx -> error of the rows that could not be decoded."""
        return {int(i): e for ix in self.index for i, e in zip(ix.idx, ix.errors) if e}

    def seconds(self) -> tuple[float, float]:
        """Task seconds of (decode, extract) over all blocks."""
        return sum(ix.decode_s for ix in self.index), sum(ix.extract_s for ix in self.index)

    def select(self, idx: Sequence[int]) -> Selection:
        """The rows `idx`, in that order."""
        used: dict[int, int] = {}
        picks = []
        for i in idx:
            b, r = self._where[int(i)]
            picks.append((used.setdefault(b, len(used)), r))
        blocks = [None] * len(used)
        for b, j in used.items():
            blocks[j] = self.blocks[b]
        return Selection(blocks, picks)


def take_rows(picks: list[tuple[int, int]], *tables) -> dict[str, np.ndarray]:
    """Ray task body (the blocks arrive as arguments, resolved from the object store): the
    picked rows' idx, layers and CLIP tokens, in the order picked."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    wanted = [c for c in tables[0].column_names
              if c in ("idx", "tokens") or c.startswith("layer_") or c.startswith("tolerated_layer_")]
    parts, where = [], []
    for j, table in enumerate(tables):
        rows = [r for b, r in picks if b == j]
        part = BlockAccessor.for_block(table.select(wanted).take(pa.array(rows, pa.int64())))
        parts.append(part.to_batch_format("numpy"))
        where += [(j, r) for r in rows]
    position = {p: k for k, p in enumerate(where)}
    order = np.asarray([position[p] for p in picks], dtype=np.int64)
    return {c: np.concatenate([p[c] for p in parts])[order] for c in wanted}


def as_features(rows: dict[str, np.ndarray]) -> Features:
    layers = sorted((c for c in rows if c.startswith("layer_")), key=lambda c: int(c.split("_")[1]))
    tokens = rows.get("tokens")
    return Features([torch.from_numpy(np.ascontiguousarray(rows[c])) for c in layers],
                    None if tokens is None else torch.from_numpy(np.ascontiguousarray(tokens)))


def as_tolerated(rows: dict[str, np.ndarray]) -> Features | None:
    """The rows' tolerated views as Features of N * T images, image-major (pipeline's order);
    None without --tolerate."""
    names = sorted((c for c in rows if c.startswith("tolerated_layer_")), key=lambda c: int(c.rsplit("_", 1)[1]))
    if not names:
        return None
    return Features([torch.from_numpy(np.ascontiguousarray(rows[c])).flatten(0, 1) for c in names])


# --------------------------------------------------------------------------- per-category tasks
def category_cpus(nodes: Sequence[Mapping[str, float]], categories: int, floor: float, gpus: float = 0.0) -> float:
    """The CPUs each per-category task reserves by default: the CPUs of the nodes that can host
    it (those with the task's `gpus`) shared among the categories (their tasks run at once), no
    more than the largest such node holds (a task runs on one node) and no less than a worker's.
    The tasks run torch on that many threads, rounded down: the coreset and the leave-one-out
    searches are matrix products that use every core."""
    cpus = [n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) + 1e-9 >= gpus]
    if not cpus:
        return floor
    return max(floor, min(max(cpus), sum(cpus) / max(1, categories)))


def _report(t0: float) -> dict[str, float]:
    """A task's last return: its seconds and the torch threads it ran on (fit's summary)."""
    return {"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def category_memory(model_cfg: dict[str, Any], seed: int, device: str, threads: int,
                    picks: list[tuple[int, int]], *tables):
    """Ray task: one category's memory (pipeline.build_memory) from its rows in idx order; returns
    (CategoryMemory on the CPU, _report)."""
    from promptad.fit.pipeline import build_memory

    t0 = time.perf_counter()
    model = stage_model(model_cfg, device, threads)
    rows = take_rows(picks, *tables)
    views = as_tolerated(rows)
    memory = build_memory(model, as_features(rows).to(device), seed,
                          None if views is None else views.to(device)).to("cpu")
    return memory, _report(t0)


def category_evidence_rows(model_cfg: dict[str, Any], seed: int, views: int, device: str, threads: int,
                           category: str, memory, paths: list[str], picks: list[tuple[int, int]], *tables):
    """Ray task (three returns): one category's evidence-head rows (learning.evidence.category_evidence)
    against its memory. Its readable images in idx order (the memory's sources): `paths`, of which
    only the chosen ones are read again (the synthetic views need their pixels), and their rows in
    the feature blocks (`picks`, `tables`: the chosen images' cached features, measured clean).
    Returns (Evidence without tokens, its CLIP tokens or None, _report): the driver fetches the
    first, (n, 2, h, w) maps and masks; the tokens, (n, 1 + h*w, D) per row, stay in the object
    store for the training workers (train.take_tokens)."""
    from promptad.fit.pipeline import read_images
    from promptad.learning.evidence import category_evidence

    t0 = time.perf_counter()
    model = stage_model(model_cfg, device, threads)
    model.memory = {category: memory.to(model.device)}
    size = int(model_cfg["input_size"])
    evidence = category_evidence(model, category, len(paths), lambda idx: read_images([paths[i] for i in idx], size),
                                 lambda idx: as_features(take_rows([picks[i] for i in idx], *tables)), views, seed)
    return replace(evidence, tokens=None), evidence.tokens, _report(t0)


def category_calibration(model_cfg: dict[str, Any], trained: dict[str, torch.Tensor], was_trained: bool,
                         head_scales: Sequence[float], map_choice: dict, category: str, memory, device: str, threads: int,
                         names: list[str], image_fpr: float, picks: list[tuple[int, int]], *tables):
    """Ray task: one category's calibration (calibrate.calibrate_category) with the trainable
    weights (`was_trained` False: the untrained ones of --epochs 0), the evidence head's input
    scales it was trained with and the map's regional weight chosen on its views (none without
    training), its memory and its rows in the order the
    memory was built from (`names`: their paths, for its warnings), at the false-alarm target
    `image_fpr`; (Calibration, _report)."""
    from promptad.fit.calibrate import calibrate_category
    from promptad.fit.pipeline import check_calibration

    t0 = time.perf_counter()
    model = stage_model(model_cfg, device, threads)
    model.trainable.load_state_dict(trained)
    model.memory = {category: memory.to(model.device)}
    model.calibration[category] = replace(model.calibration[category], head_scales=list(head_scales),
                                            map_choice=dict(map_choice))
    rows = take_rows(picks, *tables)
    calibration = calibrate_category(model, category, as_features(rows), trained=was_trained, image_fpr=image_fpr,
                                     tolerated=as_tolerated(rows), names=names)
    return check_calibration(category, calibration), _report(t0)


@functools.lru_cache(maxsize=None)
def remote(fn):
    """`fn` as a Ray remote function, made once per process (callers set resources with
    .options(); Ray is imported only when a stage runs)."""
    import ray

    return ray.remote(fn)

