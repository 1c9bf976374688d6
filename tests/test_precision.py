"""The precision contract (promptad/actors.py): a fit's backbone passes are fp32 on every device and
the artifact says so (`feature_precision`); a GPU scores in fp16, a CPU in fp32, and the two decide
the same.

No GPU here, so its features are stood in for: a GPU scoring pass by the fp32 features rounded to
fp16 (the precision its autocast hands back), a GPU fit (fp32 with TF32 off, summed in another
order) by the fp32 features with a relative jitter of a few fp32 ulps. benchmarks/gpu_check.sh
measures the real thing on a GPU against the same bounds (actors.DECISION_AGREEMENT,
actors.SCORE_TOLERANCE).
"""
import json

import numpy as np
import pytest
import torch

from promptad.actors import (DECISION_AGREEMENT, FIT_PRECISION, INFERENCE_PRECISION, SCORE_BOUND, SCORE_SHARE,
                             SCORE_TOLERANCE)
from promptad.data import storage
from promptad.data.synthesis import procedural_texture, synthesize_anomaly
from promptad.errors import UserError
from promptad.fit import stages
from promptad.fit.calibrate import calibrate_category
from promptad.fit.pipeline import build_memory, extract_all, fit_in_process
from promptad.learning.training import TrainConfig, resolve_precision
from promptad.models import artifact
from promptad.models.backbones import Features
from promptad.models.model import ModelConfig, PromptAD
from promptad.numerics import exact_fp32, float32_math
from promptad.predict import components_of, extract, predict

SIZE = 64
PROBES = 1000  # half normal, half with a synthetic defect: 99.9 % agreement means at most one flip


def _normal(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)


def _fp16(feats: Features) -> Features:
    return Features([t.half().float() for t in feats.layers])


def _gpu_fp32(feats: Features, seed: int = 5) -> Features:
    gen = torch.Generator().manual_seed(seed)
    return Features([t * (1 + 2.0 ** -21 * torch.randn(t.shape, generator=gen)) for t in feats.layers])


def test_fit_extracts_fp32_everywhere_and_inference_fp16_on_gpus():
    cuda = torch.device("cuda")
    assert resolve_precision(FIT_PRECISION, cuda) == "fp32" and resolve_precision(INFERENCE_PRECISION, cuda) == "fp16"
    pool = stages.feature_actors(2, 1.0, 1.0)
    assert pool.constructor_args() == {"device": "cuda", "threads": 1, "precision": FIT_PRECISION}


