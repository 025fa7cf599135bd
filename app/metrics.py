"""Prometheus metrics covering every worker, served as ``GET /metrics``.

Uvicorn's ``--workers N`` runs N processes and a scrape reaches one of them. prometheus-client's
multiprocess mode has each process write its values into mmap'ed files in one folder, and
``/metrics`` adds up every file there, so each scrape reports all workers (those that exited
too: their counters stay in the sums, as counters should). The folder is
``PROMETHEUS_MULTIPROC_DIR`` when set, else ``<runtime dir>/prometheus`` (``app.workers``): the
workers of one server share it and no other server does. prometheus-client picks its mode when
it is imported, which is why this module settles the folder before importing it.

Metrics (names as exposed):

* ``mnist_http_requests_total{method,route,status}``: requests answered; ``route`` is the route
  template (``/predict``), ``<unmatched>`` for unknown paths; unusual methods count as ``OTHER``.
* ``mnist_http_request_duration_seconds{method,route,status}``: latency histogram, first request
  byte to last response byte.
* ``mnist_predictions_total{input_kind}``: images classified, by input kind (json, png, uint8, npy).
* ``mnist_model_info{version}``: the info metric: 1 for each version that a live worker serves,
  0 for a version no longer served (a gauge: prometheus-client's ``Info`` has no multiprocess mode).
* ``mnist_model_reloads_total{result}``: ``success`` (a new version swapped in) or ``failure``
  (a candidate rejected, the old model kept serving).
* ``mnist_inference_batch_size``: images per forward pass, observed by the micro-batcher.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any

from app.workers import default_runtime_dir, pid_alive

logger = logging.getLogger("app.metrics")

# Set beside PROMETHEUS_MULTIPROC_DIR when we derived it, so a child process (a server started
# by a test run, say) derives its own folder instead of sharing its parent's numbers.
_DERIVED_MARK = "MNIST_PROMETHEUS_DIR_DERIVED"


def _clear_live_gauges(directory: Path, stale_only: bool) -> None:
    """Remove live-mode gauge files: this process's, and with ``stale_only`` those of dead pids.

    A live gauge must vanish with its process (``multiprocess.mark_process_dead``); a worker that
    was killed could not do it, and a new worker that inherits its pid must not inherit its values.
    """
    own = os.getpid()
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if not pid.isdigit():
            continue
        if int(pid) == own or (stale_only and not pid_alive(int(pid))):
            path.unlink(missing_ok=True)


def _setup_multiprocess_dir() -> Path | None:
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    derived = not explicit or explicit == os.environ.get(_DERIVED_MARK)
    directory = default_runtime_dir() / "prometheus" if derived else Path(str(explicit))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _clear_live_gauges(directory, stale_only=True)
    except OSError as exc:
        logger.warning("metrics cover this worker only: cannot use %s (%s)", directory, exc)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if derived:
        os.environ[_DERIVED_MARK] = str(directory)
    return directory


_imported_early = "prometheus_client" in sys.modules
_directory = _setup_multiprocess_dir()

from fastapi import APIRouter  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

__all__ = [
    "BATCH_SIZE",
    "MODEL_INFO",
    "MULTIPROC_DIR",
    "PREDICTIONS",
    "RELOADS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "PredictionCounter",
    "model_swapped",
    "model_unloaded",
    "observe_batch",
    "observe_request",
    "reload_failed",
    "render",
    "router",
]

# Only when prometheus-client really runs in multiprocess mode: imported before us (in a test
# process, say), it keeps its in-memory values and /metrics reports this process alone.
MULTIPROC_DIR: Path | None = _directory if getattr(values.ValueClass, "_multiprocess", False) else None
if _directory is not None and MULTIPROC_DIR is None and _imported_early:
    logger.warning("prometheus_client was imported before app.metrics: /metrics covers this process only")

# From 0.5 ms (a single-digit JSON request) to 10 s (a batch at the body limit on a slow core).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Anything else is folded into OTHER so a client cannot grow the label set at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "mnist_http_requests", "HTTP requests answered, by method, route template and status", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "mnist_http_request_duration_seconds",
    "Time from the request to the end of the response, by method, route template and status",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
PREDICTIONS = Counter("mnist_predictions", "Images classified, by input kind (json, png, uint8, npy)", ["input_kind"])
MODEL_INFO = Gauge(
    "mnist_model_info",
    "Model versions served: 1 while a live worker serves the version, 0 once none does (the info metric)",
    ["version"],
    multiprocess_mode="livemax",
)
RELOADS = Counter(
    "mnist_model_reloads",
    "Model reloads: success swapped a new version in, failure rejected one and kept the old",
    ["result"],
)
BATCH_SIZE = Histogram(
    "mnist_inference_batch_size",
    "Images per model forward pass (observed by the micro-batcher)",
    buckets=_BATCH_BUCKETS,
)

# Labelled children by (method, route, status): .labels() costs more than the increment itself.
_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_prediction_children: dict[str, Any] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """The ``observe`` callback of ``RequestContextMiddleware``: one request answered."""
    if method not in _METHODS:
        method = "OTHER"
    key = (method, route, status)
    children = _request_children.get(key)
    if children is None:
        labels = (method, route, str(status))
        children = _request_children[key] = (REQUESTS.labels(*labels), REQUEST_SECONDS.labels(*labels))
    children[0].inc()
    children[1].observe(seconds)


def observe_batch(size: int) -> None:
    """One forward pass over ``size`` images (for the micro-batcher)."""
    BATCH_SIZE.observe(size)


def model_swapped(previous: str | None, version: str) -> None:
    """The worker now serves ``version`` instead of ``previous`` (``None`` at startup)."""
    if previous is not None:
        RELOADS.labels("success").inc()
        if previous != version:
            MODEL_INFO.labels(previous).set(0)
    MODEL_INFO.labels(version).set(1)


def reload_failed() -> None:
    RELOADS.labels("failure").inc()


def model_unloaded(version: str | None) -> None:
    """Worker shutdown: it serves nothing any more.

    Uvicorn ends a worker by re-raising SIGTERM, so exit handlers do not run; zeroing the
    worker's own series here keeps a stopped worker out of ``mnist_model_info`` (its file goes
    when the next worker starts, see ``_clear_live_gauges``).
    """
    if version is not None:
        MODEL_INFO.labels(version).set(0)


class PredictionCounter:
    """Pure ASGI middleware counting the images that ``/predict`` reports in the request state.

    The handler sets ``request.state.input_kind`` and ``request.state.predictions``; reading them
    here keeps metric calls out of the route.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            state = scope.get("state") or {}
            kind = state.get("input_kind")
            if kind is not None:
                child = _prediction_children.get(kind)
                if child is None:
                    child = _prediction_children[kind] = PREDICTIONS.labels(kind)
                child.inc(state.get("predictions", 0))


def render() -> bytes:
    """The exposition text: every worker's values in multiprocess mode, else this process's."""
    if MULTIPROC_DIR is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(MULTIPROC_DIR))
    return generate_latest(registry)


def _process_exit() -> None:
    # multiprocess.mark_process_dead(pid) for this process, when it exits normally.
    if MULTIPROC_DIR is not None:
        _clear_live_gauges(MULTIPROC_DIR, stale_only=False)


atexit.register(_process_exit)

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics of all workers (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics() -> Response:
    # A plain def: reading the workers' files is blocking I/O, so it runs in the threadpool.
    return Response(render(), media_type=CONTENT_TYPE_LATEST)
