"""The Open Inference Protocol's wire format, without a server.

Covers the typed-tensor block of :mod:`app.decode` and :mod:`app.v2_codec`. Where a body format
matters, tritonclient's own encoder and decoder (``generate_request_body``,
``InferResult.from_response_body``) produce and read the bytes, so these tests pin the format a
real client uses rather than our reading of the documents.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import serialize_byte_tensor

from app.decode import (
    decode_uint8,
    image_elements,
    load_json_object,
    split_bytes_elements,
    tensor_batch_size,
    tensor_from_bytes,
    tensor_from_json,
)
from app.errors import InputError
from app.v2_codec import (
    InferRequest,
    OutputRequest,
    decompress,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
    split_body,
)
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
TWO_PNG = (FIXTURES / "two_28x28.png").read_bytes()
MAX_BATCH = 100
MAX_PIXELS = 4096 * 4096
MAX_JSON_BYTES = 8 * 1024 * 1024


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _digits(n: int = 3) -> np.ndarray:
    """Deterministic uint8 ``[n, 784]`` images that are not all alike."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(n, 784), dtype=np.uint8)


@contextlib.contextmanager
def _raises(status: int, match: str) -> Iterator[None]:
    with pytest.raises(InputError, match=match) as info:
        yield
    assert info.value.status_code == status, info.value.detail


