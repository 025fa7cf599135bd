"""The Open Inference Protocol (KServe v2) on the wire: request bodies in, response bodies out.

Pure functions, no FastAPI and no torch, so every protocol rule is unit-tested without a server;
:func:`infer_job` packages a request for the pipeline (app.serving).
Turning tensor data into model input is left to :mod:`app.decode` (one set of value rules and
limits for ``/predict`` and ``/v2``); this module handles the protocol's own structure:

* the inference request object: ``id``, ``inputs`` (one, named ``input``), ``outputs`` and their
  parameters, and the request-level ``binary_data_output``;
* the binary tensor data extension: a JSON header of ``Inference-Header-Content-Length`` bytes
  followed by each binary tensor in order, sized by its ``binary_data_size`` parameter, for
  requests and responses (Triton's ``docs/protocol/extension_binary_data.md``);
* the classification extension: ``"classification": k`` on the ``probabilities`` output returns
  a BYTES ``[N, k]`` tensor of ``"<probability>:<digit>"`` strings, most probable first;
* ``Content-Encoding: gzip`` / ``deflate`` request bodies (tritonclient's
  ``request_compression_algorithm``), inflated under the same size limit as plain bodies.

Every rejection is an :class:`~app.errors.InputError`; the router answers it as ``{"error": ...}``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app import __version__, image
from app.decode import (
    check_value_count,
    image_elements,
    load_json_numbers,
    only_numbers_besides,
    split_bytes_elements,
    tensor_from_bytes,
    tensor_from_json,
)
from app.errors import InputError
from app.serving import INLINE_BYTES, INLINE_PIXELS, Answer, Budgets, Decoded, Job

__all__ = [
    "EXTENSIONS",
    "INPUT_NAME",
    "MODEL_NAME",
    "OUTPUTS",
    "PLATFORM",
    "InferRequest",
    "OutputRequest",
    "decompress",
    "encode_infer_response",
    "infer_job",
    "model_metadata",
    "parse_infer_request",
    "server_metadata",
    "split_body",
]

MODEL_NAME = "mnist"
SERVER_NAME = "mnist-serve"
# The protocol's platform names are "<project>_<format>": eager PyTorch rebuilt from a state dict.
PLATFORM = "pytorch_statedict"
EXTENSIONS = ("binary_tensor_data", "classification")
INPUT_NAME = "input"
ACCEPTED_DATATYPES = ("FP32", "UINT8", "BYTES")
# Output name -> (datatype, shape with -1 for the batch dimension).
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "probabilities": ("FP32", [-1, 10]),
    "label": ("INT64", [-1]),
}
CLASSES = 10
INPUT_FORMS = (
    "FP32 [N,784], [N,28,28] or [N,1,28,28] in [0,1]; UINT8 with the same shapes in 0-255; "
    "BYTES [N] of PNG images (raw in binary data, base64 text in JSON)"
)
_HINT = 'send {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [784 numbers in 0..1]}]}'


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int | None = None


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request: the model input and how to answer.

    FP32 and UINT8 tensors arrive decoded, as ``x`` (float32 ``[N, 784]``); a BYTES tensor's
    images arrive as ``images`` (raw PNG, JPEG or WebP bytes, not decoded yet), so that their
    cost can be checked before any of them is decoded.
    """

    id: str | None
    x: np.ndarray | None
    images: tuple[bytes, ...]
    datatype: str
    outputs: tuple[OutputRequest, ...]


# --------------------------------------------------------------------------------------------
# Metadata


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(versions: list[str], served_version: str) -> dict[str, Any]:
    """Model metadata; ``properties`` (string values, as the OpenAPI document allows) say what is served."""
    return {
        "name": MODEL_NAME,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [{"name": name, "datatype": dtype, "shape": shape} for name, (dtype, shape) in OUTPUTS.items()],
        "properties": {"serving_version": served_version, "accepted_inputs": INPUT_FORMS},
    }


# --------------------------------------------------------------------------------------------
# Requests


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Inflate a ``gzip`` or ``deflate`` body, refusing with 413 once it passes ``limit`` bytes."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise InputError(400, f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or an uncompressed body")
    # wbits: 16+ reads the gzip wrapper, the positive value the zlib wrapper that "deflate" means in HTTP.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)  # max_length bounds memory: a zip bomb stops here
    except zlib.error as exc:
        raise InputError(400, f"corrupt {name} body ({exc})") from None
    if len(out) > limit:
        raise InputError(413, f"request body inflates to over the limit of {limit} bytes")
    if not inflater.eof:
        raise InputError(400, f"truncated {name} body")
    if inflater.unused_data:
        raise InputError(400, f"{len(inflater.unused_data)} unexpected bytes after the end of the {name} stream")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):  # int() would also take "1_0", "+5" or "٣"
        raise InputError(400, f"Inference-Header-Content-Length must be an integer, got {header_length!r}")
    size = int(text)
    if not 0 <= size <= len(body):
        raise InputError(400, f"Inference-Header-Content-Length is {size} but the body holds only {len(body)} bytes")
    return body[:size], body[size:]


