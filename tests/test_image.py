"""Unit tests for app.image: decoding pictures and turning them into MNIST-style input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import InputError
from app.image import decode_png, mnistify, png_declared_pixels, png_to_gray
from tests.helpers import png_bytes

MAX_PIXELS = 4096 * 4096


def _err(fn, *args) -> InputError:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        fn(*args)
    return info.value


# -- PNG ---------------------------------------------------------------------------------------


def _digit(size: int = 28, box: tuple[int, int, int, int] = (9, 6, 14, 22)) -> np.ndarray:
    """A bar-ish '1' in [0,1], white on black."""
    img = np.zeros((size, size), np.float32)
    top, left, bottom, right = box
    img[top:bottom, left:right] = 1.0
    return img


def _center_of_mass(img: np.ndarray) -> tuple[float, float]:
    total = img.sum()
    return (img.sum(1) * np.arange(28)).sum() / total, (img.sum(0) * np.arange(28)).sum() / total


def test_mnist_style_png_passes_through_unchanged() -> None:
    digit = np.zeros((28, 28), np.uint8)
    rng = np.random.default_rng(2)
    digit[4:24, 10:18] = rng.integers(30, 256, (20, 8))  # 20 px tall, centred like MNIST
    digit[4:24, 10:18][digit[4:24, 10:18] < 30] = 0
    out = decode_png(png_bytes(Image.fromarray(digit, "L")), MAX_PIXELS).reshape(28, 28)
    expected = digit / digit.max()
    cy, cx = _center_of_mass(expected)
    shift = (round(14 - cy), round(14 - cx))
    assert np.allclose(out, np.roll(expected, shift, axis=(0, 1)), atol=1e-6)


def test_light_background_is_inverted_and_digit_centred() -> None:
    paper = np.full((300, 200), 240, np.uint8)
    paper[10:110, 150:170] = 20  # dark stroke near the top-right corner
    out = mnistify(png_to_gray(png_bytes(Image.fromarray(paper, "L")), MAX_PIXELS))
    assert out.shape == (28, 28)
    assert out.max() == pytest.approx(1.0)
    assert out[0].max() == 0.0  # background is black after inversion
    rows = np.flatnonzero(out.max(1) > 0.1)
    assert rows[-1] - rows[0] + 1 == 20  # scaled to fit the 20x20 box
    cy, cx = _center_of_mass(out)
    assert abs(cy - 14) <= 0.5
    assert abs(cx - 14) <= 0.5


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_every_png_mode_gives_the_same_digit(mode: str) -> None:
    ink = (_digit(56, (10, 20, 50, 30)) * 255).astype(np.uint8)  # white on black
    base = Image.fromarray(ink, "L")
    if mode == "I;16":
        image = Image.fromarray(ink.astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "LA":
        image = Image.merge("LA", (base, Image.new("L", base.size, 255)))
    elif mode == "RGBA":
        image = base.convert("RGBA")
    else:
        image = base.convert(mode)
    reference = decode_png(png_bytes(base), MAX_PIXELS)
    out = decode_png(png_bytes(image), MAX_PIXELS)
    assert np.allclose(out, reference, atol=0.02), mode


def test_transparent_background_with_dark_ink() -> None:
    rgba = np.zeros((100, 100, 4), np.uint8)  # black ink, transparent paper
    rgba[20:80, 45:55, 3] = 255
    out = decode_png(png_bytes(Image.fromarray(rgba, "RGBA")), MAX_PIXELS).reshape(28, 28)
    assert out.max() == pytest.approx(1.0)
    assert out[0, 0] == 0.0
    assert out.sum() > 20


def test_transparent_background_with_light_ink() -> None:
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[20:80, 45:55] = 255  # white opaque ink on transparent black
    out = decode_png(png_bytes(Image.fromarray(rgba, "RGBA")), MAX_PIXELS).reshape(28, 28)
    assert out.max() == pytest.approx(1.0)
    assert out[0, 0] == 0.0


def test_palette_with_transparency() -> None:
    image = Image.new("P", (60, 60), 0)
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    image.paste(1, (25, 10, 35, 50))
    out = decode_png(png_bytes(image, transparency=0), MAX_PIXELS)
    assert out.max() == pytest.approx(1.0)


@pytest.mark.parametrize("value", [0, 255, 128])
def test_blank_images_are_422(value: int) -> None:
    error = _err(decode_png, png_bytes(Image.new("L", (50, 50), value)), MAX_PIXELS)
    assert error.status_code == 422
    assert "blank" in error.detail


def test_faint_noise_is_blank() -> None:
    noise = np.random.default_rng(3).integers(0, 20, (64, 64)).astype(np.uint8)
    assert _err(decode_png, png_bytes(Image.fromarray(noise, "L")), MAX_PIXELS).status_code == 422


def test_not_a_png() -> None:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="JPEG")
    for body in (buffer.getvalue(), b"hello", b"GIF89a" + b"\0" * 50):
        error = _err(decode_png, body, MAX_PIXELS)
        assert error.status_code == 422
        assert "not a PNG" in error.detail
    assert _err(decode_png, b"", MAX_PIXELS).status_code == 400


def test_truncated_and_corrupt_pngs() -> None:
    data = png_bytes(Image.fromarray((np.random.default_rng(4).random((64, 64)) * 255).astype(np.uint8), "L"))
    for body in (data[: len(data) // 2], data[:40], data[:-40]):
        error = _err(decode_png, body, MAX_PIXELS)
        assert error.status_code == 422
        assert "corrupt or truncated PNG" in error.detail
    corrupt = bytearray(data)
    corrupt[60:80] = b"\0" * 20
    assert _err(decode_png, bytes(corrupt), MAX_PIXELS).status_code == 422


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    """A tiny file declaring 100000x100000 pixels (10 G) must be refused from its header."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(bomb) < 200
    error = _err(decode_png, bomb, MAX_PIXELS)
    assert error.status_code == 413
    assert "100000x100000" in error.detail


def test_pixel_limit_is_configurable() -> None:
    data = png_bytes(Image.fromarray(_digit(64).astype(np.uint8) * 255, "L"))
    assert _err(decode_png, data, 64 * 64 - 1).status_code == 413
    assert decode_png(data, 64 * 64).shape == (1, 784)


def test_error_messages_carry_no_object_reprs() -> None:
    ihdr = struct.pack(">IIBBBBB", 10, 10, 8, 7, 0, 0, 0)  # colour type 7 does not exist
    body = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    error = _err(decode_png, body, MAX_PIXELS)
    assert error.status_code == 422
    assert "0x" not in error.detail
    assert "corrupt or truncated PNG" in error.detail


def test_png_declared_pixels_reads_only_the_header() -> None:
    assert png_declared_pixels(png_bytes(Image.new("L", (300, 20)))) == 6000
    ihdr = struct.pack(">IIBBBBB", 16_000_000, 1, 8, 0, 0, 0, 0)
    assert png_declared_pixels(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)) == 16_000_000
    assert png_declared_pixels(b"GIF89a" + b"\0" * 40) == 0
    assert png_declared_pixels(b"\x89PNG\r\n\x1a\n") == 0
