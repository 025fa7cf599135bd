"""Unit tests for app.decode: every input form, limit and error message, without a server."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

from app.decode import decode_json, decode_npy, decode_uint8, load_json_numbers, load_json_object, unit_scale
from app.errors import InputError

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
        ([0.5] * 783 + [None], "only numbers (got null)"),
        ([True] * 784, "only numbers (got booleans)"),
        ([{"a": 1}] * 784, "only numbers (got objects)"),
        (["x" * 30_000] + [""] * 783, "only numbers (got strings)"),
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


# -- the fast parse (simdjson) against orjson ------------------------------------------------------

_ROW = [round(i / 783, 4) for i in range(784)]
_ODD = [0.5] * 20
# Documents the fast parse reads, and documents it must leave to orjson: each must come out as
# orjson's document (number arrays as numpy arrays holding the same values) or the same error.
_DOCUMENTS = [
    _json({"pixels": _ROW}),
    _json({"pixels": [list(_ROW[r * 28 : r * 28 + 28]) for r in range(28)]}),
    _json({"instances": [_ROW, _ROW[::-1]]}),
    _json({"pixels": [int(v > 0.5) for v in _ROW]}),  # integers
    b'  {"pixels": [' + b", ".join(b"1E-3" for _ in range(784)) + b"] }\n",
    b'{"pi\\u0078els": ' + _json(_ROW) + b"}",  # an escaped key
    b'{"pixels": [1, 2], "pixels": ' + _json(_ROW) + b"}",  # a repeated key: the last one counts
    b'{"pixels": ' + _json(_ROW) + b', "pixels": [1, 2]}',
    b'{"pixels": [' + b"0.5, " * 20 + b'"0.5"]}',  # a string among the numbers
    b'{"pixels": [' + b"0.5, " * 20 + b"true]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"null]}",
    b'{"pixels": [' + b"0.5, " * 20 + b'{"a": 1}]}',
    b'{"pixels": [' + b"0.5, " * 20 + b"[], [0.5, 0.5]]}",  # nested arrays that as_buffer would flatten
    b'{"pixels": [' + b"0.5, " * 20 + b"[0.5]]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"1e400]}",  # out of range
    b'{"pixels": [' + b"0.5, " * 20 + b"NaN]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"18446744073709551616]}",  # over 64 bits
    b'{"pixels": [' + b"0.5, " * 20 + b"9007199254740993]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"01]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"1.]}",
    b'{"pixels": [' + b"0.5, " * 20 + b"-0.0, 1e-400]}",
    b"\xef\xbb\xbf" + _json({"pixels": _ODD}),  # a byte order mark
    _json({"pixels": _ODD}) + b"\x00",
    _json({"pixels": _ODD}) + b" x",
    _json({"pixels": _ODD})[:-2],
    _json({"pixels": _ODD, "note": "[not an array]"}),  # a bracket inside a string
    _json({"pixels": [_ODD, [[0.5] * 16]]}),
    _json([_ODD]),
    b"",
    b"   ",
    b"[" * 40 + b"]" * 40,
    _json({"a": {"b": {"c": _ODD}}}),
    _json({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": _ROW}]}),
    _json({"inputs": [{"name": "input", "shape": [1, 20], "datatype": "BYTES", "data": _ODD}]}),
    _json({"inputs": [{"name": "input", "parameters": {"data": _ODD}, "data": [_ODD, _ODD]}], "outputs": _ODD}),
]


def _same(fast: object, reference: object) -> bool:
    """The fast parse's document is orjson's: its arrays hold the values numpy makes of orjson's lists."""
    if isinstance(fast, np.ndarray):
        return fast.dtype == np.float64 and np.array_equal(fast, np.asarray(reference, dtype=np.float64))
    if isinstance(fast, list):
        return isinstance(reference, list) and len(fast) == len(reference) and all(map(_same, fast, reference))
    if isinstance(fast, dict):
        return (
            isinstance(reference, dict)
            and fast.keys() == reference.keys()
            and all(_same(fast[k], reference[k]) for k in fast)
        )
    return type(fast) is type(reference) and fast == reference


@pytest.mark.parametrize("body", _DOCUMENTS)
def test_the_fast_parse_gives_orjsons_document_or_its_error(body: bytes) -> None:
    try:
        expected: object = load_json_object(body, "hint")
    except InputError as exc:
        refused = exc
    else:
        assert _same(load_json_numbers(body, "hint"), expected)
        return
    error = _err(load_json_numbers, body, "hint")
    assert (error.status_code, error.detail) == (refused.status_code, refused.detail)


def test_the_fast_parse_reads_number_arrays_as_arrays() -> None:
    doc = load_json_numbers(_json({"pixels": _ROW, "shape": [1, 784]}), "hint")
    assert isinstance(doc["pixels"], np.ndarray)
    assert doc["shape"] == [1, 784]  # not under a number key: a list, as orjson gives it
    rows = load_json_numbers(_json({"instances": [_ROW, _ROW]}), "hint")["instances"]
    assert isinstance(rows, list)
    assert all(isinstance(r, np.ndarray) for r in rows)


@pytest.mark.parametrize("body", _DOCUMENTS)
def test_decode_json_answers_as_from_orjsons_document(body: bytes) -> None:
    """decode_json on the fast parse: the same rows, or the same error, as on orjson's lists."""
    try:
        doc = load_json_object(body, "hint")
        key = "pixels" if "pixels" in doc else "instances"
        reference = np.asarray(doc[key], dtype=np.float64).astype(np.float32).reshape(-1, 784)
    except (InputError, ValueError, KeyError, TypeError, OverflowError):
        reference = None
    try:
        x, _ = decode_json(body, MAX_BATCH)
    except InputError:
        return  # the error is the general path's (the test above)
    assert reference is not None
    assert np.array_equal(x, reference)


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


def test_npy_negative_dimensions() -> None:
    body = _npy(np.zeros((1, 784), np.uint8)).replace(b"(1, 784)", b"(-4, 784)")
    error = _err(decode_npy, body, MAX_BATCH)
    assert error.status_code == 422
    assert "negative dimension" in error.detail


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


def test_more_values_than_a_request_can_hold_is_413_before_parsing() -> None:
    body = b'{"pixels": [' + b"0," * 200_000 + b"0]}"  # 200,001 values: no batch of 16 holds that many
    error = _err(decode_json, body, MAX_BATCH)
    assert error.status_code == 413
    assert "split it into smaller requests" in error.detail
    # A full batch and its keys are well within the count.
    x, _ = decode_json(_json({"instances": [[0.5] * 784] * MAX_BATCH}), MAX_BATCH)
    assert x.shape == (MAX_BATCH, 784)
