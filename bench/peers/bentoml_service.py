"""BentoML serving the same weights, as its documentation writes a service: a peer for the harness.

    BENCH_WORKERS=2 bentoml serve bench.peers.bentoml_service:Mnist --port 8000   # from the repo root

``POST /predict`` takes ``{"pixels": [784 floats]}`` and ``POST /predict/batch`` takes
``{"instances": [[784 floats], ...]}`` (BentoML maps the JSON fields to the API's parameters),
both answered with the probabilities and the label, like the service's ``/predict``. BentoML's
``workers`` (``BENCH_WORKERS``, default 2) are its serving processes; no adaptive batching.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np

from bench.peers.model import Predictor


def _prediction(probs: np.ndarray) -> dict[str, Any]:
    return {"probabilities": probs.tolist(), "label": int(probs.argmax())}


@bentoml.service(workers=int(os.environ.get("BENCH_WORKERS", "2")), traffic={"timeout": 120})
class Mnist:
    def __init__(self) -> None:
        self.predictor = Predictor()

    @bentoml.api
    def predict(self, pixels: list[float]) -> dict[str, Any]:
        return _prediction(self.predictor(np.asarray(pixels, np.float32).reshape(1, 784))[0])

    @bentoml.api(route="/predict/batch")
    def predict_batch(self, instances: list[list[float]]) -> dict[str, Any]:
        probs = self.predictor(np.asarray(instances, np.float32).reshape(-1, 784))
        return {"predictions": [_prediction(row) for row in probs]}
