"""Prometheus metrics covering every worker, served as ``GET /metrics``.

Uvicorn's ``--workers N`` runs N processes and a scrape reaches one of them. prometheus-client's
multiprocess mode has each process write its values into mmap'ed files in one folder, and
``/metrics`` adds up every file there, so each scrape reports all workers (those that exited
too: their counters stay in the sums, as counters should). The folder is
``PROMETHEUS_MULTIPROC_DIR`` when set, else ``<runtime dir>/prometheus`` (``app.workers``): the
workers of one server share it and no other server does.

Nothing happens at import. :func:`share_folder` settles the folder; the launcher calls it before
it starts the workers, which inherit it. :func:`setup` (the app's lifespan, in each worker) does
the same, then creates the metrics. prometheus-client chooses between in-memory and file-backed
values once, when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``: that is why this module
imports it only in :func:`setup`, after the folder is settled. Both calls are idempotent.

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
* ``mnist_model_fallbacks_total``: worker starts that served the last good (or newest passing)
  version because ``CURRENT`` was missing, unreadable or refused (``/model`` says why).
* ``mnist_inference_batch_size``: images per forward pass, observed by the micro-batcher.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from bisect import bisect_left
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.workers import default_runtime_dir, pid_alive

__all__ = [
    "PredictionCounter",
    "count_predictions",
    "model_fallback",
    "model_swapped",
    "model_unloaded",
    "observe_batch",
    "observe_request",
    "flush",
    "reload_failed",
    "render",
    "router",
    "setup",
    "share_folder",
]

logger = logging.getLogger("app.metrics")

# Set beside PROMETHEUS_MULTIPROC_DIR when we derived it, so a child process (a server started
# by a test run, say) derives its own folder instead of sharing its parent's numbers.
_DERIVED_MARK = "MNIST_PROMETHEUS_DIR_DERIVED"

# From 0.5 ms (a single-digit JSON request) to 10 s (a batch at the body limit on a slow core).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The buckets' upper bounds as prometheus-client keeps them, +Inf last.
_LATENCY_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
_BATCH_BOUNDS = (*map(float, _BATCH_BUCKETS), float("inf"))
# The most the per-request metrics lag behind (see flush).
_FLUSH_SECONDS = 0.1
# Anything else is folded into OTHER so a client cannot grow the label set at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_lock = threading.RLock()
_UNSET = object()
_folder: Any = _UNSET  # Path | None once share_folder() has run in this process
_metrics: _Metrics | None = None


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


def _settle_folder(runtime_dir: Path | None) -> Path | None:
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    derived = not explicit or explicit == os.environ.get(_DERIVED_MARK)
    if derived:
        directory = (runtime_dir or default_runtime_dir()) / "prometheus"
    else:
        directory = Path(str(explicit))
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


def share_folder(runtime_dir: Path | None = None) -> Path | None:
    """The folder where every worker of this server writes its values, ready for use.

    Created, cleared of the live gauges of dead workers, and exported as
    ``PROMETHEUS_MULTIPROC_DIR`` so that workers started after this call inherit it. ``None``
    when it cannot be used (each worker then reports only itself). The first call in a process
    settles it: later calls return the same folder whatever ``runtime_dir`` they pass.
    """
    global _folder
    with _lock:
        if _folder is _UNSET:
            _folder = _settle_folder(runtime_dir)
        folder: Path | None = _folder
        return folder


def setup(runtime_dir: Path | None = None) -> Path | None:
    """Settle the folder (:func:`share_folder`) and create this process's metrics; idempotent.

    Returns the folder that ``/metrics`` reads, or ``None`` when it reports this process alone.
    A metric recorded before any call sets up with the defaults.
    """
    return _get(runtime_dir).directory


def _get(runtime_dir: Path | None = None) -> _Metrics:
    global _metrics
    metrics = _metrics
    if metrics is not None:
        return metrics
    with _lock:
        if _metrics is None:
            imported_early = "prometheus_client" in sys.modules
            folder = share_folder(runtime_dir)
            _metrics = _Metrics(folder)
            if folder is not None and _metrics.directory is None and imported_early:
                logger.warning("prometheus_client imported before metrics.setup(): /metrics covers this process only")
            atexit.register(_process_exit)
        return _metrics


class _Metrics:
    """The metric objects of this process, in a registry of their own."""

    def __init__(self, folder: Path | None) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, values

        # Only when prometheus-client really runs in multiprocess mode: imported before the folder
        # was settled, it keeps its in-memory values and /metrics reports this process alone.
        self.directory = folder if getattr(values.ValueClass, "_multiprocess", False) else None
        self.content_type = CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry()
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "mnist_http_requests",
            "HTTP requests answered, by method, route template and status",
            labels,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mnist_http_request_duration_seconds",
            "Time from the request to the end of the response, by method, route template and status",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "mnist_predictions",
            "Images classified, by input kind (json, png, uint8, npy)",
            ["input_kind"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "mnist_model_info",
            "Model versions served: 1 while a live worker serves the version, 0 once none does (the info metric)",
            ["version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.reloads = Counter(
            "mnist_model_reloads",
            "Model reloads: success swapped a new version in, failure rejected one and kept the old",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)  # exposed at 0 from the start, so that rate() sees the first one
        self.fallbacks = Counter(
            "mnist_model_fallbacks",
            "Worker starts that served the last good version because CURRENT could not be served",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mnist_inference_batch_size",
            "Images per model forward pass (observed by the micro-batcher)",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """The ``observe`` callback of ``RequestContextMiddleware``: one request answered."""
    if method not in _METHODS:
        method = "OTHER"
    key = (method, route, status)
    entry = _pending.requests.get(key)
    if entry is None:
        entry = _pending.requests[key] = _Tally(len(_LATENCY_BOUNDS))
    entry.add(seconds, bisect_left(_LATENCY_BOUNDS, seconds))
    _pending.due()


def observe_batch(size: int) -> None:
    """One forward pass over ``size`` images (the micro-batcher's ``observe`` hook)."""
    _pending.batches.add(size, bisect_left(_BATCH_BOUNDS, size))
    _pending.due()


def flush() -> None:
    """Write the observations kept since the last flush into the shared metric files.

    The per-request metrics (requests, latency, predictions, batch sizes) are tallied in plain
    Python and written at most ``_FLUSH_SECONDS`` later: each write to a multiprocess value is
    a locked mmap write, and four of them per request were a sizeable share of a small
    request's cost. A scrape flushes its own worker first; other workers' values are at most
    that much behind.
    """
    _pending.flush(_metrics or _get())


def model_swapped(previous: str | None, version: str) -> None:
    """The worker now serves ``version`` instead of ``previous`` (``None`` at startup)."""
    metrics = _metrics or _get()
    if previous is not None:
        metrics.reloads.labels("success").inc()
        if previous != version:
            metrics.model_info.labels(previous).set(0)
    metrics.model_info.labels(version).set(1)


def reload_failed() -> None:
    (_metrics or _get()).reloads.labels("failure").inc()


def model_fallback() -> None:
    """A worker started on a fallback version: ``CURRENT`` was missing, unreadable or refused."""
    (_metrics or _get()).fallbacks.inc()


def model_unloaded(version: str | None) -> None:
    """Worker shutdown: it serves nothing any more, and what it observed is written out.

    Uvicorn ends a worker by re-raising SIGTERM, so exit handlers do not run; zeroing the
    worker's own series here keeps a stopped worker out of ``mnist_model_info`` (its file goes
    when the next worker starts, see ``_clear_live_gauges``).
    """
    metrics = _metrics or _get()
    _pending.flush(metrics)
    if version is not None:
        metrics.model_info.labels(version).set(0)


def _count_predictions(kind: str, count: int) -> None:
    _pending.predictions[kind] = _pending.predictions.get(kind, 0) + count
    _pending.due()


class _Tally:
    """A histogram's observations since the last flush: count, sum and per-bucket counts."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self, bounds: int) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * bounds

    def add(self, value: float, bucket: int) -> None:
        self.count += 1
        self.total += value
        self.buckets[bucket] += 1

    def write(self, histogram: Any, counter: Any = None) -> None:
        # prometheus-client's Histogram.observe does exactly this per observation (its bucket
        # values are per-bucket, made cumulative when exposed); here once per flush.
        histogram._sum.inc(self.total)
        for value, count in zip(histogram._buckets, self.buckets, strict=True):
            if count:
                value.inc(count)
        if counter is not None:
            counter.inc(self.count)


class _Pending:
    """This process's hot-path observations, until the next :func:`flush`."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], _Tally] = {}
        self.predictions: dict[str, int] = {}
        self.batches = _Tally(len(_BATCH_BOUNDS))
        self.scheduled = False

    def due(self) -> None:
        """Make sure a flush comes: on the event loop shortly, or now outside one."""
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            flush()
            return
        self.scheduled = True
        loop.call_later(_FLUSH_SECONDS, flush)

    def flush(self, metrics: _Metrics) -> None:
        self.scheduled = False
        requests, self.requests = self.requests, {}
        predictions, self.predictions = self.predictions, {}
        batches, self.batches = self.batches, _Tally(len(_BATCH_BOUNDS))
        with _lock:
            for (method, route, status), tally in requests.items():
                labels = (method, route, str(status))
                tally.write(metrics.request_seconds.labels(*labels), metrics.requests.labels(*labels))
            for kind, count in predictions.items():
                metrics.predictions.labels(kind).inc(count)
            if batches.count:
                batches.write(metrics.batch_size)


_pending = _Pending()


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
            count_predictions(scope)


def count_predictions(scope: Scope) -> None:
    """Count the images a prediction request reported in its state (``input_kind``, ``predictions``)."""
    state = scope.get("state") or {}
    kind = state.get("input_kind")
    if kind is not None:
        _count_predictions(kind, state.get("predictions", 0))


def render() -> bytes:
    """The exposition text: every worker's values in multiprocess mode, else this process's."""
    flush()
    return _get().render()


def _process_exit() -> None:
    # multiprocess.mark_process_dead(pid) for this process, when it exits normally.
    if _metrics is not None:
        _pending.flush(_metrics)
    if _metrics is not None and _metrics.directory is not None:
        _clear_live_gauges(_metrics.directory, stale_only=False)


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics of all workers (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics() -> Response:
    state = _get()
    flush()  # this worker's latest, written on the event loop where they are tallied
    # Reading every worker's files is blocking I/O: in a thread.
    body = await anyio.to_thread.run_sync(state.render)
    return Response(body, media_type=state.content_type)
