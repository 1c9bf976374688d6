"""The model artifact: a directory (local or s3://) that holds everything `score` and `audit` need.

    promptad.json                  format version, model config, backbone (+ weight sha256),
                                   feature_precision, categories, prompts, calibration, training
                                   metadata, model_id
    weights.safetensors            trainable parameters and buffers (prompts, head)
    memory/<category>.safetensors  memory per category: local and regional coreset banks (with the
                                   training image of each entry) and the global Gaussian

Nothing is unpickled on load; the model id is a content hash that load verifies.

`feature_precision` is the precision of the backbone passes the memory banks, the Gaussian and the
calibration were built from: "fp32" (actors.FIT_PRECISION) since issue 37, on CPUs and GPUs
alike. Artifacts written before have no such field (a GPU fit's banks then came from fp16
features); they load as before, with `model.feature_precision` None, and a re-save leaves the
field out again (so their model id stays the same).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING
from urllib.parse import quote

from promptad.data import storage
from promptad.errors import UserError

if TYPE_CHECKING:
    import torch

    from promptad.models.model import Calibration, PromptAD

# torch, safetensors and the model are imported inside the functions that build or load a model:
# reading and verifying an artifact (what `score` checks before Ray starts) then takes no torch
# import, which alone is seconds on a small machine.

FORMAT_VERSION = 2  # 2: local + regional banks with entry sources, global Gaussian (PromptAD 0.2)
MANIFEST = "promptad.json"
WEIGHTS = "weights.safetensors"
_REFIT = "; pass the --out folder of a finished `promptad fit` (or run it again)"


def _memory_name(category: str) -> str:
    return f"memory/{quote(category, safe='')}.safetensors"


def _model_id(manifest: dict, weights: bytes, banks: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k not in ("model_id", "training")}
    h.update(json.dumps(body, sort_keys=True).encode())
    h.update(hashlib.sha256(weights).digest())
    for cat in sorted(banks):
        h.update(cat.encode() + hashlib.sha256(banks[cat]).digest())
    return h.hexdigest()[:16]


def _json_safe(value):
    """inf thresholds (uncalibrated) are stored as null; JSON has no infinity."""
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def memory_tensors(memory) -> dict:
    """A category's memory as the flat tensor dict of memory/<category>.safetensors."""
    out = {"local": memory.local.entries.float(), "local_source": memory.local.source.long(),
           "regional": memory.regional.entries.float(), "regional_source": memory.regional.source.long(),
           **memory.gaussian.tensors()}
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def memory_from_tensors(t: dict):
    from promptad.memory.bank import Bank
    from promptad.memory.gaussian import Gaussian
    from promptad.models.model import CategoryMemory

    return CategoryMemory(local=Bank(t["local"], t["local_source"]), regional=Bank(t["regional"], t["regional_source"]),
                          gaussian=Gaussian.from_tensors(t))


def non_finite_parts(model: PromptAD) -> list[str]:
    """Where the model's weights, memories or calibrations hold NaN or inf (numerics.non_finite):
    JSON stores such a threshold as null, read back as inf, and a NaN weight or bank entry makes
    every map NaN: each image of the category (of every category, for the weights) an error row."""
    from promptad.numerics import non_finite

    return (non_finite(dict(model.trainable.state_dict()), "weights")
            + [b for c in model.categories for b in non_finite(memory_tensors(model.memory[c]), f"memory[{c}]")]
            + [b for c in model.categories for b in non_finite(asdict(model.calibration[c]), f"calibration[{c}]")])


def save_artifact(model: PromptAD, uri: str, training: dict | None = None, finite: bool = True) -> str:
    """Write the artifact to `uri`; returns the model id. With `finite` (what fit writes), a model
    with a non-finite number anywhere is refused (ValueError naming where) and nothing is written;
    tests write broken models on purpose with finite=False."""
    from safetensors.torch import save as st_save

    from promptad.actors import FIT_PRECISION
    from promptad.models import prompts

    missing = [c for c in model.categories if c not in model.memory]
    if missing:
        raise ValueError(f"no memory for {missing}; build memory banks before saving")
    bad = non_finite_parts(model) if finite else []
    if bad:
        raise ValueError(f"refusing to write a model artifact with non-finite values: {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    # a model fitted by this promptad (fit/pipeline.py, fit/stages.py) was built in FIT_PRECISION;
    # a loaded one keeps what its artifact said (None: not recorded)
    precision = getattr(model, "feature_precision", FIT_PRECISION)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable.state_dict().items()}
    weights = st_save(state)
    banks = {c: st_save(memory_tensors(model.memory[c])) for c in model.categories}
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "backbone": {"spec": model.backbone.spec, "sha256": model.backbone.weight_sha256,
                     "input_size": model.backbone.input_size, "layers": list(model.backbone.layers),
                     "has_text": model.backbone.has_text},
        **({"feature_precision": precision} if precision is not None else {}),
        "categories": list(model.categories),
        "prompts": {"templates": prompts.TEMPLATES, "normal_states": prompts.NORMAL_STATES,
                    "anomaly_states": prompts.ANOMALY_STATES,
                    "anomaly_words": {c: prompts.anomaly_words(c) for c in model.categories}}
        if model.backbone.has_text else None,
        "calibration": {c: _json_safe(asdict(model.calibration[c])) for c in model.categories},
        "memory": {c: _memory_name(c) for c in model.categories},
        "training": training or {},
    }
    manifest["model_id"] = _model_id(manifest, weights, banks)
    storage.makedirs(storage.join(uri, "memory"))
    storage.write_bytes(storage.join(uri, WEIGHTS), weights)
    for c, data in banks.items():
        storage.write_bytes(storage.join(uri, _memory_name(c)), data)
    # The manifest goes last: a directory with a manifest is a complete artifact.
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest["model_id"]


