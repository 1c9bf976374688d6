"""Normal-only supervision: synthetic anomalies with exact masks, and training augmentations.

Only normal images are needed to train; the pixel and image losses are supervised with the
defects made here. Three kinds, chosen uniformly: cut-paste (a patch or a thin scar of the same
image, jittered and rotated), a noise-shaped blob blended with a texture, and thin scratches.

Mask contract: ``mask == 1`` exactly where the returned image differs from the input (in any
channel) and 0 elsewhere. Pixels outside the drawn region are copied bit-for-bit; a pixel inside
it that the operation happened to leave equal is nudged by one level, so the region is the mask.
Every defect covers ``MIN_AREA``..``MAX_AREA`` of the image and changes it by at least
``MIN_MEAN_CHANGE`` levels on average; draws that miss are redrawn, and a last-resort defect
(a rectangle with the top bit of every byte flipped) guarantees both on any input.

Every function takes a ``numpy.random.Generator``: the same seed gives identical output.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

MIN_AREA = 0.002  # fraction of the image a defect covers, at least ...
MAX_AREA = 0.15  # ... and at most
MIN_MEAN_CHANGE = 8.0  # mean |change| inside the mask, in 0..255 levels over channels
JITTER = 0.2  # augment(): brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
_ATTEMPTS = 8  # redraws of the chosen kind before the last-resort defect
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

Synth = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


def _check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
    if min(img.shape[:2]) < 8:
        raise ValueError(f"image too small to synthesize anomalies: {img.shape[:2]} (need >= 8x8)")


def _value_noise(height: int, width: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Random values on a (cells+1)^2 grid, smoothstep-interpolated to (height, width)."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    ty = (np.arange(height, dtype=np.float32) + 0.5) * (cells / height)
    tx = (np.arange(width, dtype=np.float32) + 0.5) * (cells / width)
    iy, ix = ty.astype(np.intp), tx.astype(np.intp)
    fy, fx = ty - iy, tx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # Perlin's fade: no grid creases
    top, bottom = grid[iy], grid[iy + 1]
    row0 = top[:, ix] + (top[:, ix + 1] - top[:, ix]) * fx
    row1 = bottom[:, ix] + (bottom[:, ix + 1] - bottom[:, ix]) * fx
    return row0 + (row1 - row0) * fy[:, None]


def _fractal_noise(
    height: int, width: int, rng: np.random.Generator, base_cells: int, octaves: int
) -> np.ndarray:
    """Perlin-like noise in [0, 1]: octaves of value noise, each twice as fine and half as strong."""
    total = np.zeros((height, width), np.float32)
    for k in range(octaves):
        total += _value_noise(height, width, base_cells * 2**k, rng) * 0.5**k
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-6)


def procedural_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random uint8 (size, size, 3) texture: fractal noise, warped stripes or blotches.

    The default blend source for texture anomalies (so they do not depend on an external
    texture set) and the surface generator of the demo dataset.
    """
    kind = rng.integers(3)
    noise = _fractal_noise(size, size, rng, int(rng.integers(2, 7)), 5)
    if kind == 0:
        field = noise
    elif kind == 1:
        theta = rng.uniform(0, np.pi)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        phase = 2 * np.pi * (rng.uniform(4, 16) * (x * np.cos(theta) + y * np.sin(theta)))
        field = 0.5 + 0.5 * np.sin(phase + rng.uniform(1, 4) * np.pi * noise)
    else:
        spots = _fractal_noise(size, size, rng, int(rng.integers(6, 17)), 3)
        field = np.clip((spots - 0.5) * 6 + 0.5, 0, 1) * 0.8 + noise * 0.2
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    grain = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(0, 8)
    out = c0 + (c1 - c0) * field[..., None] + grain
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _texture_source(
    texture: np.ndarray | None, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """The blend source at (height, width): a random crop of ``texture`` resized, or a new one."""
    if texture is None:
        return procedural_texture(max(height, width), rng)[:height, :width]
    tex = np.asarray(texture)
    if tex.ndim == 2:
        tex = np.repeat(tex[..., None], 3, axis=2)
    if tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[2] != 3:
        raise ValueError(f"texture must be uint8 (H, W, 3) or (H, W), got {tex.dtype} {tex.shape}")
    th, tw = tex.shape[:2]
    frac = rng.uniform(0.5, 1.0)
    ch, cw = max(1, round(th * frac)), max(1, round(tw * frac))
    y0, x0 = rng.integers(0, th - ch + 1), rng.integers(0, tw - cw + 1)
    box = (int(x0), int(y0), int(x0 + cw), int(y0 + ch))
    out = Image.fromarray(tex).resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out)


