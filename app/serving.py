"""The request pipeline: every prediction, whatever its route or input form, goes through here.

    read the body  ->  decode (cost known first)  ->  admit  ->  predict  ->  encode
    (size- and        (route-specific: JSON,          (queue       (micro-batched
     time-bounded)     uint8, .npy, images, v2)        deadline)    or a thread)

One :class:`Pipeline` per app, made in the lifespan. It is the only code that decides how much
work a request may cause and where that work runs, so ``/predict`` (both lanes, every content
type) and ``/v2/models/mnist/infer`` share the same limits, the same admission and the same
errors. The routes only say how to turn their body into a :class:`Job`.

What a request may cost is checked before the work starts:

* its body: ``max_body_bytes`` (JSON: ``max_json_bytes``, since parsed JSON takes several times
  its size in Python objects), refused from ``Content-Length`` before a byte is read; read within
  ``body_timeout`` seconds, else 408 and the connection is closed. All bodies being read or held
  by one worker share ``max_buffered_bytes``.
* its images: counted, and each one's size read from its header (at the size it will actually
  be decoded to: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that is still enough) against
  a per-image and a per-request pixel budget, before any decoding.
* its time in the queue: work too big for the event loop waits for one of the worker's compute
  slots (as many as its share of the CPUs it may use, cgroup quota included). A request that
  has waited ``queue_timeout`` seconds since it arrived is answered 503 with ``Retry-After``,
  as is one that finds ``max_inflight`` requests already in the worker.

Small requests (a body within ``INLINE_BYTES`` and images within ``INLINE_PIXELS``) are decoded
on the event loop and predicted through the micro-batcher: a thread hop would cost them more
than their work. Everything else is decoded, predicted and encoded in a thread, one per slot;
a client that left while its request queued is not computed for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np

from app import image
from app.batching import MicroBatcher
from app.config import Settings
from app.errors import InputError
from app.inference import predict_proba
from app.store import ModelStore, ServedModel

__all__ = [
    "INLINE_BYTES",
    "INLINE_PIXELS",
    "Answer",
    "Budgets",
    "Job",
    "Pipeline",
    "available_cpus",
    "cgroup_cpu_limit",
    "current_model",
    "declared_length",
]

logger = logging.getLogger("app.serving")

# Bodies up to this size are decoded on the event loop: cheaper inline than a thread hop.
INLINE_BYTES = 64 * 1024
# Images whose decoded pixels add up to at most this are decoded inline too (a 280x280 drawing).
INLINE_PIXELS = 512 * 512
# How often body-read deadlines are checked: a stalled upload gets its 408 up to this much late.
_SWEEP_SECONDS = 0.25
# What an overloaded worker tells clients: try again in about this many seconds.
RETRY_AFTER = "1"


@dataclass(frozen=True, slots=True)
class Answer:
    """A response body, its media type and any headers of its own (the route adds the model version)."""

    body: bytes
    kind: str  # the input form, for the predictions metric: json, png, jpeg, uint8, v2_fp32...
    count: int  # images classified
    media_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Encoder = Callable[[np.ndarray], Answer]
"""Probabilities ``[N, 10]`` to the answer."""

Decoded = tuple[np.ndarray, Encoder]
"""Model input rows (float32 in [0, 1], or uint8 0-255) and how to encode their answer."""


@dataclass(frozen=True)
class Job:
    """One request's work, as its route describes it once the body is read.

    ``decode`` turns the body into rows (the costly part for JSON and images); ``inline`` says
    the whole job is cheap enough for the event loop. A route decides ``inline`` from what the
    request declared (body size, image headers), never by starting the work.
    """

    decode: Callable[[], Decoded]
    inline: bool


@dataclass(frozen=True)
class Budgets:
    """The per-request and per-worker limits, from :class:`~app.config.Settings`."""

    max_body_bytes: int
    max_json_bytes: int
    max_batch: int
    max_images: int
    max_image_pixels: int
    max_request_pixels: int
    body_timeout: float
    queue_timeout: float
    max_inflight: int
    max_buffered_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Budgets:
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_json_bytes=min(settings.max_json_bytes, settings.max_body_bytes),
            max_batch=settings.max_batch_size,
            max_images=settings.max_images_per_request,
            max_image_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
            body_timeout=settings.body_timeout,
            queue_timeout=settings.queue_timeout,
            max_inflight=settings.max_inflight,
            max_buffered_bytes=max(settings.max_buffered_bytes, settings.max_body_bytes),
        )

    def check_images(self, images: list[bytes], where: str = "") -> int:
        """Probe every image's header against the budgets; returns the pixels decoding will produce.

        Nothing is decoded here: a refused request costs its headers only.
        """
        if len(images) > self.max_images:
            raise InputError(
                413, f"{len(images)} images in one request is over the limit of {self.max_images}: split the request"
            )
        total = 0
        for index, data in enumerate(images):
            label = f"{where}image {index}" if len(images) > 1 or where else "the image"
            try:
                info = image.probe(data)
            except InputError as exc:
                if label == "the image":
                    raise
                raise InputError(exc.status_code, f"{label}: {exc.detail}") from None
            if info.decoded_pixels > self.max_image_pixels:
                raise InputError(
                    413,
                    f"{label} is {info.width}x{info.height} and would decode to {info.decoded_pixels:,} pixels, "
                    f"over the per-image limit of {self.max_image_pixels:,}: scale it down before sending",
                )
            total += info.decoded_pixels
        if total > self.max_request_pixels:
            raise InputError(
                413,
                f"the request's images decode to {total:,} pixels in all, over the per-request limit of "
                f"{self.max_request_pixels:,}: send fewer or smaller images per request",
            )
        return total


def current_model(store: ModelStore) -> ServedModel:
    """The model serving now, or 503 (with Retry-After) before one is loaded: every route asks here."""
    served = store.current
    if served is None:
        raise InputError(503, "no model loaded yet", headers={"Retry-After": RETRY_AFTER})
    return served


def overloaded(why: str) -> InputError:
    return InputError(503, f"server busy: {why}; retry shortly", headers={"Retry-After": RETRY_AFTER})


class Pipeline:
    """The request pipeline of one app on one event loop (see the module docstring)."""

    def __init__(self, settings: Settings, store: ModelStore, observe_batch: Callable[[int], None] | None = None):
        self.store = store
        self.budgets = Budgets.from_settings(settings)
        self.slots = settings.compute_slots or max(1, available_cpus() // settings.workers)
        # Admission to the compute slots. Waiters queue in arrival order; their bytes are all
        # read by then, so a slot is never held while a client sends.
        self._compute = asyncio.Semaphore(self.slots)
        self.batcher = (
            MicroBatcher(
                predict_proba,  # type: ignore[arg-type]
                settings.microbatch_max_rows,
                settings.microbatch_max_wait_ms / 1000,
                observe=observe_batch,
            )
            if settings.microbatch
            else None
        )
        self.inflight = 0
        self.buffered = 0
        self._reading: dict[asyncio.Task[object], float] = {}  # body reads in progress: their deadlines
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def served(self) -> ServedModel:
        """The model this request will use from start to end (read once), or 503 before there is one."""
        return current_model(self.store)

    async def handle(
        self,
        receive: Callable[..., object],
        *,
        declared: int | None,
        limit: int,
        started: float,
        build: Callable[[bytes, ServedModel], Job | Awaitable[Job]],
    ) -> tuple[Answer, ServedModel, int]:
        """One request, start to end: the route's ``build`` turns the body into a :class:`Job`.

        Returns the answer, the model that computed it and how many images it classified.
        """
        served = self.served()
        if declared is not None and declared > limit:
            raise InputError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        if self.inflight >= self.budgets.max_inflight:
            raise overloaded(f"{self.inflight} requests in progress in this worker")
        # The declared body is held against the worker's budget from before the first byte.
        held = declared or 0
        if self.buffered + held > self.budgets.max_buffered_bytes:
            raise overloaded(f"this worker already holds {self.buffered:,} bytes of request bodies")
        self.inflight += 1
        self.buffered += held
        try:
            reading = time.perf_counter()
            body = await self.read_body(receive, declared, limit)
            # The queue deadline counts waiting for this worker, not for the client's bytes.
            started += time.perf_counter() - reading
            job = build(body, served)
            if not isinstance(job, Job):
                job = await job
            answer, count = await self.run(job, served, started, receive)
        finally:
            self.inflight -= 1
            self.buffered -= held
        return answer, served, count

    async def read_body(self, receive: Callable[..., object], declared: int | None, limit: int) -> bytes:
        """The whole body: at most ``limit`` bytes, within ``body_timeout`` seconds.

        ``declared`` is the Content-Length (already checked against ``limit`` by the caller).
        A client that disconnects gets nothing (``InputError(499)``: nobody is listening).
        """
        chunks: list[bytes] = []
        received = 0
        # The deadline is kept by a sweep (see _sweep), not a timer per request: this is on the
        # path of every prediction, and asyncio.timeout costs as much as a tenth of a small one.
        task = asyncio.current_task()
        assert task is not None
        self._reading[task] = time.monotonic() + self.budgets.body_timeout
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep)
        try:
            while True:
                message = await receive()  # type: ignore[misc]
                if message["type"] == "http.disconnect":
                    raise InputError(499, "client closed the connection while sending its body")
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise InputError(413, f"request body is over the limit of {limit} bytes")
                if declared is None and received > self.budgets.max_buffered_bytes - self.buffered:
                    raise overloaded("this worker holds too many request bodies")
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise InputError(
                408,
                f"request body not received within {self.budgets.body_timeout:g} s "
                f"({received} of {declared if declared is not None else 'an unknown number of'} bytes)",
                headers={"Connection": "close"},
            ) from None
        finally:
            del self._reading[task]
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def _sweep(self) -> None:
        """Cancel the body reads that are past their deadline; runs while any read is in progress."""
        now = time.monotonic()
        for task, deadline in list(self._reading.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep) if self._reading else None

    async def run(
        self, job: Job, served: ServedModel, started: float, receive: Callable[..., object]
    ) -> tuple[Answer, int]:
        """Decode, admit, predict, encode; returns the answer and the number of images."""
        if time.perf_counter() - started > self.budgets.queue_timeout:
            raise overloaded(f"the request waited over {self.budgets.queue_timeout:g} s to start")
        if job.inline:
            x, encode = job.decode()
            if self.batcher is not None:
                probs = await self.batcher.predict(served, x)
            else:
                probs = predict_proba(served.model, x, served.device)
            return encode(probs), len(x)
        await self._admit(started)
        try:
            if await _client_gone(receive):
                raise InputError(499, "client closed the connection before its request was computed")
            return await anyio.to_thread.run_sync(_compute, job, served)
        finally:
            self._compute.release()

    async def _admit(self, started: float) -> None:
        left = self.budgets.queue_timeout - (time.perf_counter() - started)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await self._compute.acquire()
        except TimeoutError:
            raise overloaded(f"no compute slot free within {self.budgets.queue_timeout:g} s") from None


def _compute(job: Job, served: ServedModel) -> tuple[Answer, int]:
    x, encode = job.decode()
    return encode(predict_proba(served.model, x, served.device)), len(x)


async def _client_gone(receive: Callable[..., object]) -> bool:
    """Whether the client has disconnected, without waiting (a receive cancelled at once)."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        message = await receive()  # type: ignore[misc]
        return bool(message.get("type") == "http.disconnect")
    return False


