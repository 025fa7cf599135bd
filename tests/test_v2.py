"""The v2 (Open Inference Protocol) endpoints, in process with the lifespan run.

Request and response bodies are validated against the protocol's published OpenAPI document
(``open_inference_rest.yaml``, the operations' own request and response schemas), and answers
are compared with ``/predict``'s for the same digits.
"""

from __future__ import annotations

import base64
import gzip
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
import yaml
from openapi_schema_validator import OAS30Validator
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.conftest import ROOT, constant_model, save_model

FIXTURES = ROOT / "tests" / "fixtures"
# A verbatim copy of the shared spec (test_spec_copy_is_the_shared_one checks it has not drifted).
SPEC_PATH = FIXTURES / "specs" / "open_inference_rest.yaml"
SHARED_SPEC = ROOT.parent / "shared" / "specs" / "open_inference_rest.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
INFER = "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}/infer"
MODEL_META = "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}"
SERVER_META = "/v2/"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
SEVEN_PIXELS: list[float] = orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"]
TWO_UINT8 = np.asarray(Image.open(FIXTURES / "two_28x28.png").convert("L"), dtype=np.uint8).reshape(784)
OLDER = "20200101T000000Z-00000000"


# --------------------------------------------------------------------------------------------
# Spec validation


def _schema(path: str, method: str, status: int | None = None) -> dict[str, Any]:
    operation = SPEC["paths"][path][method]
    node = operation["requestBody"] if status is None else operation["responses"][str(status)]
    schema: dict[str, Any] = node["content"]["application/json"]["schema"]
    return schema


def schema_errors(instance: Any, path: str, method: str, status: int | None = None) -> list[str]:
    """Validate against the operation's schema; ``status=None`` means its request body."""
    validator = OAS30Validator({**_schema(path, method, status), "components": SPEC["components"]})
    return sorted(f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance))


def assert_valid(instance: Any, path: str, method: str, status: int | None = None) -> None:
    errors = schema_errors(instance, path, method, status)
    assert not errors, errors


def test_spec_copy_is_the_shared_one() -> None:
    if not SHARED_SPEC.is_file():
        pytest.skip(f"{SHARED_SPEC} not present")
    assert SPEC_PATH.read_bytes() == SHARED_SPEC.read_bytes()


def test_the_spec_validator_rejects_what_the_spec_forbids() -> None:
    """The checks below mean something: bodies the schemas forbid fail them."""
    good = {"model_name": "mnist", "outputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [7]}]}
    assert_valid(good, INFER, "post", 200)
    for bad in ({"model_name": "mnist"}, {**good, "outputs": [{"name": "label", "data": [7]}]}, {**good, "id": 42}):
        with pytest.raises(AssertionError):
            assert_valid(bad, INFER, "post", 200)
    with pytest.raises(AssertionError):
        assert_valid(
            {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [{"b64": "x"}]}]}, INFER, "post"
        )
    with pytest.raises(AssertionError):
        assert_valid({"name": "mnist-serve", "version": "1"}, SERVER_META, "get", 200)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.app = app  # type: ignore[attr-defined]  # for the tests that look at the store
        yield c


