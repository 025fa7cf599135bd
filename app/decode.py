"""Request bytes to model input: the only code that turns bodies into float32 ``[N, 784]`` arrays.

Pure functions (no FastAPI, no torch), so ``/predict``, ``/v2/.../infer`` and the digit pad
share one set of limits and error messages, and every rule is unit-tested without a server.
Every rejection is an :class:`~app.errors.InputError` with the status code and a message that
says what to fix.

Images (PNG, JPEG, WebP) are :mod:`app.image`'s job; the v2 ``BYTES`` elements here hand them over.
"""

from __future__ import annotations

import io
import re
import threading
from typing import Any

import numpy as np
import orjson
import simdjson

from app import image
from app.errors import InputError

__all__ = [
    "check_value_count",
    "decode_json",
    "decode_npy",
    "decode_uint8",
    "unit_scale",
    "pixels_to_array",
]

PIXELS = 784
SIDE = 28
_NON_FINITE = re.compile(rb"\b(?:NaN|-?Infinity)\b")
_JSON_HINT = 'send {"pixels": [784 numbers]} for one digit or {"instances": [[784 numbers], ...]} for a batch'


# --------------------------------------------------------------------------------------------
# Vectors


def pixels_to_array(value: Any, field: str, max_batch: int, batch: bool, checked: bool = False) -> np.ndarray:
    """Validate a nested list of pixel values in [0, 1]; returns float32 ``[N, 784]``.

    ``checked``: the caller has proved that ``value`` holds only numbers and lists
    (:func:`only_numbers_besides`), so the per-element type walk is skipped.
    """
    arr = _numeric_array(value, f"'{field}'", checked)
    shape = arr.shape
    if batch:
        if arr.ndim not in (2, 3) or shape[1:] not in ((PIXELS,), (SIDE, SIDE)):
            raise InputError(
                422, f"'{field}' must be a list of images, each 784 numbers or 28 rows of 28; got shape {list(shape)}"
            )
        if shape[0] == 0:
            raise InputError(422, f"'{field}' is empty: send at least one image")
        _check_batch_size(shape[0], max_batch)
    elif shape not in ((PIXELS,), (SIDE, SIDE)):
        raise InputError(422, f"'{field}' must be 784 numbers (a flat list) or 28 rows of 28; got shape {list(shape)}")
    arr = arr.reshape(-1, PIXELS)
    return check_unit_range(arr, field)