def _client_body(inputs: list[Any], outputs: list[Any] | None = None, **kwargs: Any) -> tuple[bytes, str | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def _parse(body: bytes, header_length: str | None = None, max_batch: int = MAX_BATCH) -> InferRequest:
    return parse_infer_request(body, header_length, max_batch, MAX_JSON_BYTES)


def _json_request(tensor: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", **tensor}], **extra})


# --------------------------------------------------------------------------------------------
# app.decode: typed tensors


@pytest.mark.parametrize(
    ("shape", "datatype", "n"),
    [
        ([1, 784], "FP32", 1),
        ([3, 28, 28], "UINT8", 3),
        ([2, 1, 28, 28], "FP32", 2),
        ([5], "BYTES", 5),
        ([4, 1], "BYTES", 4),
    ],
)
def test_tensor_batch_size_accepts_the_image_shapes(shape: list[int], datatype: str, n: int) -> None:
    assert tensor_batch_size(shape, datatype, "input", MAX_BATCH) == n


@pytest.mark.parametrize(
    ("shape", "datatype", "match"),
    [
        ([784], "FP32", r"\[N, 784\], \[N, 28, 28\] or \[N, 1, 28, 28\] for FP32; got \[784\]"),
        ([1, 783], "FP32", "got \\[1, 783\\]"),
        ([1, 2, 28, 28], "UINT8", "for UINT8"),
        ([-1, 784], "FP32", "got \\[-1, 784\\]"),
        ([2, 2], "BYTES", r"\[N\] \(or \[N, 1\]\) for BYTES"),
        ([1, 784.0], "FP32", "list of integers"),
        ([True, 784], "FP32", "list of integers"),
        ("1,784", "FP32", "list of integers"),
        ([0, 784], "FP32", "holds no images"),
    ],
)
def test_tensor_batch_size_rejects_other_shapes(shape: Any, datatype: str, match: str) -> None:
    with _raises(422, match):
        tensor_batch_size(shape, datatype, "input", MAX_BATCH)


def test_tensor_batch_size_over_the_batch_limit_is_413() -> None:
    with _raises(413, "batch of 101 images is over the maximum of 100"):
        tensor_batch_size([101, 784], "FP32", "input", MAX_BATCH)


def test_tensor_from_json_takes_flat_and_nested_data_alike() -> None:
    pixels = _digits(2).astype(np.float32) / 255
    flat = tensor_from_json(pixels.reshape(-1).tolist(), [2, 784], "FP32", "input", MAX_BATCH)
    nested = tensor_from_json(pixels.reshape(2, 1, 28, 28).tolist(), [2, 1, 28, 28], "FP32", "input", MAX_BATCH)
    assert flat.dtype == np.float32
    assert flat.shape == (2, 784)
    np.testing.assert_array_equal(flat, pixels)
    np.testing.assert_array_equal(nested, pixels)


def test_uint8_json_and_binary_give_exactly_what_predict_gives_for_raw_bytes() -> None:
    digits = _digits(3)
    expected = decode_uint8(digits.tobytes(), MAX_BATCH)
    from_json = tensor_from_json(digits.tolist(), [3, 784], "UINT8", "input", MAX_BATCH)
    from_bytes = tensor_from_bytes(digits.tobytes(), [3, 28, 28], "UINT8", "input", MAX_BATCH)
    np.testing.assert_array_equal(from_json, expected)
    np.testing.assert_array_equal(from_bytes, expected)


def test_fp32_binary_is_little_endian_float32() -> None:
    pixels = (_digits(2).astype(np.float32) / 255).astype("<f4")
    np.testing.assert_array_equal(tensor_from_bytes(pixels.tobytes(), [2, 784], "FP32", "input", MAX_BATCH), pixels)


@pytest.mark.parametrize(
    ("data", "datatype", "match"),
    [
        ([2.0] * 784, "FP32", "look like 0-255 pixels: divide them by 255"),
        ([-0.5] * 784, "FP32", "must be in \\[0, 1\\]"),
        ([float("nan")] * 784, "FP32", "NaN or infinite"),
        (["0.5"] * 784, "FP32", "only numbers \\(got strings\\)"),
        ([True] * 784, "FP32", "only numbers \\(got booleans\\)"),
        ([[0.0] * 784, [0.0] * 783], "FP32", "rows differ in length"),
        ([0.0] * 783, "FP32", "holds 783 values but shape \\[1, 784\\] needs 784"),
        ({"a": 1}, "FP32", "must be a JSON array"),
        ([256] * 784, "UINT8", "must be in 0-255; got values from 256 to 256"),
        ([-1] * 784, "UINT8", "must be in 0-255"),
        ([1.5] * 784, "UINT8", "whole numbers 0-255"),
    ],
)
def test_tensor_from_json_rejects_unusable_values(data: Any, datatype: str, match: str) -> None:
    with _raises(422, match):
        tensor_from_json(data, [1, 784], datatype, "input", MAX_BATCH)


def test_tensor_from_bytes_checks_the_size_and_the_values() -> None:
    with _raises(422, "carries 783 bytes of binary data but a UINT8 tensor of shape \\[1, 784\\] is 784 bytes"):
        tensor_from_bytes(bytes(783), [1, 784], "UINT8", "input", MAX_BATCH)
    with _raises(422, "NaN or infinite"):
        tensor_from_bytes(np.full(784, np.nan, dtype="<f4").tobytes(), [1, 784], "FP32", "input", MAX_BATCH)


def test_split_bytes_elements_reads_what_tritonclient_writes() -> None:
    items = [b"", b"a", SEVEN_PNG, bytes(range(256))]
    raw = serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert split_bytes_elements(raw, "input") == items
    assert split_bytes_elements(b"", "input") == []


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x05\x00\x00\x00abc", "element 0 declares 5 bytes but only 3 remain"),
        (b"\x01\x00\x00\x00a\x02\x00", "truncated"),
    ],
)
def test_split_bytes_elements_rejects_broken_layouts(raw: bytes, match: str) -> None:
    with _raises(422, match):
        split_bytes_elements(raw, "input")


def test_image_elements_take_raw_images_and_base64_text_of_one() -> None:
    standard = base64.b64encode(SEVEN_PNG)
    url_safe_unpadded = base64.urlsafe_b64encode(TWO_PNG).rstrip(b"=")
    for items in ([SEVEN_PNG, TWO_PNG], [standard, url_safe_unpadded], [SEVEN_PNG, base64.encodebytes(TWO_PNG)]):
        assert image_elements(items, [2], "input", MAX_BATCH) == (SEVEN_PNG, TWO_PNG)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(SEVEN_PNG)).convert("RGB").save(jpeg, "JPEG")
    assert image_elements([base64.b64encode(jpeg.getvalue())], [1], "input", MAX_BATCH) == (jpeg.getvalue(),)


