"""The baseline: the plain FastAPI endpoint most tutorials write, serving the same weights.

    MNIST_MODEL_PATH=models/<version>.pt uvicorn bench.naive_app:app --workers N

A pydantic ``list[float]`` body, ``torch.tensor(list)``, a forward, ``.tolist()`` back through
FastAPI's generic response serializer. No validation beyond pydantic's types, no middleware:
the harness (``bench/http_bench.py``) compares the service against this.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from app.registry import load_model, read_pointer, version_path

ROOT = Path(__file__).resolve().parent.parent


class PixelsRequest(BaseModel):
    pixels: list[float]


class InstancesRequest(BaseModel):
    instances: list[list[float]]


class Prediction(BaseModel):
    probabilities: list[float]
    label: int


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


def _checkpoint() -> Path:
    explicit = os.environ.get("MNIST_MODEL_PATH")
    if explicit:
        return Path(explicit)
    models = ROOT / "models"
    version = read_pointer(models)
    if version is None:
        raise RuntimeError(f"no CURRENT pointer in {models}")
    return version_path(models, version)


model_holder: dict[str, torch.nn.Module] = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    torch.set_num_threads(1)  # the same per-worker setting as the service
    model, _ = load_model(_checkpoint(), "cpu")
    model_holder["model"] = model
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/health/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/predict")
def predict(req: PixelsRequest) -> Prediction:
    with torch.no_grad():
        probs = torch.softmax(model_holder["model"](torch.tensor([req.pixels])), dim=1)[0]
    return Prediction(probabilities=probs.tolist(), label=int(probs.argmax()))


@app.post("/predict/batch")
def predict_batch(req: InstancesRequest) -> BatchPrediction:
    with torch.no_grad():
        probs = torch.softmax(model_holder["model"](torch.tensor(req.instances)), dim=1)
    labels = probs.argmax(dim=1).tolist()
    predictions = [Prediction(probabilities=p, label=k) for p, k in zip(probs.tolist(), labels, strict=True)]
    return BatchPrediction(predictions=predictions)