@pytest.fixture
async def client(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The whole app, with an older version stored beside the served one."""
    monkeypatch.setenv("MNIST_RUNTIME_DIR", str(tmp_path / "runtime"))
    save_model(models_dir, constant_model(3), version=OLDER)
    async for c in _client(Settings(model_dir=models_dir, reload_interval=0, access_log=False)):
        yield c


@pytest.fixture
async def tight(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with small limits, for the 413s."""
    monkeypatch.setenv("MNIST_RUNTIME_DIR", str(tmp_path / "runtime"))
    settings = Settings(
        model_dir=models_dir,
        reload_interval=0,
        access_log=False,
        max_batch_size=4,
        max_body_bytes=100_000,
        max_image_pixels=100 * 100,
    )
    async for c in _client(settings):
        yield c


def served_version(client: httpx.AsyncClient) -> str:
    version: str = client.app.state.store.current.version  # type: ignore[attr-defined]
    return version


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits(n: int) -> np.ndarray:
    """``n`` uint8 images: the fixture 2, then varied noise (equality, not accuracy, is the point)."""
    rng = np.random.default_rng(n)
    out = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
    out[0] = TWO_UINT8
    return out


def tensor(datatype: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": datatype, "shape": shape, "data": data, **extra}


async def v2_infer(client: httpx.AsyncClient, doc: dict[str, Any], validate: bool = True) -> dict[str, Any]:
    if validate:
        assert_valid(doc, INFER, "post")
    response = await client.post("/v2/models/mnist/infer", content=orjson.dumps(doc))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    if validate:
        assert_valid(body, INFER, "post", 200)
    return body


def outputs_of(body: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    by_name = {o["name"]: o for o in body["outputs"]}
    probs = np.array(by_name["probabilities"]["data"], dtype=np.float32).reshape(by_name["probabilities"]["shape"])
    labels = np.array(by_name["label"]["data"], dtype=np.int64).reshape(by_name["label"]["shape"])
    return probs, labels


async def predict(client: httpx.AsyncClient, content: bytes, media_type: str) -> tuple[np.ndarray, np.ndarray]:
    response = await client.post("/predict", content=content, headers={"content-type": media_type})
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body.get("predictions", [body])
    return np.array([r["probabilities"] for r in rows], dtype=np.float32), np.array([r["label"] for r in rows])


def assert_same_answers(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[1], expected[1])


# --------------------------------------------------------------------------------------------
# Health and metadata


@pytest.mark.anyio
async def test_server_live_ready_and_metadata(client: httpx.AsyncClient) -> None:
    live = await client.get("/v2/health/live")
    assert live.status_code == 200
    assert live.json() == {"live": True}
    ready = await client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}
    for path in ("/v2", "/v2/"):
        response = await client.get(path)
        assert response.status_code == 200
        body = response.json()
        assert_valid(body, SERVER_META, "get", 200)
        assert body["name"] == "mnist-serve"
        assert body["extensions"] == ["binary_tensor_data", "classification"]


@pytest.mark.anyio
async def test_model_metadata_lists_the_served_and_stored_versions(client: httpx.AsyncClient) -> None:
    serving = served_version(client)
    response = await client.get("/v2/models/mnist")
    assert response.status_code == 200
    body = response.json()
    assert_valid(body, MODEL_META, "get", 200)
    assert body["name"] == "mnist"
    assert body["versions"] == sorted([OLDER, serving])
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert body["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert body["properties"]["serving_version"] == serving
    for version in (serving, OLDER):
        response = await client.get(f"/v2/models/mnist/versions/{version}")
        assert response.status_code == 200
        assert response.json() == body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/fashion"),
        ("GET", "/v2/models/fashion/ready"),
        ("GET", "/v2/models/fashion/versions/1"),
        ("POST", "/v2/models/fashion/infer"),
        ("GET", "/v2/models/mnist/versions/nope"),
        ("GET", "/v2/models/mnist/versions/nope/ready"),
        ("POST", "/v2/models/mnist/versions/nope/infer"),
        ("GET", "/v2/models/mnist/versions/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/v2/repository/index"),
        ("GET", "/v2/models/mnist/config"),
    ],
)
@pytest.mark.anyio
async def test_unknown_models_versions_and_endpoints_are_404_errors(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, content=b"{}")
    assert response.status_code == 404
    body = response.json()
    assert list(body) == ["error"]
    assert_valid(body, SERVER_META, "get", 400)  # the protocol's error object


@pytest.mark.anyio
async def test_wrong_method_is_405_in_the_protocol_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/models/mnist/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"error": "GET is not allowed on /v2/models/mnist/infer: use POST"}