def _cut_paste(
    img: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A jittered, rotated patch (or thin scar) of the image pasted elsewhere (CutPaste)."""
    height, width = img.shape[:2]
    if rng.random() < 0.7:  # patch of 1..8 % of the image, aspect ratio 0.3..3.3
        area = rng.uniform(0.01, 0.08) * height * width
        ratio = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        ph = int(np.clip(round(np.sqrt(area * ratio)), 2, height // 2))
        pw = int(np.clip(round(area / ph), 2, width // 2))
        angle = rng.uniform(-45, 45)
    else:  # scar: thin and long, any orientation
        ph = int(rng.integers(max(2, height // 50), max(3, height // 16) + 1))
        pw = int(rng.integers(max(4, width // 6), max(5, int(width / 2.5)) + 1))
        angle = rng.uniform(-90, 90)
    sy, sx = rng.integers(0, height - ph + 1), rng.integers(0, width - pw + 1)
    patch = img[sy : sy + ph, sx : sx + pw].astype(np.float32)
    patch = patch * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25, 3).astype(np.float32)
    patch_u8 = np.rint(np.clip(patch, 0, 255)).astype(np.uint8)
    # NEAREST for both, so every footprint pixel holds exactly one sampled patch pixel.
    nearest = Image.Resampling.NEAREST
    rotated = np.asarray(Image.fromarray(patch_u8).rotate(angle, nearest, expand=True))
    foot = np.asarray(Image.new("L", (pw, ph), 255).rotate(angle, nearest, expand=True)) > 0
    fh, fw = min(foot.shape[0], height), min(foot.shape[1], width)
    rotated, foot = rotated[:fh, :fw], foot[:fh, :fw]
    dy, dx = rng.integers(0, height - fh + 1), rng.integers(0, width - fw + 1)
    region = np.zeros((height, width), bool)
    region[dy : dy + fh, dx : dx + fw] = foot
    new = img.copy()
    new[dy : dy + fh, dx : dx + fw][foot] = rotated[foot]
    return region, new


def _texture_blend(
    img: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A localized noise-shaped blob where the image is blended with a texture (DRAEM-style)."""
    height, width = img.shape[:2]
    noise = _fractal_noise(height, width, rng, int(rng.integers(2, 5)), 4)
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    sigma = rng.uniform(0.08, 0.2) * max(height, width)
    yy = ((np.arange(height, dtype=np.float32) - cy) ** 2)[:, None]
    xx = ((np.arange(width, dtype=np.float32) - cx) ** 2)[None, :]
    score = noise * np.exp(-(yy + xx) / (2 * sigma**2))
    # Thresholding at a quantile sets the blob's area directly instead of hoping for it.
    region = score > np.quantile(score, 1 - rng.uniform(0.01, 0.10))
    source = _texture_source(texture, height, width, rng).astype(np.float32)
    beta = np.float32(rng.uniform(0.3, 1.0))
    new = np.rint((1 - beta) * img.astype(np.float32) + beta * source).astype(np.uint8)
    return region, new


def _scratches(
    img: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """1-3 thin quadratic-Bezier strokes, 1-4 px wide, each darker or brighter than beneath."""
    height, width = img.shape[:2]
    region = np.zeros((height, width), bool)
    new = img.astype(np.float32)
    t = np.linspace(0, 1, 24, dtype=np.float32)[:, None]
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(0.25, 0.7) * min(height, width)
        theta = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(theta), np.sin(theta)], np.float32)
        p0 = rng.uniform((0, 0), (width, height)).astype(np.float32)
        p2 = p0 + length * direction
        normal = np.array([-direction[1], direction[0]], np.float32)
        p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.3, 0.3) * length
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        canvas = Image.new("L", (width, height), 0)
        points = [(float(x), float(y)) for x, y in curve]
        ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(1, 5)), joint="curve")
        stroke = np.asarray(canvas) > 0
        under = new[stroke]
        if rng.random() < 0.5:
            new[stroke] = under * rng.uniform(0.15, 0.5)
        else:
            new[stroke] = under + (255 - under) * rng.uniform(0.5, 0.9)
        region |= stroke
    return region, np.rint(new).astype(np.uint8)


