"""Decoding every odd input the archives contain, plus resizing, batching and PNG encoding."""

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from promptad.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decode_mask,
    encode_png,
    map_shape,
    resize,
    resize_mask,
    to_tensor,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _save(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise_rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_with_header(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height but carries almost no pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _assert_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (h, w, 3)


# --- bad inputs: always ImageDecodeError with a one-line message ---------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty file (0 bytes)"),
        (b"sensor,value\n1,2\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n", ""),  # signature only
    ],
)
def test_bad_bytes_raise_decode_error(data: bytes, needle: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_truncated_files_raise_decode_error(fmt: str, fraction: float) -> None:
    data = _save(Image.fromarray(_noise_rgb(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt") as info:
        decode_image(data[: int(len(data) * fraction)])
    assert "\n" not in str(info.value)


def test_corrupt_pixel_stream_raises_decode_error() -> None:
    data = bytearray(_save(Image.fromarray(_noise_rgb(64, 64)), "PNG"))
    data[60:200] = bytes(140)  # zero out the start of the compressed IDAT stream
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_bomb_header_refused_before_decoding() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for width, height in [(40000, 40000), (10000, 9000)]:  # 1.6e9 and 9e7 pixels
            start = time.perf_counter()
            with pytest.raises(ImageDecodeError, match="image too large"):
                decode_image(_png_with_header(width, height))
            assert time.perf_counter() - start < 0.5  # no 270 MB+ buffer was filled
    with pytest.raises(ImageDecodeError, match=r"image too large: 10000x9000 pixels exceeds"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            decode_image(_png_with_header(10000, 9000))


def test_max_pixels_is_per_call_and_leaves_pil_global_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _save(Image.fromarray(_noise_rgb(20, 30)))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="30x20 pixels exceeds the 599-pixel limit"):
        decode_image(data, max_pixels=599)
    _assert_rgb(decode_image(data, max_pixels=600), 20, 30)
    assert Image.MAX_IMAGE_PIXELS == before and ImageFile.LOAD_TRUNCATED_IMAGES is False
    # Another thread disabling PIL's guard does not disable ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError, match="image too large"):
        decode_image(_png_with_header(10000, 9000))


def test_default_limit_matches_pil_default() -> None:
    assert DEFAULT_MAX_PIXELS == 89_478_485


# --- every mode decodes to (H, W, 3) uint8 ----------------------------------------------------


def test_rgb_round_trip_is_exact() -> None:
    img = _noise_rgb()
    out = decode_image(_save(Image.fromarray(img)))
    np.testing.assert_array_equal(out, img)
    out[0, 0] = 0  # writable


def test_grayscale_l_is_replicated() -> None:
    gray = _noise_rgb()[..., 0]
    out = decode_image(_save(Image.fromarray(gray)))
    _assert_rgb(out, *gray.shape)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_bilevel_mode_1() -> None:
    im = Image.fromarray(_noise_rgb()[..., 0] > 127)
    out = decode_image(_save(im))
    assert set(np.unique(out)) <= {0, 255}


def test_rgba_is_composited_on_black() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 128, 0], [255, 255, 255]]
    out = decode_image(_save(Image.fromarray(rgba, "RGBA")))
    _assert_rgb(out, 2, 3)
    assert out[0, 0].tolist() == [200] * 3  # opaque: unchanged
    assert out[0, 1].tolist() == [100] * 3  # half transparent: 200 * 128 / 255 rounded
    assert out[0, 2].tolist() == [0] * 3  # transparent: black


def test_la_is_composited_on_black() -> None:
    im = Image.new("LA", (4, 2), (180, 255))
    im.putpixel((0, 0), (180, 0))
    out = decode_image(_save(im))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 3].tolist() == [180] * 3


def test_palette_with_and_without_transparency() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    pal = Image.fromarray(gray).convert("P")
    out = decode_image(_save(pal))
    np.testing.assert_array_equal(out[..., 0], gray)
    index0 = pal.getpixel((0, 0))
    out_t = decode_image(_save(pal, transparency=index0))
    assert out_t[0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(out_t[gray != gray[0, 0]], out[gray != gray[0, 0]])


def test_cmyk_jpeg() -> None:
    data = _save(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    out = decode_image(data)
    _assert_rgb(out, 8, 16)
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_scaled_by_full_range(mode: str, fmt: str) -> None:
    values = np.linspace(0, 65535, 16 * 32).reshape(16, 32).astype(np.uint16)
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    out = decode_image(_save(Image.frombytes(mode, (32, 16), raw), fmt))
    _assert_rgb(out, 16, 32)
    assert out.min() == 0 and out.max() == 255  # not clipped at 255 of 65535
    np.testing.assert_array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert len(np.unique(out)) > 200


def test_int32_mode_i_with_16_bit_values() -> None:
    values = np.linspace(0, 65535, 256).reshape(16, 16).astype(np.int32)
    out = decode_image(_save(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[..., 1], np.rint(values / 257.0).astype(np.uint8))


def test_float_mode_f() -> None:
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = decode_image(_save(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[..., 2], np.rint(values * 255).astype(np.uint8))
    wide = decode_image(_save(Image.fromarray(values * 1000 - 300), "TIFF"))  # no natural range
    assert wide.min() == 0 and wide.max() == 255


def test_gif_and_bmp() -> None:
    img = _noise_rgb()
    for fmt in ["GIF", "BMP", "WEBP"]:
        _assert_rgb(decode_image(_save(Image.fromarray(img), fmt)), *img.shape[:2])


# --- masks ---------------------------------------------------------------------------------


def test_decode_mask_any_mode() -> None:
    m = np.zeros((6, 9), bool)
    m[2:4, 3:7] = True
    gray = m.astype(np.uint8) * 255
    cases = [
        Image.fromarray(gray),
        Image.fromarray(m),
        Image.fromarray(np.repeat(gray[..., None], 3, 2)),
        Image.fromarray(gray).convert("P"),
        Image.fromarray(gray).convert("LA"),
        Image.fromarray(m.astype(np.uint16)),  # 16-bit label map with value 1
    ]
    for im in cases:
        out = decode_mask(_save(im))
        assert out.dtype == bool and out.shape == (6, 9), im.mode
        np.testing.assert_array_equal(out, m, err_msg=im.mode)


def test_decode_mask_bad_bytes() -> None:
    with pytest.raises(ImageDecodeError):
        decode_mask(b"")


# --- resizing, tensors, shapes, PNG --------------------------------------------------------


def test_resize_shapes_and_antialias() -> None:
    img = _noise_rgb(40, 60)
    out = resize(img, 16)
    _assert_rgb(out, 16, 16)
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize(np.repeat(checker[..., None], 3, 2), 8)
    assert np.abs(small.astype(int) - 128).max() <= 2  # averaged, not aliased to 0/255
    with pytest.raises(ValueError):
        resize(img[..., 0], 8)


def test_resize_mask_nearest() -> None:
    m = np.zeros((10, 20), bool)
    m[:, :10] = True
    out = resize_mask(m, 4)
    assert out.dtype == bool and out.shape == (4, 4)
    np.testing.assert_array_equal(out, np.array([[1, 1, 0, 0]] * 4, bool))


def test_to_tensor() -> None:
    batch = np.stack([_noise_rgb(8, 8, s) for s in range(3)])
    t = to_tensor(batch)
    assert t.dtype == torch.float32 and t.shape == (3, 3, 8, 8) and t.is_contiguous()
    assert 0.0 <= t.min() and t.max() <= 1.0
    assert t[1, 2, 3, 4].item() == pytest.approx(batch[1, 3, 4, 2] / 255.0)
    with pytest.raises(ValueError):
        to_tensor(batch.astype(np.float32))


@pytest.mark.parametrize(
    ("h", "w", "long_side", "expected"),
    [
        (768, 576, 256, (256, 192)),
        (361, 494, 256, (187, 256)),
        (100, 50, 256, (100, 50)),  # never upsampled
        (10000, 3, 256, (256, 1)),  # short side never 0
        (256, 256, 256, (256, 256)),
    ],
)
def test_map_shape(h: int, w: int, long_side: int, expected: tuple[int, int]) -> None:
    assert map_shape(h, w, long_side) == expected


def test_map_shape_rejects_empty() -> None:
    with pytest.raises(ValueError):
        map_shape(0, 10)


def test_encode_png_round_trip() -> None:
    gray = _noise_rgb()[..., 0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(gray)))), gray)
    rgb = _noise_rgb()
    np.testing.assert_array_equal(decode_image(encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        encode_png(gray.astype(np.float32))


# --- real data, read in place --------------------------------------------------------------


@pytest.mark.parametrize("category", ["magnetic_tile", "cookie"])
def test_real_files_decode(category: str) -> None:
    folder = DATASETS / category / "train" / "good"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    for path in sorted(folder.glob("*.png"))[:3]:
        with Image.open(path) as im:
            width, height = im.size
        _assert_rgb(decode_image(path.read_bytes()), height, width)


def test_resize_to_height_width_keeps_values_where_sizes_match():
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    assert resize(img, (20, 40)).shape == (20, 40, 3)
    assert np.array_equal(resize(img, (30, 50)), img)
    mask = np.zeros((30, 50), bool)
    mask[10:20, 5:25] = True
    small = resize_mask(mask, (15, 25))
    assert small.shape == (15, 25) and small[5:10, 3:12].all() and not small[:4].any()
    assert np.array_equal(resize_mask(mask, (30, 50)), mask)