def _check_batch_size(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise InputError(413, f"batch of {n} images is over the maximum of {max_batch}: split it into smaller requests")


# Bytes that JSON numbers, arrays of them and the whitespace between can be made of.
_NUMERIC_BYTES = b"0123456789.eE+-,[] \t\r\n"
_TYPE_NAMES = {str: "strings", bool: "booleans", type(None): "null", dict: "objects"}


def only_numbers_besides(body: bytes, skeleton: Any) -> bool:
    """Whether ``body`` is the JSON of ``skeleton`` with nothing but numbers (and arrays of them) added.

    ``skeleton`` is the parsed document with its pixel arrays emptied. Any string, ``true``,
    ``false``, ``null`` or object inside those arrays leaves a quote, a letter or a brace that
    the skeleton does not have. One C-speed pass over the body, against a type walk of every
    element; ``False`` only means "not proven" (an escaped key, say): the walk decides then.
    """
    return body.translate(None, _NUMERIC_BYTES) == orjson.dumps(skeleton).translate(None, _NUMERIC_BYTES)


def _check_numbers(value: Any, what: str) -> None:
    """Every leaf of a nested list is an int or a float, or a 422 naming what else it holds.

    Runs before numpy sees the values: given strings, numpy would build a fixed-width unicode
    array (elements x longest string x 4 bytes: gigabytes from a 64 KB body) just to refuse it.
    The walk costs one step per element, whatever the strings' lengths.
    """
    if not isinstance(value, list):
        return  # a scalar: numpy makes a 0-d array of it, refused by the shape checks
    stack = [value]
    while stack:
        for item in stack.pop():
            kind = type(item)
            if kind is float or kind is int or kind is np.ndarray:  # arrays: float64, from load_json_numbers
                continue
            if kind is list:
                stack.append(item)
                continue
            raise InputError(422, f"{what} must contain only numbers (got {_TYPE_NAMES.get(kind, kind.__name__)})")


def _numeric_array(value: Any, what: str, checked: bool = False) -> np.ndarray:
    """A nested JSON list as a float64 numpy array, or a 422 naming what is wrong with it."""
    if not checked:
        _check_numbers(value, what)
    if isinstance(value, (str, bool)) or value is None or isinstance(value, dict):
        raise InputError(422, f"{what} must contain only numbers (got {_TYPE_NAMES[type(value)]})")
    try:
        return np.asarray(value, dtype=np.float64)
    except ValueError:
        raise InputError(422, f"{what} must be a rectangular array of numbers: its rows differ in length") from None
    except OverflowError:
        raise InputError(422, f"{what} holds a number too large for a pixel value") from None


def check_unit_range(arr: np.ndarray, field: str) -> np.ndarray:
    """Finite, within [0, 1]; returns float32. The 0-255 mistake gets its own hint."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(422, f"'{field}' contains NaN or infinite values: send finite numbers in [0, 1]")
    if lo < 0.0 or hi > 1.0:
        if lo >= 0.0 and hi <= 255.0:
            raise InputError(
                422,
                f"'{field}' values must be in [0, 1] (white digit on black); got values up to {hi:g}, "
                "which look like 0-255 pixels: divide them by 255",
            )
        raise InputError(
            422, f"'{field}' values must be in [0, 1] (white digit on black); got values from {lo:g} to {hi:g}"
        )
    return arr


def load_json_object(body: bytes, hint: str) -> dict[str, Any]:
    """Parse a JSON object with the same NaN / malformed / wrong-type messages as ``decode_json``."""
    if not body.strip():
        raise InputError(400, f"empty request body: {hint}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _NON_FINITE.search(body) or "infinity" in str(exc):  # NaN literals, or 1e999
            raise InputError(
                422, "NaN and Infinity are not valid pixel values (nor valid JSON): send finite numbers"
            ) from None
        raise InputError(400, f"malformed JSON ({exc}): {hint}") from None
    if not isinstance(doc, dict):
        raise InputError(422, f"expected a JSON object, got {type(doc).__name__}: {hint}")
    return doc


# Where the fast parse reads arrays of numbers straight into numpy: the values of these keys
# (except in a v2 tensor whose datatype is BYTES).
_NUMBER_KEYS = frozenset({"pixels", "instances", "data"})
_VECTOR_MIN = 16  # shorter arrays are not worth it (and a shape or a short list stays a list)
_MAX_DEPTH = 32  # deeper documents are left to orjson (the fast parse walks them recursively)
_BOM = b"\xef\xbb\xbf"


class _Unproven(Exception):
    """The fast parse cannot vouch for this document; :func:`load_json_object` decides."""


def load_json_numbers(body: bytes, hint: str) -> dict[str, Any]:
    """:func:`load_json_object`, with the long arrays of numbers under ``pixels``, ``instances`` and
    ``data`` (and their rows) returned as float64 numpy arrays.

    A digit is 784 numbers: orjson makes 784 Python floats of them and numpy reads them back,
    about 25 us of a request's worker time. simdjson parses the document and copies each such
    array into a buffer in C (about 5 us). Anything this parse cannot vouch for (not an object,
    a string or a boolean among the numbers, an array nested inside a number array, a byte order
    mark, a number out of range, malformed JSON) goes to orjson, which gives every answer and
    error message as before; a document both accept is the same document.
    """
    doc = _fast_parse(body)
    return doc if isinstance(doc, dict) else load_json_object(body, hint)


# The event loop's parser, reused for small bodies (a new parser allocates for every document).
# Only the thread that made it uses it; bigger bodies get a parser of their own, so that none
# keeps a big document's buffers. simdjson refuses to reuse a parser while a value from its last
# document is alive: every value _convert reads is dropped before it returns.
_SMALL = 64 * 1024
_local = threading.local()
_SCALARS = (str, int, float, bool, type(None))


def _parser(size: int) -> simdjson.Parser:
    if size > _SMALL:
        return simdjson.Parser()
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _fast_parse(body: bytes) -> Any:
    if body.startswith(_BOM):  # orjson refuses it; simdjson would not
        return None
    arrays = [0]
    try:
        doc = _convert(_parser(len(body)).parse(body), arrays, 0, False)
    except (ValueError, TypeError, RuntimeError, _Unproven):
        return None
    # simdjson's as_buffer flattens arrays nested in a number array ([0.5, [], [1, 0]] reads as
    # three numbers). Every "[" in the body is an array; when the walk saw them all, none was
    # nested that way. (A "[" inside a string makes the counts differ too: not proven, orjson decides.)
    return doc if body.count(b"[") == arrays[0] else None


def _convert(value: Any, arrays: list[int], depth: int, numbers: bool) -> Any:
    """simdjson's lazy document to Python, number arrays under :data:`_NUMBER_KEYS` as float64."""
    if type(value) in _SCALARS:
        return value
    if depth > _MAX_DEPTH:
        raise _Unproven
    if type(value) is simdjson.Array:
        arrays[0] += 1
        if numbers and len(value) >= _VECTOR_MIN:
            first = value[0]
            if type(first) is float or type(first) is int:
                # TypeError when another element is not a number: the whole parse is not proven.
                return np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
        return [_convert(item, arrays, depth + 1, numbers) for item in value]
    keys = list(value.keys())
    if len(set(keys)) != len(keys):  # a repeated key: simdjson reads the first, orjson the last
        raise _Unproven
    strings = "datatype" in keys and value["datatype"] == "BYTES"  # a v2 tensor of images: its data stays as is
    # value[key], not items(): items() turns everything below into Python objects at once.
    return {key: _convert(value[key], arrays, depth + 1, key in _NUMBER_KEYS and not strings) for key in keys}


# Commas a JSON body may hold beyond its images' values (keys, short lists, strings with commas).
_COMMA_SLACK = 4096


def check_value_count(body: bytes, max_batch: int) -> None:
    """413 before parsing when the JSON holds more values than ``max_batch`` images can.

    Parsing costs memory by the number of values (a 8 MB body of ``0,0,0...`` is 4 million of
    them, ~130 MB to parse), but at most ``max_batch`` x 784 of them can be an answerable request.
    Counting commas is one C-speed pass; a comma inside a string only makes the count larger.
    """
    limit = max_batch * PIXELS + _COMMA_SLACK
    if body.count(b",") > limit:
        raise InputError(
            413,
            f"the JSON holds over {limit:,} values; a request takes at most {max_batch} images of 784 values: "
            "split it into smaller requests",
        )


def decode_json(body: bytes, max_batch: int) -> tuple[np.ndarray, bool]:
    """``{"pixels": [...]}`` or ``{"instances": [[...], ...]}`` to (float32 ``[N, 784]``, is_batch)."""
    check_value_count(body, max_batch)
    doc = load_json_numbers(body, _JSON_HINT)
    if len(doc) == 1 and "pixels" in doc:
        pixels = doc["pixels"]
        checked = type(pixels) is np.ndarray or only_numbers_besides(body, {"pixels": []})
        return pixels_to_array(pixels, "pixels", max_batch, batch=False, checked=checked), False
    if len(doc) == 1 and "instances" in doc:
        if not isinstance(doc["instances"], (list, np.ndarray)):
            raise InputError(422, "'instances' must be a list of images")
        checked = only_numbers_besides(body, {"instances": []})
        return pixels_to_array(doc["instances"], "instances", max_batch, batch=True, checked=checked), True
    unknown = sorted(set(doc) - {"pixels", "instances"})
    if unknown:
        raise InputError(422, f"unknown field(s) {', '.join(map(repr, unknown))}: {_JSON_HINT}")
    if not doc:
        raise InputError(422, f"missing 'pixels' or 'instances': {_JSON_HINT}")
    raise InputError(422, f"send either 'pixels' or 'instances', not both: {_JSON_HINT}")


def decode_uint8(body: bytes, max_batch: int, scale: bool = True) -> np.ndarray:
    """Raw ``uint8`` pixels, N x 784 bytes (MNIST's own format, 0-255), to float32 ``[N, 784]``.

    ``scale=False`` returns the uint8 rows themselves (a view of ``body``), for
    ``predict_proba`` to scale chunk by chunk with the same arithmetic (``unit_scale``).
    """
    if not body:
        raise InputError(400, "empty request body: send N x 784 bytes of uint8 pixels (0-255, white digit on black)")
    if len(body) % PIXELS:
        raise InputError(
            422, f"body of {len(body)} bytes is not a whole number of 784-byte images (28x28 uint8 pixels each)"
        )
    n = len(body) // PIXELS
    _check_batch_size(n, max_batch)
    pixels = np.frombuffer(body, dtype=np.uint8).reshape(n, PIXELS)
    return unit_scale(pixels) if scale else pixels


UINT8_SCALE = np.float32(1 / 255)


def unit_scale(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 0-255 to float32 0-1: ``float32(p) * float32(1/255)``, in one pass (into ``out`` if given).

    Every path from uint8 pixels to the model uses this, so they all give bit-identical inputs.
    """
    return np.multiply(pixels, UINT8_SCALE, out=out, dtype=np.float32)


def decode_npy(body: bytes, max_batch: int, scale: bool = True) -> np.ndarray:
    """A ``.npy`` array: uint8 (0-255) or float (0-1), shaped (784,), (28,28), (N,784) or (N,28,28).

    ``scale=False`` keeps a uint8 array as uint8 rows (see ``decode_uint8``).
    """
    if not body:
        raise InputError(400, "empty request body: send a .npy file (numpy.save) of shape (N, 784) or (N, 28, 28)")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise InputError(422, f"not a valid .npy file ({exc}); create one with numpy.save") from None
    if dtype.hasobject:
        raise InputError(422, ".npy arrays of Python objects are refused: send uint8 or float32 pixels")
    if dtype.kind not in "uif" or dtype.kind == "b":
        raise InputError(422, f".npy dtype {dtype} is not supported: send uint8 (0-255) or float32 (0-1) pixels")
    if any(dim < 0 for dim in shape):
        raise InputError(422, f".npy header declares a negative dimension: {list(shape)}")
    if shape in ((PIXELS,), (SIDE, SIDE)):
        shape = (1, *shape)
    if len(shape) not in (2, 3) or tuple(shape[1:]) not in ((PIXELS,), (SIDE, SIDE)):
        raise InputError(422, f".npy array must be shaped (N, 784) or (N, 28, 28); got {list(shape)}")
    n = int(shape[0])
    if n == 0:
        raise InputError(422, ".npy array holds no images")
    _check_batch_size(n, max_batch)
    count = n * PIXELS
    data = memoryview(body)[stream.tell() :]  # a view: slicing the bytes would copy the whole array
    if len(data) != count * dtype.itemsize:
        raise InputError(
            422, f".npy data is {len(data)} bytes but its header promises {count * dtype.itemsize}: truncated?"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count)
    if fortran:
        arr = arr.reshape(shape[::-1]).transpose()
    arr = arr.reshape(n, PIXELS)
    if dtype == np.uint8:
        return unit_scale(arr) if scale else arr
    return check_unit_range(arr, "npy")


# --------------------------------------------------------------------------------------------
# Typed tensors: the Open Inference Protocol's (datatype, shape, data) triples
#
# The protocol describes every input by a datatype and a shape and carries its elements either
# as JSON (flat or nested, row-major) or as raw little-endian bytes (the binary tensor data
# extension). These turn one such tensor into the same float32 ``[N, 784]`` rows as above, with
# the same value rules: FP32 in [0, 1], UINT8 in 0-255 scaled exactly as ``decode_uint8`` does,
# and BYTES elements that are images (PNG, JPEG, WebP), handed to :mod:`app.image` undecoded.

__all__ += [
    "TENSOR_DATATYPES",
    "image_elements",
    "load_json_numbers",
    "load_json_object",
    "only_numbers_besides",
    "split_bytes_elements",
    "tensor_batch_size",
    "tensor_from_bytes",
    "tensor_from_json",
]

TENSOR_DATATYPES = ("FP32", "UINT8", "BYTES")
_PIXEL_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
_IMAGE_DIMS = ((PIXELS,), (SIDE, SIDE), (1, SIDE, SIDE))
_PIXEL_SHAPES = "[N, 784], [N, 28, 28] or [N, 1, 28, 28]"
_BYTES_SHAPES = "[N] (or [N, 1])"
_BASE64_SPACE = re.compile(rb"\s+")


def tensor_batch_size(shape: Any, datatype: str, field: str, max_batch: int) -> int:
    """Check a declared tensor shape against what ``datatype`` may carry; returns N, the image count."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError(422, f"'{field}' shape must be a list of integers, e.g. [1, 784]; got {shape!r}")
    if datatype == "BYTES":
        ok, expected = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1), _BYTES_SHAPES
    else:
        ok, expected = len(shape) >= 2 and tuple(shape[1:]) in _IMAGE_DIMS, _PIXEL_SHAPES
    if not ok or shape[0] < 0:
        raise InputError(422, f"'{field}' shape must be {expected} for {datatype}; got {shape}")
    n = shape[0]
    if n == 0:
        raise InputError(422, f"'{field}' holds no images (shape {shape}): send at least one")
    _check_batch_size(n, max_batch)
    return n


def tensor_from_json(
    data: Any, shape: Any, datatype: str, field: str, max_batch: int, checked: bool = False
) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) of an FP32 (0-1) or UINT8 (0-255) tensor to float32 ``[N, 784]``.

    ``checked``: as for :func:`pixels_to_array`.
    """
    n = tensor_batch_size(shape, datatype, field, max_batch)
    if not isinstance(data, (list, np.ndarray)):
        raise InputError(422, f"'{field}' data must be a JSON array of numbers, flat or nested")
    arr = _numeric_array(data, f"'{field}' data", checked)
    if arr.size != n * PIXELS:
        raise InputError(422, f"'{field}' data holds {arr.size} values but shape {shape} needs {n * PIXELS}")
    arr = arr.reshape(n, PIXELS)
    if datatype == "UINT8":
        return _uint8_rows(arr, field)
    return check_unit_range(arr, field)


def _uint8_rows(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not bool(np.isfinite(arr).all()) or not bool((arr == np.round(arr)).all()):
            raise InputError(422, f"'{field}' is UINT8: its values must be whole numbers 0-255")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise InputError(422, f"'{field}' is UINT8: its values must be in 0-255; got values from {lo:g} to {hi:g}")
    # The same arithmetic as decode_uint8, so both endpoints give bit-identical inputs.
    return unit_scale(arr.astype(np.uint8))


def tensor_from_bytes(raw: bytes, shape: Any, datatype: str, field: str, max_batch: int) -> np.ndarray:
    """Little-endian binary data of an FP32 (0-1) or UINT8 (0-255) tensor to float32 ``[N, 784]``."""
    n = tensor_batch_size(shape, datatype, field, max_batch)
    dtype = _PIXEL_DTYPES[datatype]
    expected = n * PIXELS * dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            422,
            f"'{field}' carries {len(raw)} bytes of binary data but a {datatype} tensor of shape {shape} "
            f"is {expected} bytes",
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(n, PIXELS)
    if datatype == "UINT8":
        return unit_scale(arr)
    return check_unit_range(arr, field)


def split_bytes_elements(raw: bytes, field: str) -> list[bytes]:
    """The binary layout of a BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError(422, f"'{field}' BYTES data is truncated: element {len(items)} has no complete length")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise InputError(
                422, f"'{field}' BYTES element {len(items)} declares {size} bytes but only {len(raw) - offset} remain"
            )
        items.append(raw[offset : offset + size])
        offset += size
    return items


def image_elements(items: list[bytes], shape: Any, field: str, max_batch: int) -> tuple[bytes, ...]:
    """BYTES elements, each an image (raw, or base64 text of one), as raw image bytes (not decoded)."""
    n = tensor_batch_size(shape, "BYTES", field, max_batch)
    if len(items) != n:
        raise InputError(422, f"'{field}' holds {len(items)} elements but shape {shape} needs {n}")
    return tuple(_image_element(item, field, index) for index, item in enumerate(items))


def _image_element(item: bytes, field: str, index: int) -> bytes:
    import base64  # only the protocol's BYTES inputs need it
    import binascii

    if image.sniff(item) is not None:
        return item
    if not item:
        raise InputError(422, f"'{field}' element {index} is empty: send a PNG, JPEG or WebP image")
    compact = _BASE64_SPACE.sub(b"", item)
    compact += b"=" * (-len(compact) % 4)
    try:
        if b"-" in compact or b"_" in compact:
            data = base64.urlsafe_b64decode(compact)
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if image.sniff(data) is None:
        raise InputError(
            422,
            f"'{field}' element {index} is neither a PNG, JPEG or WebP image nor base64 text of one "
            "(no image signature)",
        )
    return data
