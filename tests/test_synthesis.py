"""Synthetic anomalies: exact masks, sane sizes, visible changes, seeded reproducibility."""

import numpy as np
import pytest

from promptad.data import synthesis
from promptad.data.synthesis import (
    MAX_AREA,
    MIN_AREA,
    MIN_MEAN_CHANGE,
    augment,
    make_training_pair,
    procedural_texture,
    synthesize_anomaly,
)


def _images(size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:size, 0:size] * (255 / (size - 1))
    smooth = np.stack([xx, yy, 255 - xx], axis=-1)
    return {
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "smooth": np.rint(smooth).astype(np.uint8),
        "texture": procedural_texture(size, rng),
        "black": np.zeros((size, size, 3), np.uint8),
        "white": np.full((size, size, 3), 255, np.uint8),
        "gray": np.full((size, size, 3), 128, np.uint8),
    }


def _assert_exact(img: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    changed = (out != img).any(axis=2)
    np.testing.assert_array_equal(changed, mask == 1)  # 1 exactly where pixels changed
    np.testing.assert_array_equal(out[mask == 0], img[mask == 0])  # untouched bit-for-bit
    assert MIN_AREA <= mask.mean() <= MAX_AREA
    assert np.abs(out.astype(int) - img.astype(int))[mask == 1].mean() >= MIN_MEAN_CHANGE


@pytest.mark.parametrize("name", ["noise", "smooth", "texture", "black", "white", "gray"])
def test_mask_is_exact_sized_and_visible(name: str) -> None:
    img = _images()[name]
    before = img.copy()
    for seed in range(25):
        out, mask = synthesize_anomaly(img, np.random.default_rng(seed))
        _assert_exact(img, out, mask)
    np.testing.assert_array_equal(img, before)  # the input is never modified


@pytest.mark.parametrize("kind", synthesis._KINDS, ids=lambda f: f.__name__)
def test_each_kind_gives_exact_masks(kind, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthesis, "_KINDS", (kind,))
    img = _images(96)["texture"]
    for seed in range(15):
        out, mask = synthesize_anomaly(img, np.random.default_rng(seed))
        _assert_exact(img, out, mask)


def test_all_three_kinds_are_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []

    def spy(fn):
        def wrapped(*args):
            used.append(fn.__name__)
            return fn(*args)

        return wrapped

    monkeypatch.setattr(synthesis, "_KINDS", tuple(spy(f) for f in synthesis._KINDS))
    img = _images()["noise"]
    for seed in range(30):
        synthesize_anomaly(img, np.random.default_rng(seed))
    assert set(used) == {"_cut_paste", "_texture_blend", "_scratches"}


def test_last_resort_is_exact_and_strong() -> None:
    img = _images()["gray"]
    out, mask = synthesis._last_resort(img, np.random.default_rng(0))
    _assert_exact(img, out, mask)
    assert (np.abs(out.astype(int) - img)[mask == 1] == 128).all()


def test_same_seed_same_output_different_seed_different() -> None:
    img = _images()["texture"]
    a = synthesize_anomaly(img, np.random.default_rng(7))
    b = synthesize_anomaly(img, np.random.default_rng(7))
    c = synthesize_anomaly(img, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    for fn, arg in [(procedural_texture, 32), (augment, img)]:
        first, second = (fn(arg, np.random.default_rng(2)) for _ in range(2))
        np.testing.assert_array_equal(first, second)


def test_texture_argument_is_the_blend_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthesis, "_KINDS", (synthesis._texture_blend,))
    img = _images()["gray"]
    red = np.zeros((30, 50, 3), np.uint8)
    red[..., 0] = 255
    for texture in (red, red[..., 0]):  # any size; RGB or grayscale
        out, mask = synthesize_anomaly(img, np.random.default_rng(3), texture=texture)
        _assert_exact(img, out, mask)
        inside = out[mask == 1].astype(int)
        if texture.ndim == 3:
            assert (inside[:, 0] > 128).all() and (inside[:, 1] < 128).all()
        else:
            assert (inside[:, 1] > 128).all()  # gray 255 texture brightens all channels


def test_small_and_nonsquare_images() -> None:
    rng = np.random.default_rng(0)
    for shape in [(8, 8, 3), (32, 32, 3), (40, 72, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        for _ in range(5):
            out, mask = synthesize_anomaly(img, rng)
            _assert_exact(img, out, mask)
    with pytest.raises(ValueError):
        synthesize_anomaly(np.zeros((4, 4, 3), np.uint8), rng)
    with pytest.raises(ValueError):
        synthesize_anomaly(np.zeros((16, 16), np.uint8), rng)


def test_augment_returns_new_jittered_views() -> None:
    img = _images()["noise"]
    views = [augment(img, np.random.default_rng(s)) for s in range(12)]
    for v in views:
        assert v.dtype == np.uint8 and v.shape == img.shape and not np.shares_memory(v, img)
    assert len({v.tobytes() for v in views}) == len(views)
    # Geometry: flips and rotations keep the pixel multiset; jitter bounds brightness.
    flat = np.full((16, 16, 3), 100, np.uint8)
    for s in range(20):
        out = augment(flat, np.random.default_rng(s))
        assert (out == out[0, 0]).all() and 80 <= out[0, 0, 0] <= 120


def test_augment_covers_flips_and_rotations() -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    img[0, 0] = 255  # one bright corner; where it lands reveals the geometry
    corners = set()
    for s in range(40):
        out = augment(img, np.random.default_rng(s))
        y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
        corners.add((int(y), int(x)))
    assert corners == {(0, 0), (0, 15), (15, 0), (15, 15)}


def test_make_training_pair_matches_its_parts() -> None:
    img = _images()["texture"]
    for seed in range(5):
        out, mask, label = make_training_pair(img, np.random.default_rng(seed), p_anomaly=1.0)
        rng = np.random.default_rng(seed)
        view = augment(img, rng)
        rng.random()
        exp_out, exp_mask = synthesize_anomaly(view, rng)
        assert label == 1
        np.testing.assert_array_equal(out, exp_out)
        np.testing.assert_array_equal(mask, exp_mask)
        _assert_exact(view, out, mask)
    out, mask, label = make_training_pair(img, np.random.default_rng(0), p_anomaly=0.0)
    assert label == 0 and mask.dtype == np.float32 and not mask.any() and out.shape == img.shape


def test_make_training_pair_anomaly_rate() -> None:
    img = _images(16)["noise"]
    rng = np.random.default_rng(0)
    labels = [make_training_pair(img, rng, p_anomaly=0.5)[2] for _ in range(200)]
    assert 70 <= sum(labels) <= 130


def test_procedural_texture() -> None:
    for seed in range(6):
        tex = procedural_texture(48, np.random.default_rng(seed))
        assert tex.dtype == np.uint8 and tex.shape == (48, 48, 3)
        assert tex.std() > 1.0  # a texture, not a flat colour
