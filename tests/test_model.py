"""Model core: one predict path, artifact round trips, any image in, maps at the input's aspect."""
import io
import json

import numpy as np
import pytest
import tinyclip
import torch
from PIL import Image

from promptad.data import storage
from promptad.data.images import decode_image, resize
from promptad.data.synthesis import procedural_texture, synthesize_anomaly
from promptad.errors import UserError
from promptad.fit.pipeline import fit_in_process
from promptad.learning.training import TrainConfig
from promptad.models import artifact
from promptad.models.model import ModelConfig
from promptad.postprocess import postprocess
from promptad.predict import predict, predict_components

SIZE = 64


def _images(n, seed, size=SIZE, noise_seed=None):
    rng = np.random.default_rng(seed)
    base = procedural_texture(size, rng)
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
    return np.stack([np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(n)])


@pytest.fixture(scope="module")
def effnet_model():
    imgs = {"tile": _images(12, 0), "wood": _images(12, 1)}
    return fit_in_process(imgs, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                          TrainConfig(epochs=1, batch_size=4), log=None)


def _probe(n=6):
    rng = np.random.default_rng(5)
    imgs = _images(n, 0, noise_seed=99)  # same product, images the memory bank has not seen
    return np.stack([synthesize_anomaly(im, rng)[0] if i % 2 else im for i, im in enumerate(imgs)])


def test_trainable_part_excludes_the_frozen_backbone(effnet_model):
    names = [n for n, _ in effnet_model.trainable.named_parameters()]
    assert names and all(n.startswith("head.") for n in names)
    assert not any("backbone" in k or "blocks" in k for k in effnet_model.trainable.state_dict())


def test_predict_scores_maps_and_categories(effnet_model):
    x = _probe()
    cats = ["tile", "wood", "tile", "wood", "tile", "wood"]
    p = predict(effnet_model, x, cats)
    assert p.scores.shape == (6,) and p.maps.shape == (6, SIZE, SIZE)
    assert np.isfinite(p.scores).all() and p.scores.dtype == np.float32
    # a category uses its own memory bank: the same image scores differently per category
    a = predict(effnet_model, x[:1], ["tile"]).scores[0]
    b = predict(effnet_model, x[:1], ["wood"]).scores[0]
    assert a != b and a == pytest.approx(p.scores[0], rel=1e-4, abs=1e-5)
    with pytest.raises(KeyError, match="unknown category"):
        predict(effnet_model, x[:1], ["glass"])


def test_artifact_round_trip_gives_identical_scores(effnet_model, tmp_path):
    model_id = artifact.save_artifact(effnet_model, str(tmp_path / "m"), training={"epochs": 1})
    manifest = json.loads((tmp_path / "m" / "promptad.json").read_text())
    assert manifest["model_id"] == model_id and manifest["backbone"]["sha256"]
    assert sorted(p.name for p in (tmp_path / "m" / "memory").iterdir()) == ["tile.safetensors", "wood.safetensors"]
    loaded = artifact.load_artifact(str(tmp_path / "m"))
    x, cats = _probe(), ["tile", "wood"] * 3
    a, b = predict(effnet_model, x, cats), predict(loaded, x, cats)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert loaded.model_id == model_id
    assert loaded.calibration["tile"] == effnet_model.calibration["tile"]


def test_artifact_from_before_local_norm_keeps_its_scores(tmp_path):
    """An artifact written before local_norm existed has no such key: its banks hold
    un-normalized features and its calibration a reference, so it must load as "none" and score
    exactly as it did, not be read with the new default (and its model id stays valid)."""
    imgs = {"tile": _images(12, 0)}
    old = fit_in_process(imgs, ModelConfig(backbone="effnet-lite0", input_size=SIZE, local_norm="none",
                                           coreset_draws=1), TrainConfig(epochs=0), log=None)
    assert old.calibration["tile"].neighbours == 10
    uri = tmp_path / "m"
    artifact.save_artifact(old, str(uri))
    manifest = json.loads((uri / "promptad.json").read_text())
    del manifest["model"]["local_norm"], manifest["model"]["coreset_draws"]
    weights = (uri / "weights.safetensors").read_bytes()
    banks = {c: (uri / p).read_bytes() for c, p in manifest["memory"].items()}
    manifest["model_id"] = artifact._model_id(manifest, weights, banks)
    (uri / "promptad.json").write_text(json.dumps(manifest))
    loaded = artifact.load_artifact(str(uri))
    assert loaded.cfg.local_norm == "none" and loaded.cfg.coreset_draws == 1  # single draws then
    x = _probe()
    a, b = predict(old, x, ["tile"] * len(x)), predict(loaded, x, ["tile"] * len(x))
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    with pytest.raises(ValueError, match="local_norm must be one of image, none"):
        ModelConfig(local_norm="instance")
    with pytest.raises(ValueError, match="coreset_draws must be at least 1"):
        ModelConfig(coreset_draws=0)


