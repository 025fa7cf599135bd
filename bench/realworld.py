"""Real-world digit pictures: MNIST **test** digits rendered the ways people send them, and their accuracy.

    .venv/bin/python -m bench.realworld                      # in process: app.image + the bundled model
    .venv/bin/python -m bench.realworld --http               # over HTTP: starts uvicorn on a free port
    .venv/bin/python -m bench.realworld --url http://host:8000 --digits 50 --ways noisy_photo,phone_12mp
    .venv/bin/python -m bench.realworld --mnist              # the 10,000 test digits as 28x28 PNGs
    .venv/bin/python -m bench.realworld --save /tmp/rw --digits 5   # write the pictures to look at
    .venv/bin/python -m bench.realworld --speed              # preprocessing time per image, peak RSS

Each way renders its own slice of a seeded permutation of the test set, with its parameters drawn
at random per digit from realistic ranges (``--seed``), so every run sees the same pictures. The
ways are what a service meets in practice: a noisy phone photo of light-grey paper (the case that
once scored 14 %), a shadow across the page, a phone JPEG stored sideways with an EXIF rotation,
coloured pens on coloured paper (and chalk on a board), a thin ballpoint, a thick marker, a canvas
export with transparency, a small digit in a corner of a big canvas, heavy blur, ruled and squared
paper, a full-size 12-megapixel phone JPEG, and a photo re-encoded as WebP by a chat app.

Pens are re-drawn, not just scaled: a digit's skeleton (Zhang-Suen thinning) is inked again with
the pen's width, so a ballpoint line is 2-3 pixels wide on a 150-pixel digit and a marker's 25-40.
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


# --------------------------------------------------------------------------------------------
# Data


def load_mnist_test(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images (uint8 ``[N, 28, 28]``) and labels, straight from the IDX files."""
    raw = Path(data_dir) / "MNIST" / "raw"
    images = _idx(raw, "t10k-images-idx3-ubyte")
    labels = _idx(raw, "t10k-labels-idx1-ubyte")
    return images[16:].reshape(-1, 28, 28), labels[8:]


def _idx(raw: Path, name: str) -> np.ndarray:
    for path, opener in ((raw / f"{name}.gz", gzip.open), (raw / name, open)):
        if path.exists():
            with opener(path, "rb") as handle:
                return np.frombuffer(handle.read(), dtype=np.uint8)
    raise SystemExit(f"MNIST test set not found in {raw} (set --data-dir or MNIST_DATA_DIR)")


# --------------------------------------------------------------------------------------------
# Drawing


