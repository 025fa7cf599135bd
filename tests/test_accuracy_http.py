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


def test_http_realworld_pictures(server_factory: Callable[..., Server], models_dir: Path, mnist_test) -> None:  # noqa: ANN001
    """bench/realworld.py's twelve ways over HTTP, each as its own media type (PNG, JPEG, WebP).

    Ten test digits a way (three 12-megapixel JPEGs): none refused, and 95 % read right overall
    (the full bench, 200 a way, is ``python -m bench.realworld --http``; docs/images.md has its figures).
    """
    from bench.realworld import MEDIA, WAYS, samples

    images = (mnist_test.x.numpy().reshape(-1, 28, 28) * 255).round().astype(np.uint8)
    labels = mnist_test.y.numpy()
    server = server_factory(env={"MNIST_MODEL_DIR": str(models_dir), "MNIST_ACCESS_LOG": "false"})
    correct = total = 0
    with server.client() as client:
        for way in WAYS:
            digits = 3 if way == "phone_12mp" else 10
            for sample in samples(images, labels, [way], digits, seed=5):
                response = client.post("/predict", content=sample.body, headers={"content-type": MEDIA[sample.fmt]})
                assert response.status_code == 200, f"{way} #{sample.index}: {response.text}"
                correct += response.json()["label"] == sample.label
                total += 1
    print(f"real-world pictures over HTTP: {correct} of {total}")
    assert correct >= 0.95 * total, f"{correct} of {total}"
