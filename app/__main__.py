"""``python -m app`` (or ``mnist-serve``): run uvicorn with the settings from ``MNIST_*``."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import uvicorn

from app.config import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["main", "serving_app"]


def serving_app() -> FastAPI:
    """The app, whose startup ends by moving every object alive then out of the collector's sight.

    Uvicorn calls this factory in each worker. Imports and model loading leave ~350,000 tracked
    objects (torch, FastAPI, pydantic; loading a checkpoint pulls in torch._dynamo and sympy),
    and a full collection walking them takes ~100 ms: under load that came about every second
    and set the p99 latency (docs/performance.md). Frozen once startup is done, they are never
    walked again; what requests allocate is collected as usual.
    """
    from app.main import app

    startup = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with startup(app) as state:
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan
    return app


def _fastest(preferred: str, module: str) -> str:
    # uvloop and httptools come with uvicorn[standard]; "auto" would pick them too, but silently
    # fall back: naming them makes the choice visible, and the fallback keeps other platforms working.
    return preferred if importlib.util.find_spec(module) is not None else "auto"


def main() -> None:
    settings = get_settings()
    # Uvicorn drains in-flight requests on SIGTERM, then re-raises the signal through the handler
    # that was installed before it started. A no-op handler here turns that completed, graceful
    # shutdown into exit status 0 (what orchestrators expect) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "app.__main__:serving_app",
        factory=True,
        loop=_fastest("uvloop", "uvloop"),
        http=_fastest("httptools", "httptools"),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        # Our middleware writes one structured line per request; uvicorn's would duplicate it.
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
    )


if __name__ == "__main__":
    main()
