"""What the bench sends: real MNIST test digits, in every form a server under test accepts.

A :class:`Workload` is one input (one vector, a batch of 1,000, a 28x28 PNG...). A
:class:`Request` is that input in one protocol (``/predict`` JSON, v2 JSON, the v2 binary
extension, a raw image body...): the servers module gives each server the requests it speaks, and
the table names the protocol of every cell. :func:`probabilities` reads any answer back into
``[N, 10]`` probabilities, which is how every server is checked before it is timed.

Nothing here imports torch or the service: the bodies are built with numpy, Pillow and orjson.
"""

from __future__ import annotations

import base64
import gzip
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "ten_digits.u8"
BULK = 10_000  # images in the uint8 batch
BATCH = 1_000  # images in the JSON / v2 binary batch
PHONE_SIZE = (4032, 3024)  # a 12-megapixel phone photo, landscape


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 [N, 28, 28], white digit on black
    labels: np.ndarray  # int [N], MNIST's labels (None-free)
    source: str


def load_digits(data_dir: Path, count: int = BULK) -> Digits:
    """The first ``count`` MNIST test digits from ``<data_dir>/MNIST/raw`` (the IDX files, gzipped or not).

    Without them, the ten committed fixture digits repeated, labelled 0-9 in order (the fixture's
    order), so that a machine without the data set can still run the harness.
    """
    raw = data_dir / "MNIST" / "raw"
    try:
        images = _idx(raw / "t10k-images-idx3-ubyte")[:count]
        labels = _idx(raw / "t10k-labels-idx1-ubyte")[:count]
        return Digits(images, labels.astype(np.int64), f"MNIST test set ({raw})")
    except OSError as exc:
        ten = np.frombuffer(FIXTURE.read_bytes(), dtype=np.uint8).reshape(10, 28, 28)
        source = f"{FIXTURE.relative_to(ROOT)} repeated (MNIST not available: {exc})"
        return Digits(np.resize(ten, (count, 28, 28)), np.resize(np.arange(10), count), source)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian header of dimensions, then uint8 data)."""
    data = gzip.decompress(path.with_suffix(".gz").read_bytes()) if not path.exists() else path.read_bytes()
    _, _, dtype, dims = struct.unpack(">BBBB", data[:4])
    if dtype != 0x08:
        raise OSError(f"{path}: not a uint8 IDX file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


# --------------------------------------------------------------------------------------------
# Images


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def drawn(digit: np.ndarray, size: int = 280) -> Image.Image:
    """The digit as a drawing pad sends it: dark ink on white paper, RGB, ``size`` pixels square."""
    ink = Image.fromarray(digit, mode="L").resize((size * 5 // 7, size * 5 // 7), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(ink, (size // 7, size // 7))
    paper = 255 - np.asarray(canvas)
    return Image.fromarray(np.stack([paper] * 3, axis=-1), mode="RGB")


def phone_photo(digit: np.ndarray, seed: int = 0) -> Image.Image:
    """A 12-megapixel photo of the digit on paper: uneven light, a warm cast, sensor noise."""
    width, height = PHONE_SIZE
    rng = np.random.default_rng(seed)
    side = height * 2 // 3
    ink = np.asarray(Image.fromarray(digit, mode="L").resize((side, side), Image.Resampling.BICUBIC), np.float32)
    # The page: brighter towards the top left, a little warm, written on where the digit is.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 200 + 40 * (1 - (xx / width + yy / height) / 2)
    page = np.repeat(light[..., None], 3, axis=2) * np.array([1.0, 0.97, 0.9], np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    page[top : top + side, left : left + side] *= (1 - 0.85 * ink / 255)[..., None]
    page += rng.normal(0, 4, page.shape).astype(np.float32)
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------
# Workloads and the requests that carry them


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    rows: np.ndarray  # uint8 [N, 784]: the images, as pixels
    labels: np.ndarray  # MNIST's labels of those images
    images: tuple[bytes, ...] = ()  # the same images as encoded files, for image workloads
    timeout_s: int = 10

    @property
    def items(self) -> int:
        return len(self.rows)

    @property
    def batch(self) -> bool:
        return self.items > 1


@dataclass(frozen=True)
class Request:
    """One workload in one protocol: what wrk posts, and how the answer reads back."""

    protocol: str  # for the table: "/predict JSON", "v2 JSON", "v2 binary FP32", ...
    path: str
    content_type: str
    body: bytes
    answer: str  # "predict" (the service's JSON), "v2" (JSON and binary tensors) or "f32" (raw <f4)
    headers: Mapping[str, str] = field(default_factory=dict)

    def all_headers(self) -> dict[str, str]:
        return {"content-type": self.content_type, **self.headers}


def make_workloads(digits: Digits) -> list[Workload]:
    images, labels = digits.images, digits.labels
    one = images[0]
    flat = images.reshape(-1, 784)
    return [
        Workload("vector", "one vector", flat[:1], labels[:1]),
        Workload("batch1000", f"batch of {BATCH:,}", flat[:BATCH], labels[:BATCH], timeout_s=120),
        Workload("png28", "one 28x28 PNG", flat[:1], labels[:1], (png(Image.fromarray(one, mode="L")),)),
        Workload("png280", "one 280x280 RGB PNG", flat[:1], labels[:1], (png(drawn(one)),)),
        Workload("jpeg280", "one 280x280 JPEG", flat[:1], labels[:1], (jpeg(drawn(one)),)),
        Workload("phone", "one 12 MP phone JPEG", flat[:1], labels[:1], (jpeg(phone_photo(one)),), timeout_s=30),
        Workload("u8", f"uint8 batch of {min(BULK, len(flat)):,}", flat[:BULK], labels[:BULK], timeout_s=120),
    ]


def floats(workload: Workload) -> np.ndarray:
    """The rows as a Python client sends them: float64 pixels in [0, 1]."""
    return workload.rows.astype(np.float64) / 255


def predict_json(workload: Workload, path: str = "/predict") -> Request:
    """``{"pixels": [...]}`` for one image, ``{"instances": [[...], ...]}`` for a batch."""
    x = floats(workload)
    doc = {"instances": x.tolist()} if workload.batch else {"pixels": x[0].tolist()}
    return Request("/predict JSON", path, "application/json", orjson.dumps(doc), "predict")


def v2_json(workload: Workload, model: str = "mnist") -> Request:
    """An Open Inference Protocol request, the tensor as JSON numbers."""
    x = floats(workload)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    return Request("v2 JSON", f"/v2/models/{model}/infer", "application/json", orjson.dumps(doc), "v2")


def v2_binary(workload: Workload, model: str = "mnist") -> Request:
    """The v2 binary tensor data extension: FP32 rows in, the probabilities back as raw FP32."""
    x = (workload.rows.astype(np.float32) / 255).astype("<f4")
    data = x.tobytes()
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": len(data)}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    return _binary("v2 binary FP32", model, header, data)


def v2_png_binary(workload: Workload, model: str = "mnist", shape: tuple[int, ...] | None = None) -> Request:
    """PNG files as a v2 BYTES tensor in binary data (each element: a 4-byte length, then the bytes)."""
    data = b"".join(struct.pack("<I", len(item)) + item for item in workload.images)
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "BYTES",
                "shape": list(shape or (len(workload.images),)),
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    return _binary("v2 BYTES PNG, binary", model, header, data)


def v2_png_base64(workload: Workload, model: str = "mnist") -> Request:
    """PNG files as a v2 BYTES tensor in JSON, base64 text (MLServer's ``content_type: base64``)."""
    items = [base64.b64encode(item).decode() for item in workload.images]
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": "BYTES",
                "shape": [len(items)],
                "parameters": {"content_type": "base64"},
                "data": items,
            }
        ]
    }
    return Request(
        "v2 JSON, BYTES PNG base64", f"/v2/models/{model}/infer", "application/json", orjson.dumps(doc), "v2"
    )


