"""/predict, health and metadata in-process (TestClient runs the lifespan)."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.helpers import png_bytes

FIXTURES = Path(__file__).parent / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
SEVEN_PIXELS = orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"]


@pytest.fixture
def settings(models_dir: Path) -> Settings:
    return Settings(model_dir=models_dir, reload_interval=0, max_body_bytes=2_000_000, max_batch_size=64)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _post(client: TestClient, body: bytes, content_type: str | None, **kwargs: object):  # noqa: ANN202
    headers = {"content-type": content_type} if content_type else {}
    return client.post("/predict", content=body, headers=headers, **kwargs)  # type: ignore[arg-type]


def _check_prediction(entry: dict, version: str) -> None:
    probs = entry["probabilities"]
    assert len(probs) == 10
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert entry["label"] == int(np.argmax(probs))
    assert entry["model_version"] == version


def _version(client: TestClient) -> str:
    return client.get("/model").json()["version"]


# -- every input form --------------------------------------------------------------------------


def test_json_vector(client: TestClient) -> None:
    response = _post(client, orjson.dumps({"pixels": SEVEN_PIXELS}), "application/json")
    assert response.status_code == 200
    body = response.json()
    _check_prediction(body, _version(client))
    assert body["label"] == 7
    assert "top_k" not in body
    assert response.headers["x-model-version"] == body["model_version"]


def test_json_rows_of_28(client: TestClient) -> None:
    rows = np.asarray(SEVEN_PIXELS).reshape(28, 28).tolist()
    response = _post(client, orjson.dumps({"pixels": rows}), "application/json; charset=utf-8")
    assert response.status_code == 200
    assert response.json()["label"] == 7


def test_json_batch(client: TestClient) -> None:
    blank = [0.0] * 784
    response = _post(client, orjson.dumps({"instances": [SEVEN_PIXELS, blank, SEVEN_PIXELS]}), "application/json")
    assert response.status_code == 200
    body = response.json()
    assert len(body["predictions"]) == 3
    for entry in body["predictions"]:
        _check_prediction(entry, body["model_version"])
    assert body["predictions"][0] == body["predictions"][2]
    assert body["predictions"][0]["label"] == 7


def test_png_body_and_multipart_agree(client: TestClient) -> None:
    raw = _post(client, SEVEN_PNG, "image/png")
    assert raw.status_code == 200
    _check_prediction(raw.json(), _version(client))
    assert raw.json()["label"] == 7
    form = client.post("/predict", files={"file": ("seven.png", SEVEN_PNG, "image/png")})
    assert form.status_code == 200
    assert form.json() == raw.json()


def test_uint8_and_npy_batches(client: TestClient) -> None:
    seven = (np.asarray(SEVEN_PIXELS) * 255).round().astype(np.uint8)
    batch = np.stack([seven, seven])
    raw = _post(client, batch.tobytes(), "application/octet-stream")
    assert raw.status_code == 200
    assert [p["label"] for p in raw.json()["predictions"]] == [7, 7]
    buffer = io.BytesIO()
    np.save(buffer, batch.reshape(2, 28, 28))
    npy = _post(client, buffer.getvalue(), "application/x-npy")
    assert npy.status_code == 200
    assert npy.json() == raw.json()


def test_top_k(client: TestClient) -> None:
    response = _post(client, SEVEN_PNG, "image/png", params={"top_k": 3})
    assert response.status_code == 200
    body = response.json()
    top = body["top_k"]
    assert [pair["label"] for pair in top][0] == body["label"]
    assert len(top) == 3
    probs = [pair["probability"] for pair in top]
    assert probs == sorted(probs, reverse=True)
    assert probs[0] == pytest.approx(body["probabilities"][body["label"]])
    for bad in ("0", "11", "x"):
        response = _post(client, SEVEN_PNG, "image/png", params={"top_k": bad})
        assert response.status_code == 422
        assert "top_k" in response.json()["detail"]


# -- health and metadata -----------------------------------------------------------------------


def test_health_and_model(client: TestClient, models_dir: Path) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    info = client.get("/model").json()
    assert ready.json()["model_version"] == info["version"]
    assert info["architecture"] == {"name": "MLP", "in_features": 784, "hidden": 256, "num_classes": 10}
    assert info["test_accuracy"] >= 0.98
    assert info["device"] == "cpu"
    assert len(info["sha256"]) == 64
    assert info["loaded_at"]
    assert info["last_reload_error"] is None
    assert info["available_versions"] == [info["version"]]
    assert [w["pid"] for w in info["workers"]] == [info["pid"]]


def test_not_ready_without_a_model(client: TestClient) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    served, store.current = store.current, None
    try:
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200
        assert _post(client, SEVEN_PNG, "image/png").status_code == 503
    finally:
        store.current = served


def test_openapi_documents_every_input_form(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(content) >= {"application/json", "image/png", "multipart/form-data", "application/octet-stream"}
    assert content["application/json"]["examples"]
    assert client.get("/docs").status_code == 200


# -- bad input: a clear 4xx each, and the server keeps serving ---------------------------------


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


BAD_REQUESTS = [
    ("wrong length", orjson.dumps({"pixels": [0.5] * 783}), "application/json", 422, "got shape [783]"),
    ("wrong shape", orjson.dumps({"pixels": [[0.5] * 28] * 27}), "application/json", 422, "28 rows of 28"),
    ("NaN", b'{"pixels": [NaN' + b", 0" * 783 + b"]}", "application/json", 422, "NaN"),
    ("Infinity", b'{"pixels": [Infinity' + b", 0" * 783 + b"]}", "application/json", 422, "Infinity"),
    ("non-numbers", orjson.dumps({"pixels": ["a"] * 784}), "application/json", 422, "only numbers"),
    ("out of range", orjson.dumps({"pixels": [200.0] * 784}), "application/json", 422, "divide them by 255"),
    ("empty body", b"", "application/json", 400, "empty request body"),
    ("malformed JSON", b'{"pixels": [0.1,', "application/json", 400, "malformed JSON"),
    ("unknown field", orjson.dumps({"pixels": [0.0] * 784, "colour": "red"}), "application/json", 422, "'colour'"),
    ("batch over max", orjson.dumps({"instances": [[0.0] * 784] * 65}), "application/json", 413, "maximum of 64"),
    ("wrong content type", b"hello", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
    ("missing content type", SEVEN_PNG, None, 415, "missing Content-Type"),
    ("not an image we take", b"GIF89a" + b"\0" * 64, "image/png", 415, "not a PNG, JPEG or WebP image"),
    ("truncated PNG", SEVEN_PNG[: len(SEVEN_PNG) // 2], "image/png", 422, "truncated"),
    ("corrupt PNG", SEVEN_PNG[:50] + b"\0" * 200 + SEVEN_PNG[250:], "image/png", 422, "corrupt"),
    ("blank PNG", png_bytes(Image.new("RGB", (64, 64), "white")), "image/png", 422, "blank"),
    ("decompression bomb", _bomb(), "image/png", 413, "50000x50000"),
    ("empty PNG body", b"", "image/png", 400, "empty request body"),
    ("bad uint8 length", b"\0" * 1000, "application/octet-stream", 422, "784-byte images"),
    ("bad npy", b"\x93NUMPY garbage", "application/x-npy", 422, ".npy"),
    (
        "multipart without file",
        b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        422,
        "field named 'file'",
    ),
    ("malformed multipart", b"garbage", "multipart/form-data", 400, "multipart"),
]


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "message"), BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_input(
    client: TestClient, name: str, body: bytes, content_type: str | None, status: int, message: str
) -> None:
    response = _post(client, body, content_type)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["detail"]
    # ...and the next good request is served normally
    assert _post(client, SEVEN_PNG, "image/png").status_code == 200


def test_body_limit_from_content_length(client: TestClient) -> None:
    response = _post(client, b"\0" * 2_000_001, "application/octet-stream")
    assert response.status_code == 413
    assert "over the limit of 2000000 bytes" in response.json()["detail"]


def test_body_limit_enforced_while_streaming(client: TestClient) -> None:
    """A chunked body with no Content-Length is cut off once it passes the limit."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(100):  # would be 10 MB in all
            sent += 100_000
            yield b"\0" * 100_000

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]