def test_image_elements_name_the_bad_element() -> None:
    with _raises(422, "'input' element 1 is neither a PNG, JPEG or WebP image nor base64 text of one"):
        image_elements([SEVEN_PNG, b"GIF89a...."], [2], "input", MAX_BATCH)
    with _raises(422, "'input' element 0 is neither a PNG, JPEG or WebP image nor base64 text of one"):
        image_elements([base64.b64encode(b"not a png")], [1], "input", MAX_BATCH)
    with _raises(422, "'input' element 0 is empty"):
        image_elements([b""], [1], "input", MAX_BATCH)
    with _raises(422, "holds 2 elements but shape \\[1\\] needs 1"):
        image_elements([SEVEN_PNG, TWO_PNG], [1], "input", MAX_BATCH)


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"  ", 400, "empty request body"),
        (b'{"inputs": [NaN]}', 422, "NaN and Infinity are not valid"),
        (b'{"inputs": ', 400, "malformed JSON"),
        (b"[1, 2]", 422, "expected a JSON object, got list"),
    ],
)
def test_load_json_object_errors(body: bytes, status: int, match: str) -> None:
    with _raises(status, match):
        load_json_object(body, "hint")


# --------------------------------------------------------------------------------------------
# app.v2_codec: metadata


def test_metadata_names_the_extensions_the_model_and_its_tensors() -> None:
    assert server_metadata()["extensions"] == ["binary_tensor_data", "classification"]
    meta = model_metadata(["a", "b"], "b")
    assert meta["name"] == "mnist"
    assert meta["versions"] == ["a", "b"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert meta["properties"]["serving_version"] == "b"
    assert all(isinstance(v, str) for v in meta["properties"].values())


# --------------------------------------------------------------------------------------------
# app.v2_codec: bodies


def test_split_body_uses_the_inference_header_length() -> None:
    assert split_body(b"{}abc", None) == (b"{}abc", b"")
    assert split_body(b"{}abc", "2") == (b"{}", b"abc")
    for bad in ("two", "1_0", "+1", "-1", ""):
        with _raises(400, "must be an integer"):
            split_body(b"{}", bad)
    with _raises(400, "is 9 but the body holds only 2 bytes"):
        split_body(b"{}", "9")


@pytest.mark.parametrize(
    ("encoding", "pack"), [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)]
)
def test_decompress_inflates_what_tritonclient_sends(encoding: str, pack: Any) -> None:
    body = b'{"inputs": []}' * 100
    assert decompress(pack(body), encoding, 10_000) == body
    assert decompress(body, None, 10_000) == body


def test_decompress_refuses_bombs_and_broken_bodies() -> None:
    bomb = gzip.compress(bytes(10_000_000))
    assert len(bomb) < 20_000
    with _raises(413, "inflates to over the limit of 1000000 bytes"):
        decompress(bomb, "gzip", 1_000_000)
    with _raises(400, "corrupt gzip body"):
        decompress(b"not gzip at all", "gzip", 1000)
    with _raises(400, "truncated deflate body"):
        decompress(zlib.compress(bytes(range(256)) * 10)[:-8], "deflate", 10_000)
    with _raises(400, "unsupported Content-Encoding 'br'"):
        decompress(b"x", "br", 1000)
    with _raises(400, "5 unexpected bytes after the end of the gzip stream"):
        decompress(gzip.compress(b"{}") + b"extra", "gzip", 1000)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(("datatype", "shape"), [("FP32", [3, 784]), ("UINT8", [3, 28, 28]), ("FP32", [3, 1, 28, 28])])
