"""Images to model input: any picture of a digit to one MNIST-like float32 ``[1, 784]`` row.

The only code that turns a picture into what the model expects; ``/predict``'s image bodies, the
digit pad and the Open Inference Protocol's ``BYTES`` inputs all come through here.

Decoding (:func:`probe`, :func:`to_model_input`) accepts PNG, JPEG and WebP, applies the EXIF
orientation, and learns what decoding will cost from the header alone: a JPEG is decoded with
its DCT scaling (``draft``) straight to grey at roughly the resolution preprocessing needs, so a
12-megapixel phone photo costs a 504x378 decode, and anything over ``max_pixels`` of *decoded*
pixels is refused (413) before a byte of it is decompressed. A plain PNG (8-bit grey, RGB or RGBA,
not interlaced, no transparency chunk or EXIF, its image data intact and followed by nothing but
IEND) is inflated by libdeflate (``deflate``) and unfiltered by libspng (``pyspng``) in about a
third of Pillow's time, to the very same grey levels; every other PNG, and every PNG where
``pyspng`` is not installed, is Pillow's.

Preprocessing keeps MNIST's own procedure (white digit on black, cropped, scaled to fit a 20x20
box, centre of mass at the centre of 28x28) and makes the crop survive real pictures:

1. The picture is analysed at ~160 px (``Image.reduce``: box averaging, which also averages
   camera noise away). Polarity comes from the skew of the grey levels: ink is the minority, so
   the longer tail of the histogram is the ink.
2. The paper is estimated *locally*: a low percentile per block of a 12x12 grid, then the
   minimum over neighbouring blocks (wider than any stroke), interpolated back. Ink is the
   contrast over that background relative to its headroom, so a shadow or a gradient across the
   page changes nothing.
3. Ruled and squared lines are taken out as rows and columns whose lower quartile is raised
   (a line crosses the whole page; a digit's stroke never fills three quarters of a row).
4. The noise level is measured (median absolute difference of neighbouring pixels); pure noise
   and blank pictures are refused (422), and ink must stand a margin above that noise.
5. The digit is the heaviest connected group of ink on a coarse grid; isolated specks, paper
   edges along the border and stray marks far from it do not stretch the box. A digit small in
   a big picture is cropped from the full-resolution picture and analysed again.
6. The strokes are brought to MNIST's thickness (a thin ballpoint line is widened, a marker
   thinned) before the 20x20 scaling and the centre-of-mass placement.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from app.errors import InputError

try:
    from pyspng import load as _spng_load
except ImportError:  # no wheel for this platform: Pillow decodes every PNG
    _spng_load = None
try:
    from deflate import DeflateError as _DeflateError
    from deflate import adler32 as _adler32
    from deflate import crc32 as _crc32
    from deflate import zlib_decompress as _inflate
except ImportError:  # libspng inflates with zlib instead
    _inflate = None  # type: ignore[assignment]
    _crc32 = zlib.crc32  # type: ignore[assignment]

__all__ = [
    "IMAGE_TYPES",
    "PNG_SIGNATURE",
    "ImageInfo",
    "decode_png",
    "mnistify",
    "png_declared_pixels",
    "png_to_gray",
    "probe",
    "to_model_input",
    "to_png_base64",
]

PIXELS = 784
SIDE = 28
BOX = 20  # MNIST digits were scaled to fit a 20x20 box, then centred in 28x28
# Where MNIST's own digits have their centre of mass, in pixel indices (measured: 13.99, 14.01).
CENTER = 14.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pictures up to this size whose border is even to within CLEAN_BORDER grey levels (MNIST's own
# digits, thumbnails, small canvas exports) take MNIST's own procedure (_mnist_like).
SMALL_CLEAN = 56
CLEAN_BORDER = 4
# Bigger ones, up to CLEAN_MAX_SIDE, too when at least CLEAN_PAPER_SHARE of them is paper of that
# one level: drawings exported from a canvas, like the digit pad's.
CLEAN_MAX_SIDE = 512
CLEAN_PAPER_SHARE = 0.6
# Below this contrast (in [0, 1] units) an image is treated as blank rather than guessed at.
MIN_CONTRAST = 0.1
# Ink must stand this many noise standard deviations above the background, or the picture is noise.
MIN_SNR = 6.0
IMAGE_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")
# JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= this.
DRAFT_TARGET = 256
# The side, in pixels, at which a picture is analysed (background, noise, the digit's box).
ANALYSIS = 160
# A digit box smaller than this at the analysis size is cropped from the full picture and redone.
MIN_BOX = 32
# The background grid's blocks are at least this many pixels: at MNIST's own size one block
# (and the 3x3 opening over them) is already wider than a stroke.
MIN_BLOCK = 8
# The digit is looked for on a grid of about this many cells a side.
CELLS = 24
# A mark smaller than this (in the picture's own pixels, both ways) is a dot, not a digit.
MIN_DIGIT = 6
# Below this noise level (in [0, 1] units: under one grey level) a picture is clean.
CLEAN_NOISE = 1 / 255
# The ink's strength is read at the pixel of this rank, counted from the brightest.
PEAK_RANK = 8
# MNIST's stroke width in 28x28 pixels: median, and the 5th and 95th percentiles of the test set.
MNIST_STROKE, THIN_STROKE, THICK_STROKE = 2.2, 1.3, 4.5
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_HINT = "send a PNG, JPEG or WebP image"
# EXIF orientation tag values to the transposition that undoes them (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError, TypeError)
# What pyspng raises (pybind11 turns libspng's errors into RuntimeError).
_SPNG_ERRORS = (RuntimeError, ValueError, TypeError)
# The PNG colour types libspng decodes here: grey, RGB and RGBA (IHDR's 10th byte), all at 8 bits.
_SPNG_COLOUR_TYPES = (0, 2, 6)
_SPNG_MODES = ("L", "RGB", "RGBA")
_IHDR_HEAD = b"\x00\x00\x00\x0dIHDR"  # the first chunk's length (13) and type
_IHDR_END = 8 + 8 + 13 + 4  # signature, IHDR's length and type, its data, its CRC
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_STORED_BLOCK = 65535  # the most one stored deflate block holds
_STORED_MAX = 4 * 1024 * 1024  # most rows handed to libspng as a stored copy (a 1000x1000 RGBA picture)
_UNIT_LEVELS = np.arange(256, dtype=np.float32) * np.float32(1 / 255)  # grey level -> [0, 1]
_UNIT_LEVELS.flags.writeable = False
_MAX_IDATS = 4096  # more image data chunks than this (a 64 MB picture in libpng's 8 KB chunks): Pillow's

Image.MAX_IMAGE_PIXELS = None  # our own, lower limit is checked before decoding (see _decoded_size)


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: its format, declared size, and the pixels decoding will produce."""

    format: str  # "png", "jpeg" or "webp"
    width: int
    height: int
    decoded_pixels: int  # after JPEG's DCT scaling, which is what decoding costs