# --------------------------------------------------------------------------------------------
# How many CPUs this process may use: affinity and the cgroup CPU quota (containers).


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process can use: its affinity mask, capped by a cgroup v1/v2 CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def cgroup_cpu_limit(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, or None if unlimited.

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"<quota> <period>"``); v1: ``cpu.cfs_quota_us``
    (``-1`` = none) over ``cpu.cfs_period_us`` in the ``cpu`` controller's hierarchy. Inside a
    container the cgroup namespace makes the process's own group the mount's root.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            for directory in _cgroup_dirs(cgroup_root, path):
                limit = _v2_limit(directory / "cpu.max")
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):
            mount = next(
                (cgroup_root / name for name in (controllers, "cpu", "cpu,cpuacct") if (cgroup_root / name).is_dir()),
                None,
            )
            if mount is None:
                continue
            for directory in _cgroup_dirs(mount, path):
                limit = _v1_limit(directory)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The group's folder and its ancestors up to the mount (those that exist in this namespace)."""
    relative = Path(path.strip().lstrip("/"))
    dirs = [mount / relative, *(mount / parent for parent in relative.parents)]
    seen: list[Path] = []
    for directory in dirs:
        if directory.is_dir() and directory not in seen:
            seen.append(directory)
    return seen


def _v2_limit(path: Path) -> float | None:
    try:
        quota, _, period = path.read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not quota:
        return None
    try:
        value = int(quota) / int(period or "100000")
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
        period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def declared_length(value: str | None) -> int | None:
    """The ``Content-Length`` header as a number (None when absent), or 400."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InputError(400, f"invalid Content-Length header {value!r}")
    return int(text)