def test_parse_reads_tritonclient_requests(binary: bool, datatype: str, shape: list[int]) -> None:
    digits = _digits(3)
    array = (digits.astype(np.float32) / 255) if datatype == "FP32" else digits
    tensor = triton.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(array.reshape(shape), binary_data=binary)
    body, header_length = _client_body([tensor], request_id="req-1")
    assert (header_length is not None) == binary
    request = _parse(body, header_length)
    assert request.id == "req-1"
    assert request.datatype == datatype
    expected = decode_uint8(digits.tobytes(), MAX_BATCH) if datatype == "UINT8" else digits.astype(np.float32) / 255
    np.testing.assert_array_equal(request.x, expected)
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    assert request.outputs == (OutputRequest("probabilities", True), OutputRequest("label", True))


def test_parse_reads_tritonclient_png_bytes_tensors() -> None:
    tensor = triton.InferInput("input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([SEVEN_PNG, TWO_PNG], dtype=np.object_), binary_data=True)
    body, header_length = _client_body([tensor])
    request = _parse(body, header_length)
    assert request.x is None
    assert request.images == (SEVEN_PNG, TWO_PNG)  # decoded later, once their cost is checked
    # In JSON a PNG cannot be a string as it is; its base64 text can (tritonclient sends str elements).
    as_text = triton.InferInput("input", [2], "BYTES")
    as_text.set_data_from_numpy(
        np.array([base64.b64encode(SEVEN_PNG), base64.b64encode(TWO_PNG)], dtype=np.object_), binary_data=False
    )
    body, header_length = _client_body([as_text])
    assert header_length is None
    assert _parse(body).images == (SEVEN_PNG, TWO_PNG)


def test_parse_honours_output_selection_binary_flags_and_classification() -> None:
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 784), dtype=np.float32), binary_data=False)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3),
    ]
    body, _ = _client_body([tensor], outputs)
    assert _parse(body).outputs == (OutputRequest("label", False), OutputRequest("probabilities", True, 3))
    doc = {
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    }
    body = _json_request({"datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}, **doc)
    assert _parse(body).outputs == (OutputRequest("label", False),)


def test_parse_takes_binary_data_then_checks_every_byte_is_accounted_for() -> None:
    raw = _digits(1).tobytes()
    header = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "parameters": {"binary_data_size": 784}}]}
    )
    assert _parse(header + raw, str(len(header))).x.shape == (1, 784)
    with _raises(400, "carries 785 bytes after the JSON header but the inputs' binary_data_size accounts for 784"):
        _parse(header + raw + b"x", str(len(header)))
    with _raises(400, "declares binary_data_size 784 but only 10 bytes follow"):
        _parse(header + raw[:10], str(len(header)))
    with _raises(400, "malformed JSON"):
        _parse(header + raw, None)


