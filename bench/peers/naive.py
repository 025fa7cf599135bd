"""The baseline: the plain FastAPI endpoint most tutorials write, serving the same weights.

    uvicorn bench.peers.naive:app --workers N        # from the repository root

A pydantic ``list[float]`` body, ``torch.tensor(list)``, a forward, ``.tolist()`` back through
FastAPI's generic response serializer. No validation beyond pydantic's types, no middleware:
the harness compares the service against this (``x naive`` in its table).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from app.registry import load_model
from bench.peers.model import checkpoint_path


class PixelsRequest(BaseModel):
    pixels: list[float]


class InstancesRequest(BaseModel):
    instances: list[list[float]]


class Prediction(BaseModel):
    probabilities: list[float]
    label: int


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


model_holder: dict[str, torch.nn.Module] = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    torch.set_num_threads(1)  # the same per-worker setting as the service
    model, _ = load_model(checkpoint_path(), "cpu")
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