class _Exploding(torch.nn.Module):
    num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("secret internal detail /etc/passwd")


def test_unexpected_errors_are_a_plain_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    served = store.current
    store.current = dataclasses.replace(served, model=_Exploding())  # a broken model, through the store
    buffer = io.BytesIO()
    Image.open(io.BytesIO(SEVEN_PNG)).resize((600, 600)).save(buffer, "PNG")
    big = buffer.getvalue()  # more pixels than the event loop takes: decoded and computed in a thread
    try:
        with caplog.at_level(logging.ERROR, logger="app"):
            responses = [
                _post(client, SEVEN_PNG, "image/png"),  # fast lane
                client.post("/predict?top_k=2", content=SEVEN_PNG, headers={"content-type": "image/png"}),  # routed
                _post(client, big, "image/png"),
            ]
        for response in responses:
            assert response.status_code == 500
            assert response.json() == {"detail": "internal server error"}
            assert "secret" not in response.text
        assert "secret internal detail" in caplog.text  # logged with the traceback for operators
    finally:
        store.current = served
    assert _post(client, SEVEN_PNG, "image/png").status_code == 200


# -- inference hygiene -------------------------------------------------------------------------


def test_eval_mode_and_no_gradient_during_requests(client: TestClient) -> None:
    seen: list[tuple[bool, bool, bool]] = []
    served = client.app.state.store.current  # type: ignore[attr-defined]

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append((module.training, torch.is_grad_enabled(), output.requires_grad))

    handle = served.model.register_forward_hook(hook)
    try:
        assert _post(client, SEVEN_PNG, "image/png").status_code == 200
        assert _post(client, orjson.dumps({"instances": [SEVEN_PIXELS] * 40}), "application/json").status_code == 200
    finally:
        handle.remove()
    assert seen == [(False, False, False), (False, False, False)]
    assert not any(p.requires_grad for p in served.model.parameters())
    assert all(p.grad is None for p in served.model.parameters())


def test_request_id_is_echoed_or_generated(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.access"):
        given = client.get("/health/live", headers={"x-request-id": "abc-123"})
        generated = client.get("/health/live")
        bad = client.get("/health/live", headers={"x-request-id": "no spaces allowed\x01"})
    assert given.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])  # replaced, not echoed
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert any("request_id=abc-123" in line and "status=200" in line and "duration_ms=" in line for line in lines)
