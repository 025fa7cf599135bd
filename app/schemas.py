"""Pydantic models for the API's documented shapes (OpenAPI at /docs) and typed responses.

``/predict`` decodes its body with :mod:`app.decode` (orjson straight to numpy, the same rules
for every content type); these models describe that contract for humans and clients.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchPrediction",
    "ErrorResponse",
    "InstancesRequest",
    "LabelProbability",
    "ModelInfo",
    "PixelsRequest",
    "Prediction",
    "ReloadRequest",
    "ReloadResponse",
]

_EXAMPLE_PIXELS = [0.0] * 784


class PixelsRequest(BaseModel):
    """One digit: 784 values in [0, 1] (white digit on black), flat or as 28 rows of 28."""

    model_config = ConfigDict(extra="forbid")
    pixels: list[float] | list[list[float]] = Field(
        ..., description="784 floats in [0, 1], row-major, or 28 rows of 28", examples=[_EXAMPLE_PIXELS]
    )


class InstancesRequest(BaseModel):
    """A batch of digits, each like ``pixels``."""

    model_config = ConfigDict(extra="forbid")
    instances: list[list[float]] | list[list[list[float]]] = Field(
        ..., description="up to MNIST_MAX_BATCH_SIZE images", examples=[[_EXAMPLE_PIXELS, _EXAMPLE_PIXELS]]
    )


class LabelProbability(BaseModel):
    label: int
    probability: float


class Prediction(BaseModel):
    probabilities: list[float] = Field(..., min_length=10, max_length=10, description="one per digit 0-9, summing to 1")
    label: int = Field(..., ge=0, le=9, description="the most probable digit")
    model_version: str
    top_k: list[LabelProbability] | None = Field(None, description="present when ?top_k=k was asked")


class BatchPrediction(BaseModel):
    model_version: str
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    detail: str = Field(..., examples=["'pixels' must be 784 numbers (a flat list) or 28 rows of 28; got shape [783]"])


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: str
    sha256: str
    architecture: dict[str, Any]
    test_accuracy: float | None
    device: str
    loaded_at: str
    pid: int
    last_reload_error: dict[str, str] | None
    problem: dict[str, str] | None = Field(
        None,
        description="why this worker does not serve the version CURRENT names: the file at fault, the error, "
        "and what it serves instead (the last good version); null when it serves CURRENT",
    )
    last_good_version: str | None = Field(None, description="the version LAST_GOOD names (a fallback at startup)")
    workers: list[dict[str, Any]]
    available_versions: list[str]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(
        None, description="a stored version to make current for every worker; omitted: reload what CURRENT names"
    )
    previous: bool = Field(
        False, description="roll back: make current the version before the current one (as `mnist-publish --previous`)"
    )


class ReloadResponse(BaseModel):
    version: str = Field(..., description="the version this worker now serves")
    previous: str | None = Field(..., description="the version it served before")
    pid: int
    workers_total: int = Field(..., description="live workers of this server")
    workers_serving: int = Field(
        ..., description="how many of them serve `version` when the answer is sent (the others follow the pointer)"
    )
    note: str | None = Field(None, description="how the version was chosen, for a rollback")
