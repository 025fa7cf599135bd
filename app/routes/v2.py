"""The Open Inference Protocol (KServe v2) REST endpoints for one model, ``mnist``.

Health, server and model metadata, and inference with the binary tensor data and classification
extensions, so tritonclient and other v2 clients talk to this service unchanged. The wire format
lives in :mod:`app.v2_codec`, tensor decoding in :mod:`app.decode`; these handlers stay thin.

Errors answer in the protocol's shape, ``{"error": "..."}``: 400 for unusable requests (where
``/predict`` says 422), 404 for an unknown model, version or endpoint, 413 over the size limits,
503 before a model is loaded.

Versions: the metadata lists every stored version (any can be activated), but only the served
one answers inference; ``/versions/<other>/infer`` is refused with a message saying which
version serves and how to activate another. Models are never loaded per request.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from app.deps import StoreDep
from app.errors import InputError
from app.registry import list_versions
from app.serving import Answer, Job, Pipeline, current_model, declared_length
from app.store import ModelStore, ServedModel
from app.v2_codec import MODEL_NAME, infer_job, model_metadata, server_metadata

__all__ = ["INFER_PATH", "answer", "error_body", "router"]

INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def error_body(status: int, message: str) -> tuple[int, bytes]:
    """The protocol's error answer: ``{"error": ...}``, and /predict's 422 ("well-formed but unusable") as 400."""
    return (400 if status == 422 else status), orjson.dumps({"error": message})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    status, body = error_body(status, message)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class _ProtocolRoute(APIRoute):
    """Answers this router's client errors as ``{"error": ...}`` without touching the app's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except InputError as exc:
                return _error(exc.status_code, exc.detail, headers=exc.headers)
            except HTTPException as exc:
                return _error(exc.status_code, str(exc.detail), headers=exc.headers)
            except RequestValidationError as exc:
                return _error(400, "; ".join(str(e.get("msg", "invalid")) for e in exc.errors()))

        return route


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=_ProtocolRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": 'unusable request: `{"error": "..."}`'},
    404: {"description": "unknown model or version"},
    413: {"description": "body, image or batch over the configured limits"},
    503: {"description": "no model loaded yet"},
}

_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "examples": {
                    "FP32 [1, 784]": {
                        "value": {
                            "id": "42",
                            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}],
                        }
                    },
                    "top-3 classification": {
                        "value": {
                            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}],
                            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
                        }
                    },
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: the JSON header (length in the "
                "Inference-Header-Content-Length header) followed by the raw tensors",
            },
        },
    }
}


def _check_model(name: str) -> None:
    if name != MODEL_NAME:
        raise InputError(404, f"unknown model {name!r}: this server serves '{MODEL_NAME}'")


def _versions(store: ModelStore, served: ServedModel) -> list[str]:
    stored = list_versions(store.models_dir)
    return stored if served.version in stored else [*stored, served.version]


def _check_version(store: ModelStore, served: ServedModel, version: str) -> None:
    if version != served.version and version not in list_versions(store.models_dir):
        raise InputError(
            404,
            f"model '{MODEL_NAME}' has no version {version!r}; serving {served.version!r}, see GET /v2/models/mnist",
        )


# --------------------------------------------------------------------------------------------
# Health and metadata


@router.get("", summary="Server metadata: name, version, extensions")
@router.get("/", include_in_schema=False)
async def server_meta() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live", summary="The server is up")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="A model is loaded (503 until then)", responses={503: _ERRORS[503]})
async def server_ready(store: StoreDep) -> JSONResponse:
    ready = store.current is not None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{model_name}", summary="Model metadata: versions, inputs and outputs", responses=_ERRORS)
async def model_meta(model_name: str, store: StoreDep) -> dict[str, Any]:
    _check_model(model_name)
    served = current_model(store)
    return model_metadata(_versions(store, served), served.version)


@router.get("/models/{model_name}/versions/{version}", summary="Metadata of a stored version", responses=_ERRORS)
async def model_version_meta(model_name: str, version: str, store: StoreDep) -> dict[str, Any]:
    _check_model(model_name)
    served = current_model(store)
    _check_version(store, served, version)
    return model_metadata(_versions(store, served), served.version)


