"""The fast lane: small prediction requests answered straight from ASGI, past FastAPI's routing.

A one-digit request spends a large share of its worker time in the framework between the
middlewares and the endpoint: routing, parameter solving, the Request and Response objects.
:class:`FastLaneDispatch` is the last middleware of the app (app.main): it hands the requests
this lane can take to :func:`serve` and everything else to FastAPI's router. The lane takes:

* ``POST /predict`` with no query string and a Content-Type that is not multipart;
* ``POST /v2/models/mnist/infer`` with no query string and no Content-Encoding;

each with a declared Content-Length of at most ``INLINE_BYTES`` and no Transfer-Encoding, and
no repeated header among the ones it reads (the routed lane decides which of two counts). Both
lanes call the same route functions (:func:`app.routes.predict.answer`,
:func:`app.routes.v2.answer`), so limits, errors and answers are the same; the request-id,
access-log and metrics middlewares wrap both, being outside the dispatch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import InputError
from app.metrics import count_predictions
from app.middleware import RequestContextMiddleware
from app.routes import predict, v2
from app.serving import INLINE_BYTES, Pipeline

__all__ = ["DirectLane", "FastLaneDispatch", "LaneRequest", "eligible", "respond"]

logger = logging.getLogger("app")

_PREDICT_TYPES = frozenset(t for t in predict.ACCEPTED if t != "multipart/form-data")
# The route templates the metrics label these requests with, as the router would.
_TEMPLATES = {"predict": "/predict", "v2": "/v2/models/{model_name}/infer"}


@dataclass(frozen=True, slots=True)
class LaneRequest:
    """What :func:`eligible` read from the headers, handed to the lane."""

    endpoint: str  # "predict" or "v2"
    length: int
    media: str  # /predict: the media type
    accept: str
    header_length: str | None  # v2: Inference-Header-Content-Length


def eligible(scope: Scope) -> LaneRequest | None:
    """The lane's reading of this request's headers, or None when the routed lane must take it."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["query_string"]:
        return None
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path == "/predict":
        endpoint = "predict"
    elif path == v2.INFER_PATH:
        endpoint = "v2"
    else:
        return None
    media = length = accept = header_length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if media is not None:
                return None
            media = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        elif name == b"content-length":
            if length is not None:
                return None
            length = value
        elif name == b"accept":
            if accept is not None:
                return None
            accept = value.decode("latin-1")
        elif name == b"inference-header-content-length":
            if header_length is not None:
                return None
            header_length = value.decode("latin-1")
        elif name in (b"transfer-encoding", b"content-encoding"):
            return None
    if length is None or not length.isdigit() or int(length) > INLINE_BYTES:
        return None
    if endpoint == "predict" and media not in _PREDICT_TYPES:
        return None
    return LaneRequest(endpoint, int(length), media or "", accept or "", header_length)


class FastLaneDispatch:
    """Eligible requests to the lane, the rest (and the lifespan) to ``app``, the FastAPI app.

    ``app_state`` is that app's state, where the lifespan puts the pipeline.
    """

    def __init__(self, app: ASGIApp, app_state: State) -> None:
        self.app = app
        self.app_state = app_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = eligible(scope) if scope["type"] == "http" else None
        if lane is None:
            await self.app(scope, receive, send)
        else:
            await serve(lane, self.app_state.pipeline, scope, receive, send)


Header = tuple[bytes, bytes]
Response = tuple[int, list[Header], bytes]


async def serve(lane: LaneRequest, pipeline: Pipeline, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one eligible request through ASGI ``send``, errors in its route's format."""
    answer = await respond(lane, pipeline, scope, receive)
    if answer is not None:
        status, headers, body = answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def respond(lane: LaneRequest, pipeline: Pipeline, scope: Scope, receive: Receive) -> Response | None:
    """One eligible request's answer: status, headers, body; None when the client left."""
    state = scope.setdefault("state", {})
    state["route_template"] = _TEMPLATES[lane.endpoint]
    started: float = state.get("started") or time.perf_counter()
    try:
        if lane.endpoint == "predict":
            options = predict.Options(binary=predict.wants_binary(lane.accept))
            result, served = await predict.answer(
                pipeline,
                receive,
                media=lane.media,
                content_type=lane.media,
                declared=lane.length,
                started=started,
                options=options,
            )
        else:
            result, served = await v2.answer(
                pipeline,
                receive,
                declared=lane.length,
                started=started,
                header_length=lane.header_length,
                encoding=None,
            )
    except InputError as exc:
        if exc.status_code == 499:  # the client left: nobody to answer (the access line says 499)
            state["client_left"] = True
            return None
        status, body = (
            (exc.status_code, orjson.dumps({"detail": exc.detail}))
            if lane.endpoint == "predict"
            else v2.error_body(exc.status_code, exc.detail)
        )
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
        return status, _headers(body, b"application/json", extra), body
    except Exception:
        logger.exception("unhandled error (request_id=%s)", state.get("request_id", "-"))
        body = orjson.dumps({"detail": "internal server error"})
        return 500, _headers(body, b"application/json", []), body
    state["input_kind"] = result.kind
    state["predictions"] = result.count
    extra = [(b"x-model-version", served.version.encode("latin-1"))]
    extra += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
    return 200, _headers(result.body, result.media_type.encode("latin-1"), extra), result.body


def _headers(body: bytes, content_type: bytes, extra: list[Header]) -> list[Header]:
    return [*extra, (b"content-length", str(len(body)).encode()), (b"content-type", content_type)]


class DirectLane:
    """The lane as the launcher's HTTP protocol calls it (app.protocol): no ASGI in between.

    Under ``python -m app`` an eligible request does not go through the ASGI middleware chain:
    the protocol asks :meth:`respond` for the whole answer and writes it. The answer is the same
    (:func:`respond` is what the ASGI lane sends), and so are the request id, the access line,
    the latency and prediction metrics: the chain's own middlewares do them, called directly.
    """

    def __init__(self, app_state: State, context: RequestContextMiddleware) -> None:
        self.app_state = app_state
        self.context = context

    async def respond(self, lane: LaneRequest, scope: Scope, receive: Receive) -> Response | None:
        header = self.context.begin(scope)
        status = 500
        try:
            answer = await respond(lane, self.app_state.pipeline, scope, receive)
            if answer is None:
                return None
            status = answer[0]
            answer[1].append(header)
            return answer
        finally:
            count_predictions(scope)
            self.context.finish(scope, status)
