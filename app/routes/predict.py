"""``POST /predict``: one endpoint, the input form chosen by ``Content-Type``.

The route says how a body becomes model input and how the answer is written; reading, limits,
admission and prediction are :mod:`app.serving`'s. Small bodies never reach this router: the
fast lane (:mod:`app.fast_lane`) calls :func:`answer` straight from ASGI; both lanes share it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app import image
from app.decode import decode_json, decode_npy, decode_uint8
from app.errors import InputError
from app.image import IMAGE_TYPES
from app.inference import encode_binary, encode_predictions
from app.schemas import BatchPrediction, ErrorResponse, InstancesRequest, PixelsRequest, Prediction
from app.serving import INLINE_BYTES, INLINE_PIXELS, Answer, Budgets, Decoded, Job, Pipeline, declared_length
from app.store import ServedModel

__all__ = ["ACCEPTED", "Options", "answer", "media_type", "router", "wants_binary"]

router = APIRouter(tags=["predict"])

JSON = "application/json"
MULTIPART = "multipart/form-data"
RAW = "application/octet-stream"
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED = (JSON, *IMAGE_TYPES, MULTIPART, RAW, *NPY_TYPES)
BINARY = "application/octet-stream"
_KINDS = {JSON: "json", RAW: "uint8", **dict.fromkeys(NPY_TYPES, "npy")}

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
            **{
                media: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "a picture of one digit (photo, scan, drawing), any size and mode: normalised "
                    "like MNIST (JPEG EXIF orientation applied)",
                }
                for media in IMAGE_TYPES
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                },
                "description": "what `curl -F file=@digit.png` sends (PNG, JPEG or WebP)",
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
    },
    "responses": {
        "200": {
            "content": {
                BINARY: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "with `Accept: application/octet-stream`: N x 10 little-endian float32 "
                    "probabilities, row i for image i (the model version is in the X-Model-Version header)",
                }
            }
        }
    },
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty body, malformed JSON or Content-Length",
        408: "the body did not arrive within the body timeout (the connection is closed)",
        413: "body, image, pixels or batch over the configured limits",
        415: "missing or unsupported Content-Type, or an image in another format",
        422: "well-formed but unusable input (shape, range, NaN, corrupt image, blank image...)",
        503: "no model loaded yet, or the worker is busy (with Retry-After)",
    }.items()
}


@dataclass(frozen=True, slots=True)
class Options:
    """How to answer: the query parameters and the ``Accept`` header."""

    top_k: int | None = None
    binary: bool = False
    include_input: bool = False


def media_type(content_type: str | None) -> str:
    """The body's media type, if /predict takes it; else 415 saying what it takes."""
    if not content_type:
        raise InputError(415, f"missing Content-Type header: use one of {', '.join(ACCEPTED)}")
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in ACCEPTED:
        raise InputError(415, f"unsupported Content-Type {media!r}: use one of {', '.join(ACCEPTED)}")
    return media


