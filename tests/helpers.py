"""Small helpers shared by tests: PNG encoding and MNIST-to-"drawn" image transforms."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def mnist_png(digit: np.ndarray) -> bytes:
    """A 28x28 MNIST digit (float in [0,1]) as an 8-bit greyscale PNG, white on black."""
    return png_bytes(Image.fromarray((np.asarray(digit).reshape(28, 28) * 255).round().astype(np.uint8), mode="L"))


def drawn_like_a_person(digit: np.ndarray, index: int, mode: str) -> bytes:
    """Turn an MNIST digit into what a person draws: black ink on white, 280x280, off-centre.

    The digit is scaled up to 140-200 px, placed with a thick margin at an offset that varies
    with ``index``, and saved as RGB or as RGBA (transparent paper, opaque ink).
    """
    ink = (np.asarray(digit).reshape(28, 28) * 255).round().astype(np.uint8)
    size = 140 + (index * 7) % 61
    big = Image.fromarray(ink, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    left = 20 + (index * 13) % (260 - size - 20 + 1) if size < 240 else 20
    top = 20 + (index * 29) % (260 - size - 20 + 1) if size < 240 else 20
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(big, (left, top))
    coverage = np.asarray(canvas)
    if mode == "RGB":
        paper = 255 - coverage
        return png_bytes(Image.fromarray(np.stack([paper] * 3, axis=-1), mode="RGB"))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)  # black ink...
    rgba[..., 3] = coverage  # ...whose opacity is the stroke; the paper is fully transparent
    return png_bytes(Image.fromarray(rgba, mode="RGBA"))
