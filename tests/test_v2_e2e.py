"""Interoperability: the unmodified tritonclient from PyPI against a real uvicorn process.

Every answer is compared with what ``/predict`` says for the same digits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from app.registry import write_pointer
from tests.conftest import ROOT, Server, constant_model, save_model, start_server

pytestmark = [pytest.mark.e2e]

FIXTURES = ROOT / "tests" / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
TWO_PNG = (FIXTURES / "two_28x28.png").read_bytes()
SEVEN_PIXELS = np.array(orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"], dtype=np.float32)
TWO_UINT8 = np.asarray(Image.open(FIXTURES / "two_28x28.png").convert("L"), dtype=np.uint8).reshape(784)
OLDER = "20200101T000000Z-00000000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundled_checkpoint: Path) -> Iterator[Server]:
    """One real server for the module, an older version stored beside the served one."""
    tmp = tmp_path_factory.mktemp("v2-e2e")
    models = tmp / "models"
    models.mkdir()
    (models / bundled_checkpoint.name).write_bytes(bundled_checkpoint.read_bytes())
    save_model(models, constant_model(3), version=OLDER)
    write_pointer(models, bundled_checkpoint.stem)
    server = start_server(tmp, env={"MNIST_MODEL_DIR": str(models), "MNIST_RELOAD_INTERVAL": "0"})
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    tc = triton.InferenceServerClient(server.base_url.removeprefix("http://"), network_timeout=60)
    yield tc
    tc.close()


@pytest.fixture(scope="module")
def serving(server: Server) -> str:
    with server.client() as http:
        version: str = http.get("/model").json()["version"]
    return version


def predict(server: Server, content: bytes, media_type: str) -> tuple[np.ndarray, np.ndarray]:
    with server.client() as http:
        response = http.post("/predict", content=content, headers={"content-type": media_type})
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body.get("predictions", [body])
    return np.array([r["probabilities"] for r in rows], dtype=np.float32), np.array([r["label"] for r in rows])


def answers(result: triton.InferResult) -> tuple[np.ndarray, np.ndarray]:
    return result.as_numpy("probabilities"), result.as_numpy("label")


def assert_same_answers(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.float32
    assert got[1].dtype == np.int64
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[1], expected[1])


def uint8_digits() -> np.ndarray:
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(4, 784), dtype=np.uint8)
    images[0] = TWO_UINT8
    return images


def float_digits() -> np.ndarray:
    images = uint8_digits().astype(np.float32) / 255
    images[1] = SEVEN_PIXELS
    return images


# --------------------------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient, serving: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", serving)
    assert not client.is_model_ready("mnist", OLDER)  # stored, not loaded
    assert not client.is_model_ready("mnist", "nope")
    assert not client.is_model_ready("fashion")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "mnist-serve"
    assert set(server_meta["extensions"]) >= {"binary_tensor_data", "classification"}
    meta = client.get_model_metadata("mnist")
    assert meta["versions"] == sorted([OLDER, serving])
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]
    assert client.get_model_metadata("mnist", serving) == meta
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("fashion")
    assert info.value.status() == "404"
    assert "unknown model 'fashion'" in info.value.message()


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_fp32_and_uint8_infer_matches_predict(
    client: triton.InferenceServerClient,
    server: Server,
    serving: str,
    datatype: str,
    binary_input: bool,
    binary_output: bool,
) -> None:
    if datatype == "FP32":
        images = float_digits()
        expected = predict(server, orjson.dumps({"instances": images.tolist()}), "application/json")
        shape = [4, 1, 28, 28] if binary_input else [4, 784]
    else:
        images = uint8_digits()
        expected = predict(server, images.tobytes(), "application/octet-stream")
        shape = [4, 28, 28]
    tensor = triton.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(images.reshape(shape), binary_data=binary_input)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary_output),
        triton.InferRequestedOutput("label", binary_data=binary_output),
    ]
    result = client.infer("mnist", [tensor], outputs=outputs, request_id=f"{datatype}-1")
    assert_same_answers(answers(result), expected)
    response = result.get_response()
    assert response["id"] == f"{datatype}-1"
    assert response["model_name"] == "mnist"
    assert response["model_version"] == serving
    has_binary = all("binary_data_size" in o.get("parameters", {}) for o in response["outputs"])
    assert has_binary == binary_output


def test_default_outputs_come_back_in_binary(client: triton.InferenceServerClient, server: Server) -> None:
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(SEVEN_PIXELS.reshape(1, 784))
    result = client.infer("mnist", [tensor])  # no outputs named: tritonclient sets binary_data_output
    assert all("data" not in o for o in result.get_response()["outputs"])
    expected = predict(server, orjson.dumps({"pixels": SEVEN_PIXELS.tolist()}), "application/json")
    assert_same_answers(answers(result), expected)
    assert result.as_numpy("label").tolist() == [7]


@pytest.mark.parametrize("binary_input", [True, False], ids=["raw-png-binary", "base64-png-json"])
def test_png_bytes_infer_matches_predict(
    client: triton.InferenceServerClient, server: Server, binary_input: bool
) -> None:
    pngs = [SEVEN_PNG, TWO_PNG]
    # Raw PNG bytes go as binary data; JSON strings cannot hold them, so they travel as base64 text.
    elements = pngs if binary_input else [base64.b64encode(png) for png in pngs]
    tensor = triton.InferInput("input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary_input)
    result = client.infer("mnist", [tensor])
    expected = [predict(server, png, "image/png") for png in pngs]
    assert_same_answers(
        answers(result), (np.concatenate([e[0] for e in expected]), np.concatenate([e[1] for e in expected]))
    )
    assert result.as_numpy("label").tolist() == [7, 2]


def test_classification_through_tritonclient(client: triton.InferenceServerClient, server: Server) -> None:
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(SEVEN_PIXELS.reshape(1, 784), binary_data=False)
    for binary in (True, False):
        output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        top = client.infer("mnist", [tensor], outputs=[output]).as_numpy("probabilities")
        assert top.shape == (1, 3)
        pairs = [item.decode().split(":") if isinstance(item, bytes) else item.split(":") for item in top[0]]
        probs, _ = predict(server, orjson.dumps({"pixels": SEVEN_PIXELS.tolist()}), "application/json")
        assert [int(i) for _, i in pairs] == np.argsort(-probs[0], kind="stable")[:3].tolist()
        assert pairs[0][1] == "7"


def test_gzip_request_compression(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(SEVEN_PIXELS.reshape(1, 784))
    result = client.infer("mnist", [tensor], request_compression_algorithm="gzip")
    assert result.as_numpy("label").tolist() == [7]


@pytest.mark.parametrize(
    ("shape", "data", "version", "status", "needle"),
    [
        ([1, 783], np.zeros((1, 783), np.float32), "", "400", "got [1, 783]"),
        ([1, 784], np.full((1, 784), 255, np.float32), "", "400", "divide them by 255"),
        ([1, 784], np.full((1, 784), np.nan, np.float32), "", "400", "NaN or infinite"),
        ([1, 784], np.zeros((1, 784), np.float32), OLDER, "400", "is stored but not loaded"),
        ([1, 784], np.zeros((1, 784), np.float32), "nope", "404", "has no version 'nope'"),
    ],
)
def test_errors_reach_tritonclient_as_messages(
    client: triton.InferenceServerClient, shape: list[int], data: np.ndarray, version: str, status: str, needle: str
) -> None:
    tensor = triton.InferInput("input", shape, "FP32")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mnist", [tensor], model_version=version)
    assert info.value.status() == status
    assert needle in info.value.message()


def test_unknown_triton_endpoints_answer_in_the_protocol_shape(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert info.value.status() == "404"
    assert "no such endpoint POST /v2/repository/index" in info.value.message()


def test_curl_style_request_from_the_docs(server: Server) -> None:
    """The plain-JSON request shown in docs/open-inference-protocol.md, sent as curl would."""
    doc: dict[str, Any] = {
        "id": "42",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": SEVEN_PIXELS.tolist()}],
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        response = http.post("/v2/models/mnist/infer", json=doc)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "42"
    assert {o["name"]: o["data"] for o in body["outputs"]}["label"] == [7]


def test_real_mnist_digits_agree_with_predict(
    client: triton.InferenceServerClient, server: Server, mnist_test: Any
) -> None:
    images = (mnist_test.x[:500].numpy() * 255).round().astype(np.uint8)
    labels = mnist_test.y[:500].numpy()
    tensor = triton.InferInput("input", [500, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images.reshape(500, 28, 28))
    got = answers(client.infer("mnist", [tensor]))
    assert_same_answers(got, predict(server, images.tobytes(), "application/octet-stream"))
    assert (got[1] == labels).mean() > 0.95