FP32_ONE = {"datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}


@pytest.mark.parametrize(
    ("doc", "status", "match"),
    [
        ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
        ({"id": "x"}, 400, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "input", **FP32_ONE}] * 2}, 400, "takes exactly one input, 'input'; got 2"),
        ({"inputs": [{"name": "pixels", **FP32_ONE}]}, 400, "unexpected input 'pixels'.*only input is 'input'"),
        ({"inputs": [{"name": "input", **FP32_ONE, "datatype": "FP64"}]}, 400, "datatype 'FP64' is not accepted"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784]}]}, 400, "neither 'data' nor"),
        (
            {"inputs": [{"name": "input", **FP32_ONE, "parameters": {"binary_data_size": 0}}]},
            400,
            "both 'data' and 'binary_data_size'",
        ),
        (
            {"inputs": [{"name": "input", **FP32_ONE, "parameters": {"shared_memory_region": "r"}}]},
            400,
            "shared-memory extension is not supported",
        ),
        ({"inputs": [{"name": "input", **FP32_ONE}], "id": 42}, 400, "'id' must be a string"),
        ({"inputs": [{"name": "input", **FP32_ONE}], "parameters": []}, 400, "'parameters' of the request must be"),
        (
            {"inputs": [{"name": "input", **FP32_ONE}], "parameters": {"binary_data_output": "yes"}},
            400,
            "'binary_data_output' of the request must be true or false",
        ),
        ({"inputs": [{"name": "input", **FP32_ONE}], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ({"inputs": [{"name": "input", **FP32_ONE}], "outputs": [{"name": "label"}] * 2}, 400, "requested twice"),
        ({"inputs": [{"name": "input", **FP32_ONE}], "outputs": "label"}, 400, "'outputs' must be a list"),
        (
            {
                "inputs": [{"name": "input", **FP32_ONE}],
                "outputs": [{"name": "label", "parameters": {"classification": 1}}],
            },
            400,
            "applies to the 'probabilities' output, not 'label'",
        ),
        (
            {
                "inputs": [{"name": "input", **FP32_ONE}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}],
            },
            400,
            "must be an integer from 1 to 10, got 11",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [7]}]},
            400,
            "element 0 must be a string \\(base64 of a PNG, JPEG or WebP image\\), got int",
        ),
        ({"inputs": [{"name": "input", **FP32_ONE, "shape": [1, 783]}]}, 422, "got \\[1, 783\\]"),
    ],
)
def test_parse_rejects_requests_it_cannot_use(doc: dict[str, Any], status: int, match: str) -> None:
    with _raises(status, match):
        _parse(orjson.dumps(doc))


PROBS = np.array(
    [
        [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.5, 0.12, 0.1],
        [0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.02, 0.01, 0.01],
    ],
    dtype=np.float32,
)


def _request(*outputs: OutputRequest, request_id: str | None = "r") -> InferRequest:
    return InferRequest(id=request_id, x=np.zeros((2, 784), np.float32), images=(), datatype="FP32", outputs=outputs)


def test_encode_json_response() -> None:
    body, header_length = encode_infer_response(
        PROBS, _request(OutputRequest("probabilities", False), OutputRequest("label", False)), "v1"
    )
    assert header_length is None
    doc = orjson.loads(body)
    assert doc["model_name"] == "mnist"
    assert doc["model_version"] == "v1"
    assert doc["id"] == "r"
    probs, label = doc["outputs"]
    # float32 written in its shortest form: it reads back to the very same float32 values.
    np.testing.assert_array_equal(np.array(probs.pop("data"), dtype=np.float32), PROBS.reshape(-1))
    assert probs == {"name": "probabilities", "datatype": "FP32", "shape": [2, 10]}
    assert label == {"name": "label", "datatype": "INT64", "shape": [2], "data": [7, 0]}
    no_id, _ = encode_infer_response(PROBS, _request(OutputRequest("label", False), request_id=None), "v1")
    assert "id" not in orjson.loads(no_id)


def test_encode_binary_response_reads_back_through_tritonclient() -> None:
    outputs = (
        OutputRequest("label", True),
        OutputRequest("probabilities", False),
        OutputRequest("probabilities", True, 2),
    )
    body, header_length = encode_infer_response(PROBS, _request(*outputs[:2]), "v1")
    assert header_length is not None
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("label"), [7, 0])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), PROBS)
    assert result.get_output("label")["parameters"] == {"binary_data_size": 16}

    body, header_length = encode_infer_response(PROBS, _request(OutputRequest("label", True), outputs[2]), "v1")
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("label"), [7, 0])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    assert top.tolist() == [[b"0.5:7", b"0.12:8"], [b"0.9:0", b"0.02:7"]]


def test_classification_in_json_is_sorted_value_index_strings() -> None:
    body, _ = encode_infer_response(PROBS, _request(OutputRequest("probabilities", False, 3)), "v1")
    (output,) = orjson.loads(body)["outputs"]
    assert output == {
        "name": "probabilities",
        "datatype": "BYTES",
        "shape": [2, 3],
        "data": ["0.5:7", "0.12:8", "0.1:9", "0.9:0", "0.02:7", "0.01:1"],
    }