def _compose(img: np.ndarray, new: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Take ``new`` inside the region, ``img`` outside, and make every region pixel differ."""
    out = np.where(region[..., None], new, img)
    same = region & (out == img).all(axis=2)
    out[same] = np.where(img[same] < 128, img[same] + 1, img[same] - 1)
    return out, region.astype(np.float32)


def _last_resort(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of ~2 % with every byte's top bit flipped: a change of exactly 128 levels."""
    height, width = img.shape[:2]
    side = max(2, round(np.sqrt(0.02 * height * width)))
    sh, sw = min(side, height), min(side, width)
    y0, x0 = rng.integers(0, height - sh + 1), rng.integers(0, width - sw + 1)
    region = np.zeros((height, width), bool)
    region[y0 : y0 + sh, x0 : x0 + sw] = True
    return _compose(img, img ^ np.uint8(128), region)


_KINDS: tuple[Synth, ...] = (_cut_paste, _texture_blend, _scratches)


def synthesize_anomaly(
    img: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect on ``img``: (uint8 image, float32 mask in {0, 1} exact to the pixel).

    ``texture`` (any uint8 RGB or grayscale image) is the blend source for texture defects;
    without it a procedural texture is drawn.
    """
    _check_image(img)
    make = _KINDS[int(rng.integers(len(_KINDS)))]
    for _ in range(_ATTEMPTS):
        region, new = make(img, rng, texture)
        if MIN_AREA <= region.mean() <= MAX_AREA:
            out, mask = _compose(img, new, region)
            change = np.abs(out.astype(np.int16) - img.astype(np.int16))[region].mean()
            if change >= MIN_MEAN_CHANGE:
                return out, mask
    return _last_resort(img, rng)


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's augmentations: random flips, 90-degree rotations and colour jitter.

    Brightness scales the image, contrast scales around its mean luma, and saturation scales
    the distance from each pixel's luma, each by a factor in [1 - JITTER, 1 + JITTER].
    """
    _check_image(img)
    out = img
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    out = np.rot90(out, int(rng.integers(4)))
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, 3).astype(np.float32)
    x = out.astype(np.float32) * brightness
    mean = (x @ _LUMA).mean()
    x = (x - mean) * contrast + mean
    luma = (x @ _LUMA)[..., None]
    x = luma + (x - luma) * saturation
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)


def make_training_pair(
    img: np.ndarray,
    rng: np.random.Generator,
    p_anomaly: float = 0.5,
    texture: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Augment, then with probability ``p_anomaly`` add a synthetic defect.

    Returns (uint8 image, float32 (H, W) mask, label 0/1); a normal sample has an all-zero mask.
    """
    view = augment(img, rng)
    if rng.random() < p_anomaly:
        out, mask = synthesize_anomaly(view, rng, texture)
        return out, mask, 1
    return view, np.zeros(view.shape[:2], np.float32), 0
