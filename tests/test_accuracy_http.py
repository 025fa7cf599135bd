"""Accuracy through the whole HTTP path on 1,000 real MNIST test digits, against a real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.inference import predict_proba
from app.registry import load_model
from tests.conftest import Server
from tests.helpers import drawn_like_a_person, mnist_png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 1000


@pytest.fixture(scope="module")
def digits(mnist_test):  # noqa: ANN001, ANN201
    # A fixed, spread-out sample: every 10th test digit.
    return mnist_test.x.numpy()[::10][:N], mnist_test.y.numpy()[::10][:N]


def _labels(server: Server, pngs: list[bytes]) -> np.ndarray:
    labels = []
    with server.client() as client:
        for png in pngs:
            response = client.post("/predict", content=png, headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            labels.append(response.json()["label"])
    return np.asarray(labels)


def test_http_path_accuracy(
    server_factory: Callable[..., Server], models_dir: Path, bundled_checkpoint: Path, digits: tuple
) -> None:
    x, y = digits
    model, _ = load_model(bundled_checkpoint)
    direct = predict_proba(model, x).argmax(axis=1)
    server = server_factory(env={"MNIST_MODEL_DIR": str(models_dir), "MNIST_ACCESS_LOG": "false"})

    # 28x28 MNIST PNGs: the same labels as calling the model directly.
    via_http = _labels(server, [mnist_png(d) for d in x])
    agreement = float((via_http == direct).mean())
    assert agreement == 1.0, f"{int((via_http != direct).sum())} of {N} labels differ"

    # The same digits as a person draws them: black on white, 280x280, off-centre, RGB and RGBA.
    direct_accuracy = float((direct == y).mean())
    for mode in ("RGB", "RGBA"):
        drawn = _labels(server, [drawn_like_a_person(d, i, mode) for i, d in enumerate(x)])
        accuracy = float((drawn == y).mean())
        print(f"{mode} 280x280 drawn digits: {accuracy:.1%} (direct 28x28 model call: {direct_accuracy:.1%})")
        assert accuracy >= 0.97, f"{mode}: {accuracy:.1%}"
