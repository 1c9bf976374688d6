"""The Ray stages of `promptad audit`: what runs on the cluster (command.py is the driver).

    _load_rows  (CPU tasks) read + decode the image and its mask once, then for each condition
                (clean, then every --shifts name) apply the seeded shift to the full-resolution
                image and mask and resize: model input S x S, mask at the metric resolution
    _Scorer     (actor pool) predict.predict_rows -- the same inference path as `score` -- then
                the map resized to the metric resolution; a row the model cannot score becomes
                an error row
    _render     (CPU tasks) the labelled visualization PNG of every clean image

Ragged data (views, masks, maps) travel between stages as bytes plus a shape.
"""
from __future__ import annotations

import argparse
import math
import warnings

import numpy as np

from promptad.actors import INFERENCE_PRECISION, ModelActors
from promptad.data import storage
from promptad.data.datasets import NORMAL_DEFECT, Sample
from promptad.data.images import ImageDecodeError, decode_image, decode_mask, encode_png, map_shape, resize, resize_mask
from promptad.data.shifts import apply_shift, shift_seed
from promptad.models.model import Calibration
from promptad.postprocess import resize_map
from promptad.predict import load_for_worker, predict_rows
from promptad.report.plots import visualization

CLEAN = "clean"
LOAD_BATCH = 4  # images per read task; each becomes 1 + len(shifts) rows
LOAD_CPUS = 0.25  # per read task
RENDER_CPUS = 0.25  # per render task


def model_actors(args: argparse.Namespace) -> ModelActors:
    """The audit's scoring actors: score's (actors.ModelActors) with the audit's flags."""
    return ModelActors(args.actors, args.cpus_per_actor, args.gpus_per_actor)




def _read_mask(mask_path: str, label: int, shape: tuple[int, int]
               ) -> tuple[np.ndarray | None, str]:
    """(mask at the image's size or None, why it is unusable or ""). Normal images without a
    mask are all-normal; an anomalous one without a mask is skipped by pixel metrics."""
    if not mask_path:
        return (np.zeros(shape, bool), "") if label == 0 else (None, "")
    try:
        mask = decode_mask(storage.read_bytes(mask_path))
    except (ImageDecodeError, OSError) as e:
        return None, f"mask {mask_path}: {e}"
    if mask.shape != shape:
        return None, (f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                      f"{shape[1]}x{shape[0]}")
    return mask, ""


def _load_rows(batch: dict[str, np.ndarray], input_size: int, conditions: list[str]
               ) -> dict[str, np.ndarray]:
    """Decode each sample once and emit one row per condition (only the clean row for an image
    that fails, carrying its error). Ragged data travel as bytes plus a shape."""
    rows: dict[str, list] = {k: [] for k in (
        "image_id", "path", "category", "label", "defect", "vis", "condition", "error",
        "mask_error", "height", "width", "has_mask", "mask", "view", "input")}

    def emit(i: int, condition: str, error: str = "", mask_error: str = "", hw=(0, 0),
             mask: np.ndarray | None = None, view: bytes = b"",
             model_input: np.ndarray | None = None) -> None:
        for k in ("image_id", "path", "category", "label", "defect", "vis"):
            rows[k].append(batch[k][i])
        rows["condition"].append(condition)
        rows["error"].append(error)
        rows["mask_error"].append(mask_error)
        rows["height"].append(hw[0])
        rows["width"].append(hw[1])
        rows["has_mask"].append(mask is not None)
        rows["mask"].append(np.packbits(mask).tobytes() if mask is not None else b"")
        rows["view"].append(view)
        rows["input"].append(model_input if model_input is not None
                             else np.zeros((input_size, input_size, 3), np.uint8))

    for i in range(len(batch["path"])):
        try:
            image = decode_image(storage.read_bytes(str(batch["path"][i])))
        except (ImageDecodeError, OSError) as e:
            emit(i, CLEAN, error=" ".join(str(e).split()) or type(e).__name__)
            continue
        shape = image.shape[:2]
        mask, mask_error = _read_mask(str(batch["mask_path"][i]), int(batch["label"][i]), shape)
        h, w = map_shape(*shape)
        for condition in conditions:
            img, m = image, mask
            if condition != CLEAN:
                img, m = apply_shift(condition, image, mask,
                                     shift_seed(str(batch["image_id"][i]), condition))
            view = resize(img, (h, w)).tobytes() if condition == CLEAN else b""
            emit(i, condition, mask_error=mask_error, hw=(h, w),
                 mask=resize_mask(m, (h, w)) if m is not None else None, view=view,
                 model_input=resize(img, input_size))
    out = {k: _objects(v) for k, v in rows.items() if k != "input"}
    out["label"] = np.asarray(rows["label"], np.int8)
    out["height"] = np.asarray(rows["height"], np.int32)
    out["width"] = np.asarray(rows["width"], np.int32)
    out["has_mask"] = np.asarray(rows["has_mask"], bool)
    out["input"] = np.stack(rows["input"])
    return out