def is_own_file(relative: str) -> bool:
    """Whether a file at `relative` (below an artifact folder) is one save_artifact writes, or the
    write probe fit leaves if killed mid-check."""
    return relative in (MANIFEST, WEIGHTS) or relative.startswith(".promptad-write-test-") or (
        relative.startswith("memory/") and relative.endswith(".safetensors") and relative.count("/") == 1)


def check_out_folder(uri: str) -> None:
    """`fit --out`: new, empty, or a model artifact (which the fit replaces). Anything else is
    refused (UserError) before any work: writing into a scores folder mixed an artifact into a
    Parquet dataset, and into another tool's folder it would leave a half-model among its files."""
    if not storage.exists(uri):
        return
    if not storage.is_dir(uri):
        raise UserError(f"--out {uri} is a file; pass a new or empty folder (or the --out of an earlier fit)")
    foreign = [f for f in (storage.relative(p, uri) for p in storage.list_files(uri)) if not is_own_file(f)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {uri} holds files that are not a promptad model ({shown}); pass a new or empty "
                        "folder (or the --out of an earlier fit, whose model is replaced)")


def read_manifest(uri: str) -> dict:
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
    except FileNotFoundError:
        if not storage.exists(uri):
            raise UserError(f"no model artifact at {uri}: it does not exist; pass the --out folder of "
                            "`promptad fit`") from None
        raise UserError(f"no model artifact at {uri} ({MANIFEST} missing: not a model folder); pass the --out "
                        "of `promptad fit`") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"unreadable model artifact at {uri}: {MANIFEST} is not valid JSON" + _REFIT) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"model artifact at {uri} has format {manifest.get('format_version')}, "
                        f"this promptad reads format {FORMAT_VERSION}" + _REFIT)
    return manifest


def read_calibration(manifest: dict) -> dict[str, Calibration]:
    """Per-category calibration from a manifest, without loading weights (score's CPU tasks need only this)."""
    from promptad.models.calibration import Calibration

    out = {}
    for c, cal in manifest["calibration"].items():
        cal = {k: (float("inf") if v is None and k.endswith("threshold") else v) for k, v in cal.items()}
        out[c] = Calibration(**cal)
    return out


def read_verified(uri: str) -> tuple[dict, bytes, dict[str, bytes]]:
    """(manifest, weights, memory banks) after checking them against the model id: a driver
    calls this before starting workers, so a damaged artifact is one line, not a dead actor."""
    manifest = read_manifest(uri)
    try:
        weights = storage.read_bytes(storage.join(uri, WEIGHTS))
        banks = {c: storage.read_bytes(storage.join(uri, p)) for c, p in manifest["memory"].items()}
    except FileNotFoundError as e:
        raise UserError(f"incomplete model artifact at {uri}: {e}" + _REFIT) from None
    if _model_id(manifest, weights, banks) != manifest.get("model_id"):
        raise UserError(f"model artifact at {uri} does not match its model_id (files altered or mixed)" + _REFIT)
    return manifest, weights, banks


def load_artifact(uri: str, device: str | torch.device = "cpu") -> PromptAD:
    """Rebuild the model from an artifact; raises UserError if it is missing, corrupt or altered."""
    from safetensors.torch import load as st_load

    from promptad.actors import FIT_PRECISION
    from promptad.models.backbones import create_backbone
    from promptad.models.model import ModelConfig, PromptAD

    manifest, weights, banks = read_verified(uri)
    precision = manifest.get("feature_precision")
    if precision not in (None, FIT_PRECISION):
        raise UserError(f"model artifact at {uri} was built from {precision} features; this promptad builds and "
                        f"reads {FIT_PRECISION} ones" + _REFIT)
    # an artifact written before local_norm existed holds banks of un-normalized features
    # ... and one written before head_input existed has a head on the local features
    cfg = ModelConfig(**{"local_norm": "none", "coreset_draws": 1, "head_input": "features", **manifest["model"]})

    bb = manifest["backbone"]
    backbone = create_backbone(bb["spec"], layers=bb["layers"], input_size=bb["input_size"],
                               expected_sha256=bb.get("sha256"))
    model = PromptAD(cfg, backbone=backbone)
    try:
        model.trainable.load_state_dict(st_load(weights), strict=True)
        model.memory = {c: memory_from_tensors(st_load(data)) for c, data in banks.items()}
    except Exception as e:  # safetensors header errors, shape mismatches
        raise UserError(f"unreadable model artifact at {uri}: {str(e).splitlines()[0][:200]}" + _REFIT) from None
    model.calibration.update(read_calibration(manifest))
    model.model_id = manifest["model_id"]
    model.manifest = manifest
    model.feature_precision = precision
    return model.to(device).eval()