def sniff(data: bytes) -> str | None:
    """The image format its first bytes announce ("png", "jpeg", "webp"), or None."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return None


def _reason(exc: BaseException) -> str:
    # Pillow's messages can embed object reprs ("<_io.BytesIO object at 0x7f...>"): keep them out.
    return _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__


def _open(data: bytes) -> Image.Image:
    """Open (header only) a PNG, JPEG or WebP: 400 empty, 415 another format, 422 a corrupt header."""
    if not data:
        raise InputError(400, f"empty request body: {_HINT}")
    kind = sniff(data)
    if kind is None:
        raise InputError(415, f"the body is not a PNG, JPEG or WebP image (unrecognised signature): {_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except UnidentifiedImageError:
        raise InputError(422, f"corrupt or truncated {_NAMES[kind]} (its header cannot be read)") from None
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(422, f"corrupt or truncated {_NAMES[kind]} ({_reason(exc)})") from None
    return image


def _draft(image: Image.Image, target: int) -> tuple[int, int]:
    """Ask a JPEG decoder for grey at the smallest DCT scale >= ``target``; the size decoding gives."""
    if image.format == "JPEG" and image.mode in ("RGB", "L", "YCbCr", "CMYK"):
        image.draft("L", (target, target))
    return image.size


def probe(data: bytes, *, target: int = DRAFT_TARGET) -> ImageInfo:
    """Format, declared size and decoded pixel count of an image, from its header (nothing decoded)."""
    image = _open(data)
    width, height = image.size
    fmt = _FORMATS[str(image.format)]
    decoded_w, decoded_h = _draft(image, target)
    return ImageInfo(fmt, width, height, decoded_w * decoded_h)


def _load_gray(data: bytes, max_pixels: int, target: int = DRAFT_TARGET) -> np.ndarray:
    """Decode to uint8 grey (EXIF orientation applied, transparency flattened), within ``max_pixels``."""
    image = _open(data)
    name = _NAMES[_FORMATS[str(image.format)]]
    width, height = image.size
    decoded_w, decoded_h = _draft(image, target)
    if decoded_w * decoded_h > max_pixels:
        decoded = "" if (decoded_w, decoded_h) == (width, height) else f" ({decoded_w}x{decoded_h} once decoded)"
        raise InputError(
            413,
            f"image declares {width}x{height} pixels{decoded}, over the limit of {max_pixels}: send a smaller image",
        )
    if _spng_load is not None:
        image_data = _plain_png(data, image)
        if image_data is not None:
            fast = _spng_gray(data, image, image_data)
            if fast is not None:
                return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            orientation = image.getexif().get(0x0112, 1) if image.format != "PNG" or "exif" in image.info else 1
            gray = _to_gray(image)
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(422, f"corrupt or truncated {name} ({_reason(exc)})") from None
    transpose = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if transpose is not None:
        gray = gray.transpose(transpose)
    return np.asarray(gray)


def _plain_png(data: bytes, image: Image.Image) -> list[memoryview] | None:
    """A PNG (already opened by Pillow) that libspng decodes to exactly what Pillow would: its image data.

    That is 8-bit grey, RGB or RGBA, not interlaced, with no transparency chunk and no EXIF
    before the image data (Pillow's header read found those), and image data that ends the file's
    content: IDAT chunks in one run, each with a correct CRC, then IEND. Pillow reads any chunk
    after the image data (text, EXIF, a late tRNS) once the pixels are decoded, and may refuse
    the file there; such files stay Pillow's. The CRCs matter because this pyspng build checks no
    checksum at all (neither the chunks' CRC nor zlib's Adler-32), while Pillow refuses a stream
    whose Adler-32 is wrong: corruption in transit fails a CRC and is left to Pillow, and the
    Adler-32 is checked by libdeflate (:func:`_spng_gray`). The bit depth and interlace are what
    was checked bit for bit against Pillow; a 16-bit RGB PNG, which Pillow reads as 8-bit "RGB",
    would otherwise be decoded twice. None when the file is not such a PNG.
    """
    if image.format != "PNG" or image.mode not in _SPNG_MODES or "transparency" in image.info or "exif" in image.info:
        return None
    # IHDR (its first chunk, as Pillow checked; 13 bytes): bit depth at byte 24, colour type 25, interlace 28.
    if data[8:16] != _IHDR_HEAD or data[24] != 8 or data[25] not in _SPNG_COLOUR_TYPES or data[28] != 0:
        return None
    view = memoryview(data)
    end = len(data)
    pos = len(PNG_SIGNATURE)
    chunks: list[memoryview] = []
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if kind == b"IDAT":
            if stop > end or _crc32(view[pos + 4 : stop - 4]) != int.from_bytes(view[stop - 4 : stop], "big"):
                return None
            if len(chunks) == _MAX_IDATS:  # millions of empty chunks would cost ~200 bytes of memory each here
                return None
            chunks.append(view[pos + 8 : stop - 4])
        elif chunks:
            return chunks if kind == b"IEND" and length == 0 else None
        pos = stop
    return None  # truncated: Pillow says where


def _spng_gray(data: bytes, image: Image.Image, image_data: list[memoryview]) -> np.ndarray | None:
    """A plain PNG (see :func:`_plain_png`) decoded by libspng to Pillow's grey; None to leave it to Pillow.

    With libdeflate installed, it inflates the image data (SIMD copies and checksums: a tenth of
    zlib's time for a mostly blank drawing) and checks the Adler-32 and the exact size, and
    libspng only undoes the row filters of that data, handed over as stored (uncompressed)
    deflate blocks; a picture of over ``_STORED_MAX`` bytes of rows is inflated again by libspng
    instead, which costs less than a second copy of it. Pillow decodes whatever either refuses:
    a file it takes is taken as before, and one it refuses is refused with its own words. (One
    difference: libdeflate is laxer than zlib about two code-table details no encoder writes,
    length symbols 286/287 and over-long code tables; such a stream with the right size and
    Adler-32 decodes to exactly what its encoder meant, where Pillow's zlib refuses it.)
    """
    width, height = image.size
    channels = len(image.mode)
    if _inflate is not None:
        size = height * (1 + width * channels)  # each row: its filter byte, then the samples
        try:
            rows = _inflate(image_data[0] if len(image_data) == 1 else b"".join(image_data), size)
        except _DeflateError:
            return None
        if len(rows) != size:
            return None
        if size <= _STORED_MAX:
            data = _stored_png(data[:_IHDR_END], rows)
        # else libspng inflates the file again: a stored copy of a big picture would double the
        # peak memory (the size and Adler-32 are checked all the same)
        del rows
    try:
        pixels = _spng_load(data)
    except _SPNG_ERRORS:
        return None
    if pixels.dtype != np.uint8 or pixels.shape != ((height, width) if channels == 1 else (height, width, channels)):
        return None
    if channels == 1:
        return pixels
    return np.asarray(_to_gray(Image.frombuffer(image.mode, (width, height), pixels, "raw", image.mode, 0, 1)))


def _stored_png(head: bytes, rows: bytes | bytearray) -> bytes:
    """A PNG of ``head`` (signature and IHDR) and ``rows`` (filtered scanlines) in stored deflate blocks.

    One copy of the rows: the chunk's CRC is chained over the parts, which are joined once.
    """
    stream: list[bytes | memoryview] = [b"\x78\x01"]  # zlib header: deflate, 32 KB window, no preset dictionary
    view = memoryview(rows)
    for start in range(0, len(rows), _STORED_BLOCK):
        block = view[start : start + _STORED_BLOCK]
        final = start + _STORED_BLOCK >= len(rows)
        stream += (struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF), block)
    stream.append(_adler32(rows).to_bytes(4, "big"))
    crc = _crc32(b"IDAT")
    for part in stream:
        crc = _crc32(part, crc)
    length = sum(len(part) for part in stream)
    return b"".join((head, length.to_bytes(4, "big"), b"IDAT", *stream, crc.to_bytes(4, "big"), _IEND))


def _to_gray(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit grey ("L"), transparency composited onto a contrasting background."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA" if mode == "RGB" else "LA")
    mode = image.mode
    if mode == "L":
        return image
    if mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B") or 32-bit integer
        gray = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(gray, 0, 255).round().astype(np.uint8), mode="L")
    if mode == "F":
        return Image.fromarray((np.clip(np.asarray(image), 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")
    if mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"))
        opaque = image.convert("RGB" if mode.startswith(("RGB", "PA")) else "L").convert("L")
        if int(alpha.min()) == 255:
            return opaque
        return Image.fromarray(_composite(np.asarray(opaque), alpha), mode="L")
    return image.convert("L")


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency onto a background that contrasts with the visible strokes.

    A digit drawn in black on a transparent canvas and one drawn in white both survive: the
    background becomes the opposite of the (alpha-weighted) colour of what is drawn.
    """
    a = alpha.astype(np.float32) * np.float32(1 / 255)
    g = gray.astype(np.float32)
    weight = float(a.sum())
    ink = float((g * a).sum() / weight) if weight > 0 else 0.0
    background = 255.0 if ink < 127.5 else 0.0
    return np.clip(g * a + background * (1.0 - a), 0, 255).round().astype(np.uint8)


def to_model_input(data: bytes, *, max_pixels: int) -> np.ndarray:
    """A PNG, JPEG or WebP picture of a digit to one MNIST-like float32 ``[1, 784]`` row in [0, 1].

    400 for an empty body, 415 for another format, 413 over ``max_pixels`` decoded pixels
    (checked from the header), 422 for a corrupt file or one with no digit in it (blank, nearly
    blank, or noise).
    """
    return _mnistify_u8(_load_gray(data, max_pixels)).reshape(1, PIXELS)


# --------------------------------------------------------------------------------------------
# The PNG-only entry points (the v2 protocol's BYTES elements are PNGs)


def png_declared_pixels(body: bytes) -> int:
    """Width x height from a PNG's IHDR without decoding anything (0 when it is not a PNG).

    Decoding cost follows the declared size, not the compressed size: a 40 KB file can declare
    16 million pixels. Callers use this to keep such work off the event loop.
    """
    if len(body) < 24 or not body.startswith(PNG_SIGNATURE) or body[12:16] != b"IHDR":
        return 0
    return int.from_bytes(body[16:20], "big") * int.from_bytes(body[20:24], "big")


def _require_png(body: bytes) -> None:
    if not body:
        raise InputError(400, "empty request body: send a PNG image")
    if not body.startswith(PNG_SIGNATURE):
        raise InputError(422, "the body is not a PNG image (it does not start with the PNG signature)")


def decode_png(body: bytes, max_pixels: int) -> np.ndarray:
    """A PNG of any size and mode to one MNIST-like float32 ``[1, 784]`` row."""
    _require_png(body)
    return to_model_input(body, max_pixels=max_pixels)


def png_to_gray(body: bytes, max_pixels: int) -> np.ndarray:
    """Decode a PNG into float32 grey levels in [0, 1], transparency composited away."""
    _require_png(body)
    return _load_gray(body, max_pixels).astype(np.float32) * np.float32(1 / 255)


def to_png_base64(row: np.ndarray) -> str:
    """A ``(784,)`` (or 28x28) row in [0, 1] as a 28x28 8-bit greyscale PNG, base64 (no ``data:`` prefix)."""
    pixels = np.asarray(row, dtype=np.float32).reshape(SIDE, SIDE)
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Preprocessing


def mnistify(gray: np.ndarray) -> np.ndarray:
    """Any grey image (float in [0, 1], or uint8) to a 28x28 MNIST-style float32 array (white digit on black)."""
    gray = np.asarray(gray)
    if gray.dtype != np.uint8:
        gray = (np.clip(gray.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return _mnistify_u8(gray)


def _mnistify_u8(full: np.ndarray) -> np.ndarray:
    """uint8 grey (any polarity) to the 28x28 float32 model input; 422 when no digit is found.

    A big picture is analysed small, which averages a thin line in it nearly away: when nothing
    is found that way, it is looked at again three times finer before being called blank.
    """
    if max(full.shape) <= CLEAN_MAX_SIDE:
        digit = _mnist_like(full)
        if digit is not None:
            return digit
    try:
        return _prepare(full)
    except InputError as exc:
        if exc.status_code != 422 or max(full.shape) <= 2 * ANALYSIS:
            raise
    return _prepare(full, analysis=3 * ANALYSIS)


def _mnist_like(full: np.ndarray) -> np.ndarray | None:
    """A small picture on perfectly even paper (an MNIST digit, a thumbnail) the way MNIST was made.

    Such a picture has no noise, lighting or lines to undo, so MNIST's own procedure is all it
    needs: background from the border, crop, 20x20, centre of mass. It costs a fraction of the
    full analysis. None when the border is not even: the full analysis decides.

    The ink is a function of the grey level alone, so it is worked out once per level (a
    256-entry table) and the whole picture is only read as uint8: the share of paper, the
    strongest ink and the digit's box. Only the box becomes float ink.
    """
    border = np.concatenate([full[0], full[-1], full[:, 0], full[:, -1]])
    if int(border.max()) - int(border.min()) > CLEAN_BORDER:
        return None
    paper = _median_level(border)
    if max(full.shape) > SMALL_CLEAN:
        # A bigger picture must be a drawing on plain paper throughout (a canvas export): most
        # of it exactly the paper's level. A photo or scan never is; its noise needs the full analysis.
        low, high = max(0, paper - CLEAN_BORDER), min(255, paper + CLEAN_BORDER)
        # Levels within CLEAN_BORDER of the paper: in uint8, those below ``low`` wrap round past 255 - 8.
        near = np.count_nonzero(full - np.uint8(low) <= high - low)
        if near / full.size < CLEAN_PAPER_SHARE:
            return None
    background = paper / 255
    dark_ink = background > 0.5  # dark digit on light paper: inverted to MNIST's polarity
    table = _UNIT_LEVELS
    if dark_ink:
        table, background = 1.0 - table, 1.0 - background
    table = np.maximum(table - background, 0.0)
    # The ink grows with the distance from the paper's level: its strongest is at the extreme grey.
    peak = float(table[int(full.min()) if dark_ink else int(full.max())])
    if peak < MIN_CONTRAST:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    table /= peak
    marked = np.flatnonzero(table > MIN_CONTRAST)  # never empty: the peak's own level is 1.0
    if dark_ink:  # the levels marked are those as far from the paper as the faintest, or further
        rows = np.flatnonzero(full.min(axis=1) <= int(marked[-1]))
        cols = np.flatnonzero(full.min(axis=0) <= int(marked[-1]))
    else:
        rows = np.flatnonzero(full.max(axis=1) >= int(marked[0]))
        cols = np.flatnonzero(full.max(axis=0) >= int(marked[0]))
    if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 < MIN_DIGIT:
        raise InputError(422, "the image is nearly blank: its only mark is a dot, too small to be a digit")
    ink = np.take(table, full[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return _center_by_mass(_fit_box(ink))


def _median_level(levels: np.ndarray) -> int:
    """``int(np.median(levels))`` of uint8 levels, from a sort (np.median's overhead is most of its time)."""
    ordered = np.sort(levels)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return int(ordered[middle])
    return int((float(ordered[middle - 1]) + float(ordered[middle])) / 2)


def _prepare(
    full: np.ndarray, dark_ink: bool | None = None, zoomed: bool = False, analysis: int = ANALYSIS
) -> np.ndarray:
    """uint8 grey ``full`` (any polarity) to the 28x28 float32 model input; 422 when no digit is found."""
    height, width = full.shape
    factor = max(1, math.ceil(max(height, width) / analysis))
    small = np.asarray(Image.fromarray(full).reduce(factor)) if factor > 1 else full
    if dark_ink is None:
        dark_ink = _dark_ink(small)
    bright_u8 = 255 - small if dark_ink else small  # ink is bright from here on
    grid, block = _background_grid(bright_u8)
    bright = bright_u8.astype(np.float32)
    ink = _ink(bright, grid, block)
    levels = _quantise(ink)
    noise = _noise_level(levels)
    peak = _peak(ink, levels)
    if peak < MIN_CONTRAST:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    if peak < MIN_SNR * noise:
        raise InputError(422, "the image is blank or pure noise: no digit stands out from the noise")
    threshold = max(4.0 * noise, 0.3 * peak)
    # What is left of the background where there is no ink (a shadow's edge the grid could not
    # follow, the rest of a line): nothing at or below it is ink.
    residue = _residue(ink, levels, threshold)
    threshold = max(threshold, 1.5 * residue)
    keep, box = _digit_region(ink, threshold, clean=noise < CLEAN_NOISE)
    top, bottom, left, right = box
    if max(bottom - top, right - left) * factor < MIN_DIGIT:
        raise InputError(422, "the image is nearly blank: its only mark is a dot, too small to be a digit")
    if max(bottom - top, right - left) < MIN_BOX and factor > 1 and not zoomed:
        # Small in a big picture: crop it (with a wide margin) from the full picture and look again.
        margin = max(bottom - top, right - left)
        y0, y1 = max(0, (top - margin) * factor), min(height, (bottom + margin) * factor)
        x0, x1 = max(0, (left - margin) * factor), min(width, (right + margin) * factor)
        return _prepare(full[y0:y1, x0:x1], dark_ink, zoomed=True)
    floor = min(max(3.0 * noise, residue), 0.5 * peak)
    digit = np.clip((ink - floor) / (peak - floor), 0.0, 1.0)
    digit *= keep  # only the digit's own region: specks and lines elsewhere are dropped
    rows = np.flatnonzero((digit > MIN_CONTRAST).any(axis=1))
    cols = np.flatnonzero((digit > MIN_CONTRAST).any(axis=0))
    if rows.size == 0:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return _center_by_mass(_fit_box(_normalise_stroke(digit)))


def _dark_ink(small: np.ndarray) -> bool:
    """Dark ink on light paper? Decided by the border first, by the histogram's tails if unsure.

    The border is paper in nearly every picture: when its median sits clearly nearer one end of
    the grey levels (read far out, at 0.05 % and 99.95 %, so a small digit still counts), the
    ink is the other end. Otherwise (a strong shadow across the page) ink is the minority, so it
    makes the longer tail of the histogram of the picture less its local mean (a wide box blur,
    so that the gradient lengthens neither tail).
    """
    low, high = _tails(small)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    paper = float(np.median(border))
    to_dark, to_light = paper - low, high - paper
    if to_dark > 2 * to_light:
        return True
    if to_light > 2 * to_dark:
        return False
    radius = max(2, max(small.shape) // 6)
    local = np.asarray(Image.fromarray(small).filter(ImageFilter.BoxBlur(radius)))
    low, high = _tails(small.astype(np.int16) - local.astype(np.int16) + 255)
    return bool(255 - low > high - 255)


def _tails(values: np.ndarray) -> tuple[int, int]:
    """The 0.05 % and 99.95 % quantiles of non-negative integers."""
    cdf = np.cumsum(np.bincount(values.ravel()))
    total = int(cdf[-1])
    low, high = np.searchsorted(cdf, [0.0005 * total, 0.9995 * total])
    return int(low), int(high)


def _background_grid(bright: np.ndarray) -> tuple[np.ndarray, int]:
    """The local background of an ink-bright uint8 image on a coarse grid, and the grid's block size.

    Each block's 25th percentile on a 12x12 grid, then an opening over the 3x3 neighbouring
    blocks: wider than any stroke, so a block inside a thick marker line still sees paper around
    it. Blocks of 8 pixels or more are read from the image halved (box averaged): a quarter of
    the work, and the same paper.
    """
    height, width = bright.shape
    block = max(MIN_BLOCK, math.ceil(max(height, width) / 12))
    source, step = bright, block
    if block >= 8:
        block += block % 2
        source, step = np.asarray(Image.fromarray(bright).reduce(2)), block // 2
    sh, sw = source.shape
    gh, gw = -(-sh // step), -(-sw // step)
    padded = np.pad(source, ((0, gh * step - sh), (0, gw * step - sw)), mode="edge")
    blocks = padded.reshape(gh, step, gw, step).transpose(0, 2, 1, 3).reshape(gh, gw, step * step)
    kth = step * step // 4
    grid = np.partition(blocks, kth, axis=2)[:, :, kth]
    # An opening over 3x3 blocks: the minimum removes blocks filled by a thick stroke, the
    # maximum after it restores the level of a gradient (a minimum alone would sit a block low).
    grid = _grid_filter(_grid_filter(grid, np.minimum), np.maximum)
    return grid.astype(np.float32), block


def _grid_filter(grid: np.ndarray, combine: Callable[..., np.ndarray]) -> np.ndarray:
    """``np.minimum`` or ``np.maximum`` over each cell's 3x3 neighbourhood (separable, edges clamped)."""
    out = grid.copy()
    combine(out[1:], grid[:-1], out=out[1:])
    combine(out[:-1], grid[1:], out=out[:-1])
    rows = out.copy()
    combine(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    combine(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    return out


def _ink(bright: np.ndarray, grid: np.ndarray, block: int) -> np.ndarray:
    """Contrast over the local background, relative to its headroom, ruled lines taken out."""
    low, high = float(grid.min()), float(grid.max())
    if low == high:  # flat paper (a canvas, a clean scan): one number, no interpolation
        ink = bright - np.float32(low)
        ink *= np.float32(1.0 / max(255.0 - low, 16.0))
    else:
        background = _upsample(grid, block, bright.shape)
        ink = (bright - background) / np.maximum(255.0 - background, 16.0)
    np.clip(ink, 0.0, 1.0, out=ink)
    _remove_lines(ink)
    return ink


def _upsample(grid: np.ndarray, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """Bilinear interpolation of block values (known at block centres) to every pixel."""
    gh, gw = grid.shape
    if gh == 1 and gw == 1:
        return np.full(shape, grid[0, 0], dtype=np.float32)
    image = Image.fromarray(grid, mode="F").resize((gw * block, gh * block), Image.Resampling.BILINEAR)
    return np.asarray(image)[: shape[0], : shape[1]]


def _remove_lines(ink: np.ndarray) -> None:
    """Take out ruled and grid lines in place: rows and columns whose lower quartile is raised.

    The quartiles are read from every other column (row) of the image: a line is many pixels long.
    """
    height, width = ink.shape
    if width >= 16:
        sample = ink[:, ::2]
        kth = sample.shape[1] // 4
        rows = np.partition(sample, kth, axis=1)[:, kth]
        if float(rows.max()) > 0:
            ink -= rows[:, None]
            np.clip(ink, 0.0, 1.0, out=ink)
    if height >= 16:
        sample = ink[::2]
        kth = sample.shape[0] // 4
        cols = np.partition(sample, kth, axis=0)[kth]
        if float(cols.max()) > 0:
            ink -= cols[None, :]
            np.clip(ink, 0.0, 1.0, out=ink)


# Order statistics are read from histograms of the ink quantised to 1/1023: a bincount is ~20x
# cheaper than a partition, and the levels are far finer than any threshold they feed.
_LEVELS = 1023


def _quantise(ink: np.ndarray) -> np.ndarray:
    return (ink * _LEVELS + 0.5).astype(np.int16)


def _quantile(levels: np.ndarray, fraction: float) -> float:
    """The ``fraction`` quantile (0-1) of quantised values, back in [0, 1] units."""
    if levels.size == 0:
        return 0.0
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=_LEVELS + 1))
    return float(np.searchsorted(cdf, fraction * cdf[-1])) / _LEVELS


def _noise_level(levels: np.ndarray) -> float:
    """Standard deviation of pixel noise, from the median absolute difference of neighbours."""
    diffs = np.abs(np.diff(levels[::2], axis=1))  # every other row is plenty
    return _quantile(diffs, 0.5) * 1.4826 / math.sqrt(2.0)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean dilation by a (2 * radius + 1) square, as shifted ORs (separable)."""
    rows = mask.copy()
    for step in range(1, radius + 1):
        rows[step:] |= mask[:-step]
        rows[:-step] |= mask[step:]
    out = rows.copy()
    for step in range(1, radius + 1):
        out[:, step:] |= rows[:, :-step]
        out[:, :-step] |= rows[:, step:]
    return out


def _residue(ink: np.ndarray, levels: np.ndarray, threshold: float) -> float:
    """The 98th percentile of the pixels away from ink: the background's own highest level.

    "Away" is more than two pixels from anything over ``threshold``, so the soft edges of the
    strokes (and the fainter parts of the digit) are not taken for background.
    """
    return _quantile(levels[~_dilate(ink > threshold, 2)], 0.98)


def _peak(ink: np.ndarray, levels: np.ndarray) -> float:
    """The ink's full strength: the 8th brightest pixel, so a few hot pixels do not set it.

    The exact value of a pixel at that quantised level, so a clean image is scaled exactly as
    MNIST's own (its brightest pixel becomes 1.0).
    """
    rank = min(PEAK_RANK, 1 + levels.size // 2000)  # the brightest itself in an MNIST-sized image
    level = round(_quantile(levels, 1.0 - (rank - 1) / levels.size) * _LEVELS)
    at_level = ink[levels == level]
    return float(at_level.max()) if at_level.size else level / _LEVELS


def _digit_region(
    ink: np.ndarray, threshold: float, clean: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The digit's pixels (a 0/1 mask) and box (top, bottom, left, right; exclusive ends).

    Ink above ``threshold`` is grouped on a coarse grid (8-connected cells); the heaviest group is
    the digit, long groups along the border (paper edges) count for less, and other groups join
    it only when they are close to it and not negligible (the separate bar of a 5, a broken pen
    line), so isolated specks and marks far away never stretch the box. In a ``clean`` picture (no
    measurable noise) the cells around the chosen ones are kept too: whatever faint is there is
    the strokes' own soft edge, not noise.
    """
    height, width = ink.shape
    mask = ink > threshold
    cell = max(2, math.ceil(max(height, width) / CELLS))
    gh, gw = -(-height // cell), -(-width // cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=np.float32)
    padded[:height, :width] = np.where(mask, ink, 0.0)
    mass = padded.reshape(gh, cell, gw, cell).sum(axis=(1, 3))
    labels, found = _components(mass)
    if not found:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    components = []
    for index, (weight, (y0, y1, x0, x1)) in enumerate(found, start=1):
        edge = (y0 == 0 or x0 == 0 or y1 == gh or x1 == gw) and (y1 - y0 > 0.6 * gh or x1 - x0 > 0.6 * gw)
        components.append((weight * (0.2 if edge else 1.0), weight, (y0, y1, x0, x1), edge, index))
    components.sort(key=lambda c: c[0], reverse=True)
    _, main_weight, (y0, y1, x0, x1), _, _ = components[0]
    chosen = [components[0]]
    reach = max(1, round(0.3 * max(y1 - y0, x1 - x0)))
    changed = True
    while changed:
        changed = False
        for comp in components:
            if any(comp is c for c in chosen) or comp[3] or comp[1] < 0.06 * main_weight:
                continue
            cy0, cy1, cx0, cx1 = comp[2]
            gap = max(cy0 - y1, y0 - cy1, cx0 - x1, x0 - cx1)
            if gap <= reach:
                chosen.append(comp)
                y0, y1, x0, x1 = min(y0, cy0), max(y1, cy1), min(x0, cx0), max(x1, cx1)
                changed = True
    keep_cells = np.isin(labels, [comp[4] for comp in chosen])
    if max(height, width) <= 2 * SIDE:
        keep_cells[:] = True  # MNIST's own size: the picture is the digit, every mark in it counts
    elif clean:
        keep_cells = _dilate(keep_cells, 1)
    keep = np.broadcast_to(keep_cells[:, None, :, None], (gh, cell, gw, cell)).reshape(gh * cell, gw * cell)
    keep = keep[:height, :width]
    inside = mask & keep
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    return keep.astype(np.float32), (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def _components(mass: np.ndarray) -> tuple[np.ndarray, list[tuple[float, tuple[int, int, int, int]]]]:
    """8-connected groups of the non-zero cells of a small grid: labels, and each group's mass and box.

    Row runs joined with a union-find: a handful of runs per row rather than a visit per cell.
    """
    gh, gw = mass.shape
    padded = np.zeros((gh, gw + 2), dtype=np.int8)
    padded[:, 1:-1] = mass > 0
    flips = np.flatnonzero(np.diff(padded, axis=1).ravel()).tolist()  # run starts and ends, row by row
    runs = [
        (start // (gw + 1), start % (gw + 1), end % (gw + 1))
        for start, end in zip(flips[::2], flips[1::2], strict=True)
    ]
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []  # indices of the previous row's runs
    current: list[int] = []
    row = -1
    for index, (y, x0, x1) in enumerate(runs):
        if y != row:
            previous, current, row = (current if y == row + 1 else []), [], y
        for other in previous:
            _, p0, p1 = runs[other]
            if x0 <= p1 and p0 <= x1:  # overlapping or touching diagonally (ends are exclusive)
                parent[root(index)] = root(other)
        current.append(index)
    cumulative = np.zeros((gh, gw + 1), dtype=np.float64)
    np.cumsum(mass, axis=1, out=cumulative[:, 1:])
    sums = cumulative.tolist()
    labels = np.zeros((gh, gw), dtype=np.int32)
    ids: dict[int, int] = {}
    found: list[tuple[float, tuple[int, int, int, int]]] = []
    for index, (y, x0, x1) in enumerate(runs):
        group = root(index)
        if group not in ids:
            ids[group] = len(found) + 1
            found.append((0.0, (y, y + 1, x0, x1)))
        label = ids[group]
        weight, (y0, y1, bx0, bx1) = found[label - 1]
        found[label - 1] = (
            weight + sums[y][x1] - sums[y][x0],
            (min(y0, y), max(y1, y + 1), min(bx0, x0), max(bx1, x1)),
        )
        labels[y, x0:x1] = label
    return labels, found


def _stroke_width(digit: np.ndarray) -> float:
    """Mean stroke width in pixels: twice the ink's area over its outline's length (total variation)."""
    dx = np.diff(digit, axis=1)[:-1, :]
    dy = np.diff(digit, axis=0)[:, :-1]
    outline = float(np.sqrt(dx * dx + dy * dy).sum())
    return 2.0 * float(digit.sum()) / outline if outline > 0 else 0.0


def _normalise_stroke(digit: np.ndarray) -> np.ndarray:
    """Widen a ballpoint line or thin a marker's towards MNIST's stroke (median 2.2 px in 28x28).

    Measured on the test set, 90 % of MNIST strokes are 1.6-3.4 px wide once the digit fits the
    20x20 box; a digit already that size is MNIST-like and left exactly as it is.
    """
    longest = max(digit.shape)
    if abs(longest - BOX) <= 2 and longest <= SIDE:
        return digit
    scale = BOX / longest
    width = _stroke_width(digit) * scale
    if width <= 0 or THIN_STROKE <= width <= THICK_STROKE:
        return digit
    if width < THIN_STROKE:
        steps = max(1, round((MNIST_STROKE - width) / scale / 2))
        padded = np.pad(digit, steps)
        return np.asarray(Image.fromarray(padded, mode="F").filter(ImageFilter.MaxFilter(2 * steps + 1)))
    steps = round((width - MNIST_STROKE) / scale / 2)
    if steps < 1:
        return digit
    thinned = np.asarray(Image.fromarray(digit, mode="F").filter(ImageFilter.MinFilter(2 * steps + 1)))
    return thinned if float(thinned.max()) > 0.5 else digit


def _fit_box(digit: np.ndarray) -> np.ndarray:
    height, width = digit.shape
    longest = max(height, width)
    # Within ~10 % of the box already (an MNIST image, say): resampling would only blur it.
    if abs(longest - BOX) <= 2 and longest <= SIDE:
        return digit
    scale = BOX / longest
    rows = _lanczos(height, max(1, round(height * scale)))
    cols = _lanczos(width, max(1, round(width * scale)))
    resized = rows @ (np.asarray(digit, dtype=np.float32) @ cols.T)
    return np.minimum(np.maximum(resized, 0.0, out=resized), 1.0, out=resized)


@functools.lru_cache(maxsize=128)
def _lanczos(size: int, new_size: int) -> np.ndarray:
    """Pillow's LANCZOS resampling of ``size`` samples to ``new_size`` as a ``(new_size, size)`` matrix.

    The same kernel (a=3, ``-3 <= x < 3``), support (widened by the reduction factor), centres
    and per-sample normalisation as Pillow's ``precompute_coeffs``, so ``rows @ picture @ cols.T``
    is Pillow's resize of a float picture to within float32 rounding (~1e-7), in a tenth of its
    time. Sizes here are a digit's box (at most a few hundred pixels), so the cache stays small.
    """
    scale = size / new_size
    stretch = max(scale, 1.0)
    support = 3.0 * stretch
    weights = np.zeros((new_size, size), dtype=np.float64)
    for out in range(new_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), size)
        x = (np.arange(first, stop) - center + 0.5) / stretch
        kernel = np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)
        total = kernel.sum()
        weights[out, first:stop] = kernel / total if total != 0 else kernel
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


def _center_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place ``digit`` in 28x28 so that its centre of mass lands on the centre, as MNIST did."""
    height, width = digit.shape
    total = float(digit.sum())
    if total <= 0:
        raise InputError(422, "the image is blank: no digit stands out from the background")
    cy = float((digit.sum(axis=1) * np.arange(height)).sum() / total)
    cx = float((digit.sum(axis=0) * np.arange(width)).sum() / total)
    # To 1e-4 of a pixel first: float32 rounding (~1e-7) never decides a tie such as a centre at 13.5.
    top = min(max(round(round(CENTER - cy, 4)), 0), SIDE - height)
    left = min(max(round(round(CENTER - cx, 4)), 0), SIDE - width)
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + height, left : left + width] = digit
    return out