@router.get("/models/{model_name}/ready", summary="The model is loaded and serving", responses=_ERRORS)
async def model_ready(model_name: str, store: StoreDep) -> JSONResponse:
    _check_model(model_name)
    ready = store.current is not None
    return JSONResponse({"name": MODEL_NAME, "ready": ready}, status_code=200 if ready else 503)


@router.get(
    "/models/{model_name}/versions/{version}/ready",
    summary="This version is the one serving (503 for a stored version that is not loaded)",
    responses=_ERRORS,
)
async def model_version_ready(model_name: str, version: str, store: StoreDep) -> JSONResponse:
    _check_model(model_name)
    served = current_model(store)
    _check_version(store, served, version)
    ready = version == served.version
    return JSONResponse({"name": MODEL_NAME, "ready": ready}, status_code=200 if ready else 503)


# --------------------------------------------------------------------------------------------
# Inference


async def answer(
    pipeline: Pipeline,
    receive: Any,
    *,
    declared: int | None,
    started: float,
    header_length: str | None,
    encoding: str | None,
) -> tuple[Answer, ServedModel]:
    """One v2 inference request through the pipeline, for either lane."""
    budgets = pipeline.budgets

    def build(body: bytes, served: ServedModel) -> Job:
        return infer_job(body, header_length, encoding, budgets, served.version)

    result, served, _ = await pipeline.handle(
        receive, declared=declared, limit=budgets.max_body_bytes, started=started, build=build
    )
    return result, served


async def _infer(request: Request) -> Response:
    headers = request.headers
    result, served = await answer(
        request.app.state.pipeline,
        request.receive,
        declared=declared_length(headers.get("content-length")),
        started=request.scope["state"]["started"],
        header_length=headers.get("inference-header-content-length"),
        encoding=headers.get("content-encoding"),
    )
    request.state.input_kind = result.kind
    request.state.predictions = result.count
    return Response(
        result.body, media_type=result.media_type, headers={"x-model-version": served.version, **dict(result.headers)}
    )


@router.post(
    "/models/{model_name}/infer",
    summary="Classify digits (FP32, UINT8 or PNG BYTES tensors) with the serving version",
    responses=_ERRORS,
    openapi_extra=_INFER_OPENAPI,
)
async def infer(model_name: str, request: Request) -> Response:
    _check_model(model_name)
    return await _infer(request)


@router.post(
    "/models/{model_name}/versions/{version}/infer",
    summary="Classify digits with a named version; only the serving version answers",
    responses=_ERRORS,
    openapi_extra=_INFER_OPENAPI,
)
async def infer_version(model_name: str, version: str, request: Request, store: StoreDep) -> Response:
    _check_model(model_name)
    served = current_model(store)
    _check_version(store, served, version)
    if version != served.version:
        raise InputError(
            400,
            f"model '{MODEL_NAME}' version {version!r} is stored but not loaded; this server is serving "
            f"{served.version!r}. Infer with /v2/models/{MODEL_NAME}/infer (or /versions/{served.version}/infer), "
            f'or activate {version!r} first: POST /admin/reload {{"version": "{version}"}} or '
            f"python -m training.publish {version}",
        )
    return await _infer(request)


# --------------------------------------------------------------------------------------------
# Anything else under /v2 (tritonclient's repository, statistics, shared-memory calls...)


@router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
async def unknown_endpoint(path: str, request: Request) -> Response:
    where = request.scope["path"]
    allowed = sorted(
        {
            method
            for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint is not unknown_endpoint
            if route.path_regex.match(where)
            for method in route.methods or ()
        }
    )
    if allowed:
        message = f"{request.method} is not allowed on {where}: use {', '.join(allowed)}"
        return _error(405, message, headers={"Allow": ", ".join(allowed)})
    return _error(
        404, f"no such endpoint {request.method} {where}: this server has the v2 health, metadata and infer endpoints"
    )
