"""Image bytes -> RGB uint8 arrays, resizing, batching and PNG encoding.

Decoding is the first step of every pipeline and sees whatever is in the archive, so every
failure (empty, truncated, non-image, decompression bomb, unsupported mode) surfaces as one
exception type, :class:`ImageDecodeError`, with a one-line reason for the ``error`` column.

Decisions other modules rely on:
- Alpha (RGBA, LA, PA, palette or colour-key transparency) is composited onto black: the colour
  stored under a transparent pixel is arbitrary encoder output, so compositing makes the decoded
  pixels what the file means and identical across encoders. Opaque images are unchanged by it.
- 16-bit integer images are mapped by the full 16-bit range (value / 257), never clipped, so the
  same sensor value gives the same 8-bit value in every image. 32-bit 'I' images whose values
  fit 0..65535 (how 16-bit data often arrives) are treated as 16-bit; float 'F' images in [0, 1]
  are scaled by 255. Anything else without a natural range is stretched min..max per image.
- EXIF orientation is NOT applied: masks, maps and boxes all refer to the stored pixel grid.
- Multi-frame files (GIF, TIFF) decode their first frame.
- The pixel limit is checked on the header size before any pixel data is decoded. It is a
  per-call argument; PIL's global ``Image.MAX_IMAGE_PIXELS`` is never modified. PIL still
  applies its own global guard at open time (an error above twice that value), which can only
  make decoding stricter, and we turn it into the same ImageDecodeError.
- Truncated files are detected by PIL while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its
  default). This module never sets it, and no module of this project may.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS (a 0.25 GiB RGB budget)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageDecodeError(ValueError):
    """Bytes that cannot be turned into an image; the message is one line saying why."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data``, refusing oversized headers before decoding pixels."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {' '.join(str(e).split())}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (cannot identify format)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a crash
        raise _decode_failure(e, "corrupt image header") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} pixels exceeds the {max_pixels}-pixel limit "
            "(decompression bomb guard)"
        )
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...
        raise _decode_failure(e, "corrupt image data") from None
    return im


def _decode_failure(e: BaseException, what: str) -> ImageDecodeError:
    """One-line ImageDecodeError for a PIL failure; it ends up in a Parquet ``error`` column."""
    text = " ".join(str(e).split())
    if isinstance(e, EOFError) or "truncated" in text.lower() or "broken data stream" in text:
        return ImageDecodeError("truncated image data")
    detail = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return ImageDecodeError(f"{what} ({detail})")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map one-channel high-depth values to uint8 by their range (see module docstring)."""
    v = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        lo, hi = 0.0, 65535.0
    elif mode == "F" and np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0:
        lo, hi = 0.0, 1.0
    elif mode == "I" and v.min() >= 0 and v.max() <= 65535:
        lo, hi = 0.0, 65535.0
    else:
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            return np.zeros(v.shape, np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """RGB premultiplied by alpha, rounded: transparent pixels become black."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any supported image file to uint8 (H, W, 3) RGB; raise ImageDecodeError if not."""
    im = _open(data, max_pixels)
    mode = im.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
            gray = _to_uint8(np.asarray(im), mode)
            return np.repeat(gray[..., None], 3, axis=2)
        if mode in _ALPHA_MODES or "transparency" in im.info:
            return _composite_on_black(np.asarray(im.convert("RGBA")))
        if mode == "RGB":
            return np.array(im)  # a writable copy that owns its memory
        return np.asarray(im.convert("RGB")).copy()
    except Exception as e:  # noqa: BLE001 - e.g. a mode PIL cannot convert to RGB
        raise _decode_failure(e, f"unsupported image mode {mode}") from None


def decode_mask(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a ground-truth mask to bool (H, W): any nonzero value (any colour channel) = defect.

    Values are compared raw, before any bit-depth scaling, so a 16-bit label map with value 1
    still marks a defect. Alpha is ignored: masks carry their labels in the colour channels.
    """
    im = _open(data, max_pixels)
    mode = im.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in {"1", "L", "I", "F"}:
            return np.asarray(im) != 0
        if mode in {"LA", "La"}:
            return np.asarray(im)[..., 0] != 0
        return (np.asarray(im.convert("RGB")) != 0).any(axis=2)
    except Exception as e:  # noqa: BLE001
        raise _decode_failure(e, f"unsupported mask mode {mode}") from None


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to (size, size, 3) (model inputs are square) or to (h, w, 3):
    bilinear, antialiased when shrinking (PIL widens the bilinear support by the shrink factor)."""
    h, w = _hw(size)
    img = _check_rgb(img)
    if img.shape[:2] == (h, w):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR)).copy()


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool (H, W) mask to (size, size) or (h, w) with nearest neighbour, so labels stay crisp."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h, w = _hw(size)
    if mask.shape == (h, w):
        return np.asarray(mask, dtype=bool).copy()
    im = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.Resampling.NEAREST)) != 0


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> float32 (N, 3, S, S) in [0, 1], the model input convention. (torch is
    imported here, not above: read tasks decode images and never need it.)"""
    import torch

    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3), got {batch.dtype} {batch.shape}")
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return t.to(torch.float32).div_(255.0).contiguous()


def map_shape(height: int, width: int, long_side: int = 256) -> tuple[int, int]:
    """(h, w) of an anomaly map with the input's aspect ratio and long side <= long_side.

    Small inputs are not upsampled (long side = min(long_side, max(height, width))), and the
    short side never rounds down to zero.
    """
    if height < 1 or width < 1 or long_side < 1:
        raise ValueError(f"sizes must be positive, got {height}x{width}, long_side={long_side}")
    longest = max(height, width)
    target = min(long_side, longest)
    scale = target / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grayscale or (H, W, 3) RGB array (maps, visualizations)."""
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _check_rgb(img: np.ndarray) -> np.ndarray:
    """Reject arrays that break the (H, W, 3) uint8 convention instead of mis-resizing them."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)
