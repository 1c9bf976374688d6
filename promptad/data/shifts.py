"""Robustness shifts for audits: how a model holds up under lighting, camera and sensor changes.

Each shift has one fixed, documented strength so that audit results are comparable between
models and runs (VAND 3.0 asks "does it survive realistic shifts?", not "at what strength does
it break?"). Shifts are seeded: the same (name, image, seed) gives the same output.

Geometric shifts move the ground-truth mask exactly as the image (nearest neighbour, same
sampling grid). They sample outside the frame by mirror reflection rather than padding with
black, because a real camera move shows more of the scene, not a black border the model would
rightly call anomalous. Photometric shifts return the mask untouched (the same object).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from promptad.errors import UserError

BRIGHTNESS = 1.25  # brightness: every channel x1.25 (+25 %), clipped
CONTRAST = 0.7  # contrast: distance from the image's mean luma x0.7
GAMMA = 1.5  # gamma: out = 255 * (in / 255) ** 1.5 (darker mid-tones)
ROTATION_DEG = 5.0  # rotation: 5 degrees about the centre, direction from the seed
TRANSLATION = 0.04  # translation: 4 % of the image size, direction from the seed
SCALE = 1.1  # scale: zoom in x1.1 about the centre
BLUR_SIGMA = 1.5  # blur: Gaussian, sigma 1.5 px (defocus)
NOISE_SIGMA = 8.0  # noise: additive Gaussian, sigma 8/255, independent per pixel and channel
JPEG_QUALITY = 30  # jpeg: one JPEG round trip at quality 30

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

ShiftFn = Callable[
    [np.ndarray, "np.ndarray | None", np.random.Generator], tuple[np.ndarray, "np.ndarray | None"]
]


@dataclass(frozen=True)
class Shift:
    """One named shift: its group (lighting, camera, sensor), what it does, and the function."""

    group: str
    description: str
    fn: ShiftFn


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)


def _photometric(op: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> ShiftFn:
    """Lift an image-only op to a shift that leaves the mask as it is."""
    return lambda img, mask, rng: (op(img, rng), mask)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(img * np.float32(BRIGHTNESS))


def _contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    mean = (x @ _LUMA).mean()
    return _to_uint8((x - mean) * CONTRAST + mean)


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** GAMMA)
    return lut[img]


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # PIL's GaussianBlur radius is the standard deviation of the kernel.
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(BLUR_SIGMA))).copy()


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(img + rng.normal(0.0, NOISE_SIGMA, img.shape).astype(np.float32))


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


def _reflect(coord: np.ndarray, n: int) -> np.ndarray:
    """Mirror continuous coordinates into [0, n - 1] (the scene continues past the frame)."""
    if n == 1:
        return np.zeros_like(coord)
    period = 2.0 * (n - 1)
    c = np.abs(coord) % period
    return np.where(c > n - 1, period - c, c)


def _warp(
    img: np.ndarray,
    mask: np.ndarray | None,
    angle_deg: float,
    scale: float,
    shift: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate, zoom and translate about the centre: bilinear for the image, nearest for the mask.

    Each output pixel is mapped back to its source position once, and both the image and the
    mask are read at that position, so they stay aligned to the pixel.
    """
    height, width = img.shape[:2]
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs - cx - shift[0], ys - cy - shift[1]
    cos, sin = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    src_x = _reflect((cos * u + sin * v) / scale + cx, width)
    src_y = _reflect((-sin * u + cos * v) / scale + cy, height)
    x0 = np.minimum(src_x.astype(np.intp), max(width - 2, 0))
    y0 = np.minimum(src_y.astype(np.intp), max(height - 2, 0))
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    f = img.astype(np.float32)
    top = f[y0, x0] + (f[y0, x1] - f[y0, x0]) * fx
    bottom = f[y1, x0] + (f[y1, x1] - f[y1, x0]) * fx
    out = _to_uint8(top + (bottom - top) * fy)
    if mask is None:
        return out, None
    return out, mask[np.rint(src_y).astype(np.intp), np.rint(src_x).astype(np.intp)]


