"""The fast lane for small /predict and v2 bodies answers exactly as the routed endpoints do.

A body sent with Content-Length (within 64 KiB) takes the fast lane; the same bytes sent chunked
(a generator body, no Content-Length) take FastAPI's route. Every case below goes both ways and
must give the same status, body and headers.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app import fast_lane
from app.config import Settings
from app.main import create_app
from app.metrics import PredictionCounter
from app.middleware import RequestContextMiddleware, StartupErrorMiddleware
from app.protocol import guarded_protocol
from app.serving import INLINE_BYTES
from tests.helpers import png_bytes, serving

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
    "npy lying header": ("application/x-npy", _npy(np.zeros((2, 784), dtype=np.uint8))[:-100]),
    "json strings 30k": ("application/json", orjson.dumps({"pixels": ["x" * 30_000] + [""] * 783})),
    "json deep nesting": ("application/json", b'{"pixels": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "json huge integer": ("application/json", b'{"pixels": [' + b"9" * 400 + b"]}"),
    "jpeg not a jpeg": ("image/jpeg", b"\xff\xd8\xff" + b"\0" * 40),
    "png declaring 50000x50000": (
        "image/png",
        SEVEN_PNG[:16] + (50_000).to_bytes(4, "big") + (50_000).to_bytes(4, "big") + SEVEN_PNG[24:],
    ),
}


def _v2(tensor: dict[str, object]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", **tensor}]})


V2_CASES: dict[str, bytes] = {
    "fp32": _v2({"datatype": "FP32", "shape": [1, 784], "data": SEVEN}),
    "uint8 batch": _v2({"datatype": "UINT8", "shape": [2, 784], "data": [0] * 1568}),
    "strings in fp32 data": _v2({"datatype": "FP32", "shape": [1, 784], "data": ["x" * 30_000] + [""] * 783}),
    "too many values": _v2({"datatype": "FP32", "shape": [1, 784], "data": [0.0] * 785}),
    "png bytes": _v2({"datatype": "BYTES", "shape": [1], "data": [__import__("base64").b64encode(SEVEN_PNG).decode()]}),
    "not json": b"{nope",
    "empty": b"",
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


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_v2_fast_lane_answers_like_the_route(client: TestClient, case: str) -> None:
    body = V2_CASES[case]

    def chunked() -> Iterator[bytes]:
        yield body

    fast = client.post("/v2/models/mnist/infer", content=body)
    routed = client.post("/v2/models/mnist/infer", content=chunked())
    _same(fast, routed)


def test_which_requests_take_the_fast_lane() -> None:
    def scope(path: str = "/predict", query: bytes = b"", **headers: str) -> dict:
        base = {"content-type": "application/json", "content-length": "100"}
        base.update({k.replace("_", "-"): v for k, v in headers.items()})
        raw = [(k.encode(), v.encode()) for k, v in base.items() if v]
        return {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": raw}

    eligible = fast_lane.eligible
    assert eligible(scope()) == fast_lane.LaneRequest("predict", 100, "application/json", "", None)
    assert eligible(scope(content_type="image/png"))
    assert eligible(scope(content_type="image/jpeg"))
    assert eligible(scope(content_type="Application/JSON; charset=utf-8"))
    assert eligible({**scope(path="/api/predict"), "root_path": "/api"})
    v2 = eligible(scope(path="/v2/models/mnist/infer", content_type="", inference_header_content_length="80"))
    assert v2 == fast_lane.LaneRequest("v2", 100, "", "", "80")
    assert not eligible(scope(path="/v2/models/mnist/infer", content_encoding="gzip"))
    assert not eligible(scope(path="/v2/models/mnist/versions/1/infer"))
    assert not eligible(scope(path="/v2/models/other/infer"))
    assert not eligible(scope(query=b"top_k=3"))
    assert not eligible(scope(query=b"include=input"))
    assert not eligible(scope(path="/predict/"))
    assert not eligible(scope(content_type="multipart/form-data; boundary=x"))
    assert not eligible(scope(content_type=""))
    assert not eligible(scope(content_type="text/plain"))
    assert not eligible(scope(content_length=""))
    assert not eligible(scope(content_length=str(INLINE_BYTES + 1)))
    assert not eligible(scope(content_length="12x"))
    assert not eligible(scope(transfer_encoding="chunked"))
    assert not eligible({**scope(), "method": "PUT"})
    # A repeated header is left to the routed lane, which reads the first one.
    for name in (b"content-type", b"content-length", b"accept"):
        doubled = scope(accept="application/json")
        doubled["headers"] += [(name, next(v for k, v in doubled["headers"] if k == name))]
        assert not eligible(doubled), name


def test_one_middleware_chain_wraps_both_lanes(models_dir: Path) -> None:
    app = create_app(Settings(model_dir=models_dir, reload_interval=0))
    # Outermost first; the dispatch is the innermost, so both lanes pass every other middleware,
    # and FastAPI (with its own middlewares) is behind it.
    chain, layers = app.chain, []
    while chain is not app.api:
        layers.append(type(chain))
        chain = chain.app  # type: ignore[attr-defined]
    assert layers == [StartupErrorMiddleware, RequestContextMiddleware, PredictionCounter, fast_lane.FastLaneDispatch]
    assert app.api.user_middleware == []  # no second chain inside FastAPI


def test_the_first_of_repeated_headers_counts_in_both_lanes(client: TestClient) -> None:
    headers = [("content-type", "image/png"), ("content-type", "application/json")]
    response = client.post("/predict", content=SEVEN_PNG, headers=headers)
    assert response.status_code == 200
    assert response.json()["label"] == 7


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


class _Broken(torch.nn.Module):
    num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("secret internals")


def test_fast_lane_unexpected_error_is_a_plain_500(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    served = store.current
    store.current = dataclasses.replace(served, model=_Broken())
    try:
        with caplog.at_level(logging.ERROR):
            fast, routed = _both(client, "application/json", orjson.dumps({"pixels": SEVEN}))
    finally:
        store.current = served
    assert fast.status_code == routed.status_code == 500
    assert fast.json() == routed.json() == {"detail": "internal server error"}
    assert "secret" not in fast.text
    assert "unhandled error" in caplog.text
    assert client.get("/health/ready").status_code == 200


def test_fast_lane_can_be_switched_off(models_dir: Path) -> None:
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, fast_lane=False))
    assert not isinstance(app.chain.app.app.app, fast_lane.FastLaneDispatch)  # type: ignore[attr-defined]
    assert app.chain.app.app.app is app.api  # type: ignore[attr-defined]
    with TestClient(app) as client:
        response = client.post(
            "/predict", content=orjson.dumps({"pixels": SEVEN}), headers={"content-type": "application/json"}
        )
    assert response.status_code == 200


def test_no_model_is_a_503_before_any_body_check(models_dir: Path) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_body_bytes=100)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.app.state.store.current = None  # type: ignore[attr-defined]
        fast, routed = _both(client, "application/json", orjson.dumps({"pixels": SEVEN}))
    assert fast.status_code == routed.status_code == 503
    assert fast.json() == routed.json() == {"detail": "no model loaded yet"}
    assert fast.headers["retry-after"] == routed.headers["retry-after"] == "1"


# -- the direct lane: the launcher's protocol calls the lane without ASGI ---------------------------


@pytest.fixture
def served(models_dir: Path) -> Iterator[tuple[str, list[int]]]:
    """The service behind uvicorn with the launcher's protocol; the direct lane's calls counted."""
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, max_batch_size=8, access_log=False))
    assert app.lane is not None
    calls: list[int] = []
    respond = app.lane.respond

    async def counted(*args: Any) -> Any:
        calls.append(1)
        return await respond(*args)

    app.lane.respond = counted  # type: ignore[method-assign]
    with serving(app, http=guarded_protocol(64 * 1024, 10.0), log_level="warning") as port:
        yield f"http://127.0.0.1:{port}", calls


def _over_http(base: str, path: str, content_type: str | None, body: bytes) -> tuple[httpx.Response, httpx.Response]:
    headers = {"content-type": content_type} if content_type else {}

    def chunked() -> Iterator[bytes]:
        yield body

    with httpx.Client(base_url=base, timeout=30) as http:
        direct = http.post(path, content=body, headers=headers)
        routed = http.post(path, content=chunked(), headers=headers)  # no Content-Length: the ASGI app
    return direct, routed


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_direct_lane_answers_like_the_route(served: tuple[str, list[int]], case: str) -> None:
    base, calls = served
    content_type, body = CASES[case]
    direct, routed = _over_http(base, "/predict", content_type, body)
    _same(direct, routed)
    assert calls == ([1] if len(body) <= INLINE_BYTES else [])


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_the_direct_v2_lane_answers_like_the_route(served: tuple[str, list[int]], case: str) -> None:
    base, calls = served
    direct, routed = _over_http(base, "/v2/models/mnist/infer", None, V2_CASES[case])
    _same(direct, routed)
    assert calls == [1]


def test_the_direct_lane_keeps_ids_metrics_and_keep_alive(served: tuple[str, list[int]]) -> None:
    base, calls = served
    body = orjson.dumps({"pixels": SEVEN})
    with httpx.Client(base_url=base, timeout=30) as http:
        before = http.get("/metrics").text
        json_type = {"content-type": "application/json"}
        answers = [
            http.post("/predict", content=body, headers={**json_type, "x-request-id": f"id-{i}"}) for i in range(5)
        ]
        after = http.get("/metrics").text
    assert [a.headers["x-request-id"] for a in answers] == [f"id-{i}" for i in range(5)]
    assert all(a.json()["label"] == 7 for a in answers)
    assert len(calls) == 5

    def count(text: str) -> float:
        pattern = r'mnist_http_requests_total\{method="POST",route="/predict",status="200"\} ([\d.e+]+)'
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    assert count(after) - count(before) == 5


def test_the_direct_lane_keeps_uvicorns_concurrency_limit(models_dir: Path) -> None:
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, access_log=False))
    body = orjson.dumps({"pixels": SEVEN})
    lane_protocol = guarded_protocol(64 * 1024, 10.0)
    with serving(app, http=lane_protocol, log_level="critical", limit_concurrency=2) as port:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as first, httpx.Client(base_url=base, timeout=30) as second:
            assert first.get("/health/live").status_code == 200  # holds one connection open
            over = second.post("/predict", content=body, headers={"content-type": "application/json"})
    assert over.status_code == 503  # uvicorn's answer over the limit, not the lane's