def _coverage(digit: np.ndarray, size: int, rng: np.random.Generator, rotate: float = 4.0) -> np.ndarray:
    """The digit's ink coverage in [0, 1] at ``size`` px, slightly rotated and sheared like handwriting."""
    image = Image.fromarray(digit, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    shear = float(rng.uniform(-0.1, 0.1))
    if shear:
        image = image.transform(
            image.size, Image.Transform.AFFINE, (1, shear, -shear * size / 2, 0, 1, 0), Image.Resampling.BICUBIC
        )
    angle = float(rng.uniform(-rotate, rotate))
    if angle:
        image = image.rotate(angle, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image to one-pixel-wide strokes (vectorised)."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = img
            p2, p3, p4 = p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:]
            p5, p6, p7 = p[2:, 2:], p[2:, 1:-1], p[2:, :-2]
            p8, p9 = p[1:-1, :-2], p[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            b = sum(n.astype(np.int32) for n in ring[:8])
            a = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                c1, c2 = p2 * p4 * p6, p4 * p6 * p8
            else:
                c1, c2 = p2 * p4 * p8, p2 * p6 * p8
            remove = (p[1:-1, 1:-1] == 1) & (b >= 2) & (b <= 6) & (a == 1) & (c1 == 0) & (c2 == 0)
            if remove.any():
                img[1:-1, 1:-1][remove] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _pen(digit: np.ndarray, size: int, width: float, rng: np.random.Generator) -> np.ndarray:
    """The digit re-drawn with a round pen ``width`` px wide: skeleton, then a disc brush, anti-aliased."""
    scale = 2  # drawn at twice the size and reduced: anti-aliased edges
    cover = _coverage(digit, size * scale, rng)
    skeleton = _skeleton(cover > 0.45)
    # A lone skeleton pixel is what thinning leaves of a speck, not a stroke a pen would draw.
    around = np.pad(skeleton, 1).astype(np.uint8)
    neighbours = sum(
        around[1 + dy : 1 + dy + skeleton.shape[0], 1 + dx : 1 + dx + skeleton.shape[1]]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    )
    skeleton &= neighbours > 0
    ys, xs = np.nonzero(skeleton)
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    radius = max(0.5, width * scale / 2)
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(canvas.reduce(scale), dtype=np.float32) / 255.0


def _place(cover: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    canvas = np.zeros((height, width), dtype=np.float32)
    h, w = cover.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(height, top + h), min(width, left + w)
    canvas[y0:y1, x0:x1] = cover[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas


def _random_place(cover: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    h, w = cover.shape
    return _place(
        cover, height, width, int(rng.integers(0, max(1, height - h + 1))), int(rng.integers(0, max(1, width - w + 1)))
    )


def _ink_on(cover: np.ndarray, paper: np.ndarray, ink: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """RGB float image: ``paper`` (HxWx3 or a colour) where there is no ink, ``ink`` where there is."""
    c = cover[..., None]
    return paper * (1.0 - c) + np.asarray(ink, dtype=np.float32) * c


def _paper(height: int, width: int, colour: tuple[float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.float32), (height, width, 3)).copy()


def _gradient(height: int, width: int, rng: np.random.Generator, low: float, high: float = 1.0) -> np.ndarray:
    """Light falling off linearly across the page in a random direction, from ``high`` to ``low``."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (high + (low - high) * t)[..., None]


def _shadow(height: int, width: int, rng: np.random.Generator, depth: float) -> np.ndarray:
    """A soft shadow (a hand or a phone over the page): a blurred dark ellipse."""
    mask = Image.new("L", (width, height), 0)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(height, width) / 10))
    return (1.0 - depth * np.asarray(mask, dtype=np.float32) / 255.0)[..., None]


def _noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Camera noise: per-pixel luminance noise plus weaker per-channel chroma noise."""
    h, w = image.shape[:2]
    luma = rng.standard_normal((h, w, 1), dtype=np.float32) * sigma
    chroma = rng.standard_normal((h, w, 3), dtype=np.float32) * (sigma * 0.4)
    return image + luma + chroma


def _to_image(rgb: np.ndarray, mode: str = "RGB") -> Image.Image:
    arr = np.clip(rgb, 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode=mode)


def _blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# Stored orientation: the upright picture is saved rotated, with the EXIF tag that undoes it.
_STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _jpeg_with_orientation(upright: Image.Image, orientation: int, quality: int) -> bytes:
    stored = upright.transpose(_STORE[orientation]) if orientation in _STORE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Generic"  # Make
    exif[0x0110] = "Phone"  # Model
    return _encode(stored, "JPEG", quality=quality, exif=exif.tobytes(), subsampling=2)


def _light_paper(rng: np.random.Generator, low: float = 215, high: float = 250) -> tuple[float, float, float]:
    base = rng.uniform(low, high)
    tint = rng.uniform(-6, 6, 3)
    return tuple(float(np.clip(base + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def _pen_ink(rng: np.random.Generator) -> tuple[float, float, float]:
    inks = [(25, 25, 30), (20, 35, 120), (35, 45, 150), (10, 10, 10), (40, 40, 60)]
    r, g, b = inks[int(rng.integers(len(inks)))]
    jitter = rng.uniform(-10, 10, 3)
    return (r + jitter[0], g + jitter[1], b + jitter[2])


# --------------------------------------------------------------------------------------------
# The ways


Render = Callable[[np.ndarray, np.random.Generator], tuple[bytes, str]]


def noisy_photo(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A phone photo of light-grey paper, 300x200, camera noise: the case that once scored 14 %."""
    height, width = 200, 300
    size = int(rng.integers(130, 200))
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    paper = _paper(height, width, _light_paper(rng, 150, 215))
    ink = np.full(3, rng.uniform(15, 70), dtype=np.float32)
    rgb = _ink_on(cover, paper, ink) * _gradient(height, width, rng, float(rng.uniform(0.8, 1.0)))
    image = _blur(_to_image(rgb), float(rng.uniform(0.3, 1.0)))
    rgb = _noise(np.asarray(image, dtype=np.float32), float(rng.uniform(10, 25)), rng)
    return _encode(_to_image(rgb), "PNG"), "png"


def uneven_light(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """White paper under a strong gradient and a soft shadow: the far side at 30-55 % of the light."""
    height = width = 400
    size = int(rng.integers(170, 300))
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    rgb = _ink_on(cover, _paper(height, width, _light_paper(rng)), _pen_ink(rng))
    light = _gradient(height, width, rng, float(rng.uniform(0.3, 0.55))) * _shadow(
        height, width, rng, float(rng.uniform(0.2, 0.45))
    )
    rgb = _noise(rgb * light, float(rng.uniform(3, 8)), rng)
    return _encode(_blur(_to_image(rgb), 0.7), "PNG"), "png"


def _photo(digit: np.ndarray, rng: np.random.Generator, height: int, width: int, size: int) -> Image.Image:
    """A generic phone photo of a digit on paper: tinted paper, a gradient, noise, slight blur."""
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    rgb = _ink_on(cover, _paper(height, width, _light_paper(rng, 190, 245)), _pen_ink(rng))
    rgb = rgb * _gradient(height, width, rng, float(rng.uniform(0.6, 0.95)))
    rgb = _noise(rgb, float(rng.uniform(4, 10)), rng)
    return _blur(_to_image(rgb), float(rng.uniform(0.4, 1.2)))


def phone_jpeg(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A 480x640 phone JPEG stored sideways or upside down, with the EXIF orientation that fixes it."""
    portrait = bool(rng.integers(2))
    height, width = (640, 480) if portrait else (480, 640)
    upright = _photo(digit, rng, height, width, int(rng.integers(220, 420)))
    orientation = int(rng.choice([3, 6, 8]))
    return _jpeg_with_orientation(upright, orientation, int(rng.integers(60, 92))), "jpeg"


_PAPERS = [(250, 235, 120), (250, 200, 215), (190, 220, 245), (205, 240, 200), (205, 175, 135), (255, 205, 150)]
_INKS = [(30, 50, 170), (190, 30, 40), (20, 110, 50), (95, 40, 145), (20, 20, 20), (100, 55, 20)]


def _luma(rgb: tuple[float, ...] | np.ndarray) -> float:
    return 0.299 * float(rgb[0]) + 0.587 * float(rgb[1]) + 0.114 * float(rgb[2])


def coloured(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Coloured pens on sticky notes and tinted paper; one in five is chalk on a green board."""
    height = width = 320
    size = int(rng.integers(180, 300))
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    if rng.random() < 0.2:
        paper_rgb = np.asarray([40, 70, 50], dtype=np.float32) + rng.uniform(-10, 10, 3)
        ink_rgb = np.asarray([225, 225, 210], dtype=np.float32) + rng.uniform(-20, 10, 3)
    else:
        while True:  # a pen people would pick for that paper: visible, not necessarily dark
            paper_rgb = np.asarray(_PAPERS[int(rng.integers(len(_PAPERS)))], dtype=np.float32) + rng.uniform(-8, 8, 3)
            ink_rgb = np.asarray(_INKS[int(rng.integers(len(_INKS)))], dtype=np.float32) + rng.uniform(-10, 10, 3)
            if _luma(paper_rgb) - _luma(ink_rgb) > 80:
                break
    rgb = _noise(_ink_on(cover, _paper(height, width, tuple(paper_rgb)), ink_rgb), float(rng.uniform(2, 6)), rng)
    return _encode(_blur(_to_image(rgb), 0.6), "PNG"), "png"


def thin_pen(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A ballpoint: a line 1.5-3 px wide on a 130-250 px digit, scanned at 300x300."""
    height = width = 300
    size = int(rng.integers(130, 250))
    cover = _random_place(_pen(digit, size, float(rng.uniform(1.5, 3.0)), rng), height, width, rng)
    rgb = _ink_on(cover * float(rng.uniform(0.75, 1.0)), _paper(height, width, _light_paper(rng)), _pen_ink(rng))
    rgb = _noise(rgb, float(rng.uniform(2, 6)), rng)
    return _encode(_to_image(rgb), "PNG"), "png"


def thick_marker(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A felt marker: a line 12-20 % of the digit's height wide."""
    height = width = 300
    size = int(rng.integers(170, 260))
    cover = _random_place(_pen(digit, size, float(rng.uniform(0.12, 0.2)) * size * 0.7, rng), height, width, rng)
    ink = np.asarray(_INKS[int(rng.integers(len(_INKS)))], dtype=np.float32) * 0.6
    rgb = _noise(_ink_on(cover, _paper(height, width, _light_paper(rng)), ink), float(rng.uniform(2, 5)), rng)
    return _encode(_blur(_to_image(rgb), 0.8), "PNG"), "png"


def canvas_rgba(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A drawing app's export: a round brush on a fully transparent canvas (RGBA), any ink colour."""
    side = int(rng.choice([280, 400, 512]))
    size = int(rng.uniform(0.55, 0.85) * side)
    brush = float(rng.uniform(0.05, 0.09)) * side
    cover = _random_place(_pen(digit, size, brush, rng), side, side, rng)
    if rng.random() < 0.7:
        colour = np.asarray([0, 0, 0], dtype=np.float32)
    else:
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    rgba = np.zeros((side, side, 4), dtype=np.float32)
    rgba[..., :3] = colour
    rgba[..., 3] = cover * 255
    return _encode(_to_image(rgba, "RGBA"), "PNG"), "png"


def small_offcentre(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A 30-60 px digit in a corner of an 800-1200 px canvas, a few stray specks elsewhere."""
    width, height = int(rng.integers(800, 1201)), int(rng.integers(600, 901))
    size = int(rng.integers(42, 85))
    cover_small = _coverage(digit, size, rng)
    corner_y = int(rng.integers(0, int(0.25 * height)))
    corner_x = int(rng.integers(0, int(0.25 * width)))
    top = corner_y if rng.random() < 0.5 else height - size - corner_y
    left = corner_x if rng.random() < 0.5 else width - size - corner_x
    specks = Image.new("L", (width, height), 0)
    for _ in range(int(rng.integers(0, 4))):  # dust, a stray dot of ink
        y, x, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.8, 2.0)
        ImageDraw.Draw(specks).ellipse((x - r, y - r, x + r, y + r), fill=255)
    cover = np.maximum(_place(cover_small, height, width, top, left), np.asarray(specks, np.float32) / 255)
    rgb = _ink_on(cover, _paper(height, width, _light_paper(rng, 235, 255)), _pen_ink(rng))
    return _encode(_tile_noise(_to_image(rgb), float(rng.uniform(1, 4)), rng), "PNG"), "png"


def blurred(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Out of focus: a Gaussian blur of 2-5 % of the digit's size, then noise."""
    height = width = 300
    size = int(rng.integers(160, 240))
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    rgb = _ink_on(cover, _paper(height, width, _light_paper(rng)), _pen_ink(rng))
    image = _blur(_to_image(rgb), float(rng.uniform(0.02, 0.05)) * size)
    rgb = _noise(np.asarray(image, dtype=np.float32), float(rng.uniform(2, 6)), rng)
    return _encode(_to_image(rgb), "PNG"), "png"


def lined_paper(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Written across ruled (with a red margin) or squared paper, photographed slightly askew."""
    height = width = 400
    paper = _paper(height, width, _light_paper(rng, 225, 252))
    lines = Image.new("L", (width * 2, height * 2), 0)
    draw = ImageDraw.Draw(lines)
    spacing = float(rng.uniform(22, 40)) * 2
    thickness = int(rng.integers(2, 5))
    squared = rng.random() < 0.5
    offset = rng.uniform(0, spacing)
    y = offset
    while y < height * 2:
        draw.line((0, y, width * 2, y), fill=255, width=thickness)
        y += spacing
    if squared:
        x = rng.uniform(0, spacing)
        while x < width * 2:
            draw.line((x, 0, x, height * 2), fill=255, width=thickness)
            x += spacing
    lines = lines.rotate(float(rng.uniform(-0.7, 0.7)), Image.Resampling.BILINEAR).reduce(2)
    line_cover = np.asarray(lines, dtype=np.float32) / 255 * float(rng.uniform(0.6, 1.0))
    line_colour = np.asarray([150, 185, 230] if not squared or rng.random() < 0.5 else [160, 160, 165], np.float32)
    rgb = _ink_on(line_cover, paper, line_colour + rng.uniform(-15, 15, 3))
    if not squared and rng.random() < 0.6:  # the red margin
        margin = np.zeros((height, width), np.float32)
        x = int(rng.integers(30, 80))
        margin[:, x : x + 2] = 0.8
        rgb = _ink_on(margin, rgb, np.asarray([220, 90, 100], np.float32))
    size = int(rng.integers(180, 300))
    cover = _random_place(_coverage(digit, size, rng), height, width, rng)
    rgb = _noise(_ink_on(cover, rgb, _pen_ink(rng)), float(rng.uniform(2, 6)), rng)
    return _encode(_blur(_to_image(rgb), 0.6), "PNG"), "png"


_NOISE_TILE: dict[int, np.ndarray] = {}


def _tile_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Sensor noise for big pictures: a fixed 1024x1024 field of it, tiled from a random offset."""
    tile = _NOISE_TILE.get(0)
    if tile is None:
        tile = _NOISE_TILE[0] = np.random.default_rng(0).standard_normal((1024, 1024, 3)).astype(np.float32)
    width, height = image.size
    oy, ox = int(rng.integers(1024)), int(rng.integers(1024))
    reps = (-(-(height + oy) // 1024), -(-(width + ox) // 1024), 1)
    noise = (np.tile(tile, reps)[oy : oy + height, ox : ox + width] * sigma).astype(np.int16)
    arr = np.asarray(image).astype(np.int16) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def phone_12mp(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A full-size 12-megapixel phone JPEG (4032x3024 as stored), sometimes with the desk at an edge."""
    portrait = bool(rng.integers(2))
    height, width = (4032, 3024) if portrait else (3024, 4032)
    # The scene is built at half size (light, blur and the digit are smooth), then brought to full
    # size and given per-pixel sensor noise there: that noise is what makes real photos 3-5 MB.
    h2, w2 = height // 2, width // 2
    size = int(rng.uniform(0.25, 0.5) * min(h2, w2))
    cover = _random_place(_coverage(digit, size, rng), h2, w2, rng)
    rgb = _ink_on(cover, _paper(h2, w2, _light_paper(rng, 190, 240)), _pen_ink(rng))
    if rng.random() < 0.5:  # the paper ends before the frame does: a dark desk along one edge
        desk = np.zeros((h2, w2), np.float32)
        extent = int(rng.uniform(0.04, 0.12) * min(h2, w2))
        side = int(rng.integers(4))
        if side == 0:
            desk[:extent] = 1
        elif side == 1:
            desk[-extent:] = 1
        elif side == 2:
            desk[:, :extent] = 1
        else:
            desk[:, -extent:] = 1
        rgb = _ink_on(desk, rgb, np.asarray([70, 50, 35], np.float32) + rng.uniform(-15, 15, 3))
    rgb *= _gradient(h2, w2, rng, float(rng.uniform(0.6, 0.95)))
    image = _blur(_to_image(rgb), 1.5).resize((width, height), Image.Resampling.BILINEAR)
    upright = _tile_noise(image, 7.0, rng)
    orientation = 6 if portrait else 1
    return _jpeg_with_orientation(upright, orientation, int(rng.integers(88, 95))), "jpeg"


def chat_webp(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A phone photo as a chat app forwards it: scaled down to 512 px and re-encoded as lossy WebP."""
    portrait = bool(rng.integers(2))
    height, width = (1024, 768) if portrait else (768, 1024)
    photo = _photo(digit, rng, height, width, int(rng.integers(300, 600)))
    photo = photo.resize((width // 2, height // 2), Image.Resampling.BILINEAR)
    return _encode(photo, "WEBP", quality=int(rng.integers(40, 80))), "webp"


WAYS: dict[str, Render] = {
    "noisy_photo": noisy_photo,
    "uneven_light": uneven_light,
    "phone_jpeg": phone_jpeg,
    "coloured": coloured,
    "thin_pen": thin_pen,
    "thick_marker": thick_marker,
    "canvas_rgba": canvas_rgba,
    "small_offcentre": small_offcentre,
    "blurred": blurred,
    "lined_paper": lined_paper,
    "phone_12mp": phone_12mp,
    "chat_webp": chat_webp,
}


@dataclass(frozen=True)
class Sample:
    way: str
    index: int  # in the MNIST test set
    label: int
    body: bytes
    fmt: str  # png, jpeg or webp


def samples(images: np.ndarray, labels: np.ndarray, ways: list[str], digits: int, seed: int) -> Iterator[Sample]:
    """Each way's ``digits`` pictures, rendered from its own slice of a seeded permutation of the test set."""
    order = np.random.default_rng(seed).permutation(len(images))
    for k, way in enumerate(ways):
        offset = (list(WAYS).index(way) * digits) % len(images)
        for i in range(digits):
            index = int(order[(offset + i) % len(images)])
            rng = np.random.default_rng([seed, list(WAYS).index(way), i])
            body, fmt = WAYS[way](images[index], rng)
            yield Sample(way, index, int(labels[index]), body, fmt)
        del k


# --------------------------------------------------------------------------------------------
# Classifying


class InProcess:
    """``app.image.to_model_input`` and the bundled model, called directly."""

    def __init__(self, model_dir: Path, max_pixels: int) -> None:
        self.model = _current_model(model_dir)
        self.max_pixels = max_pixels

    def __call__(self, sample: Sample) -> tuple[int | None, str]:
        from app.errors import InputError
        from app.image import to_model_input
        from app.inference import predict_proba

        try:
            x = to_model_input(sample.body, max_pixels=self.max_pixels)
        except InputError as exc:
            return None, f"{exc.status_code} {exc.detail}"
        return int(predict_proba(self.model, x).argmax()), ""


class OverHttp:
    """``POST /predict`` with the picture as the body and its media type."""

    def __init__(self, url: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=url, timeout=60)

    def __call__(self, sample: Sample) -> tuple[int | None, str]:
        response = self.client.post("/predict", content=sample.body, headers={"content-type": MEDIA[sample.fmt]})
        if response.status_code != 200:
            return None, f"{response.status_code} {response.text[:200]}"
        return int(response.json()["label"]), ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "MNIST_MODEL_DIR": str(model_dir), "MNIST_ACCESS_LOG": "false"}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server was not ready within 60 s")


def direct_labels(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """The model's answer for each test digit as MNIST gives it (28x28): the ceiling for every way."""
    from app.inference import predict_proba

    model = _current_model(model_dir)
    return predict_proba(model, images.reshape(-1, 784).astype(np.float32) / 255).argmax(axis=1)


def _current_model(model_dir: Path):  # noqa: ANN202 - app.model.MLP, imported lazily
    """The model ``CURRENT`` names, as the service resolves it (the registry's checks, its errors)."""
    from app.registry import CheckpointError, current_checkpoint, load_model

    try:
        return load_model(current_checkpoint(model_dir))[0]
    except CheckpointError as exc:
        raise SystemExit(f"no usable CURRENT model in {model_dir}: {exc.path}: {exc.problem}") from None


def run(
    classify: Callable[[Sample], tuple[int | None, str]], stream: Iterator[Sample], workers: int, direct: np.ndarray
) -> dict:
    """Per way: correct, total, refused (non-200), right on the 28x28 original, a few errors."""
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for sample in stream:
            pending.append((sample, pool.submit(classify, sample)))
            if len(pending) >= 4 * workers:
                _collect(pending.pop(0), results, direct)
        for item in pending:
            _collect(item, results, direct)
    return results


def _collect(item: tuple, results: dict, direct: np.ndarray) -> None:
    sample, future = item
    label, error = future.result()
    row = results.setdefault(
        sample.way, {"correct": 0, "total": 0, "refused": 0, "direct": 0, "errors": [], "wrong": []}
    )
    row["total"] += 1
    row["direct"] += int(direct[sample.index] == sample.label)
    if label is None:
        row["refused"] += 1
        row["errors"].append((sample.index, error))
    elif label == sample.label:
        row["correct"] += 1
    else:
        row["wrong"].append((sample.index, sample.label, label))


def report(results: dict, title: str) -> tuple[float, float]:
    print(f"\n{title}")
    print(f"{'way':<16} {'digits':>6} {'accuracy':>9} {'refused':>8} {'28x28 original':>15}")
    correct = total = ceiling = 0
    worst = 1.0
    for way, row in results.items():
        accuracy = row["correct"] / row["total"]
        worst = min(worst, accuracy)
        correct += row["correct"]
        total += row["total"]
        ceiling += row["direct"]
        print(f"{way:<16} {row['total']:>6} {accuracy:>9.1%} {row['refused']:>8} {row['direct'] / row['total']:>15.1%}")
        for index, error in row["errors"][:2]:
            print(f"    test #{index}: {error}")
    overall = correct / total if total else 0.0
    print(f"{'overall':<16} {total:>6} {overall:>9.2%} {'':>8} {ceiling / max(total, 1):>15.2%}")
    print(f"worst way {worst:.1%}; the bar: >= 97 % overall, >= 95 % for the worst way")
    return overall, worst


def mnist_pngs(images: np.ndarray, labels: np.ndarray) -> Iterator[Sample]:
    for index, (digit, label) in enumerate(zip(images, labels, strict=True)):
        yield Sample("mnist_28x28", index, int(label), _encode(Image.fromarray(digit, "L"), "PNG"), "png")


def saved(folder: Path, ways: list[str]) -> Iterator[Sample]:
    """The pictures a ``--save`` run wrote (``{way}-{index}-label{label}.{fmt}``), way by way."""
    for way in ways:
        for path in sorted(folder.glob(f"{way}-*")):
            _, index, label = path.stem.rsplit("-", 2)
            yield Sample(way, int(index), int(label.removeprefix("label")), path.read_bytes(), path.suffix[1:])


def speed(images: np.ndarray, rounds: int) -> None:
    """Preprocessing time per image (``to_model_input``, decode included) and the 12 MP photo's peak RSS."""
    import statistics
    import tempfile

    from app.image import to_model_input

    # The HTTP bench's png280 workload: the digit as the pad sends it, dark ink on white, RGB.
    ink = Image.fromarray(images[0], mode="L").resize((200, 200), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(ink, (40, 40))
    picture = Image.fromarray(np.stack([255 - np.asarray(canvas)] * 3, axis=-1), mode="RGB")
    bodies = {
        "280x280 RGB PNG": _encode(picture, "PNG"),
        "280x280 JPEG": _encode(picture, "JPEG", quality=90),
        "12 MP phone JPEG": phone_12mp(images[0], np.random.default_rng(0))[0],
    }
    print(f"{'workload':<18} {'bytes':>9} {'median ms':>10} {'best ms':>8}")
    for name, body in bodies.items():
        count = rounds if "12 MP" not in name else max(3, rounds // 20)
        to_model_input(body, max_pixels=4096 * 4096)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            to_model_input(body, max_pixels=4096 * 4096)
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{name:<18} {len(body):>9} {statistics.median(times):>10.2f} {min(times):>8.2f}")
    # Peak RSS growth of one 12 MP request, in a fresh process (this one holds the test set).
    with tempfile.NamedTemporaryFile(suffix=".jpg") as photo:
        photo.write(bodies["12 MP phone JPEG"])
        photo.flush()
        probe = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, photo.name], cwd=ROOT, capture_output=True, text=True, check=True
        )
    print(probe.stdout.strip())


_RSS_PROBE = """
import resource, sys, time
from pathlib import Path
from app.image import to_model_input
body = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
to_model_input(body, max_pixels=4096 * 4096)
took = (time.perf_counter() - start) * 1e3
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(f"12 MP phone JPEG, first request in a fresh process: {took:.0f} ms, peak RSS growth {growth} KB")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of: " + ", ".join(WAYS))
    parser.add_argument("--digits", type=int, default=200, help="digits per way (default 200)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--http", action="store_true", help="start uvicorn on a free port and send over HTTP")
    parser.add_argument("--url", help="send over HTTP to this running service instead")
    parser.add_argument("--mnist", action="store_true", help="the 10,000 test digits as 28x28 PNGs instead")
    parser.add_argument("--workers", type=int, default=2, help="requests (or in-process calls) in flight")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--save", type=Path, help="write the pictures to this folder and exit")
    parser.add_argument("--speed", action="store_true", help="time to_model_input on 280x280 PNG/JPEG and a 12 MP JPEG")
    parser.add_argument("--load", type=Path, help="classify the pictures a --save run wrote, instead of rendering")
    args = parser.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"unknown way(s) {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    images, labels = load_mnist_test(args.data_dir)
    if args.speed:
        speed(images, rounds=200)
        return 0
    if args.load:
        stream = saved(args.load, ways)
    elif args.mnist:
        stream = mnist_pngs(images, labels)
    else:
        stream = samples(images, labels, ways, args.digits, args.seed)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for sample in stream:
            (args.save / f"{sample.way}-{sample.index:05d}-label{sample.label}.{sample.fmt}").write_bytes(sample.body)
        return 0
    server = None
    if args.url:
        classify: Callable[[Sample], tuple[int | None, str]] = OverHttp(args.url)
        title = f"over HTTP ({args.url})"
    elif args.http:
        server, url = _start_server(args.model_dir)
        classify, title = OverHttp(url), f"over HTTP (uvicorn app.main:app at {url})"
    else:
        classify, title = InProcess(args.model_dir, args.max_pixels), "in process (app.image.to_model_input + model)"
    started = time.perf_counter()
    try:
        results = run(classify, stream, args.workers, direct_labels(args.model_dir, images))
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    report(results, f"{title}, seed {args.seed}, {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