def _binary(protocol: str, model: str, header: Mapping[str, object], data: bytes) -> Request:
    head = orjson.dumps(header)
    return Request(
        protocol,
        f"/v2/models/{model}/infer",
        "application/octet-stream",
        head + data,
        "v2",
        {"inference-header-content-length": str(len(head))},
    )


def image_body(workload: Workload, content_type: str) -> Request:
    """The image file itself as the request body (``/predict`` with an image Content-Type)."""
    return Request(content_type, "/predict", content_type, workload.images[0], "predict")


def uint8_body(workload: Workload, binary_answer: bool = False) -> Request:
    """Raw uint8 pixels, 784 bytes an image; with ``binary_answer``, ``Accept: application/octet-stream``."""
    body = workload.rows.tobytes()
    if binary_answer:
        headers = {"accept": "application/octet-stream"}
        return Request("uint8, binary answer", "/predict", "application/octet-stream", body, "f32", headers)
    return Request("uint8, JSON answer", "/predict", "application/octet-stream", body, "predict")


def npy_body(workload: Workload) -> Request:
    buffer = io.BytesIO()
    np.save(buffer, workload.rows)
    return Request(".npy, JSON answer", "/predict", "application/x-npy", buffer.getvalue(), "predict")


# --------------------------------------------------------------------------------------------
# Answers


def probabilities(request: Request, headers: Mapping[str, str], body: bytes) -> np.ndarray:
    """Any server's answer to ``request`` as float64 ``[N, 10]`` probabilities.

    Raises ValueError when the answer does not carry them in the form the protocol promises.
    """
    if request.answer == "f32":
        return np.frombuffer(body, dtype="<f4").reshape(-1, 10).astype(np.float64)
    if request.answer == "v2":
        return _v2_probabilities(headers, body)
    doc = orjson.loads(body)
    entries = doc["predictions"] if "predictions" in doc else [doc]
    return np.array([entry["probabilities"] for entry in entries], dtype=np.float64).reshape(-1, 10)


def _v2_probabilities(headers: Mapping[str, str], body: bytes) -> np.ndarray:
    size = headers.get("inference-header-content-length")
    head, binary = (body[: int(size)], body[int(size) :]) if size else (body, b"")
    doc = orjson.loads(head)
    offset = 0
    for output in doc["outputs"]:
        length = (output.get("parameters") or {}).get("binary_data_size")
        if output["name"] == "probabilities":
            if length is not None:
                values = np.frombuffer(binary[offset : offset + length], dtype="<f4")
            else:
                values = np.asarray(output["data"], dtype=np.float64)
            return values.astype(np.float64).reshape(-1, 10)
        offset += length or 0
    raise ValueError(f"no 'probabilities' output in {[o.get('name') for o in doc['outputs']]}")