def test_fp32_math_has_tf32_off_and_gives_the_callers_setting_back(monkeypatch):
    """cuDNN runs fp32 convolutions in TF32 unless told not to: the fit's fp32 backbone pass and
    the fp32 islands (the blur) tell it not to, and restore what the caller had."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen = []

    @float32_math
    def island(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return x

    island(torch.zeros(1))
    with exact_fp32():
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    model = PromptAD(ModelConfig(backbone="effnet-lite0", input_size=SIZE, categories=["a"]))
    forward = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward",
                        lambda x: seen.append((torch.backends.cudnn.allow_tf32,)) or forward(x))
    extract(model, np.zeros((1, SIZE, SIZE, 3), np.uint8), FIT_PRECISION)
    assert seen == [(False, False), (False, False), (False,)]
    assert torch.backends.cudnn.allow_tf32 is True


@pytest.fixture(scope="module")
def probe() -> dict:
    rng = np.random.default_rng(0)
    base = procedural_texture(SIZE, rng)
    train = np.stack([_normal(base, rng) for _ in range(40)])
    rng = np.random.default_rng(1)
    images = np.stack([synthesize_anomaly(_normal(base, rng), rng)[0] if i % 2 else _normal(base, rng)
                       for i in range(PROBES)])
    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", input_size=SIZE, categories=["tile"]))
    return {"backbone": model.backbone, "train": extract_all(model, train), "probe": extract_all(model, images, 100)}


def _fit(backbone, feats: Features) -> PromptAD:
    """fit_in_process's memory and calibration (no training: the evidence head shapes the map, not
    the image score) on the given features."""
    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", input_size=SIZE, categories=["tile"]), backbone=backbone)
    model.memory = {"tile": build_memory(model, feats, 0)}
    calibrate_category(model, "tile", feats, trained=False)
    return model


def _decide(model: PromptAD, feats: Features) -> tuple[np.ndarray, np.ndarray]:
    scores = []
    for s in range(0, len(feats), 100):
        part = feats.select(slice(s, s + 100))
        cats = ["tile"] * len(part)
        scores.append(model.fuse(components_of(model, part, cats), cats).scores)
    scores = torch.cat(scores).numpy()
    return scores, scores >= np.float32(model.calibration["tile"].image_threshold)


def test_fitted_one_way_and_scored_the_other_decides_the_same(probe):
    """Fitted on a CPU or a GPU, scored on a CPU or a GPU: the same decision on >= 99.9 % of 1,000
    images, the scores of 99 % within SCORE_TOLERANCE and all within SCORE_BOUND (robust standard
    deviations of the held-out normal scores: the unit of the image score). Decisions are not trivially all alike: about half of the
    images are flagged."""
    cpu_fit, gpu_fit = _fit(probe["backbone"], probe["train"]), _fit(probe["backbone"], _gpu_fp32(probe["train"]))
    scores, decisions = _decide(cpu_fit, probe["probe"])
    assert 0.3 < decisions.mean() < 0.7
    for fitted, feats in ((cpu_fit, _fp16(probe["probe"])), (gpu_fit, probe["probe"]),
                          (gpu_fit, _fp16(probe["probe"]))):
        other, decided = _decide(fitted, feats)
        assert (decided == decisions).mean() >= DECISION_AGREEMENT
        diff = np.abs(other - scores)
        assert (diff <= SCORE_TOLERANCE).mean() >= SCORE_SHARE and diff.max() <= SCORE_BOUND
        assert not np.array_equal(other, scores), "the stand-in changed nothing"


def test_artifact_records_feature_precision_and_older_artifacts_load_as_before(tmp_path):
    rng = np.random.default_rng(3)
    base = procedural_texture(SIZE, rng)
    images = np.stack([_normal(base, rng) for _ in range(6)])
    model = fit_in_process({"tile": images}, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=0), log=None)
    uri = str(tmp_path / "new")
    model_id = artifact.save_artifact(model, uri)
    manifest = json.loads(storage.read_bytes(storage.join(uri, artifact.MANIFEST)))
    assert manifest["feature_precision"] == FIT_PRECISION == artifact.load_artifact(uri).feature_precision

    # an artifact written before the field: the same files, its manifest without it
    old = tmp_path / "old"
    (old / "memory").mkdir(parents=True)
    for rel in [artifact.WEIGHTS, *manifest["memory"].values()]:
        (old / rel).write_bytes((tmp_path / "new" / rel).read_bytes())
    del manifest["feature_precision"]
    banks = {c: (old / p).read_bytes() for c, p in manifest["memory"].items()}
    manifest["model_id"] = artifact._model_id(manifest, (old / artifact.WEIGHTS).read_bytes(), banks)
    (old / artifact.MANIFEST).write_text(json.dumps(manifest))
    loaded = artifact.load_artifact(str(old))
    assert loaded.feature_precision is None and manifest["model_id"] != model_id
    assert np.array_equal(predict(loaded, images, ["tile"] * 6).scores, predict(model, images, ["tile"] * 6).scores)
    assert artifact.save_artifact(loaded, str(tmp_path / "resaved")) == manifest["model_id"]  # says nothing new

    manifest["feature_precision"] = "fp16"
    manifest["model_id"] = artifact._model_id(manifest, (old / artifact.WEIGHTS).read_bytes(), banks)
    (old / artifact.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="built from fp16 features"):
        artifact.load_artifact(str(old))
