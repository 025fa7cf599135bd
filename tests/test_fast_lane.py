"""The fast lane for small /predict bodies answers exactly as the routed endpoint does.

A body sent with Content-Length (within 64 KiB) takes the fast lane; the same bytes sent chunked
(a generator body, no Content-Length) take FastAPI's route. Every case below goes both ways and
must give the same status, body and headers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import ServiceApp, create_app
from app.metrics import PredictionCounter
from app.middleware import RequestContextMiddleware, StartupErrorMiddleware
from app.routes import predict
from tests.helpers import png_bytes

FIXTURES = Path(__file__).parent / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
SEVEN = orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"]


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


CASES: dict[str, tuple[str, bytes]] = {
    "json flat": ("application/json", orjson.dumps({"pixels": SEVEN})),
    "json 28x28": ("application/json", orjson.dumps({"pixels": np.reshape(SEVEN, (28, 28)).tolist()})),
    "json batch": ("application/json", orjson.dumps({"instances": [SEVEN, [0.0] * 784]})),
    "json with charset": ("application/json; charset=utf-8", orjson.dumps({"pixels": SEVEN})),
    "json empty": ("application/json", b""),
    "json malformed": ("application/json", b'{"pixels": [0.1,'),
    "json NaN": ("application/json", b'{"pixels": [NaN]}'),
    "json short": ("application/json", orjson.dumps({"pixels": [0.5] * 783})),
    "json 0-255": ("application/json", orjson.dumps({"pixels": [255.0] * 784})),
    "json strings": ("application/json", orjson.dumps({"pixels": ["a"] * 784})),
    "json unknown field": ("application/json", orjson.dumps({"pixel": SEVEN})),
    "json ragged": ("application/json", orjson.dumps({"instances": [SEVEN, [0.0] * 10]})),
    "json batch too big": ("application/json", orjson.dumps({"instances": [[0.0] * 784] * 9})),
    "json not an object": ("application/json", b"[1, 2]"),
    "png": ("image/png", SEVEN_PNG),
    "png truncated": ("image/png", SEVEN_PNG[:40]),
    "png not a png": ("image/png", b"GIF89a" + b"\0" * 40),
    "png blank": ("image/png", png_bytes(Image.new("L", (28, 28), 0))),
    "uint8": ("application/octet-stream", bytes(784 * 2)),
    "uint8 wrong length": ("application/octet-stream", bytes(785)),
    "npy": ("application/x-npy", _npy(np.zeros((2, 28, 28), dtype=np.uint8))),
    "npy garbage": ("application/x-npy", b"\x93NUMPY garbage"),
}


@pytest.fixture
def client(models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_batch_size=8)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _both(client: TestClient, content_type: str, body: bytes, **headers: str):  # noqa: ANN202
    hdrs = {"content-type": content_type, **headers}
    fast = client.post("/predict", content=body, headers=hdrs)

    def chunked() -> Iterator[bytes]:
        yield body

    routed = client.post("/predict", content=chunked(), headers=hdrs)
    return fast, routed


def _same(fast, routed) -> None:  # noqa: ANN001
    assert fast.status_code == routed.status_code, (fast.text, routed.text)
    assert fast.content == routed.content
    for name in ("content-type", "x-model-version"):
        assert fast.headers.get(name) == routed.headers.get(name), name
    assert fast.headers["x-request-id"]
    assert fast.headers["x-request-id"] != routed.headers["x-request-id"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_lane_answers_like_the_route(client: TestClient, case: str) -> None:
    content_type, body = CASES[case]
    fast, routed = _both(client, content_type, body)
    _same(fast, routed)


@pytest.mark.parametrize("accept", ["application/octet-stream", "application/json;q=0.5, application/octet-stream"])
def test_fast_lane_binary_answers_like_the_route(client: TestClient, accept: str) -> None:
    fast, routed = _both(client, "application/octet-stream", bytes(784 * 3), accept=accept)
    assert fast.headers["content-type"] == "application/octet-stream"
    assert len(fast.content) == 3 * 10 * 4
    _same(fast, routed)


def test_which_requests_take_the_fast_lane() -> None:
    def scope(path: str = "/predict", query: bytes = b"", **headers: str) -> dict:
        base = {"content-type": "application/json", "content-length": "100"}
        base.update({k.replace("_", "-"): v for k, v in headers.items()})
        raw = [(k.encode(), v.encode()) for k, v in base.items() if v]
        return {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": raw}

    assert predict.fast_lane_eligible(scope())
    assert predict.fast_lane_eligible(scope(content_type="image/png"))
    assert predict.fast_lane_eligible(scope(content_type="Application/JSON; charset=utf-8"))
    assert predict.fast_lane_eligible({**scope(path="/api/predict"), "root_path": "/api"})
    assert not predict.fast_lane_eligible(scope(query=b"top_k=3"))
    assert not predict.fast_lane_eligible(scope(path="/predict/"))
    assert not predict.fast_lane_eligible(scope(content_type="multipart/form-data; boundary=x"))
    assert not predict.fast_lane_eligible(scope(content_type=""))
    assert not predict.fast_lane_eligible(scope(content_type="text/plain"))
    assert not predict.fast_lane_eligible(scope(content_length=""))
    assert not predict.fast_lane_eligible(scope(content_length=str(predict.INLINE_LIMIT + 1)))
    assert not predict.fast_lane_eligible(scope(content_length="12x"))
    assert not predict.fast_lane_eligible(scope(transfer_encoding="chunked"))
    assert not predict.fast_lane_eligible({**scope(), "method": "PUT"})
    # A repeated header is left to the routed lane, which reads the first one.
    for name in (b"content-type", b"content-length", b"accept"):
        doubled = scope(accept="application/json")
        doubled["headers"] += [(name, next(v for k, v in doubled["headers"] if k == name))]
        assert not predict.fast_lane_eligible(doubled), name


def test_fast_lane_has_every_middleware_of_the_app(models_dir: Path) -> None:
    # The lane is wrapped by hand (app.main): a middleware added to the app must be added there too.
    app = create_app(Settings(model_dir=models_dir, reload_interval=0))
    assert {m.cls for m in app.user_middleware} == {StartupErrorMiddleware, RequestContextMiddleware, PredictionCounter}
    lane = app.fast_lane
    wrappers = []
    while not isinstance(lane, predict.FastPredict):
        wrappers.append(type(lane))
        lane = lane.app  # type: ignore[union-attr]
    # StartupErrorMiddleware only handles the lifespan, which never takes the lane.
    assert wrappers == [RequestContextMiddleware, PredictionCounter]


def test_the_first_of_repeated_headers_counts_in_both_lanes(client: TestClient) -> None:
    headers = [("content-type", "image/png"), ("content-type", "application/json")]
    response = client.post("/predict", content=SEVEN_PNG, headers=headers)
    assert response.status_code == 200
    assert response.json()["label"] == 7


def test_fast_lane_really_skips_the_router(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    routed = predict._respond

    async def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append("routed")
        return await routed(*args, **kwargs)

    monkeypatch.setattr(predict, "_respond", spy)
    body = orjson.dumps({"pixels": SEVEN})
    assert client.post("/predict", content=body, headers={"content-type": "application/json"}).status_code == 200
    assert calls == []
    assert (
        client.post("/predict?top_k=2", content=body, headers={"content-type": "application/json"}).status_code == 200
    )
    assert calls == ["routed"]


def test_fast_lane_keeps_the_body_limit(models_dir: Path) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_body_bytes=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        fast, routed = _both(client, "application/json", orjson.dumps({"pixels": SEVEN}))
    assert fast.status_code == 413
    assert "over the limit of 1000 bytes" in fast.json()["detail"]
    assert routed.status_code == 413


def test_fast_lane_counts_metrics_and_request_ids(client: TestClient) -> None:
    body = orjson.dumps({"pixels": SEVEN})
    response = client.post(
        "/predict", content=body, headers={"content-type": "application/json", "x-request-id": "abc-1"}
    )
    assert response.headers["x-request-id"] == "abc-1"
    text = client.get("/metrics").text
    assert 'mnist_http_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'mnist_predictions_total{input_kind="json"}' in text


def test_fast_lane_unexpected_error_is_a_plain_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(predict, "predict_proba", broken)
    monkeypatch.setattr(predict, "_forward", broken)
    with caplog.at_level(logging.ERROR):
        fast, routed = _both(client, "application/json", orjson.dumps({"pixels": SEVEN}))
    assert fast.status_code == routed.status_code == 500
    assert fast.json() == routed.json() == {"detail": "internal server error"}
    assert "secret" not in fast.text
    assert "unhandled error" in caplog.text
    assert client.get("/health/ready").status_code == 200


def test_fast_lane_can_be_switched_off(models_dir: Path) -> None:
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, fast_lane=False))
    assert isinstance(app, ServiceApp)
    assert app.fast_lane is None
    with TestClient(app) as client:
        response = client.post(
            "/predict", content=orjson.dumps({"pixels": SEVEN}), headers={"content-type": "application/json"}
        )
    assert response.status_code == 200


def test_no_model_is_a_503_before_any_body_check(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_body_bytes=100)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        monkeypatch.setattr(client.app.state.store, "current", None)  # type: ignore[attr-defined]
        fast, routed = _both(client, "application/json", orjson.dumps({"pixels": SEVEN}))
    assert fast.status_code == routed.status_code == 503
    assert fast.json() == routed.json() == {"detail": "no model loaded yet"}