@pytest.mark.anyio
async def test_model_ready_by_version(client: httpx.AsyncClient) -> None:
    serving = served_version(client)
    response = await client.get("/v2/models/mnist/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "mnist", "ready": True}
    response = await client.get(f"/v2/models/mnist/versions/{serving}/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "mnist", "ready": True}
    response = await client.get(f"/v2/models/mnist/versions/{OLDER}/ready")
    assert response.status_code == 503  # stored, so known, but not loaded
    assert response.json() == {"name": "mnist", "ready": False}


@pytest.mark.anyio
async def test_no_model_loaded_means_not_ready_and_503(client: httpx.AsyncClient) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    served, store.current = store.current, None
    try:
        assert (await client.get("/v2/health/live")).status_code == 200
        for path in ("/v2/health/ready", "/v2/models/mnist/ready"):
            response = await client.get(path)
            assert response.status_code == 503
            assert response.json()["ready"] is False
        for response in (
            await client.get("/v2/models/mnist"),
            await client.post("/v2/models/mnist/infer", json={"inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)]}),
        ):
            assert response.status_code == 503
            assert response.json() == {"error": "no model loaded yet"}
    finally:
        store.current = served


# --------------------------------------------------------------------------------------------
# Inference


@pytest.mark.anyio
async def test_fp32_json_request_matches_predict_and_the_spec(client: httpx.AsyncClient) -> None:
    body = await v2_infer(client, {"id": "seven-1", "inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)]})
    assert body["model_name"] == "mnist"
    assert body["model_version"] == served_version(client)
    assert body["id"] == "seven-1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("probabilities", "FP32", [1, 10]),
        ("label", "INT64", [1]),
    ]
    got = outputs_of(body)
    assert got[1].tolist() == [7]
    assert_same_answers(got, await predict(client, orjson.dumps({"pixels": SEVEN_PIXELS}), "application/json"))


@pytest.mark.anyio
async def test_bytes_base64_png_request_matches_predict_and_the_spec(client: httpx.AsyncClient) -> None:
    doc = {"inputs": [tensor("BYTES", [1], [base64.b64encode(SEVEN_PNG).decode()])]}
    got = outputs_of(await v2_infer(client, doc))
    assert got[1].tolist() == [7]
    assert_same_answers(got, await predict(client, SEVEN_PNG, "image/png"))


@pytest.mark.anyio
async def test_every_input_form_gives_the_same_answers_as_predict(client: httpx.AsyncClient) -> None:
    images = digits(5)
    expected = await predict(client, images.tobytes(), "application/octet-stream")
    floats = images.astype(np.float32) * np.float32(1 / 255)
    docs = [
        tensor("FP32", [5, 784], floats.reshape(-1).tolist()),
        tensor("FP32", [5, 28, 28], floats.reshape(5, 28, 28).tolist()),
        tensor("FP32", [5, 1, 28, 28], floats.reshape(-1).tolist()),
        tensor("UINT8", [5, 784], images.tolist()),
        tensor("UINT8", [5, 1, 28, 28], images.reshape(-1).tolist()),
    ]
    for doc in docs:
        assert_same_answers(outputs_of(await v2_infer(client, {"inputs": [doc]})), expected)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "UINT8", "shape": [5, 28, 28], "parameters": {"binary_data_size": 3920}}
            ]
        }
    )
    response = await client.post(
        "/v2/models/mnist/infer",
        content=header + images.tobytes(),
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert_same_answers(outputs_of(response.json()), expected)


@pytest.mark.anyio
async def test_binary_outputs_follow_the_json_header(client: httpx.AsyncClient) -> None:
    doc = {
        "id": "b",
        "inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)],
        "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    assert_valid(doc, INFER, "post")
    response = await client.post("/v2/models/mnist/infer", json=doc)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:size])
    # The binary extension replaces an output's "data" by its binary_data_size parameter; the base
    # schema's one complaint is exactly that (tritonclient's binary requests differ the same way).
    assert schema_errors(header, INFER, "post", 200) == ["['outputs', 1]: 'data' is a required property"]
    label, probs = header["outputs"]
    assert label == {"name": "label", "datatype": "INT64", "shape": [1], "data": [7]}
    assert probs == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [1, 10],
        "parameters": {"binary_data_size": 40},
    }
    blob = np.frombuffer(response.content[size:], dtype="<f4")
    assert_same_answers(
        (blob.reshape(1, 10), np.array([7])),
        await predict(client, orjson.dumps({"pixels": SEVEN_PIXELS}), "application/json"),
    )


