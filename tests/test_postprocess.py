"""What a user stores, against numbers computed by hand: score normalization (median -> 0.25,
threshold -> 0.5, clipped to [0, 1]), the 8-bit map, the defect area and the decision as a
reader re-computes it from the stored float32 columns."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from promptad.models.model import Calibration
from promptad.postprocess import is_anomalous, postprocess
from promptad.score import command as score

# centre 2, threshold 6: y = 0.25 + 0.25 * (x - 2) / 4 = x / 16 + 0.125, clipped to [0, 1]
PIXEL = dict(pixel_center=2.0, pixel_threshold=6.0)
# centre 1, threshold 3: y = 0.25 + 0.25 * (x - 1) / 2 = x / 8 + 0.125
IMAGE = dict(image_center=1.0, image_threshold=3.0)


@pytest.mark.parametrize("x, expected", [
    (2.0, 0.25),    # centre
    (6.0, 0.5),     # threshold: the decision boundary
    (4.0, 0.375),
    (10.0, 0.75),
    (14.0, 1.0),
    (30.0, 1.0),    # clipped
    (0.0, 0.125),
    (-2.0, 0.0),
    (-9.0, 0.0),    # clipped
])
def test_normalize_map_by_hand(x, expected):
    cal = Calibration(**PIXEL)
    assert cal.normalize_map(np.array([x]))[0] == expected
    assert cal.normalize_map(x) == expected  # a plain float too


@pytest.mark.parametrize("s, expected", [(1.0, 0.25), (3.0, 0.5), (2.5, 0.4375), (0.0, 0.125), (7.0, 1.0),
                                         (-1.0, 0.0), (-5.0, 0.0), (100.0, 1.0)])
def test_normalize_score_by_hand(s, expected):
    assert Calibration(**IMAGE).normalize_score(s) == expected


def test_postprocess_of_a_hand_made_map():
    cal = Calibration(**IMAGE, **PIXEL)
    amap = np.array([[6.0, 2.0, 10.0, 14.0, 30.0],
                     [-2.0, 5.99, 4.0, 0.0, -9.0]], np.float32)  # at the stored size: no resize
    row = postprocess(cal, 2.5, amap, height=2, width=5)
    # round(255 * y): 0.5 -> 127.5 -> 128; 0.25 -> 63.75 -> 64; 0.75 -> 191.25 -> 191; 5.99 ->
    # 0.499375 -> 127.34 -> 127; 0.375 -> 95.625 -> 96; 0.125 -> 31.875 -> 32; clipped -> 0 / 255
    expected = np.array([[128, 64, 191, 255, 255],
                         [0, 127, 96, 32, 0]], np.uint8)
    png = Image.open(io.BytesIO(row["map_png"]))
    assert png.mode == "L" and png.size == (5, 2)
    np.testing.assert_array_equal(np.asarray(png), expected)
    assert (row["map_height"], row["map_width"]) == (2, 5)
    assert row["defect_area"] == np.float32(0.4)  # 6, 10, 14, 30 are >= 6: 4 of 10 pixels
    assert row["score_norm"] == np.float32(0.4375) and row["score"] == np.float32(2.5)
    assert row["threshold"] == np.float32(3.0) and row["is_anomalous"] is False
    assert postprocess(cal, 3.0, amap, 2, 5)["is_anomalous"] is True  # score >= threshold flags
    assert postprocess(cal, 3.0, amap, 2, 5)["score_norm"] == np.float32(0.5)


def test_postprocess_resizes_to_the_images_aspect_ratio():
    cal = Calibration(**IMAGE, **PIXEL)
    row = postprocess(cal, 1.0, np.full((8, 8), 6.0, np.float32), height=300, width=600)
    png = np.asarray(Image.open(io.BytesIO(row["map_png"])))
    assert png.shape == (128, 256) and (row["map_height"], row["map_width"]) == (128, 256)
    assert (png == 128).all() and row["defect_area"] == 1.0  # all at the threshold
    assert row["score_norm"] == np.float32(0.25)  # the median normal score


def _thresholds_around(base: np.float32) -> dict[str, float]:
    """float64 thresholds a quarter of a float32 step above and below `base`: neither is a float32
    value; stored as float32 both become `base`."""
    up = float(np.nextafter(base, np.float32(np.inf))) - float(base)
    down = float(base) - float(np.nextafter(base, np.float32(-np.inf)))
    return {"rounds down": float(base) + up / 4, "rounds up": float(base) - down / 4}


def test_is_anomalous_agrees_with_the_stored_float32_columns(tmp_path):
    """Scores one float32 step either side of (and at) a threshold that float32 cannot hold,
    written as score writes them and read back with plain pyarrow: is_anomalous is exactly
    score >= threshold on the stored columns."""
    base = np.float32(0.7)
    scores = [np.nextafter(base, np.float32(-1)), base, np.nextafter(base, np.float32(1))]
    for name, threshold in _thresholds_around(base).items():
        assert np.float32(threshold) == base and threshold != float(base), name
        assert [is_anomalous(s, threshold) for s in scores] == [False, True, True], name
        n = len(scores)
        batch = {"image_id": np.array([f"{name}-{i}" for i in range(n)], object),
                 "path": np.array([f"/x/{i}.png" for i in range(n)], object),
                 "category": np.array(["c"] * n, object), "source_version": np.array([""] * n, object),
                 "error": np.array([""] * n, object), "score": np.array(scores, np.float32),
                 "map": np.zeros((n, 4, 4), np.float32), "height": np.full(n, 4, np.int32),
                 "width": np.full(n, 4, np.int32)}
        cal = {"c": Calibration(image_threshold=threshold, pixel_threshold=1.0)}
        out = tmp_path / name.replace(" ", "_")
        score.postprocess_and_commit(batch, str(out), cal, model_id="m", run_id="r")
        table = pq.read_table(out)
        s = np.asarray(table["score"].to_numpy(), np.float32)
        t = np.asarray(table["threshold"].to_numpy(), np.float32)
        assert table["score"].type == table["threshold"].type == pa.float32()
        assert table["is_anomalous"].to_pylist() == list(s >= t) == [False, True, True], name


@pytest.mark.parametrize("shape", [(256, 143), (97, 256), (256, 256), (512, 300), (7, 3)])
def test_resize_map_is_torchs_bilinear_interpolate(shape):
    """The numpy resize (kept torch-free for the CPU tasks) gives torch's interpolate(bilinear,
    align_corners=False) numbers, shrinking and growing, on a map with sharp and smooth parts."""
    import torch
    import torch.nn.functional as F

    from promptad.postprocess import resize_map

    rng = np.random.default_rng(0)
    amap = rng.gamma(2.0, 1.0, (256, 256)).astype(np.float32)
    amap[100:110, 30:200] += 40.0
    want = F.interpolate(torch.from_numpy(amap)[None, None], size=shape, mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    got = resize_map(amap, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_cpu_stages_never_import_torch():
    """Score's read and commit tasks, and the driver's plan, run in processes that must not import
    torch (seconds of start-up and ~0.3 GiB per worker): only the model actor needs it."""
    import subprocess
    import sys

    code = ("import sys; import promptad.score.command, promptad.postprocess, promptad.actors;"
            " assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