def _rotation(
    img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    return _warp(img, mask, ROTATION_DEG * rng.choice([-1.0, 1.0]), 1.0, (0.0, 0.0))


def _translation(
    img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    theta = rng.uniform(0.0, 2.0 * np.pi)
    height, width = img.shape[:2]
    shift = (TRANSLATION * width * np.cos(theta), TRANSLATION * height * np.sin(theta))
    return _warp(img, mask, 0.0, 1.0, shift)


def _scale(
    img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    return _warp(img, mask, 0.0, SCALE, (0.0, 0.0))


SHIFTS: dict[str, Shift] = {
    "brightness": Shift("lighting", f"brightness x{BRIGHTNESS}", _photometric(_brightness)),
    "contrast": Shift("lighting", f"contrast x{CONTRAST} about the mean", _photometric(_contrast)),
    "gamma": Shift("lighting", f"gamma {GAMMA}", _photometric(_gamma)),
    "rotation": Shift("camera", f"rotation {ROTATION_DEG} degrees", _rotation),
    "translation": Shift("camera", f"translation {TRANSLATION:.0%} of the size", _translation),
    "scale": Shift("camera", f"zoom x{SCALE}", _scale),
    "blur": Shift("camera", f"Gaussian blur sigma {BLUR_SIGMA} px", _photometric(_blur)),
    "noise": Shift("sensor", f"Gaussian noise sigma {NOISE_SIGMA:g}/255", _photometric(_noise)),
    "jpeg": Shift("sensor", f"JPEG quality {JPEG_QUALITY}", _photometric(_jpeg)),
}
GROUPS: dict[str, list[str]] = {
    group: [name for name, s in SHIFTS.items() if s.group == group]
    for group in ("lighting", "camera", "sensor")
}


def _unknown(name: str) -> UserError:
    return UserError(
        f"unknown shift {name!r}; valid shifts: {', '.join(SHIFTS)} "
        f"(or groups: {', '.join(GROUPS)}, all)"
    )


def apply_shift(
    name: str, img: np.ndarray, mask: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply the named shift to a uint8 (H, W, 3) image and, for geometric shifts, its mask."""
    if name not in SHIFTS:
        raise _unknown(name)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
    if mask is not None and mask.shape != img.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {img.shape[:2]}")
    return SHIFTS[name].fn(img, mask, np.random.default_rng(seed))


def parse_shifts(spec: str) -> list[str]:
    """Names from a comma-separated --shifts value; groups and "all" expand, duplicates drop."""
    names: list[str] = []
    for token in (t.strip().lower() for t in spec.split(",")):
        if not token:
            continue
        if token == "all":
            expanded = list(SHIFTS)
        elif token in GROUPS:
            expanded = GROUPS[token]
        elif token in SHIFTS:
            expanded = [token]
        else:
            raise _unknown(token)
        names.extend(n for n in expanded if n not in names)
    return names


def shift_seed(image_id: str, shift: str) -> int:
    """Seed of one image under one shift: stable across runs, machines and worker order."""
    return int.from_bytes(hashlib.sha256(f"{image_id}\0{shift}".encode()).digest()[:8], "little")


def tolerated_views(img: np.ndarray, names: list[str], key: str) -> list[np.ndarray]:
    """The image under each tolerated condition (`promptad fit --tolerate`), one per name, at the
    audit's strengths and seeds (shift_seed of the image's id `key`), so a view does not depend
    on the batch or the order a fit met the image in."""
    return [apply_shift(n, img, None, shift_seed(key, n))[0] for n in names]


# --------------------------------------------------------------------------- whole-image defects
# Not robustness shifts (an audit asks the model to survive those) but defects of the whole image
# that a model must flag: every patch of such an image still resembles some normal patch, so a
# patch memory bank alone misses them and the global branch (memory/gaussian.py) has to catch them.
# They evaluate that branch (tests/test_global_branch.py, benchmarks/quality.py).


def colour_cast(img: np.ndarray) -> np.ndarray:
    """A warm cast: red x1.15, blue x0.8 (a wrong light source, a discoloured batch)."""
    return _to_uint8(img.astype(np.float32) * np.array([1.15, 1.0, 0.8], np.float32))


def hue_shift(img: np.ndarray) -> np.ndarray:
    """Hue turned by a third of the circle (the wrong colour variant)."""
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + 85) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def texture_zoom(img: np.ndarray) -> np.ndarray:
    """The centre two thirds enlarged to the full frame: a texture 1.5x too coarse."""
    h, w = img.shape[:2]
    crop = Image.fromarray(img).crop((w / 6, h / 6, w * 5 / 6, h * 5 / 6))
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))


def texture_rotation(img: np.ndarray) -> np.ndarray:
    """Rotated by 90 degrees (a weave or a grinding direction turned)."""
    return np.ascontiguousarray(np.rot90(img))


WHOLE_IMAGE_DEFECTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "colour_cast": colour_cast, "hue_shift": hue_shift, "texture_zoom": texture_zoom,
    "texture_rotation": texture_rotation,
}