def wants_binary(accept: str | None) -> bool:
    """Whether ``Accept`` prefers ``application/octet-stream`` over JSON (q-values honoured, ties: first)."""
    if not accept or BINARY not in accept.lower():
        return False
    best, best_q = "", -1.0
    for part in accept.lower().split(","):
        media, _, params = part.partition(";")
        media = media.strip()
        if media not in (BINARY, "application/json", "application/*", "*/*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = media, q
    return best == BINARY and best_q > 0


def _job(media: str, body: bytes, budgets: Budgets, version: str, options: Options) -> Job:
    """What this body asks for; images are checked against the pixel budgets from their headers."""
    inline = len(body) <= INLINE_BYTES
    if media in IMAGE_TYPES:
        pixels = budgets.check_images([body])
        kind = image.sniff(body) or "image"

        def decode_image() -> Decoded:
            x = image.to_model_input(body, max_pixels=budgets.max_image_pixels)
            return x, _encoder(version, False, options, x, kind)

        return Job(decode_image, inline and pixels <= INLINE_PIXELS)

    def decode() -> Decoded:
        # uint8 rows stay uint8: predict_proba scales them chunk by chunk (bit-identical, no float copy).
        if media == JSON:
            x, batch = decode_json(body, budgets.max_batch)
        elif media == RAW:
            x, batch = decode_uint8(body, budgets.max_batch, scale=False), True
        else:
            x, batch = decode_npy(body, budgets.max_batch, scale=False), True
        return x, _encoder(version, batch, options, x, _KINDS[media])

    return Job(decode, inline)


def _encoder(version: str, batch: bool, options: Options, x: Any, kind: str) -> Any:
    def encode(probs: Any) -> Answer:
        if options.binary:
            return Answer(encode_binary(probs), kind, len(probs), BINARY)
        inputs = x if options.include_input else None
        return Answer(encode_predictions(probs, version, batch, options.top_k, inputs), kind, len(probs))

    return encode


async def _multipart_image(content_type: str, body: bytes, budgets: Budgets) -> bytes:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        Headers({"content-type": content_type}),
        stream(),
        max_files=1,
        max_fields=8,
        max_part_size=budgets.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InputError(400, f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InputError(
                422, "multipart body must carry the image in a file field named 'file' (curl -F file=@digit.png)"
            )
        return await upload.read()
    finally:
        await form.close()


async def answer(
    pipeline: Pipeline,
    receive: Any,
    *,
    media: str,
    content_type: str,
    declared: int | None,
    started: float,
    options: Options,
) -> tuple[Answer, ServedModel]:
    """One /predict request through the pipeline, for either lane."""
    if options.binary and options.top_k is not None:
        raise InputError(422, "top_k needs a JSON response; the application/octet-stream one has all 10 probabilities")
    if options.binary and options.include_input:
        raise InputError(422, "include=input needs a JSON response, not application/octet-stream")
    budgets = pipeline.budgets

    def build(body: bytes, served: ServedModel) -> Job:
        return _job(media, body, budgets, served.version, options)

    async def build_multipart(body: bytes, served: ServedModel) -> Job:
        data = await _multipart_image(content_type, body, budgets)
        if not data:
            raise InputError(400, "the multipart 'file' field is empty: send a PNG, JPEG or WebP image")
        if image.sniff(data) is None:
            raise InputError(415, "the uploaded file is not a PNG, JPEG or WebP image (unrecognised signature)")
        return _job(image.IMAGE_TYPES[0], data, budgets, served.version, options)

    limit = budgets.max_json_bytes if media == JSON else budgets.max_body_bytes
    result, served, _ = await pipeline.handle(
        receive,
        declared=declared,
        limit=limit,
        started=started,
        build=build_multipart if media == MULTIPART else build,
    )
    return result, served


@router.post(
    "/predict",
    summary="Classify digits: JSON vectors, images (PNG, JPEG, WebP), or raw uint8 / .npy batches",
    response_model=Prediction | BatchPrediction,
    responses=_ERRORS,
    openapi_extra=_OPENAPI,
)
async def predict(
    request: Request,
    top_k: Annotated[int | None, Query(ge=1, le=10, description="also return the k most probable labels")] = None,
    include: Annotated[
        list[Literal["input"]] | None,
        Query(description="`input`: also return the 28x28 image the model was given (base64 PNG and 784 values)"),
    ] = None,
) -> Response:
    headers = request.headers
    content_type = headers.get("content-type")
    media = media_type(content_type)
    options = Options(top_k, wants_binary(headers.get("accept")), bool(include))
    result, served = await answer(
        request.app.state.pipeline,
        request.receive,
        media=media,
        content_type=content_type or "",
        declared=declared_length(headers.get("content-length")),
        started=request.scope["state"]["started"],
        options=options,
    )
    request.state.input_kind = result.kind
    request.state.predictions = result.count
    return Response(
        result.body, media_type=result.media_type, headers={"x-model-version": served.version, **dict(result.headers)}
    )
