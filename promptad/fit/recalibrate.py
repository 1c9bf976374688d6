"""`promptad recalibrate`: a model's image thresholds drawn again without refitting.

A fit keeps every normal image's held-out score beside its name (calibrate.image_threshold_of,
`stats["held_out"]`). Recalibrating applies the same threshold rule to those scores
- at another false-alarm target (--false-alarm-rate),
- without some images (--exclude: an image found defective, or a photo that should not count), or
- with new normal images (--add: a folder or manifest of images marked normal, e.g. false alarms an
  engineer cleared). They are scored by the model as it stands; they are not in its memory, so
  their scores are held out by construction, like the fit's leave-one-out ones.
and writes a new artifact (a new model_id) whose banks, head and scales are the old one's. Only the
image threshold and the score normalization's centre move; the memory still holds any excluded
image's patches, so a defective image is truly gone only after `fit --exclude`. No Ray: the work is
a handful of order statistics, plus one model pass over the added images.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np

from promptad.data import storage
from promptad.data.datasets import load_samples, path_named
from promptad.errors import UserError


@dataclass
class RecalibrateSummary:
    artifact: str
    model_id: str
    source_model_id: str
    lines: list[str]


def _added_scores(model, data: str, categories: list[str], batch_size: int = 16) -> dict[str, tuple[list, list]]:
    """(names, scores) per category of the normal images under `data` (rows labelled anomalous are
    left out, as fit leaves them out), scored by the model; an unreadable image is a one-line error."""
    from promptad.data.images import ImageDecodeError
    from promptad.fit.pipeline import read_images
    from promptad.predict import predict

    samples = [s for s in load_samples(data, categories, "train") if s.label != 1 and s.category in categories]
    if not samples:
        raise UserError(f"--add {data}: no normal images of {', '.join(categories)} there")
    size = model.backbone.input_size
    out: dict[str, tuple[list, list]] = {c: ([], []) for c in categories}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = np.zeros((len(chunk), size, size, 3), np.uint8)
        for i, s in enumerate(chunk):
            try:  # one at a time, to name the file that fails; the fit's decoding (pipeline.read_images)
                images[i] = read_images([s.path], size)[0]
            except (OSError, ImageDecodeError) as e:
                raise UserError(f"--add: cannot read {s.path}: {' '.join(str(e).split())}") from None
        scores = predict(model, images, [s.category for s in chunk], precision="fp32").scores
        for s, v in zip(chunk, scores):
            out[s.category][0].append(s.path)
            out[s.category][1].append(float(v))
    return out


def recalibrate(model, categories: list[str], target: float | None, exclude: list[str],
                added: dict[str, tuple[list, list]]) -> list[str]:
    """Re-draw each category's image threshold in place (model.calibration); returns the lines to print."""
    from promptad.fit.calibrate import IMAGE_FPR, image_threshold_of, sample_warnings

    lines = []
    unmatched = set(exclude)
    for c in categories:
        cal = model.calibration[c]
        held = cal.stats.get("held_out")
        if not held:
            raise UserError(f"the model's category {c!r} was fitted before fits kept their held-out normal scores; "
                            "refit it (promptad fit) to recalibrate it")
        new_names, new_scores = added.get(c, ([], []))
        dropped = {i for i, name in enumerate(held["images"]) if any(path_named(name, x) for x in exclude)}
        unmatched -= {x for x in exclude for i in dropped if path_named(held["images"][i], x)}
        names = [n for i, n in enumerate(held["images"]) if i not in dropped] + new_names
        scores = [v for i, v in enumerate(held["scores"]) if i not in dropped] + new_scores
        if not scores:
            raise UserError(f"--exclude leaves category {c!r} without normal images to calibrate on")
        rate = cal.stats.get("image_fpr_target", IMAGE_FPR) if target is None else target
        values = np.asarray(scores, np.float32)
        threshold, image_stats, warnings = image_threshold_of(values, rate, names)
        record = {"from_model": getattr(model, "model_id", None),
                  "excluded": [held["images"][i] for i in sorted(dropped)], "added": len(new_names)}
        stats = {**cal.stats, **image_stats, "warnings": sample_warnings(values) + warnings, "recalibrated": record}
        model.calibration[c] = replace(cal, image_threshold=threshold, image_center=float(np.median(scores)),
                                       stats=stats)
        lines.append(f"recalibrate: {c}: {len(dropped)} image(s) left out, {record['added']} added: "
                     f"{len(scores)} normal images")
    if unmatched:
        raise UserError(f"--exclude {', '.join(sorted(unmatched))}: no normal image the model was calibrated on "
                        "has that name (give a path or its end)")
    return lines


def run(args: argparse.Namespace) -> RecalibrateSummary:
    """`promptad recalibrate` (and jobs/recalibrate.py)."""
    from promptad.fit.command import calibration_line
    from promptad.models.artifact import check_out_folder, load_artifact, save_artifact

    storage.preflight({"--model": args.model, "--out": args.out, **({"--add": args.add} if args.add else {})})
    if storage.join(args.model, "") == storage.join(args.out, ""):
        raise UserError("--out must differ from --model: recalibration writes a new model beside the old one")
    check_out_folder(args.out)
    model = load_artifact(args.model)
    categories = sorted(set(args.category)) if args.category else list(model.categories)
    unknown = [c for c in categories if c not in model.categories]
    if unknown:
        raise UserError(f"--category {', '.join(unknown)}: the model holds {', '.join(model.categories)}")
    added = _added_scores(model, args.add, categories) if args.add else {}
    source = model.model_id
    lines = recalibrate(model, categories, args.false_alarm_rate, args.exclude, added)
    model_id = save_artifact(model, args.out, training=model.manifest.get("training"))
    for c in categories:
        cal = model.calibration[c]
        lines.append(calibration_line(c, cal).replace("fit: ", "recalibrate: ", 1))
        lines += [f"recalibrate: warning: {c}: {w}" for w in cal.stats["warnings"]]
    lines.append(f"recalibrate: wrote {args.out} (model {model_id}, recalibrated from {source})")
    for line in lines:
        print(line, flush=True)
    return RecalibrateSummary(artifact=args.out, model_id=model_id, source_model_id=source, lines=lines)
