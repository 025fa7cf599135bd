"""Unit tests for app.decode: every input form, limit and error message, without a server."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import orjson
import pytest
from PIL import Image

from app.decode import decode_json, decode_npy, decode_png, decode_uint8, mnistify, png_to_gray, unit_scale
from app.errors import InputError
from tests.helpers import png_bytes

MAX_BATCH = 16
MAX_PIXELS = 4096 * 4096


def _err(fn, *args) -> InputError:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        fn(*args)
    return info.value


def _json(doc: object) -> bytes:
    return orjson.dumps(doc)


# -- JSON --------------------------------------------------------------------------------------


def test_json_flat_and_square_pixels_agree() -> None:
    flat = np.linspace(0, 1, 784, dtype=np.float32)
    x1, batch1 = decode_json(_json({"pixels": flat.tolist()}), MAX_BATCH)
    x2, batch2 = decode_json(_json({"pixels": flat.reshape(28, 28).tolist()}), MAX_BATCH)
    assert x1.shape == (1, 784)
    assert x1.dtype == np.float32
    assert np.array_equal(x1, x2)
    assert not batch1
    assert not batch2


def test_json_instances() -> None:
    rows = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    x, batch = decode_json(_json({"instances": rows.tolist()}), MAX_BATCH)
    assert batch
    assert np.allclose(x, rows)
    x, _ = decode_json(_json({"instances": rows.reshape(3, 28, 28).tolist()}), MAX_BATCH)
    assert x.shape == (3, 784)
    # integers 0 and 1 are valid values too
    x, _ = decode_json(_json({"pixels": [0] * 783 + [1]}), MAX_BATCH)
    assert x[0, -1] == 1.0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty request body"),
        (b"   ", 400, "empty request body"),
        (b'{"pixels": [0.1, ', 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b'{"pixels": [NaN]}', 422, "NaN and Infinity"),
        (b'{"pixels": [Infinity, 0]}', 422, "NaN and Infinity"),
        (b'{"pixels": [-Infinity]}', 422, "NaN and Infinity"),
        (b"[0.1, 0.2]", 422, "expected a JSON object"),
        (b"{}", 422, "missing 'pixels' or 'instances'"),
        (b'{"pixel": []}', 422, "unknown field(s) 'pixel'"),
        (b'{"pixels": [], "extra": 1}', 422, "unknown field(s) 'extra'"),
        (b'{"pixels": [], "instances": []}', 422, "not both"),
        (b'{"instances": 5}', 422, "must be a list of images"),
        (b'{"instances": []}', 422, "must be a list of images"),
    ],
)
def test_json_errors(body: bytes, status: int, message: str) -> None:
    error = _err(decode_json, body, MAX_BATCH)
    assert error.status_code == status
    assert message in error.detail


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ([0.5] * 783, "got shape [783]"),
        ([0.5] * 785, "got shape [785]"),
        ([[0.5] * 28] * 27, "got shape [27, 28]"),
        ([[0.5] * 784], "got shape [1, 784]"),
        (0.5, "got shape []"),
        ([0.5] * 783 + ["0.5"], "only numbers (got strings)"),
        ([0.5] * 783 + [None], "rows differ in length or hold non-numbers"),
        ([True] * 784, "only numbers (got booleans)"),
        ([{"a": 1}] * 784, "non-numbers"),
        ([[0.5] * 28] * 27 + [[0.5] * 27], "rows"),
        ([0.5] * 783 + [1.5], "values must be in [0, 1]"),
        ([0.5] * 783 + [-0.1], "got values from -0.1 to 0.5"),
    ],
)
def test_json_pixel_errors(pixels: object, message: str) -> None:
    error = _err(decode_json, _json({"pixels": pixels}), MAX_BATCH)
    assert error.status_code == 422
    assert message in error.detail


def test_0_255_values_get_a_hint() -> None:
    error = _err(decode_json, _json({"pixels": [0] * 700 + [255] * 84}), MAX_BATCH)
    assert error.status_code == 422
    assert "divide them by 255" in error.detail


def test_huge_numbers_are_not_finite() -> None:
    body = b'{"pixels": [' + b"0," * 783 + b"1e999]}"
    error = _err(decode_json, body, MAX_BATCH)
    assert error.status_code == 422
    assert "NaN and Infinity are not valid pixel values" in error.detail


def test_batch_limit_is_413() -> None:
    error = _err(decode_json, _json({"instances": [[0.0] * 784] * (MAX_BATCH + 1)}), MAX_BATCH)
    assert error.status_code == 413
    assert f"over the maximum of {MAX_BATCH}" in error.detail


def test_wrong_instance_shape() -> None:
    error = _err(decode_json, _json({"instances": [0.5] * 784}), MAX_BATCH)
    assert error.status_code == 422
    assert "got shape [784]" in error.detail


# -- raw uint8 and .npy ------------------------------------------------------------------------


def test_uint8_batches() -> None:
    images = np.arange(3 * 784, dtype=np.uint32).astype(np.uint8).reshape(3, 784)
    x = decode_uint8(images.tobytes(), MAX_BATCH)
    assert x.shape == (3, 784)
    assert np.allclose(x, images / 255.0)
    assert _err(decode_uint8, b"", MAX_BATCH).status_code == 400
    error = _err(decode_uint8, b"\0" * 785, MAX_BATCH)
    assert error.status_code == 422
    assert "784-byte images" in error.detail
    assert _err(decode_uint8, b"\0" * 784 * (MAX_BATCH + 1), MAX_BATCH).status_code == 413


def _npy(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr)
    return buffer.getvalue()


def test_npy_forms() -> None:
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    assert np.allclose(decode_npy(_npy(u8), MAX_BATCH), u8.reshape(4, 784) / 255.0)
    f32 = rng.random((2, 784), dtype=np.float32)
    assert np.array_equal(decode_npy(_npy(f32), MAX_BATCH), f32)
    assert decode_npy(_npy(f32[0]), MAX_BATCH).shape == (1, 784)
    fortran = np.asfortranarray(rng.random((3, 784)))
    assert np.allclose(decode_npy(_npy(fortran), MAX_BATCH), fortran)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty request body"),
        (b"not numpy at all", 422, "not a valid .npy file"),
        (_npy(np.zeros((2, 783), np.uint8)), 422, "shaped (N, 784) or (N, 28, 28)"),
        (_npy(np.zeros((0, 784), np.uint8)), 422, "holds no images"),
        (_npy(np.zeros((MAX_BATCH + 1, 784), np.uint8)), 413, "over the maximum"),
        (_npy(np.zeros((1, 784), np.float32) + 2), 422, "divide them by 255"),
        (_npy(np.full((1, 784), np.nan, np.float32)), 422, "NaN or infinite"),
        (_npy(np.zeros((1, 784), np.bool_)), 422, "not supported"),
        (_npy(np.zeros((1, 784), np.complex64)), 422, "not supported"),
        (_npy(np.zeros((2, 784), np.uint8))[:-10], 422, "truncated"),
    ],
)
def test_npy_errors(body: bytes, status: int, message: str) -> None:
    error = _err(decode_npy, body, MAX_BATCH)
    assert error.status_code == status
    assert message in error.detail


def test_npy_object_arrays_are_refused_without_unpickling() -> None:
    body = _npy(np.array([object()] * 784, dtype=object).reshape(1, 784))
    error = _err(decode_npy, body, MAX_BATCH)
    assert error.status_code == 422
    assert "Python objects" in error.detail


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


def test_npy_negative_dimensions() -> None:
    body = _npy(np.zeros((1, 784), np.uint8)).replace(b"(1, 784)", b"(-4, 784)")
    error = _err(decode_npy, body, MAX_BATCH)
    assert error.status_code == 422
    assert "negative dimension" in error.detail


def test_png_declared_pixels_reads_only_the_header() -> None:
    from app.decode import png_declared_pixels

    assert png_declared_pixels(png_bytes(Image.new("L", (300, 20)))) == 6000
    ihdr = struct.pack(">IIBBBBB", 16_000_000, 1, 8, 0, 0, 0, 0)
    assert png_declared_pixels(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)) == 16_000_000
    assert png_declared_pixels(b"GIF89a" + b"\0" * 40) == 0
    assert png_declared_pixels(b"\x89PNG\r\n\x1a\n") == 0


def test_unit_scale_is_the_one_uint8_arithmetic() -> None:
    values = np.arange(256, dtype=np.uint8)
    reference = values.astype(np.float32) * np.float32(1 / 255)
    assert np.array_equal(unit_scale(values), reference)
    assert unit_scale(values).dtype == np.float32
    body = bytes(range(256)) * 49  # 16 images of 784 bytes
    raw = decode_uint8(body, 100, scale=False)
    assert raw.dtype == np.uint8
    assert raw.shape == (16, 784)
    assert np.array_equal(unit_scale(raw), decode_uint8(body, 100))