@pytest.mark.anyio
async def test_classification_returns_top_k_strings(client: httpx.AsyncClient) -> None:
    doc = {
        "inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    body = await v2_infer(client, doc)
    (output,) = body["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [1, 3]
    probs, _ = await predict(client, orjson.dumps({"pixels": SEVEN_PIXELS}), "application/json")
    pairs = [s.split(":") for s in output["data"]]
    assert [int(index) for _, index in pairs] == np.argsort(-probs[0], kind="stable")[:3].tolist()
    assert pairs[0][1] == "7"
    np.testing.assert_allclose([float(value) for value, _ in pairs], np.sort(probs[0])[::-1][:3], rtol=1e-5)


@pytest.mark.anyio
async def test_gzip_request_bodies_are_inflated(client: httpx.AsyncClient) -> None:
    doc = {"inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)], "outputs": [{"name": "label"}]}
    response = await client.post(
        "/v2/models/mnist/infer", content=gzip.compress(orjson.dumps(doc)), headers={"content-encoding": "gzip"}
    )
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [7]


@pytest.mark.anyio
async def test_big_requests_run_off_the_event_loop_small_ones_on_it(client: httpx.AsyncClient) -> None:
    import dataclasses
    import threading

    class Spy(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model
            self.num_classes = 10

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            threads.append(threading.current_thread())
            return self.model(x)

    threads: list[threading.Thread] = []
    store = client.app.state.store  # type: ignore[attr-defined]
    served = store.current
    store.current = dataclasses.replace(served, model=Spy(served.model))
    loop_thread = threading.current_thread()
    try:
        for images in (digits(1), digits(200)):  # a tiny body (micro-batched inline) and ~1.2 MB of JSON
            body = await v2_infer(
                client, {"inputs": [tensor("UINT8", list(images.shape), images.tolist())]}, validate=False
            )
            assert_same_answers(outputs_of(body), await predict(client, images.tobytes(), "application/octet-stream"))
    finally:
        store.current = served
    v2_threads = threads[0::2]  # each round: the v2 request, then /predict
    assert v2_threads[0] is loop_thread
    assert v2_threads[1] is not loop_thread


@pytest.mark.anyio
async def test_versioned_infer_answers_only_for_the_served_version(client: httpx.AsyncClient) -> None:
    serving = served_version(client)
    doc = {"inputs": [tensor("FP32", [1, 784], SEVEN_PIXELS)]}
    response = await client.post(f"/v2/models/mnist/versions/{serving}/infer", json=doc)
    assert response.status_code == 200
    assert response.json()["model_version"] == serving
    response = await client.post(f"/v2/models/mnist/versions/{OLDER}/infer", json=doc)
    assert response.status_code == 400
    message = response.json()["error"]
    assert f"version '{OLDER}' is stored but not loaded" in message
    assert f"serving '{serving}'" in message
    assert f'POST /admin/reload {{"version": "{OLDER}"}}' in message
    assert served_version(client) == serving  # nothing was loaded for the request


# --------------------------------------------------------------------------------------------
# Errors: the same bad inputs as /predict, answered as {"error": ...}

BLANK_PNG = _png(Image.new("L", (28, 28), 255))


def _predict_json(doc: dict[str, Any]) -> tuple[bytes, str]:
    return orjson.dumps(doc), "application/json"


BAD_INPUTS = {
    "wrong shape": (
        _predict_json({"pixels": [0.0] * 783}),
        {"inputs": [tensor("FP32", [1, 783], [0.0] * 783)]},
        "got [1, 783]",
    ),
    "0-255 floats": (
        _predict_json({"pixels": [255.0] * 784}),
        {"inputs": [tensor("FP32", [1, 784], [255.0] * 784)]},
        "divide them by 255",
    ),
    "not numbers": (
        _predict_json({"pixels": ["a"] * 784}),
        {"inputs": [tensor("FP32", [1, 784], ["a"] * 784)]},
        "only numbers (got strings)",
    ),
    "corrupt PNG": (
        (SEVEN_PNG[:100], "image/png"),
        {"inputs": [tensor("BYTES", [1], [base64.b64encode(SEVEN_PNG[:100]).decode()])]},
        "corrupt or truncated PNG",
    ),
    "blank image": (
        (BLANK_PNG, "image/png"),
        {"inputs": [tensor("BYTES", [1], [base64.b64encode(BLANK_PNG).decode()])]},
        "the image is blank",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.anyio
async def test_bad_inputs_are_400_where_predict_says_422(client: httpx.AsyncClient, case: str) -> None:
    (content, media_type), doc, needle = BAD_INPUTS[case]
    predicted = await client.post("/predict", content=content, headers={"content-type": media_type})
    assert predicted.status_code == 422
    response = await client.post("/v2/models/mnist/infer", content=orjson.dumps(doc))
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["error"]
    assert needle in body["error"]
    assert_valid(body, INFER, "post", 400)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty request body"),
        (b'{"inputs": [', "malformed JSON"),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [NaN]}]}',
            "NaN and Infinity are not valid",
        ),
        (b"[]", "expected a JSON object"),
    ],
)
@pytest.mark.anyio
async def test_unreadable_bodies_are_400(client: httpx.AsyncClient, content: bytes, needle: str) -> None:
    response = await client.post("/v2/models/mnist/infer", content=content)
    assert response.status_code == 400
    assert needle in response.json()["error"]


@pytest.mark.anyio
async def test_limits_are_413_errors_like_predict(tight: httpx.AsyncClient) -> None:
    images = digits(5)
    too_many = (images.tobytes(), {"inputs": [tensor("UINT8", [5, 784], images.tolist())]}, "over the maximum of 4")
    big_png = _png(Image.new("L", (200, 200), 0))
    too_wide = (
        big_png,
        {"inputs": [tensor("BYTES", [1], [base64.b64encode(big_png).decode()])]},
        "over the per-image limit of 10,000",
    )
    huge = bytes(100_001)
    for content, doc, needle in (too_many, too_wide):
        media = "image/png" if content.startswith(b"\x89PNG") else "application/octet-stream"
        assert (await tight.post("/predict", content=content, headers={"content-type": media})).status_code == 413
        response = await tight.post("/v2/models/mnist/infer", content=orjson.dumps(doc))
        assert response.status_code == 413
        assert needle in response.json()["error"]
    assert (
        await tight.post("/predict", content=huge, headers={"content-type": "application/octet-stream"})
    ).status_code == 413
    response = await tight.post("/v2/models/mnist/infer", content=huge)
    assert response.status_code == 413
    assert response.json() == {"error": "request body of 100001 bytes is over the limit of 100000 bytes"}
    bomb = gzip.compress(b" " * 1_000_000)
    response = await tight.post("/v2/models/mnist/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert response.status_code == 413
    assert "inflates to over the limit" in response.json()["error"]