def test_artifact_on_s3(effnet_model, s3_bucket):
    uri = f"{s3_bucket}/models/m1"
    model_id = artifact.save_artifact(effnet_model, uri)
    loaded = artifact.load_artifact(uri)
    x = _probe(2)
    assert loaded.model_id == model_id
    assert np.array_equal(predict(loaded, x, ["tile"] * 2).scores, predict(effnet_model, x, ["tile"] * 2).scores)


def test_altered_or_missing_artifact_is_a_user_error(effnet_model, tmp_path):
    with pytest.raises(UserError, match="no model artifact"):
        artifact.load_artifact(str(tmp_path / "nothing"))
    uri = str(tmp_path / "m")
    artifact.save_artifact(effnet_model, uri)
    w = tmp_path / "m" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model_id"):
        artifact.load_artifact(uri)
    (tmp_path / "m" / "promptad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        artifact.load_artifact(uri)


def _encode(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_any_image_mode_and_size_scores_with_map_at_its_aspect(effnet_model):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (90, 300, 3), dtype=np.uint8)
    inputs = {
        "L": Image.fromarray(rgb[..., 0]),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "tall": Image.fromarray(rgb.transpose(1, 0, 2).copy()),
    }
    cal = effnet_model.calibration["tile"]
    for name, img in inputs.items():
        arr = decode_image(_encode(img))
        p = predict(effnet_model, resize(arr, SIZE)[None], ["tile"])
        row = postprocess(cal, float(p.scores[0]), p.maps[0], arr.shape[0], arr.shape[1])
        h, w = int(row["map_height"]), int(row["map_width"])
        assert abs(h / w - arr.shape[0] / arr.shape[1]) < 0.02, name
        png = Image.open(io.BytesIO(row["map_png"]))
        assert png.mode == "L" and png.size == (w, h)
        assert 0.0 <= row["score_norm"] <= 1.0 and 0.0 <= row["defect_area"] <= 1.0
        assert row["is_anomalous"] == (row["score"] >= cal.image_threshold)


def test_clip_model_round_trip_with_local_weights(tmp_path):
    tinyclip.register()
    weights = tinyclip.write_weights(str(tmp_path / "tiny.safetensors"))
    imgs = {"tile": _images(8, 0), "wood": _images(8, 1)}
    model = fit_in_process(imgs, ModelConfig(backbone=f"clip:{tinyclip.NAME}:{weights}"),
                           TrainConfig(epochs=1, batch_size=4), log=None)
    names = {n.split(".")[0] for n, _ in model.trainable.named_parameters()}
    assert names == {"head", "vision_prompts", "text"}
    uri = str(tmp_path / "clip_model")
    artifact.save_artifact(model, uri)
    manifest = json.loads(open(f"{uri}/promptad.json").read())
    assert manifest["backbone"]["sha256"] == storage.sha256_file(weights)
    assert manifest["prompts"]["anomaly_words"]["tile"]
    loaded = artifact.load_artifact(uri)
    x, cats = _probe(4), ["tile", "wood", "wood", "tile"]
    a, b = predict(model, x, cats), predict(loaded, x, cats)
    assert np.allclose(a.scores, b.scores, atol=1e-5) and np.allclose(a.maps, b.maps, atol=1e-5)
    assert set(model.calibration["tile"].fusion) == {"memory", "regional", "head", "text", "global"}


def test_untrained_fit_scores_without_running_the_trainable_part(monkeypatch):
    """Without training (--epochs 0) the head weighs nothing, so prediction never runs it: the same
    scores as with the head computed and weighted 0, and a head weight asked of such components
    is refused rather than read as zeros."""
    model = fit_in_process({"tile": _images(8, 0)}, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=0), log=None)
    x = _probe(3)
    fusion = dict(model.calibration["tile"].fusion)
    assert fusion["head"] == 0.0 and not model.weighs_trainable(["tile"])
    full_cal = model.calibration["tile"]
    monkeypatch.setattr(full_cal, "fusion", {**fusion, "head": 1e-30})  # weighs it: the head runs
    monkeypatch.setattr(full_cal, "head_scales", [1.0, 1.0])  # (its input scales, set by training)
    with_head = predict_components(model, x, ["tile"] * 3)
    monkeypatch.setattr(full_cal, "fusion", fusion)
    calls = []
    monkeypatch.setattr(type(model.trainable), "forward", lambda *a, **k: calls.append(1))
    without = predict_components(model, x, ["tile"] * 3)
    assert not calls and "head" not in without and "head" in with_head
    a = model.fuse(with_head, ["tile"] * 3, {"tile": fusion})
    b = model.fuse(without, ["tile"] * 3)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.maps, b.maps)
    with pytest.raises(ValueError, match="head or text"):
        model.fuse(without, ["tile"] * 3, {"tile": {**fusion, "head": 1.0}})


