"""``POST /predict``: one endpoint, the input form chosen by ``Content-Type``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Annotated, Any

import anyio
import numpy as np
import orjson
import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import State, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive, Scope, Send

from app.batching import MicroBatcher
from app.config import Settings
from app.decode import decode_json, decode_npy, decode_uint8
from app.deps import read_body
from app.errors import InputError
from app.image import decode_png, png_declared_pixels
from app.inference import encode_binary, encode_predictions, predict_proba
from app.schemas import BatchPrediction, ErrorResponse, InstancesRequest, PixelsRequest, Prediction
from app.store import ServedModel

__all__ = ["FastPredict", "fast_lane_eligible", "router"]


class _PredictRoute(APIRoute):
    """``/predict`` skips FastAPI's parameter solving when there is nothing to solve.

    Without a query string the endpoint's only input is the request itself, and calling it
    directly saves ~10 % of a single-digit request (docs/performance.md). With one (``top_k``),
    FastAPI's own handler parses and validates it, with its usual 422 messages.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solved = super().get_route_handler()

        async def handler(request: Request) -> Response:
            if request.scope.get("query_string"):
                return await solved(request)
            return await predict(request)

        return handler


router = APIRouter(tags=["predict"], route_class=_PredictRoute)

JSON_TYPES = ("application/json",)
PNG_TYPES = ("image/png",)
MULTIPART_TYPES = ("multipart/form-data",)
RAW_TYPES = ("application/octet-stream",)
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED = (*JSON_TYPES, *PNG_TYPES, *MULTIPART_TYPES, *RAW_TYPES, *NPY_TYPES)
# Bodies above this size are decoded and predicted in the threadpool: small ones are cheaper
# inline than a thread hop, big ones (batches, large PNGs) would stall the event loop.
INLINE_LIMIT = 64 * 1024
# A small PNG can still declare a huge image: above this many pixels it is decoded in a thread.
INLINE_PIXELS = 512 * 512
BINARY = "application/octet-stream"

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


def _wants_binary(accept: str | None) -> bool:
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


def _current(request: Request) -> ServedModel:
    # Read once: the request keeps this model even if a reload swaps another in meanwhile.
    served: ServedModel | None = request.app.state.store.current
    if served is None:
        raise HTTPException(503, "no model loaded yet")
    return served


