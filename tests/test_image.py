"""Unit tests for app.image: decoding pictures and turning them into MNIST-style input."""

from __future__ import annotations

import base64
import io
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from app.errors import InputError
from app.image import (
    PNG_SIGNATURE,
    ImageInfo,
    decode_png,
    mnistify,
    png_declared_pixels,
    png_to_gray,
    probe,
    to_model_input,
    to_png_base64,
)
from bench.realworld import WAYS, samples
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
    assert abs(cy - 14) <= 0.5 + 1e-6
    assert abs(cx - 14) <= 0.5 + 1e-6


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


# -- The libspng decoder for plain PNGs, against Pillow -----------------------------------------

_ROOT = Path(__file__).resolve().parents[1]
# Adam7's passes: first row, first column, row step, column step.
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
_WITHOUT = """
import pickle, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # its import fails, as on a platform without a wheel
from app.errors import InputError
from app.image import png_to_gray
results = []
for body in pickle.load(sys.stdin.buffer):
    try:
        results.append(png_to_gray(body, 1 << 24))
    except InputError as exc:
        results.append((exc.status_code, exc.detail))
sys.stdout.buffer.write(pickle.dumps(results))
"""


def _decode_all(bodies: list[bytes]) -> list[np.ndarray | tuple[int, str]]:
    results: list[np.ndarray | tuple[int, str]] = []
    for body in bodies:
        try:
            results.append(png_to_gray(body, 1 << 24))
        except InputError as exc:
            results.append((exc.status_code, exc.detail))
    return results


def _decode_all_with_pillow(
    bodies: list[bytes], without: tuple[str, ...] = ("pyspng",)
) -> list[np.ndarray | tuple[int, str]]:
    """What app.image gives for each body where ``without`` cannot be imported (a fresh interpreter).

    Without pyspng, Pillow decodes every PNG; without deflate, libspng inflates with zlib.
    """
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT, *without],
        input=pickle.dumps(bodies),
        capture_output=True,
        env=env,
        check=True,
    )
    results: list[np.ndarray | tuple[int, str]] = pickle.loads(done.stdout)
    return results


def _chunks(body: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks, each as (type, the whole chunk with its length and CRC)."""
    out, pos = [], 8
    while pos < len(body):
        (length,) = struct.unpack_from(">I", body, pos)
        out.append((body[pos + 4 : pos + 8], body[pos : pos + 12 + length]))
        pos += 12 + length
    return out


def _rebuilt(body: bytes, *, idat_size: int = 0, after_image: bytes = b"") -> bytes:
    """``body`` with its image data re-cut into IDAT chunks of ``idat_size`` and chunks inserted before IEND."""
    chunks = _chunks(body)
    data = b"".join(chunk[8:-4] for kind, chunk in chunks if kind == b"IDAT")
    size = idat_size or len(data)
    idats = b"".join(_png_chunk(b"IDAT", data[i : i + size]) for i in range(0, len(data), size))
    head = b"".join(chunk for kind, chunk in chunks[:-1] if kind != b"IDAT")
    return PNG_SIGNATURE + head + idats + after_image + _png_chunk(b"IEND", b"")


def _interlaced_png(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit grey or RGB PNG (Pillow reads them but does not write them)."""
    height, width = pixels.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 1)
    passes = (pixels[y0::dy, x0::dx] for y0, x0, dy, dx in _ADAM7)
    raw = b"".join(b"\0" + row.tobytes() for sub in passes if sub.size for row in sub)
    return (
        PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    )


