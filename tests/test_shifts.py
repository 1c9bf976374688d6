"""Robustness shifts: fixed strengths, seeded, masks moved with the image, --shifts parsing."""

import numpy as np
import pytest

from promptad.data.shifts import GROUPS, SHIFTS, apply_shift, parse_shifts
from promptad.errors import UserError

GEOMETRIC = ["rotation", "translation", "scale"]
PHOTOMETRIC = [n for n in SHIFTS if n not in GEOMETRIC]


def _scene(height: int = 64, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A smooth background with a bright off-centre square; the mask is that square."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 60 // width, yy * 60 // height, np.full_like(xx, 40)], -1).astype(np.uint8)
    mask = np.zeros((height, width), bool)
    mask[12:28, 44:64] = True
    img[mask] = 230
    return img, mask


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)  # (y, x)


def test_names_and_groups() -> None:
    assert list(SHIFTS) == [
        "brightness", "contrast", "gamma", "rotation", "translation", "scale", "blur", "noise", "jpeg",
    ]
    assert GROUPS == {
        "lighting": ["brightness", "contrast", "gamma"],
        "camera": ["rotation", "translation", "scale", "blur"],
        "sensor": ["noise", "jpeg"],
    }


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_changes_image_keeps_shape_and_is_seeded(name: str) -> None:
    img, mask = _scene()
    out, out_mask = apply_shift(name, img, mask, seed=3)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out_mask is not None and out_mask.dtype == bool and out_mask.shape == mask.shape
    assert not np.array_equal(out, img)
    again, again_mask = apply_shift(name, img, mask, seed=3)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(out_mask, again_mask)
    assert apply_shift(name, img, None, seed=3)[1] is None


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_photometric_shifts_leave_mask_alone(name: str) -> None:
    img, mask = _scene()
    assert apply_shift(name, img, mask, seed=0)[1] is mask


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_shifts_move_mask_with_image(name: str) -> None:
    img, mask = _scene()
    out, out_mask = apply_shift(name, img, mask, seed=1)
    bright = out[..., 2] > 135  # where the square landed in the image
    iou = (bright & out_mask).sum() / (bright | out_mask).sum()
    assert iou > 0.9
    assert not np.array_equal(out_mask, mask)


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_shifts_reflect_instead_of_black_borders(name: str) -> None:
    flat = np.full((40, 56, 3), 90, np.uint8)
    np.testing.assert_array_equal(apply_shift(name, flat, None, seed=0)[0], flat)


def test_translation_is_four_percent_in_a_seeded_direction() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True
    moves = set()
    for seed in range(4):
        moved = _centroid(apply_shift("translation", img, mask, seed)[1]) - _centroid(mask)
        assert np.hypot(*moved) == pytest.approx(4.0, abs=1.0)
        moves.add(tuple(np.round(moved)))
    assert len(moves) > 1


def test_rotation_is_five_degrees_either_way() -> None:
    img = np.zeros((101, 101, 3), np.uint8)
    mask = np.zeros((101, 101), bool)
    mask[46:55, 80:89] = True  # right of the centre (50, 50)
    angles = set()
    for seed in range(8):
        dy, dx = _centroid(apply_shift("rotation", img, mask, seed)[1]) - 50
        angles.add(round(float(np.degrees(np.arctan2(dy, dx)))))
    assert angles == {-5, 5}


def test_scale_zooms_in_by_ten_percent() -> None:
    img, mask = _scene(96, 96)
    out_mask = apply_shift("scale", img, mask, seed=0)[1]
    assert out_mask.sum() / mask.sum() == pytest.approx(1.21, rel=0.08)


def test_photometric_strengths() -> None:
    flat = np.full((8, 8, 3), 100, np.uint8)
    assert (apply_shift("brightness", flat, None, 0)[0] == 125).all()
    assert (apply_shift("contrast", flat, None, 0)[0] == 100).all()  # nothing to compress
    two = np.zeros((2, 4, 3), np.uint8)
    two[1] = 200
    out = apply_shift("contrast", two, None, 0)[0].astype(int)
    assert out[1, 0, 0] - out[0, 0, 0] == pytest.approx(140, abs=1)
    gamma = apply_shift("gamma", np.array([[[0, 128, 255]]], np.uint8), None, 0)[0]
    assert gamma.tolist() == [[[0, 91, 255]]]
    impulse = np.zeros((15, 15, 3), np.uint8)
    impulse[7, 7] = 255
    blurred = apply_shift("blur", impulse, None, 0)[0]
    assert blurred[7, 7, 0] < 255 and blurred[7, 9, 0] > 0 and blurred[7, 7, 0] == blurred.max()


def test_noise_is_sigma_8_and_seeded() -> None:
    gray = np.full((64, 64, 3), 128, np.uint8)
    a = apply_shift("noise", gray, None, seed=0)[0]
    b = apply_shift("noise", gray, None, seed=1)[0]
    assert (a.astype(float) - 128).std() == pytest.approx(8.0, rel=0.05)
    assert not np.array_equal(a, b)


def test_jpeg_is_lossy_but_close() -> None:
    img, _ = _scene()
    out = apply_shift("jpeg", img, None, 0)[0]
    assert 0 < np.abs(out.astype(int) - img).mean() < 10


def test_unknown_shift_and_bad_input() -> None:
    img, mask = _scene()
    with pytest.raises(UserError, match="unknown shift 'fog'.*brightness.*jpeg"):
        apply_shift("fog", img, mask, 0)
    with pytest.raises(ValueError):
        apply_shift("rotation", img, mask[:10], 0)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", []),
        ("  ", []),
        ("jpeg", ["jpeg"]),
        ("Noise, blur ,noise", ["noise", "blur"]),
        ("lighting", ["brightness", "contrast", "gamma"]),
        ("sensor,camera", ["noise", "jpeg", "rotation", "translation", "scale", "blur"]),
        ("gamma,all", ["gamma", "brightness", "contrast", "rotation", "translation", "scale", "blur", "noise", "jpeg"]),
    ],
)
def test_parse_shifts(spec: str, expected: list[str]) -> None:
    assert parse_shifts(spec) == expected


def test_parse_shifts_unknown_lists_valid_names() -> None:
    with pytest.raises(UserError) as info:
        parse_shifts("lighting,rain")
    message = str(info.value)
    assert "'rain'" in message and "\n" not in message
    assert all(name in message for name in [*SHIFTS, *GROUPS, "all"])
