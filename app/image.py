"""Images to model input: any picture of a digit to one MNIST-like float32 ``[1, 784]`` row.

Images go through :func:`mnistify`, the normalisation that produced MNIST itself: white digit on
black, cropped to its bounding box, scaled to fit 20x20, centred by centre of mass in 28x28.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib

import numpy as np
from PIL import Image

from app.errors import InputError

__all__ = ["PNG_SIGNATURE", "decode_png", "mnistify", "png_declared_pixels", "png_to_gray"]

PIXELS = 784
SIDE = 28
BOX = 20  # MNIST digits were scaled to fit a 20x20 box, then centred in 28x28
# Where MNIST's own digits have their centre of mass, in pixel indices (measured: 13.99, 14.01).
CENTER = 14.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Below this contrast (in [0, 1] units) an image is treated as blank rather than guessed at.
MIN_CONTRAST = 0.1
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

Image.MAX_IMAGE_PIXELS = None  # our own, lower limit is checked before decoding (see decode_png)


def png_declared_pixels(body: bytes) -> int:
    """Width x height from a PNG's IHDR without decoding anything (0 when it is not a PNG).

    Decoding cost follows the declared size, not the compressed size: a 40 KB file can declare
    16 million pixels. Callers use this to keep such work off the event loop.
    """
    if len(body) < 24 or not body.startswith(PNG_SIGNATURE) or body[12:16] != b"IHDR":
        return 0
    return int.from_bytes(body[16:20], "big") * int.from_bytes(body[20:24], "big")


def decode_png(body: bytes, max_pixels: int) -> np.ndarray:
    """A PNG of any size and mode to one MNIST-like float32 ``[1, 784]`` row."""
    return mnistify(png_to_gray(body, max_pixels)).reshape(1, PIXELS)


def png_to_gray(body: bytes, max_pixels: int) -> np.ndarray:
    """Decode a PNG into float32 grey levels in [0, 1], transparency composited away."""
    if not body:
        raise InputError(400, "empty request body: send a PNG image")
    if not body.startswith(PNG_SIGNATURE):
        raise InputError(422, "the body is not a PNG image (it does not start with the PNG signature)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body), formats=["PNG"])
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    413,
                    f"image declares {width}x{height} pixels, over the limit of {max_pixels}: send a smaller image",
                )
            image.load()
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
        # Pillow's messages can embed object reprs ("<_io.BytesIO object at 0x7f...>"): keep them out.
        reason = _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise InputError(422, f"corrupt or truncated PNG ({reason})") from None
    return _to_gray(image)


def _to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    alpha: np.ndarray | None = None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA" if mode == "RGB" else "LA")
    mode = image.mode
    if mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B") or 32-bit integer
        gray = np.asarray(image, dtype=np.float32) / 65535.0
    elif mode == "F":
        gray = np.asarray(image, dtype=np.float32)
    else:
        if mode in ("LA", "PA", "RGBA", "La", "RGBa"):
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
            image = image.convert("RGB" if mode.startswith(("RGB", "PA")) else "L")
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    gray = np.clip(gray, 0.0, 1.0)
    if alpha is not None and float(alpha.min()) < 1.0:
        gray = _composite(gray, alpha)
    return gray


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency onto a background that contrasts with the visible strokes.

    A digit drawn in black on a transparent canvas and one drawn in white both survive: the
    background becomes the opposite of the (alpha-weighted) colour of what is drawn.
    """
    weight = float(alpha.sum())
    ink = float((gray * alpha).sum() / weight) if weight > 0 else 0.0
    background = 1.0 if ink < 0.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def mnistify(gray: np.ndarray) -> np.ndarray:
    """Any grey image to a 28x28 MNIST-style float32 array (white digit on black in [0, 1])."""
    gray = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 0.5:  # dark digit on light paper: invert to MNIST's polarity
        gray, background = 1.0 - gray, 1.0 - background
    ink = np.clip(gray - background, 0.0, None)
    peak = float(ink.max()) if ink.size else 0.0
    if peak < MIN_CONTRAST:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    ink /= peak  # stretch contrast so faint pencil and bold marker look alike
    rows = np.flatnonzero((ink > MIN_CONTRAST).any(axis=1))
    cols = np.flatnonzero((ink > MIN_CONTRAST).any(axis=0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = _fit_box(digit)
    return _center_by_mass(digit)


def _fit_box(digit: np.ndarray) -> np.ndarray:
    height, width = digit.shape
    longest = max(height, width)
    # Within ~10 % of the box already (an MNIST image, say): resampling would only blur it.
    if abs(longest - BOX) <= 2 and longest <= SIDE:
        return digit
    scale = BOX / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(digit, mode="F").resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _center_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place ``digit`` in 28x28 so that its centre of mass lands on the centre, as MNIST did."""
    height, width = digit.shape
    total = float(digit.sum())
    cy = float((digit.sum(axis=1) * np.arange(height)).sum() / total)
    cx = float((digit.sum(axis=0) * np.arange(width)).sum() / total)
    top = int(np.clip(round(CENTER - cy), 0, SIDE - height))
    left = int(np.clip(round(CENTER - cx), 0, SIDE - width))
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + height, left : left + width] = digit
    return out