def _rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow reads it as 8-bit "RGB" but does not write it)."""
    height, width = pixels.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return (
        PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    )


def _plain_and_other_pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(17)
    rgb = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    rgb[8:30, 15:25] = 0  # a dark bar: something for the grey and the compositing to keep
    alpha = rng.integers(0, 256, (37, 45), dtype=np.uint8)
    alpha[:4] = 0
    alpha[-4:] = 255
    grey = Image.fromarray(rgb, "RGB").convert("L")
    orientation = Image.Exif()
    orientation[0x0112] = 6
    upright = png_bytes(Image.fromarray(rgb, "RGB"))
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "a test")
    return {
        "RGB": upright,
        "RGB, fastest compression": png_bytes(Image.fromarray(rgb, "RGB"), compress_level=1),
        # Over 4 MiB of rows: libspng inflates the file itself once libdeflate has checked it.
        "RGB, 1200x1200": png_bytes(Image.fromarray(np.tile(rgb, (33, 27, 1))[:1200, :1200], "RGB")),
        "RGBA, opaque": png_bytes(Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]), "RGBA")),
        "RGBA, with alpha": png_bytes(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")),
        "L": png_bytes(grey),
        "LA": png_bytes(Image.merge("LA", (grey, Image.fromarray(alpha, "L")))),
        "P": png_bytes(Image.fromarray(rgb, "RGB").quantize(64)),
        "P, transparent": png_bytes(Image.fromarray(rgb, "RGB").quantize(64), transparency=0),
        "1": png_bytes(grey.convert("1")),
        "L, transparent": png_bytes(grey, transparency=0),
        "RGB, transparent": png_bytes(Image.fromarray(rgb, "RGB"), transparency=(0, 0, 0)),
        "I;16": png_bytes(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257 + 3)),
        "RGB, 16-bit": _rgb16_png(rgb.astype(np.uint16) * 257 + 100),
        "RGB, interlaced": _interlaced_png(rgb),
        "L, interlaced": _interlaced_png(np.asarray(grey)),
        "RGB, EXIF orientation": png_bytes(Image.fromarray(rgb, "RGB"), exif=orientation),
        "RGB, EXIF orientation after the image data": _rebuilt(
            upright, after_image=_png_chunk(b"eXIf", orientation.tobytes())
        ),
        "RGB, text": png_bytes(Image.fromarray(rgb, "RGB"), pnginfo=text),
        "RGB, text after the image data": _rebuilt(upright, after_image=_png_chunk(b"tEXt", b"Software\0a test")),
        "RGB, image data in 300-byte chunks": _rebuilt(upright, idat_size=300),
        "RGB, image data in 1-byte chunks": _rebuilt(upright, idat_size=1),  # thousands: left to Pillow
        "RGB, bytes after IEND": upright + b"trailing bytes",
    }


def test_plain_pngs_decode_to_pillows_grey_levels() -> None:
    """libspng (RGB, RGBA, L) and Pillow (every other PNG) give exactly the grey levels of Pillow alone.

    So does libspng inflating with zlib where libdeflate is missing.
    """
    pytest.importorskip("pyspng")
    pytest.importorskip("deflate")
    cases = _plain_and_other_pngs()
    bodies = list(cases.values())
    here, zlib_only = _decode_all(bodies), _decode_all_with_pillow(bodies, without=("deflate",))
    pillow = _decode_all_with_pillow(bodies)
    for name, got, spng_zlib, expected in zip(cases, here, zlib_only, pillow, strict=True):
        assert isinstance(expected, np.ndarray), (name, expected)
        for decoded in (got, spng_zlib):
            assert isinstance(decoded, np.ndarray), (name, decoded)
            assert decoded.dtype == expected.dtype, name
            assert decoded.shape == expected.shape, name
            assert np.array_equal(decoded, expected), name
    decoded = dict(zip(cases, here, strict=True))
    # The hand-built files are what they claim: the same pixels as Pillow's own encoding.
    assert np.array_equal(decoded["RGB, interlaced"], decoded["RGB"])
    for name in ("RGB, EXIF orientation", "RGB, EXIF orientation after the image data"):
        assert np.array_equal(decoded[name], np.rot90(decoded["RGB"], -1)), name  # 6: turned right
    assert not np.array_equal(decoded["RGBA, with alpha"], decoded["RGBA, opaque"])


def test_png_end_to_end_with_libspng_matches_pillow() -> None:
    pytest.importorskip("pyspng")
    paper = np.full((280, 280, 3), 235, np.uint8)
    paper[40:240, 120:150] = (20, 30, 90)  # a blue ballpoint bar on white paper, as the bench's pictures
    body = png_bytes(Image.fromarray(paper, "RGB"))
    row = to_model_input(body, max_pixels=MAX_PIXELS)
    expected = _decode_all_with_pillow([body])[0]
    assert isinstance(expected, np.ndarray)
    assert np.array_equal(row, mnistify(expected).reshape(1, 784))


def test_broken_pngs_are_refused_as_pillow_refuses_them() -> None:
    """Truncated and corrupt PNGs: the same status and the same words as with Pillow alone."""
    rgb = png_bytes(Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB"))
    chunks = _chunks(rgb)
    idat = next(chunk for kind, chunk in chunks if kind == b"IDAT")
    start = rgb.index(idat)
    flipped = bytearray(rgb)
    flipped[start + 40] ^= 0x10  # inside the compressed data; the chunk's CRC now fails
    wrong_adler = bytearray(rgb)
    wrong_adler[start + len(idat) - 5] ^= 0xFF  # zlib's checksum, the IDAT's last byte before its CRC
    # A deflate stream that is broken (an invalid block type) in a chunk whose CRC is right.
    invalid_block = _rebuilt(rgb[:start] + _png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 20) + rgb[start + len(idat) :])
    # The encoder's own mistakes, under right CRCs: a wrong Adler-32, rows missing, rows to spare.
    rows = zlib.decompress(idat[8:-4])
    bad_adler = zlib.compress(rows)[:-4] + (zlib.adler32(rows) ^ 1).to_bytes(4, "big")
    encoder_adler = rgb[:start] + _png_chunk(b"IDAT", bad_adler) + rgb[start + len(idat) :]
    big = png_bytes(Image.new("RGB", (1200, 1200), (250, 250, 250)))  # over 4 MiB of rows
    big_idat = next(chunk for kind, chunk in _chunks(big) if kind == b"IDAT")
    big_rows = zlib.decompress(big_idat[8:-4])
    big_bad = zlib.compress(big_rows)[:-4] + (zlib.adler32(big_rows) ^ 1).to_bytes(4, "big")
    big_start = big.index(big_idat)
    big_adler = big[:big_start] + _png_chunk(b"IDAT", big_bad) + big[big_start + len(big_idat) :]
    short = rgb[:start] + _png_chunk(b"IDAT", zlib.compress(rows[:-121])) + rgb[start + len(idat) :]
    long = rgb[:start] + _png_chunk(b"IDAT", zlib.compress(rows + rows[-121:])) + rgb[start + len(idat) :]
    bodies = {
        "cut in the image data": rgb[: start + len(idat) // 2],
        "cut before the image data": rgb[:40],
        "cut in IEND": rgb[:-6],
        "no IEND": rgb[:-12],
        "a bit flipped in the image data": bytes(flipped),
        "wrong Adler-32": bytes(wrong_adler),
        "invalid deflate block, right CRC": invalid_block,
        "zeroed image data": rgb[:60] + b"\0" * 20 + rgb[80:],
        "wrong Adler-32, right CRC": encoder_adler,
        "wrong Adler-32, right CRC, 1200x1200": big_adler,
        "a row missing, right CRC": short,
        "a row to spare, right CRC": long,
    }
    here, pillow = _decode_all(list(bodies.values())), _decode_all_with_pillow(list(bodies.values()))
    refused = {name: got for name, got in zip(bodies, here, strict=True) if isinstance(got, tuple)}
    assert set(refused) >= {
        "cut in the image data",
        "cut before the image data",
        "a bit flipped in the image data",
        "wrong Adler-32",
        "invalid deflate block, right CRC",
        "zeroed image data",
        "wrong Adler-32, right CRC",
        "wrong Adler-32, right CRC, 1200x1200",
    }
    for name, (status, detail) in refused.items():
        assert status == 422, name
        assert detail.startswith("corrupt or truncated PNG ("), (name, detail)
    try:
        import deflate  # noqa: F401
        import pyspng  # noqa: F401
    except ImportError:
        pass
    else:  # libdeflate's check refuses it: libspng inflating with zlib checks no Adler-32 and decodes it
        assert isinstance(_decode_all_with_pillow([encoder_adler], without=("deflate",))[0], np.ndarray)
    for name, got, expected in zip(bodies, here, pillow, strict=True):
        if isinstance(expected, tuple):
            assert got == expected, name
        else:
            assert isinstance(got, np.ndarray), (name, got)
            assert np.array_equal(got, expected), name


# -- JPEG, WebP, EXIF and the header probe -------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _bar_on_paper(width: int = 120, height: int = 160) -> Image.Image:
    """Dark ink on white paper: a tall bar (a '1') with a foot to the right, so rotations show."""
    paper = np.full((height, width), 245, np.uint8)
    paper[30:130, 55:65] = 20
    paper[120:130, 55:90] = 20
    return Image.fromarray(paper, "L").convert("RGB")


def test_probe_reads_format_size_and_decoded_pixels_from_the_header() -> None:
    png = png_bytes(Image.new("L", (300, 200), 255))
    assert probe(png) == ImageInfo("png", 300, 200, 60_000)
    webp = _encoded(Image.new("RGB", (64, 48), "white"), "WEBP")
    assert probe(webp) == ImageInfo("webp", 64, 48, 64 * 48)
    # A 12-megapixel JPEG decodes at 1/8 scale (DCT scaling) to 504x378: that is its cost.
    phone = _encoded(Image.new("RGB", (4032, 3024), "white"), "JPEG", quality=50)
    assert probe(phone) == ImageInfo("jpeg", 4032, 3024, 504 * 378)
    assert probe(phone, target=1024).decoded_pixels == 2016 * 1512  # both sides >= 1024: 1/2
    small = _encoded(Image.new("RGB", (280, 280), "white"), "JPEG")
    assert probe(small).decoded_pixels == 280 * 280  # never scaled below what preprocessing needs


def test_probe_refuses_other_formats_with_415_and_corrupt_headers_with_422() -> None:
    gif = _encoded(Image.new("L", (10, 10)), "GIF")
    for body in (gif, b"hello world", b"BM" + b"\0" * 60):
        error = _err(probe, body)
        assert error.status_code == 415
        assert "PNG, JPEG or WebP" in error.detail
    assert _err(probe, b"").status_code == 400
    for body in (b"\xff\xd8\xff\xe0" + b"\0" * 20, b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 8):
        error = _err(probe, body)
        assert error.status_code == 422
        assert "corrupt or truncated" in error.detail
        assert "0x" not in error.detail


def test_decoded_pixels_over_the_limit_are_413_before_decoding() -> None:
    phone = _encoded(Image.new("RGB", (4032, 3024), "white"), "JPEG", quality=50)
    error = _err(lambda: to_model_input(phone, max_pixels=504 * 378 - 1))
    assert error.status_code == 413
    assert "4032x3024" in error.detail
    # At 504 * 378 it is decoded (a blank page: refused as blank, not as too big).
    assert _err(lambda: to_model_input(phone, max_pixels=504 * 378)).status_code == 422


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_exif_orientation_is_applied(orientation: int) -> None:
    upright = _bar_on_paper()
    stored = upright.transpose(
        {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = to_model_input(_encoded(stored, "JPEG", quality=95, exif=exif.tobytes()), max_pixels=MAX_PIXELS)
    reference = to_model_input(_encoded(upright, "JPEG", quality=95), max_pixels=MAX_PIXELS)
    assert np.abs(rotated - reference).max() < 0.1
    digit = rotated.reshape(28, 28)
    rows = np.flatnonzero(digit.max(axis=1) > 0.5)
    cols = np.flatnonzero(digit.max(axis=0) > 0.5)
    assert rows[-1] - rows[0] > 2 * (cols[-1] - cols[0])  # still a tall bar, not a lying one
    assert digit[rows[-1] - 1, cols[-1]] > 0.5  # and its foot is bottom right


def test_webp_and_jpeg_give_the_same_digit_as_png() -> None:
    upright = _bar_on_paper()
    reference = to_model_input(png_bytes(upright), max_pixels=MAX_PIXELS)
    for body in (_encoded(upright, "WEBP", lossless=True), _encoded(upright, "JPEG", quality=95)):
        assert np.abs(to_model_input(body, max_pixels=MAX_PIXELS) - reference).max() < 0.1
    rgba = np.zeros((160, 120, 4), np.uint8)  # black ink on a transparent canvas, as WebP
    rgba[30:130, 55:65, 3] = 255
    rgba[120:130, 55:90, 3] = 255
    webp = _encoded(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True)
    assert np.abs(to_model_input(webp, max_pixels=MAX_PIXELS) - reference).max() < 0.1


def test_to_model_input_shape_range_and_mnist_placement() -> None:
    out = to_model_input(png_bytes(_bar_on_paper()), max_pixels=MAX_PIXELS)
    assert out.shape == (1, 784)
    assert out.dtype == np.float32
    assert out.min() == 0.0
    assert out.max() == pytest.approx(1.0)
    digit = out.reshape(28, 28)
    rows = np.flatnonzero(digit.max(axis=1) > 0.1)
    assert 19 <= rows[-1] - rows[0] + 1 <= 21  # the 20x20 box
    cy, cx = _center_of_mass(digit)
    assert abs(cy - 14) <= 0.5 + 1e-6
    assert abs(cx - 14) <= 0.5 + 1e-6


def test_to_png_base64_is_the_row_as_a_28x28_png() -> None:
    row = np.random.default_rng(5).random(784).astype(np.float32)
    encoded = to_png_base64(row)
    assert not encoded.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG"
    assert image.mode == "L"
    assert image.size == (28, 28)
    assert np.array_equal(np.asarray(image).reshape(784), (row * 255).round().astype(np.uint8))


# -- What is not a digit ---------------------------------------------------------------------------


def _noise_png(rng: np.random.Generator, kind: str) -> bytes:
    pixels: np.ndarray
    if kind == "uniform":
        pixels = rng.integers(0, 256, (200, 300, 3))
    else:  # camera noise on light-grey paper, nothing written
        pixels = rng.normal(200, 20, (200, 300, 3))
    return png_bytes(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))


@pytest.mark.parametrize("kind", ["uniform", "camera"])
def test_pure_noise_is_refused(kind: str) -> None:
    for seed in range(3):
        body = _noise_png(np.random.default_rng(seed), kind)
        error = _err(lambda body=body: to_model_input(body, max_pixels=MAX_PIXELS))
        assert error.status_code == 422
        assert "blank" in error.detail


def test_near_blank_pictures_are_refused() -> None:
    paper = np.full((200, 300), 235, np.uint8)
    one_pixel = paper.copy()
    one_pixel[100, 150] = 0
    dot = paper.copy()
    dot[98:101, 148:151] = 10
    faint = paper.copy()
    faint[40:160, 140:150] = 225  # a mark 4 % darker than the paper
    gradient = np.tile(np.linspace(120, 250, 300), (200, 1)).astype(np.uint8)  # a shadow, no ink
    for pixels in (paper, one_pixel, dot, faint, gradient):
        body = png_bytes(Image.fromarray(pixels, "L"))
        error = _err(lambda body=body: to_model_input(body, max_pixels=MAX_PIXELS))
        assert error.status_code == 422
        assert "blank" in error.detail


# -- Real pictures: the cases the preprocessing is built for -----------------------------------------


def _row_extent(digit: np.ndarray) -> int:
    rows = np.flatnonzero(digit.reshape(28, 28).max(axis=1) > 0.3)
    return int(rows[-1] - rows[0] + 1)


def test_noise_shadow_lines_and_specks_do_not_move_the_box() -> None:
    """The bar on grey, noisy, shadowed, ruled paper with specks gives the bar, as on clean paper."""
    rng = np.random.default_rng(7)
    reference = to_model_input(png_bytes(_bar_on_paper(300, 200)), max_pixels=MAX_PIXELS)
    clean = np.asarray(_bar_on_paper(300, 200).convert("L"), np.float32) / 245
    light = np.tile(np.linspace(1.0, 0.45, 300), (200, 1))  # the right side in shadow
    paper = np.full((200, 300), 200.0)
    paper[::25] = 150  # ruled lines every 25 px
    paper[5:8, 5:8] = 40  # specks in the corners
    paper[190:192, 290:293] = 40
    photo = np.minimum(paper, clean * 200) * light + rng.normal(0, 15, (200, 300))
    body = png_bytes(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8), "L"))
    out = to_model_input(body, max_pixels=MAX_PIXELS)
    assert 19 <= _row_extent(out) <= 21
    assert np.abs(out - reference).mean() < 0.05


def test_a_small_digit_in_the_corner_of_a_big_canvas() -> None:
    canvas = Image.new("RGB", (1200, 900), "white")
    canvas.paste(_bar_on_paper().resize((30, 40)), (1150, 840))
    out = to_model_input(png_bytes(canvas), max_pixels=MAX_PIXELS)
    assert 19 <= _row_extent(out) <= 21
    cy, cx = _center_of_mass(out.reshape(28, 28))
    assert abs(cy - 14) <= 0.5 + 1e-6
    assert abs(cx - 14) <= 0.5 + 1e-6


def _canvas(paper: int, ink: int, size: int = 280) -> np.ndarray:
    """A canvas export: an MNIST-like '7' (a bar and a slanted stroke) in ``ink`` on flat ``paper``."""
    canvas = np.full((size, size), paper, np.uint8)
    canvas[60:80, 70:210] = ink
    for row in range(80, 230):
        column = 200 - (row - 80) * 100 // 150
        canvas[row, column - 10 : column + 10] = ink
    return canvas


@pytest.mark.parametrize(("paper", "ink"), [(255, 0), (252, 30), (3, 225), (0, 255), (200, 40)])
def test_a_canvas_export_and_its_negative_give_the_same_digit(paper: int, ink: int) -> None:
    """Either polarity, any paper level (the ends of the grey scale too): the same model input."""
    reference = to_model_input(png_bytes(Image.fromarray(_canvas(255, 0)).convert("RGB")), max_pixels=MAX_PIXELS)
    for pixels in (_canvas(paper, ink), 255 - _canvas(paper, ink)):
        out = to_model_input(png_bytes(Image.fromarray(pixels).convert("RGB")), max_pixels=MAX_PIXELS)
        assert np.allclose(out, reference, atol=1e-6), (paper, ink)
    assert _row_extent(reference) == 20


@pytest.mark.parametrize(("tail", "marked"), [(224, True), (235, False)])
def test_a_canvas_digit_box_takes_in_ink_just_over_the_contrast_floor(tail: int, marked: bool) -> None:
    """A faint tail 12 % of the ink's strength is part of the digit (it stretches the box); 8 % is not."""
    canvas = np.full((280, 280), 255, np.uint8)
    canvas[40:140, 130:150] = 0  # a bar 100 px tall, in full-strength ink
    canvas[140:200, 130:150] = tail  # and a faint tail 60 px below it
    out = to_model_input(png_bytes(Image.fromarray(canvas).convert("RGB")), max_pixels=MAX_PIXELS)
    strong = np.flatnonzero(out.reshape(28, 28).max(axis=1) > 0.5)
    assert strong.size == (13 if marked else 20)  # the bar: 100 of 160 rows of the box, or the whole box
    faint = np.flatnonzero((out.reshape(28, 28).max(axis=1) > 0.05) & (out.reshape(28, 28).max(axis=1) < 0.3))
    assert (faint.size >= 6) == marked  # the tail's own rows, in the picture or cut off


@pytest.fixture(scope="module")
def model_and_digits():  # noqa: ANN201
    from app.registry import load_model, read_pointer, version_path
    from bench.realworld import DEFAULT_DATA, load_mnist_test

    raw = DEFAULT_DATA / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"real MNIST not found at {raw}; these tests need the real digits")
    models = Path(__file__).resolve().parent.parent / "models"
    model, _ = load_model(version_path(models, str(read_pointer(models))))
    images, labels = load_mnist_test(DEFAULT_DATA)
    return model, images, labels


@pytest.mark.parametrize("way", list(WAYS))
def test_each_realworld_way_on_a_handful_of_digits(way: str, model_and_digits) -> None:  # noqa: ANN001
    """Five test digits drawn this way (two for the 12-megapixel photo): at least four read right."""
    from app.inference import predict_proba

    model, images, labels = model_and_digits
    digits = 2 if way == "phone_12mp" else 5
    correct = 0
    for sample in samples(images, labels, [way], digits, seed=3):
        x = to_model_input(sample.body, max_pixels=MAX_PIXELS)
        correct += int(predict_proba(model, x).argmax()) == sample.label
    assert correct >= digits - 1, f"{way}: {correct} of {digits}"
