"""``POST /predict``: one endpoint, the input form chosen by ``Content-Type``."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.config import Settings
from app.decode import decode_json, decode_npy, decode_png, decode_uint8
from app.deps import ServedDep, SettingsDep, read_body
from app.errors import InputError
from app.inference import encode_predictions, predict_proba
from app.schemas import BatchPrediction, ErrorResponse, InstancesRequest, PixelsRequest, Prediction
from app.store import ServedModel

__all__ = ["router"]

router = APIRouter(tags=["predict"])

JSON_TYPES = ("application/json",)
PNG_TYPES = ("image/png",)
MULTIPART_TYPES = ("multipart/form-data",)
RAW_TYPES = ("application/octet-stream",)
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED = (*JSON_TYPES, *PNG_TYPES, *MULTIPART_TYPES, *RAW_TYPES, *NPY_TYPES)
# Bodies above this size are decoded and predicted in the threadpool: small ones are cheaper
# inline than a thread hop, big ones (batches, large PNGs) would stall the event loop.
INLINE_LIMIT = 64 * 1024

_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [PixelsRequest.model_json_schema(), InstancesRequest.model_json_schema()]},
                "examples": {
                    "one digit (flat)": {"value": {"pixels": [0.0] * 784}},
                    "one digit (28 rows of 28)": {"value": {"pixels": [[0.0] * 28] * 28}},
                    "a batch": {"value": {"instances": [[0.0] * 784, [0.0] * 784]}},
                },
            },
            "image/png": {
                "schema": {"type": "string", "format": "binary"},
                "description": "a PNG of any size and mode: dark-on-light or light-on-dark, normalised like MNIST",
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                },
                "description": "what `curl -F file=@digit.png` sends",
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "N x 784 bytes of uint8 pixels (0-255), MNIST's own format; answered as a batch",
            },
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": ".npy array (numpy.save): uint8 0-255 or float 0-1, shape (N,784) or (N,28,28)",
            },
        },
    }
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty body or malformed JSON",
        413: "body, image or batch over the configured limits",
        415: "missing or unsupported Content-Type",
        422: "well-formed but unusable input (shape, range, NaN, not a PNG, blank image...)",
        503: "no model loaded yet",
    }.items()
}


def _media_type(request: Request) -> str:
    raw = request.headers.get("content-type")
    if not raw:
        raise InputError(415, f"missing Content-Type header: use one of {', '.join(ACCEPTED)}")
    media = raw.split(";", 1)[0].strip().lower()
    if media not in ACCEPTED:
        raise InputError(415, f"unsupported Content-Type {media!r}: use one of {', '.join(ACCEPTED)}")
    return media


async def _multipart_png(request: Request, body: bytes, settings: Settings) -> bytes:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=1, max_fields=8, max_part_size=settings.max_body_bytes
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InputError(400, f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InputError(
                422, "multipart body must carry the PNG in a file field named 'file' (curl -F file=@digit.png)"
            )
        return await upload.read()
    finally:
        await form.close()


def _decode(media: str, body: bytes, settings: Settings) -> tuple[np.ndarray, bool]:
    if media in JSON_TYPES:
        return decode_json(body, settings.max_batch_size)
    if media in RAW_TYPES:
        return decode_uint8(body, settings.max_batch_size), True
    if media in NPY_TYPES:
        return decode_npy(body, settings.max_batch_size), True
    return decode_png(body, settings.max_image_pixels), False


def _run(media: str, body: bytes, settings: Settings, served: ServedModel, top_k: int | None) -> tuple[bytes, int]:
    x, batch = _decode(media, body, settings)
    probs = predict_proba(served.model, x, served.device)
    return encode_predictions(probs, served.version, batch, top_k), len(x)


@router.post(
    "/predict",
    summary="Classify digits: JSON vectors, PNG images, or raw uint8 / .npy batches",
    response_model=Prediction | BatchPrediction,
    responses=_ERRORS,
    openapi_extra=_OPENAPI,
)
async def predict(
    request: Request,
    served: ServedDep,
    settings: SettingsDep,
    top_k: Annotated[int | None, Query(ge=1, le=10, description="also return the k most probable labels")] = None,
) -> Response:
    media = _media_type(request)
    body = await read_body(request, settings.max_body_bytes)
    if media in MULTIPART_TYPES:
        body = await _multipart_png(request, body, settings)
        media = PNG_TYPES[0]
    if len(body) > INLINE_LIMIT:
        payload, count = await run_in_threadpool(_run, media, body, settings, served, top_k)
    else:
        payload, count = _run(media, body, settings, served, top_k)
    request.state.input_kind = _kind(media)
    request.state.predictions = count
    return Response(payload, media_type="application/json", headers={"x-model-version": served.version})


def _kind(media: str) -> str:
    return {
        "application/json": "json",
        "image/png": "png",
        "application/octet-stream": "uint8",
        "application/x-npy": "npy",
        "application/npy": "npy",
    }.get(media, media)