def parse_infer_request(body: bytes, header_length: str | None, max_batch: int, max_json_bytes: int) -> InferRequest:
    """An inference request body (JSON, optionally followed by binary tensors) to :class:`InferRequest`."""
    header, binary = split_body(body, header_length)
    if len(header) > max_json_bytes:
        raise InputError(
            413,
            f"the JSON part of the request is {len(header)} bytes, over the limit of {max_json_bytes}: send big "
            "tensors as binary data (the binary tensor data extension)",
        )
    check_value_count(header, max_batch)
    doc = load_json_numbers(header, _HINT)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError(400, f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(doc, "the request")
    binary_default = _flag(parameters, "binary_data_output", "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError(400, f"'inputs' must be a non-empty list of tensors: {_HINT}")
    if len(inputs) != 1:
        raise InputError(400, f"model '{MODEL_NAME}' takes exactly one input, '{INPUT_NAME}'; got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise InputError(400, f"each input must be a JSON object: {_HINT}")
    x, images, datatype, used = _input_array(tensor, binary, max_batch, header, doc)
    if used != len(binary):
        raise InputError(
            400,
            f"the body carries {len(binary)} bytes after the JSON header but the inputs' binary_data_size "
            f"accounts for {used}",
        )
    outputs = _outputs(doc.get("outputs"), binary_default)
    return InferRequest(id=request_id, x=x, images=images, datatype=datatype, outputs=outputs)


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InputError(400, f"'parameters' of {where} must be a JSON object")
    return parameters


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InputError(400, f"parameter '{name}' of {where} must be true or false, got {value!r}")
    return value


def _input_array(
    tensor: dict[str, Any], binary: bytes, max_batch: int, header: bytes, doc: dict[str, Any]
) -> tuple[np.ndarray | None, tuple[bytes, ...], str, int]:
    """The input tensor as rows (or undecoded images); also returns how many binary bytes it used."""
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise InputError(400, f"unexpected input {name!r} for model '{MODEL_NAME}': its only input is '{INPUT_NAME}'")
    datatype = tensor.get("datatype")
    if datatype not in ACCEPTED_DATATYPES:
        raise InputError(
            400, f"input '{INPUT_NAME}' datatype {datatype!r} is not accepted: send {', '.join(ACCEPTED_DATATYPES)}"
        )
    shape = tensor.get("shape")
    parameters = _parameters(tensor, f"input '{INPUT_NAME}'")
    if "shared_memory_region" in parameters:
        raise InputError(400, "the shared-memory extension is not supported: send the data in the request body")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise InputError(400, f"input '{INPUT_NAME}' has neither 'data' nor a 'binary_data_size' parameter")
        data = tensor["data"]
        if datatype == "BYTES":
            items = [_json_element(item, index) for index, item in enumerate(_flatten(data))]
            return None, image_elements(items, shape, INPUT_NAME, max_batch), datatype, 0
        # Data read straight into an array holds only numbers. Else, the document with this tensor's
        # data emptied: if the header is that plus numbers only, the per-element type walk can be skipped.
        checked = type(data) is np.ndarray or only_numbers_besides(header, {**doc, "inputs": [{**tensor, "data": []}]})
        return tensor_from_json(data, shape, datatype, INPUT_NAME, max_batch, checked), (), datatype, 0
    if "data" in tensor:
        raise InputError(400, f"input '{INPUT_NAME}' has both 'data' and 'binary_data_size': send one of them")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError(400, f"binary_data_size of input '{INPUT_NAME}' must be a non-negative integer, got {size!r}")
    if size > len(binary):
        raise InputError(
            400,
            f"input '{INPUT_NAME}' declares binary_data_size {size} but only {len(binary)} bytes follow the JSON "
            "header (is Inference-Header-Content-Length right?)",
        )
    raw = binary[:size]
    if datatype == "BYTES":
        items = split_bytes_elements(raw, INPUT_NAME)
        return None, image_elements(items, shape, INPUT_NAME, max_batch), datatype, size
    return tensor_from_bytes(raw, shape, datatype, INPUT_NAME, max_batch), (), datatype, size


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of a flat or nested JSON array (no numpy: strings would be padded to the longest)."""
    if not isinstance(data, list):
        raise InputError(400, f"input '{INPUT_NAME}' data must be a JSON array")
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_element(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise InputError(
            400,
            f"input '{INPUT_NAME}' element {index} must be a string (base64 of a PNG, JPEG or WebP image), "
            f"got {type(item).__name__}",
        )
    return item.encode("utf-8")


def _outputs(requested: Any, binary_default: bool) -> tuple[OutputRequest, ...]:
    if requested is None:
        return tuple(OutputRequest(name, binary_default) for name in OUTPUTS)
    if not isinstance(requested, list):
        raise InputError(400, "'outputs' must be a list of {\"name\": ...} objects")
    chosen: list[OutputRequest] = []
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(400, "each requested output must be an object with a 'name'")
        name = entry["name"]
        if name not in OUTPUTS:
            raise InputError(
                400, f"unknown output {name!r} for model '{MODEL_NAME}': it produces {', '.join(map(repr, OUTPUTS))}"
            )
        if any(c.name == name for c in chosen):
            raise InputError(400, f"output {name!r} is requested twice")
        where = f"output {name!r}"
        parameters = _parameters(entry, where)
        binary = _flag(parameters, "binary_data", where) if "binary_data" in parameters else binary_default
        chosen.append(OutputRequest(name, binary, _classification(parameters, name)))
    return tuple(chosen)


def _classification(parameters: dict[str, Any], name: str) -> int | None:
    count = parameters.get("classification")
    if count is None:
        return None
    if name != "probabilities":
        raise InputError(400, f"'classification' applies to the 'probabilities' output, not {name!r}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= CLASSES:
        raise InputError(400, f"'classification' must be an integer from 1 to {CLASSES}, got {count!r}")
    return count


# --------------------------------------------------------------------------------------------
# The request as the pipeline's job


def _rows(request: InferRequest, budgets: Budgets) -> np.ndarray:
    if request.x is not None:
        return request.x
    rows = []
    for index, data in enumerate(request.images):
        try:
            rows.append(image.to_model_input(data, max_pixels=budgets.max_image_pixels))
        except InputError as exc:
            raise InputError(exc.status_code, f"'{INPUT_NAME}' element {index}: {exc.detail}") from None
    return np.concatenate(rows)


def _decoded(request: InferRequest, budgets: Budgets, version: str) -> Decoded:
    x = _rows(request, budgets)

    def encode(probs: np.ndarray) -> Answer:
        payload, json_size = encode_infer_response(probs, request, version)
        kind = f"v2_{request.datatype.lower()}"
        if json_size is None:
            return Answer(payload, kind, len(probs))
        header = (("inference-header-content-length", str(json_size)),)
        return Answer(payload, kind, len(probs), "application/octet-stream", header)

    return x, encode


def infer_job(body: bytes, header_length: str | None, encoding: str | None, budgets: Budgets, version: str) -> Job:
    """An inference request body as the pipeline's :class:`~app.serving.Job`, its cost checked first.

    A small uncompressed body is parsed here (its images only probed); a compressed or large one
    is inflated and parsed in the job, off the event loop.
    """

    def parse(raw: bytes) -> tuple[InferRequest, int]:
        """The request and the pixels its images decode to (their headers checked against the budgets)."""
        request = parse_infer_request(raw, header_length, budgets.max_batch, budgets.max_json_bytes)
        pixels = budgets.check_images(list(request.images), where=f"input '{INPUT_NAME}' ") if request.images else 0
        return request, pixels

    if (encoding or "identity").strip().lower() != "identity" or len(body) > INLINE_BYTES:
        # Inflating and parsing cost what the body holds, not what it measures: all in a thread.
        def decode_all() -> Decoded:
            request, _ = parse(decompress(body, encoding, budgets.max_body_bytes))
            return _decoded(request, budgets, version)

        return Job(decode_all, inline=False)
    request, pixels = parse(body)
    return Job(lambda: _decoded(request, budgets, version), inline=pixels <= INLINE_PIXELS)


# --------------------------------------------------------------------------------------------
# Responses


def encode_infer_response(probs: np.ndarray, request: InferRequest, version: str) -> tuple[bytes, int | None]:
    """The response body and, when binary tensors follow the JSON, the JSON header's length."""
    n = len(probs)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in request.outputs:
        datatype, shape, values = _output_tensor(probs, output)
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": [n, *shape[1:]]}
        if output.binary:
            blob = _to_bytes(values, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.reshape(-1) if isinstance(values, np.ndarray) else values
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _output_tensor(probs: np.ndarray, output: OutputRequest) -> tuple[str, list[int], np.ndarray | list[str]]:
    if output.classification is not None:
        k = output.classification
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        strings = [f"{str(probs[row, i])}:{i}" for row in range(len(probs)) for i in order[row]]
        return "BYTES", [-1, k], strings
    if output.name == "label":
        return "INT64", [-1], probs.argmax(axis=1).astype(np.int64)
    return "FP32", [-1, CLASSES], np.ascontiguousarray(probs, dtype=np.float32)


def _to_bytes(values: np.ndarray | list[str], datatype: str) -> bytes:
    if isinstance(values, list):  # BYTES: each element a 4-byte little-endian length, then its bytes
        encoded = [v.encode() for v in values]
        return b"".join(len(e).to_bytes(4, "little") + e for e in encoded)
    return values.astype("<f4" if datatype == "FP32" else "<i8", copy=False).tobytes()
