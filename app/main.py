"""The FastAPI application: ``create_app(settings)`` and the module-level ``app``.

``uvicorn app.main:app`` serves the bundled model from the project root with no arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send
from threadpoolctl import threadpool_limits

from app import __version__, metrics
from app.config import Settings, get_settings
from app.errors import InputError
from app.fast_lane import DirectLane, FastLaneDispatch
from app.logs import configure_logging
from app.middleware import RequestContextMiddleware, StartupErrorMiddleware
from app.registry import CheckpointError
from app.routes import admin, health, predict, ui, v2
from app.serving import Pipeline
from app.store import ModelStore

__all__ = ["Service", "app", "create_app"]

logger = logging.getLogger("app")

DESCRIPTION = """
Handwritten-digit classification with a PyTorch MLP trained on MNIST.

`POST /predict` takes one digit as JSON (`{"pixels": [784 floats in 0..1]}`), a batch
(`{"instances": [...]}`), a picture (PNG, JPEG or WebP: a raw body or `multipart/form-data` field `file`),
or bulk `application/octet-stream` uint8 pixels / `.npy` arrays, and answers with the ten class
probabilities, the label and the model version that computed them.
"""


class Service:
    """The ASGI app uvicorn serves: one middleware chain, the fast-lane dispatch, FastAPI behind it.

    ``chain`` is, outermost first: the startup-error filter, request id + access log + latency
    metrics, the predictions counter, then :class:`~app.fast_lane.FastLaneDispatch`, which hands
    small prediction requests to the lane and everything else (lifespan included) to ``api``,
    the FastAPI app with every route. Both lanes pass the same middlewares, built once.
    ``lane`` is the same fast lane for the launcher's protocol, which calls it without ASGI.
    """

    def __init__(self, api: FastAPI, chain: ASGIApp, lane: DirectLane | None = None) -> None:
        self.api = api
        self.chain = chain
        # The fast lane without ASGI, for the launcher's HTTP protocol (app.protocol); None: off.
        self.lane = lane

    @property
    def state(self) -> State:
        """The app's state: settings, and from startup on the model store and the pipeline."""
        return self.api.state

    def lifespan(self) -> contextlib.AbstractAsyncContextManager[object]:
        """Startup and shutdown without a server (tests, tools): ``async with service.lifespan():``."""
        return self.api.router.lifespan_context(self.api)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.chain(scope, receive, send)


def create_app(settings: Settings | None = None) -> Service:
    """The service on ``settings`` (default: from the environment): routes, middlewares, lifespan."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    startup_problem: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.setup()  # before the store: loading the model records mnist_model_info
        if settings.torch_threads:
            # One intra-op thread per worker: workers, not threads, use the cores for small batches.
            # numpy's BLAS too (an image's 20x20 resize is a small matrix product): its idle threads
            # spin on the cores the other workers need.
            torch.set_num_threads(settings.torch_threads)
            threadpool_limits(settings.torch_threads, user_api="blas")
        store = ModelStore(settings)
        app.state.store = store
        try:
            served = await asyncio.to_thread(store.start)
        except CheckpointError as exc:
            message = f"cannot start: {exc.path}: {exc.problem}"
            startup_problem.append(message)
            logger.error(message)
            raise RuntimeError(message) from None
        logger.info(
            "serving model %s on %s (test accuracy %s, canary %.1f%%)",
            served.version,
            served.device,
            served.meta.get("test_accuracy"),
            100 * served.canary_accuracy,
        )
        app.state.pipeline = Pipeline(settings, store, observe_batch=metrics.observe_batch)
        watcher = asyncio.create_task(store.watch(), name="pointer-watch") if store.watching else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            store.close()
            metrics.model_unloaded(store.serving_version)
            for handler in logging.getLogger("app").handlers:  # the buffered access lines (app.logs)
                handler.flush()

    app = FastAPI(
        title="MNIST digit service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(predict.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    app.include_router(v2.router)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error (request_id=%s)", getattr(request.state, "request_id", "-"))
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # Built inside out: each wraps the one before. FastAPI's own per-request layers (its error
    # and body-limit middlewares, routing) are behind the dispatch: the fast lane skips them.
    chain: ASGIApp = FastLaneDispatch(app, app.state) if settings.fast_lane else app
    chain = metrics.PredictionCounter(chain)
    context = RequestContextMiddleware(chain, access_log=settings.access_log, observe=metrics.observe_request)
    chain = StartupErrorMiddleware(context, message=lambda: startup_problem[-1] if startup_problem else None)
    return Service(app, chain, DirectLane(app.state, context) if settings.fast_lane else None)


app = create_app()
