"""/predict's compact binary answer (``Accept: application/octet-stream``) and its fast route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.routes.predict import wants_binary

FIXTURES = Path(__file__).parent / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
SEVEN_PIXELS = orjson.loads((FIXTURES / "seven.json").read_bytes())["pixels"]
TEN_DIGITS = (FIXTURES / "ten_digits.u8").read_bytes()


@pytest.fixture(params=[True, False], ids=["microbatch", "no-microbatch"])
def client(request: pytest.FixtureRequest, models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_dir=models_dir, reload_interval=0, microbatch=request.param)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _json(client: TestClient, body: bytes, content_type: str, query: str = "") -> dict:
    response = client.post(f"/predict{query}", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    return response.json()


def _binary(client: TestClient, body: bytes, content_type: str, accept: str = "application/octet-stream"):  # noqa: ANN202
    return client.post("/predict", content=body, headers={"content-type": content_type, "accept": accept})


@pytest.mark.parametrize(
    ("body", "content_type", "rows"),
    [
        (orjson.dumps({"pixels": SEVEN_PIXELS}), "application/json", 1),
        (SEVEN_PNG, "image/png", 1),
        (orjson.dumps({"instances": [SEVEN_PIXELS, [0.0] * 784]}), "application/json", 2),
        (TEN_DIGITS, "application/octet-stream", 10),
    ],
    ids=["json", "png", "json-batch", "uint8"],
)
def test_binary_answer_holds_the_json_probabilities(
    client: TestClient, body: bytes, content_type: str, rows: int
) -> None:
    response = _binary(client, body, content_type)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert len(response.content) == rows * 10 * 4
    probs = np.frombuffer(response.content, dtype="<f4").reshape(rows, 10)
    doc = _json(client, body, content_type)
    entries = doc["predictions"] if "predictions" in doc else [doc]
    np.testing.assert_allclose(probs, [e["probabilities"] for e in entries], rtol=1e-6)
    assert probs.argmax(axis=1).tolist() == [e["label"] for e in entries]
    assert response.headers["x-model-version"] == entries[0]["model_version"]


def test_binary_answer_of_a_big_batch(client: TestClient) -> None:
    """Over the inline limit the request is computed in the threadpool; the answer is the same."""
    body = TEN_DIGITS * 100  # 1,000 images, 784 KB
    response = _binary(client, body, "application/octet-stream")
    assert response.status_code == 200
    probs = np.frombuffer(response.content, dtype="<f4").reshape(1000, 10)
    small = np.frombuffer(_binary(client, TEN_DIGITS, "application/octet-stream").content, dtype="<f4").reshape(10, 10)
    np.testing.assert_allclose(probs, np.tile(small, (100, 1)), rtol=1e-5, atol=1e-7)


def test_errors_stay_json_when_binary_is_asked(client: TestClient) -> None:
    response = _binary(client, b"\0" * 1000, "application/octet-stream")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert "784-byte images" in response.json()["detail"]


def test_top_k_needs_a_json_answer(client: TestClient) -> None:
    response = client.post(
        "/predict?top_k=3",
        content=SEVEN_PNG,
        headers={"content-type": "image/png", "accept": "application/octet-stream"},
    )
    assert response.status_code == 422
    assert "top_k needs a JSON response" in response.json()["detail"]


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        (None, False),
        ("application/json", False),
        ("*/*", False),
        ("application/octet-stream", True),
        ("Application/Octet-Stream", True),
        ("application/octet-stream, application/json", True),
        ("application/json, application/octet-stream", False),  # equal q: the first listed wins
        ("application/json;q=0.5, application/octet-stream", True),
        ("application/octet-stream;q=0.2, */*;q=0.8", False),
        ("application/octet-stream;q=0", False),
        ("text/html, application/octet-stream;q=0.9", True),
        ("application/octet-stream;q=bogus, application/json;q=0.1", False),  # an unreadable q counts as 0
    ],
)
def test_accept_negotiation(accept: str | None, binary: bool) -> None:
    assert wants_binary(accept) is binary


# -- the fast route: validation of top_k is FastAPI's own ------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?top_k=0", "query.top_k: Input should be greater than or equal to 1"),
        ("?top_k=11", "query.top_k: Input should be less than or equal to 10"),
        ("?top_k=abc", "query.top_k: Input should be a valid integer"),
    ],
)
def test_top_k_is_still_validated(client: TestClient, query: str, message: str) -> None:
    response = client.post(f"/predict{query}", content=SEVEN_PNG, headers={"content-type": "image/png"})
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_with_and_without_query_string_agree(client: TestClient) -> None:
    body = orjson.dumps({"pixels": SEVEN_PIXELS})
    plain = _json(client, body, "application/json")
    with_unknown_query = _json(client, body, "application/json", "?unused=1")
    with_top_k = _json(client, body, "application/json", "?top_k=2")
    assert plain == with_unknown_query
    assert with_top_k["probabilities"] == plain["probabilities"]
    assert [entry["label"] for entry in with_top_k["top_k"]][0] == plain["label"] == 7


def test_openapi_documents_the_binary_answer(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    answers = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]
    assert "application/octet-stream" in answers
    assert "application/json" in answers
    assert {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]} == {"top_k", "include"}