def _objects(values: list) -> np.ndarray:
    """An object array: numpy would otherwise make bytes fixed-width and strip trailing NULs."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


class _Scorer:
    """One model per actor, loaded once; rows that failed to load pass through unscored, and
    a row the model could not score (an error from predict_rows, a non-finite score, an
    empty or non-finite map) becomes an error row, never an exception. Built from
    actors.ModelActors, as score's predictors are."""

    precision = INFERENCE_PRECISION

    def __init__(self, model_uri: str, device: str, threads: int, precision: str = INFERENCE_PRECISION):
        self.model = load_for_worker(model_uri, device, threads)
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pred = predict_rows(self.model, batch["input"], batch["category"], batch["error"], self.precision)
        n = len(batch["image_id"])
        maps, errors = _objects([b""] * n), _objects([str(e) for e in batch["error"]])
        pred_errors = getattr(pred, "errors", None)  # a newer predict_rows may name them
        for i in range(n):
            if errors[i]:
                continue
            why = str(pred_errors[i]) if pred_errors is not None and pred_errors[i] else ""
            amap = np.asarray(pred.maps[i]) if i < len(pred.maps) else np.empty(0)
            why = why or _prediction_problem(float(pred.scores[i]), amap)
            if why:
                errors[i] = f"predict: {why}"
                continue
            shape = (int(batch["height"][i]), int(batch["width"][i]))
            maps[i] = resize_map(amap, shape).tobytes()
        out = {k: v for k, v in batch.items() if k != "input"}
        out["score"], out["map"], out["error"] = pred.scores, maps, errors
        return out


def _prediction_problem(score: float, amap: np.ndarray) -> str:
    """Why a prediction cannot be used ("" when it can)."""
    if not math.isfinite(score):
        return f"non-finite image score ({score})"
    if amap.ndim != 2 or amap.size == 0:
        return f"empty or malformed anomaly map (shape {amap.shape})"
    if not np.all(np.isfinite(amap)):
        return "anomaly map has non-finite values"
    return ""


def unpack_mask(packed: bytes, h: int, w: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=h * w).reshape(h, w).astype(bool)


def caption(image_id: str, defect: str, score: float, threshold: float, width: int = 72) -> str:
    """The line under a visualization: which image, its score against the deployed threshold,
    the decision and whether it was right. Long ids keep their end (the file name)."""
    flagged = score >= threshold
    outcome = ("false alarm" if flagged else "correct") if defect == NORMAL_DEFECT else \
        ("caught" if flagged else "missed")
    name = image_id if len(image_id) <= width else "..." + image_id[-(width - 3):]
    thr = f"{threshold:.4g}" if math.isfinite(threshold) else "none (uncalibrated)"
    return (f"{name}\nscore {score:.4g} | threshold {thr} | decision: "
            f"{'anomalous' if flagged else 'normal'} | truth: {defect} ({outcome})")


def _render(batch: dict[str, np.ndarray], calibration: dict[str, Calibration]
            ) -> dict[str, np.ndarray]:
    """The labelled visualization (plots.visualization: input | map over the input with the
    pixel-threshold contour | mask, colour bar, caption) as PNG bytes for each scored clean row."""
    n = len(batch["image_id"])
    pngs = _objects([b""] * n)
    for i in range(n):
        if batch["condition"][i] != CLEAN or batch["error"][i]:
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        view = np.frombuffer(batch["view"][i], np.uint8).reshape(h, w, 3)
        amap = np.frombuffer(batch["map"][i], np.float32).reshape(h, w)
        mask = unpack_mask(batch["mask"][i], h, w) if batch["has_mask"][i] else None
        cal = calibration[str(batch["category"][i])]
        text = caption(str(batch["image_id"][i]), str(batch["defect"][i]),
                       float(batch["score"][i]), cal.image_threshold)
        pngs[i] = encode_png(visualization(view, amap, mask, pixel_center=cal.pixel_center,
                                           pixel_threshold=cal.pixel_threshold, caption=text))
    out = {k: v for k, v in batch.items() if k != "view"}
    out["png"] = pngs
    return out


def dataset(samples: list[Sample], vis: dict[str, str], args: argparse.Namespace,
            model_uri: str, input_size: int, conditions: list[str],
            calibration: dict[str, Calibration]):
    """The audit's Ray Data pipeline over `samples`: rows of every condition, scored, the clean
    ones rendered (module docstring); the driver iterates it."""
    import ray

    items = [{"image_id": s.image_id, "path": s.path, "category": s.category, "label": s.label,
              "defect": s.defect, "mask_path": s.mask_path or "", "vis": vis[s.image_id]}
             for s in samples]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / LOAD_BATCH)))
    # The actors' remote args (ModelActors.pool_args) keep Ray Data from fusing the reads into
    # the actor, which would then decode and shift while the model waits.
    ds = ds.map_batches(_load_rows, batch_size=LOAD_BATCH, num_cpus=LOAD_CPUS, batch_format="numpy",
                        fn_kwargs={"input_size": input_size, "conditions": conditions})
    pool = model_actors(args)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the restarts as keyword remote args but has no named form yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(_Scorer, batch_size=args.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"model_uri": model_uri, **pool.constructor_args()},
                            **pool.pool_args())
    return ds.map_batches(_render, batch_size=args.batch_size, num_cpus=RENDER_CPUS,
                          batch_format="numpy", fn_kwargs={"calibration": calibration})