def test_evidence_head_shapes_the_map_not_the_image_score(effnet_model):
    """A trained evidence head scales the map by 1 + head^2 (only where it is confident does a
    distance grow) and leaves the image score, the banks' and the global branch's, as it is."""
    from promptad.models.model import _up

    model = effnet_model
    assert model.cfg.head_input == "evidence" and model.calibration["tile"].fusion["head"] == 1.0
    assert len(model.calibration["tile"].head_scales) == 2
    cats = ["tile"] * 6
    comps = predict_components(model, _probe(6), cats)
    with_head = model.fuse(comps, cats)
    without = model.fuse(comps, cats, {"tile": {**model.calibration["tile"].fusion, "head": 0.0}})
    torch.testing.assert_close(with_head.scores, without.scores)
    assert not torch.equal(with_head.maps, without.maps)
    cal = model.calibration["tile"]
    local = comps["memory"] / cal.memory_scale
    regional = _up(comps["regional"], local.shape[-2:]) * cal.fusion["regional"] / cal.regional_scale
    want = model.fuse({**comps, "memory": torch.maximum(local, regional) * cal.memory_scale * (1 + comps["head"] ** 2),
                       "regional": torch.zeros_like(comps["regional"])}, cats,
                      {"tile": {**cal.fusion, "head": 0.0}}).maps
    torch.testing.assert_close(with_head.maps, want, rtol=1e-5, atol=1e-6)


def test_artifact_from_before_head_input_keeps_its_features_head(tmp_path):
    """An artifact written before head_input existed holds a trained head on the local features
    (and calibrations without head_scales): it must load as a features head and score exactly as
    it did, its head in the image score as then, not as an evidence head."""
    imgs = {"tile": _images(12, 0)}
    old = fit_in_process(imgs, ModelConfig(backbone="effnet-lite0", input_size=SIZE, head_input="features"),
                         TrainConfig(epochs=1, batch_size=4, lr=3e-4), log=None)
    assert old.calibration["tile"].fusion["head"] == 1.0 and old.calibration["tile"].head_scales == []
    uri = tmp_path / "m"
    artifact.save_artifact(old, str(uri))
    manifest = json.loads((uri / "promptad.json").read_text())
    del manifest["model"]["head_input"]
    for cal in manifest["calibration"].values():
        del cal["head_scales"]
    weights = (uri / "weights.safetensors").read_bytes()
    banks = {c: (uri / p).read_bytes() for c, p in manifest["memory"].items()}
    manifest["model_id"] = artifact._model_id(manifest, weights, banks)
    (uri / "promptad.json").write_text(json.dumps(manifest))
    loaded = artifact.load_artifact(str(uri))
    assert loaded.cfg.head_input == "features" and loaded.trainable.head.net[0].in_channels == loaded.local_dim
    x = _probe()
    a, b = predict(old, x, ["tile"] * len(x)), predict(loaded, x, ["tile"] * len(x))
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    without = old.fuse(predict_components(old, x, ["tile"] * len(x)), ["tile"] * len(x),
                       {"tile": {**old.calibration["tile"].fusion, "head": 0.0}})
    assert not np.allclose(a.scores, without.scores.numpy())  # the features head moves the image score
    with pytest.raises(ValueError, match="head_input must be one of evidence, features"):
        ModelConfig(head_input="pixels")
