"""Categories are isolated (issue 34): no input of one category (a single image, NaN features)
can change another category's model, and a fit never writes a non-finite number. Before, one
category of one image gave leave-one-out distances of inf, the shared head's standardization
NaN, and every category's maps and pixel thresholds NaN."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from promptad.data.synthesis import procedural_texture
from promptad.fit.pipeline import fit_in_process
from promptad.learning.training import TrainConfig
from promptad.models import artifact
from promptad.models.model import FUSION_UNTRAINED, ModelConfig
from promptad.numerics import non_finite

SIZE = 64


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = procedural_texture(SIZE, rng).astype(np.int16)
    return np.stack([np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8) for _ in range(n)])


def _fit(images: dict[str, np.ndarray], log=None):
    return fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                          TrainConfig(epochs=1, batch_size=4), log=log)


@pytest.fixture(scope="module")
def fits() -> dict:
    """A trained fit of tile (8 images) beside wood (1 image), and one of tile alone."""
    tile, wood = _images(8, 1), _images(1, 2)
    lines: list[str] = []
    return {"both": _fit({"tile": tile, "wood": wood}, lines.append), "alone": _fit({"tile": tile}),
            "log": lines}


def test_a_one_image_category_leaves_the_other_unchanged(fits):
    """The 1-image category trains nothing (a warning says so) and the other category's model,
    head weights included, is exactly the one it gets when fitted alone; all of it finite."""
    both, alone = fits["both"], fits["alone"]
    assert non_finite(dict(both.trainable.state_dict())) == []
    for k, v in alone.trainable.state_dict().items():
        assert torch.equal(both.trainable.state_dict()[k], v), k
    a, b = asdict(both.calibration["tile"]), asdict(alone.calibration["tile"])
    assert non_finite(a) == [] and a == b
    assert torch.equal(both.memory["tile"].local.entries, alone.memory["tile"].local.entries)
    wood = both.calibration["wood"]
    assert non_finite(asdict(wood)) == [] and wood.fusion == FUSION_UNTRAINED and len(wood.head_scales) == 2
    assert any("wood: only 1 readable normal image" in ln and "left out of training" in ln for ln in fits["log"])


def test_a_mixed_batch_of_both_categories_scores_finite(fits, tmp_path):
    """Saved and loaded, a batch that mixes both categories (the head runs on every row) gives
    finite scores and maps, and tile's rows are those of the tile-only model."""
    from promptad.predict import predict

    uri = str(tmp_path / "m")
    artifact.save_artifact(fits["both"], uri)
    model = artifact.load_artifact(uri)
    x = np.concatenate([_images(2, 1), _images(2, 2)])
    out = predict(model, x, ["tile", "tile", "wood", "wood"])
    assert np.isfinite(out.scores).all() and np.isfinite(out.maps).all()
    ref = predict(fits["alone"], x[:2], ["tile", "tile"])
    np.testing.assert_allclose(out.scores[:2], ref.scores, rtol=1e-5)


def test_no_category_can_train_is_one_line():
    from promptad.errors import UserError

    with pytest.raises(UserError, match="needs at least 2 readable normal images.*pass --epochs 0"):
        _fit({"tile": _images(1, 1), "wood": _images(1, 2)})


def test_save_refuses_non_finite_numbers(fits, tmp_path):
    """A NaN weight, bank entry or threshold is refused at save and nothing is written; before,
    a NaN threshold went into promptad.json as null and read back as inf."""
    model = fits["alone"]
    saved = model.calibration["tile"]
    try:
        model.calibration["tile"] = replace(saved, pixel_threshold=float("nan"))
        with pytest.raises(ValueError, match=r"non-finite values: calibration\[tile\]\.pixel_threshold"):
            artifact.save_artifact(model, str(tmp_path / "a"))
        assert not (tmp_path / "a").exists()
    finally:
        model.calibration["tile"] = saved
    bank = model.memory["tile"].local
    entries = bank.entries.clone()
    entries[3, 1] = float("inf")
    model.memory["tile"].local = replace(bank, entries=entries)
    try:
        with pytest.raises(ValueError, match=r"memory\[tile\]\.local \(1 of"):
            artifact.save_artifact(model, str(tmp_path / "b"))
    finally:
        model.memory["tile"].local = bank
    artifact.save_artifact(model, str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "promptad.json").read_text())["calibration"]["tile"]["pixel_threshold"]


def test_non_finite_inputs_are_refused_where_they_enter():
    """NaN features cannot build a memory; NaN rows cannot set the head's standardization; the
    Ray feature stage marks an image whose features are NaN as an error (skipped like an
    unreadable image)."""
    from promptad.fit.pipeline import build_memory, set_standardization
    from promptad.fit.stages import _non_finite_errors
    from promptad.models.backbones import Features
    from promptad.models.model import PromptAD

    model = PromptAD(ModelConfig(backbone="effnet-lite0", input_size=SIZE, categories=["tile"]))
    layers = [torch.randn(3, 4, 8, 8), torch.randn(3, 5, 4, 4)]
    layers[1][2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite backbone features"):
        build_memory(model, Features(layers))
    rows = torch.rand(4, 2, 8, 8)
    rows[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        set_standardization(model.trainable, rows)
    errors = _non_finite_errors(np.asarray(["", "read: gone", ""], dtype=object), layers)
    assert errors[0] == "" and errors[1] == "read: gone" and errors[2].startswith("features: ")


def test_a_category_of_identical_images_is_warned_about_and_leaves_the_other_unchanged(fits):
    """Constant images: every held-out score is the same, so the threshold promises nothing; the
    calibration says so (a warning the fit prints), stays finite, and tile is as when alone."""
    blank = np.full((4, SIZE, SIZE, 3), 128, np.uint8)
    lines: list[str] = []
    model = _fit({"tile": _images(8, 1), "blank": blank}, lines.append)
    cal = model.calibration["blank"]
    assert non_finite(asdict(cal)) == []
    assert any("score the same held out" in w for w in cal.stats["warnings"]), cal.stats["warnings"]
    assert not any("score the same" in w for w in model.calibration["tile"].stats["warnings"])
    assert asdict(model.calibration["tile"])["image_threshold"] == fits["alone"].calibration["tile"].image_threshold