def _forward(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    # Looked up at call time, so a patched predict_proba (tests) reaches batched requests too.
    return predict_proba(model, x, device)  # type: ignore[arg-type]


class _LoopLocal:
    """The micro-batcher and the big-request limiter of one app on one event loop.

    Made on first use rather than in the lifespan: each event loop (a worker's, or each
    TestClient's) gets its own, since futures and limiters belong to the loop that made them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings) -> None:
        self.loop = loop
        # Big requests: as many computing at once as this worker's share of the cores, plus one
        # being read. Each holds its body, a float32 copy and activations (~80 MB for 10,000
        # images); more at once would only add memory and cache misses. The rest wait with their
        # bytes still in the socket (flow control), not in this process.
        self.compute = anyio.CapacityLimiter(max(1, _cpus() // settings.workers))
        self.admit = anyio.CapacityLimiter(self.compute.total_tokens + 1)
        self.batcher = (
            MicroBatcher(_forward, settings.microbatch_max_rows, settings.microbatch_max_wait_ms / 1000)
            if settings.microbatch
            else None
        )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _loop_local(state: State) -> _LoopLocal:
    local: _LoopLocal | None = getattr(state, "predict_loop_local", None)
    loop = asyncio.get_running_loop()
    if local is None or local.loop is not loop:
        local = state.predict_loop_local = _LoopLocal(loop, state.settings)
    return local


def _small(request: Request) -> bool:
    """A declared Content-Length within INLINE_LIMIT (chunked or invalid: not known to be small)."""
    declared = request.headers.get("content-length")
    return declared is not None and declared.isdigit() and int(declared) <= INLINE_LIMIT


def _decode(media: str, body: bytes, settings: Settings, scale: bool = True) -> tuple[np.ndarray, bool]:
    """Float32 ``[N, 784]`` rows and whether the answer is a batch; ``scale=False`` may give uint8 rows."""
    if media in JSON_TYPES:
        return decode_json(body, settings.max_batch_size)
    if media in RAW_TYPES:
        return decode_uint8(body, settings.max_batch_size, scale), True
    if media in NPY_TYPES:
        return decode_npy(body, settings.max_batch_size, scale), True
    return decode_png(body, settings.max_image_pixels), False


def _encode(probs: np.ndarray, served: ServedModel, batch: bool, top_k: int | None, binary: bool) -> bytes:
    return encode_binary(probs) if binary else encode_predictions(probs, served.version, batch, top_k)


def _run(
    media: str, body: bytes, settings: Settings, served: ServedModel, top_k: int | None, binary: bool
) -> tuple[bytes, int]:
    # uint8 rows stay uint8 here: predict_proba scales them chunk by chunk (bit-identical).
    x, batch = _decode(media, body, settings, scale=False)
    probs = predict_proba(served.model, x, served.device)
    return _encode(probs, served, batch, top_k, binary), len(x)


@router.post(
    "/predict",
    summary="Classify digits: JSON vectors, PNG images, or raw uint8 / .npy batches",
    response_model=Prediction | BatchPrediction,
    responses=_ERRORS,
    openapi_extra=_OPENAPI,
)
async def predict(
    request: Request,
    top_k: Annotated[int | None, Query(ge=1, le=10, description="also return the k most probable labels")] = None,
) -> Response:
    # The hot route takes no dependencies: each sync dependency costs a threadpool round trip,
    # and the settings and the store are plain attributes of the app (docs/performance.md).
    served = _current(request)
    settings: Settings = request.app.state.settings
    media = _media_type(request)
    binary = _wants_binary(request.headers.get("accept"))
    if binary and top_k is not None:
        raise InputError(422, "top_k needs a JSON response; the application/octet-stream one has all 10 probabilities")
    local = _loop_local(request.app.state)
    if _small(request):
        payload, count = await _respond(request, media, settings, served, top_k, binary, local)
    else:
        async with local.admit:
            payload, count = await _respond(request, media, settings, served, top_k, binary, local)
    request.state.input_kind = _kind(media)
    request.state.predictions = count
    return Response(
        payload, media_type=BINARY if binary else "application/json", headers={"x-model-version": served.version}
    )


async def _respond(
    request: Request,
    media: str,
    settings: Settings,
    served: ServedModel,
    top_k: int | None,
    binary: bool,
    local: _LoopLocal,
) -> tuple[bytes, int]:
    body = await read_body(request, settings.max_body_bytes)
    if media in MULTIPART_TYPES:
        body = await _multipart_png(request, body, settings)
        media = PNG_TYPES[0]
    return await _answer(media, body, settings, served, top_k, binary, local)


async def _answer(
    media: str,
    body: bytes,
    settings: Settings,
    served: ServedModel,
    top_k: int | None,
    binary: bool,
    local: _LoopLocal,
) -> tuple[bytes, int]:
    """Decode, predict and encode a body that has been read: the same for both lanes."""
    if len(body) > INLINE_LIMIT or (media in PNG_TYPES and png_declared_pixels(body) > INLINE_PIXELS):
        return await anyio.to_thread.run_sync(_run, media, body, settings, served, top_k, binary, limiter=local.compute)
    if local.batcher is None:
        return _run(media, body, settings, served, top_k, binary)
    x, batch = _decode(media, body, settings)
    probs = await local.batcher.predict(served, x)
    return _encode(probs, served, batch, top_k, binary), len(x)


def _kind(media: str) -> str:
    return {
        "application/json": "json",
        "image/png": "png",
        "application/octet-stream": "uint8",
        "application/x-npy": "npy",
        "application/npy": "npy",
    }.get(media, media)


# --------------------------------------------------------------------------------------------
# The fast lane: small POST /predict bodies straight from ASGI.
#
# A one-digit request spends about a third of its worker time in the framework layers between
# uvicorn and the endpoint (routing, FastAPI's and Starlette's middlewares, Request and Response
# objects; docs/performance.md). ``ServiceApp`` in app.main hands the requests this lane can take
# to ``FastPredict`` before all of that; everything else (a query string such as top_k, multipart,
# a missing or unknown Content-Type, chunked or big bodies, other paths) takes the usual route.
# Both lanes share ``_answer``, so decoding, limits, error messages and answers are the same; the
# request-id, access-log and metrics middlewares wrap this lane too (app.main).

_FAST_TYPES = frozenset((*JSON_TYPES, *PNG_TYPES, *RAW_TYPES, *NPY_TYPES))
_FAST = "mnist.fast_lane"  # scope key: (media type, Accept) as read by fast_lane_eligible


def fast_lane_eligible(scope: Scope) -> bool:
    """Whether ``FastPredict`` answers this request; notes what it read in the scope if so.

    Only ``POST /predict`` with no query string, a supported non-multipart Content-Type and a
    declared Content-Length of at most INLINE_LIMIT bytes (and no Transfer-Encoding).
    """
    if scope["method"] != "POST" or scope["query_string"]:
        return False
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path != "/predict":
        return False
    media = length = accept = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if media is not None:  # repeated: the routed lane decides which one counts
                return False
            media = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        elif name == b"content-length":
            if length is not None:
                return False
            length = value
        elif name == b"accept":
            if accept is not None:
                return False
            accept = value.decode("latin-1")
        elif name == b"transfer-encoding":
            return False
    if media not in _FAST_TYPES or length is None or not length.isdigit() or int(length) > INLINE_LIMIT:
        return False
    scope[_FAST] = (media, int(length), accept or "")
    return True


class FastPredict:
    """The ASGI endpoint of the fast lane (see ``fast_lane_eligible``)."""

    def __init__(self, route: APIRoute, log: logging.Logger) -> None:
        self.route = route  # for the metrics' route label, as the router would set it
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        media, length, accept = scope.pop(_FAST)
        state: State = scope["app"].state
        settings: Settings = state.settings
        limit = settings.max_body_bytes
        try:
            # The routed lane's checks, in its order: the model, then read_body's limit.
            served: ServedModel | None = state.store.current
            if served is None:
                raise InputError(503, "no model loaded yet")
            if length > limit:
                raise InputError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
            body = await _receive_small(receive, limit)
            if body is None:  # the client went away: nobody to answer
                return
            binary = _wants_binary(accept)
            payload, count = await _answer(media, body, settings, served, None, binary, _loop_local(state))
        except InputError as exc:
            await _send(send, exc.status_code, _error_body(exc.detail), b"application/json", ())
            return
        except Exception:
            request_id = scope.get("state", {}).get("request_id", "-")
            self.log.exception("unhandled error (request_id=%s)", request_id)
            await _send(send, 500, _error_body("internal server error"), b"application/json", ())
            return
        request_state = scope.setdefault("state", {})
        request_state["input_kind"] = _kind(media)
        request_state["predictions"] = count
        content_type = BINARY.encode() if binary else b"application/json"
        await _send(send, 200, payload, content_type, ((b"x-model-version", served.version.encode("latin-1")),))


async def _receive_small(receive: Receive, limit: int) -> bytes | None:
    """The whole body, cut off like ``read_body`` past ``limit`` bytes; None if the client left.

    The declared length is within INLINE_LIMIT and the HTTP server holds the body to it, so the
    check here only matters behind a server that does not.
    """
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise InputError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _error_body(detail: str) -> bytes:
    return orjson.dumps({"detail": detail})


Header = tuple[bytes, bytes]


async def _send(send: Send, status: int, body: bytes, content_type: bytes, extra: tuple[Header, ...]) -> None:
    headers = [*extra, (b"content-length", str(len(body)).encode()), (b"content-type", content_type)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
