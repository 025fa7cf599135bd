"""The live model of one worker: validated loading, an atomic swap, the pointer watch, last-good fallback.

A candidate is loaded in a worker thread (requests keep flowing), checked end to end (safe
loading, architecture from its metadata, strict keys and shapes, finite weights, the canary
gate) and only then swapped in by one reference assignment. A handler reads ``store.current``
once and uses that object for the whole request, so a request never straddles two models.
Any failure leaves the old model serving and is recorded in ``last_reload_error``.

Startup never depends on ``CURRENT`` alone: when it is missing, unreadable or names a version
that fails the checks, the worker serves ``LAST_GOOD``, else the newest version that passes,
and reports the problem (``problem``: on ``/model``, ``/health/ready``, the log and a metric).
It refuses to start only when no stored version passes.

Failures come in two kinds. A file that was read and refused is remembered (by version, mtime
and size) and not tried again until it changes. A file that could not be read this time (an
I/O or memory error, ``CheckpointError.transient``) is retried with a growing delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app import metrics
from app.config import Settings
from app.registry import (
    MLP,
    POINTER_NAME,
    Canary,
    CheckpointError,
    PointerError,
    Rollback,
    inspect_folder,
    load_canary,
    pick_device,
    read_pointer,
    record_last_good,
    validate_candidate,
    version_path,
)
from app.registry import publish as publish_version
from app.registry import rollback as rollback_version
from app.workers import WorkerRegistry

__all__ = ["ModelStore", "ReloadError", "ServedModel"]

logger = logging.getLogger("app.store")

# Startup: how often a file that could not be read is tried again before the next candidate.
STARTUP_ATTEMPTS = 4
# The pointer watch: the first retry of a transient failure, doubling up to the cap.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 30.0
# The watch's memory of "no pointer at all", beside (version, mtime, size) of a refused file.
_NO_POINTER = ("no-pointer", 0, 0)


class ReloadError(Exception):
    """A candidate was rejected (or, ``transient``, could not be read); the old model keeps serving."""

    def __init__(self, problem: str, transient: bool = False) -> None:
        super().__init__(problem)
        self.transient = transient


@dataclass(frozen=True)
class ServedModel:
    model: MLP
    version: str
    path: Path
    sha256: str
    model_args: dict[str, int]
    meta: dict[str, Any]
    device: torch.device
    canary_accuracy: float
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "architecture": {"name": "MLP", **self.model_args},
            "test_accuracy": self.meta.get("test_accuracy"),
            "canary_accuracy": self.canary_accuracy,
            "created_at": self.meta.get("created_at"),
            "torch_version": self.meta.get("torch_version"),
            "input": self.meta.get("input"),
            "device": str(self.device),
            "loaded_at": self.loaded_at.isoformat(timespec="milliseconds"),
            "path": str(self.path),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _file_key(version: str, path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (version, -1, -1)
    return (version, stat.st_mtime_ns, stat.st_size)


class ModelStore:
    def __init__(
        self, settings: Settings, canary: Canary | None = None, registry: WorkerRegistry | None = None
    ) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.canary = canary or load_canary()
        self.registry = registry or WorkerRegistry()
        self.current: ServedModel | None = None
        self.last_reload_error: dict[str, str] | None = None
        # Why this worker does not serve what CURRENT names (None when it does).
        self.problem: dict[str, str] | None = None
        self.reloads = {"success": 0, "failure": 0}
        self._rejected: tuple[str, int, int] | None = None
        self._retry: tuple[str, float, float] | None = None  # (version, delay, monotonic time of the next try)
        self._lock = asyncio.Lock()

    # -- loading -----------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.settings.model_dir

    @property
    def pointer_path(self) -> Path:
        return self.models_dir / POINTER_NAME

    @property
    def watching(self) -> bool:
        return self.settings.model_path is None and self.settings.reload_interval > 0

    def load_candidate(self, path: Path) -> ServedModel:
        """Load and fully validate ``path``; blocking, so call it off the event loop."""
        model, ckpt, accuracy = validate_candidate(path, self.device, self.settings.canary_min_accuracy, self.canary)
        return ServedModel(
            model=model,
            version=ckpt.version,
            path=Path(path),
            sha256=str(ckpt.meta.get("weights_sha256", "")),
            model_args=dict(model.model_args()),
            meta=ckpt.meta,
            device=self.device,
            canary_accuracy=accuracy,
        )

    def _load_retrying(self, path: Path, attempts: int = STARTUP_ATTEMPTS) -> ServedModel:
        """``load_candidate``, trying a file that could not be read again after 0.25, 0.5, 1 s..."""
        delay = 0.25
        for attempt in range(1, attempts + 1):
            try:
                return self.load_candidate(path)
            except CheckpointError as exc:
                if not exc.transient or attempt == attempts:
                    raise
                logger.warning("%s: %s (attempt %d of %d)", exc.path, exc.problem, attempt, attempts)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def start(self) -> ServedModel:
        """Startup: serve ``CURRENT``, else ``LAST_GOOD``, else the newest version that passes.

        Blocking (the lifespan runs it in a thread). Raises :class:`CheckpointError` only when
        nothing can be served: a pinned ``MNIST_MODEL_PATH`` that fails, or no stored version
        that passes the checks.
        """
        if self.settings.model_path is not None:
            served = self._load_retrying(self.settings.model_path)
            self._swap(served)
            return served
        state = inspect_folder(self.models_dir)
        # What is wrong with CURRENT, if anything: the file at fault and why.
        problem = (state.problem_file, state.problem) if state.problem_file and state.problem else None
        candidates: list[tuple[str, str]] = []
        if state.current is not None and problem is None:
            candidates.append((state.current, "current"))
        if state.last_good is not None:
            candidates.append((state.last_good, "the last good version"))
        candidates += [(v, "the newest version that passes") for v in reversed(state.versions)]
        failures = [f"{problem[0]}: {problem[1]}"] if problem else []
        # What the watch would find: remembered, so that it does not try (and report) it all over again.
        if state.problem_kind == "missing-file" and state.current is not None:
            self._rejected = _file_key(state.current, version_path(self.models_dir, state.current))
        elif state.problem_kind == "invalid":
            self._rejected = (f"invalid:{state.problem}", 0, 0)
        elif state.problem_kind in ("absent", "empty"):
            self._rejected = _NO_POINTER
        tried: set[str] = set()
        for version, role in candidates:
            if version in tried:
                continue
            tried.add(version)
            path = version_path(self.models_dir, version)
            try:
                served = self._load_retrying(path)
            except CheckpointError as exc:
                failures.append(f"{exc.path}: {exc.problem}")
                logger.warning("startup: %s (%s) cannot serve: %s: %s", version, role, exc.path, exc.problem)
                if role == "current":
                    problem = (exc.path, exc.problem)
                    if not exc.transient:
                        self._rejected = _file_key(version, path)  # the watch need not try it again
                continue
            if problem is not None:
                self._set_problem(problem[0], problem[1], f"{version} ({role})")
                metrics.model_fallback()
            self._swap(served)
            self._record_last_good(served)
            return served
        if not state.versions:
            failures.append(f"{self.models_dir} holds no versions")
        raise CheckpointError(
            self.pointer_path,
            f"no stored version can be served ({'; '.join(failures)}): "
            "train one (python -m training.train), publish a good one (python -m training.publish VERSION) "
            "or set MNIST_MODEL_PATH",
        )

    def _set_problem(self, path: Path, error: str, serving: str) -> None:
        self.problem = {"file": str(path), "error": error, "serving": serving, "at": _now()}
        logger.error("CURRENT cannot be served: %s: %s; serving %s instead", path, error, serving)
        self._report()

    def _clear_problem(self) -> None:
        if self.problem is not None:
            logger.info("CURRENT is served again (%s); problem cleared", self.serving_version)
            self.problem = None
            self._report()

    def _swap(self, served: ServedModel) -> None:
        metrics.model_swapped(self.serving_version, served.version)
        self.current = served  # the swap: one reference assignment, atomic for readers
        self._report()

    def _record_last_good(self, served: ServedModel) -> None:
        """Blocking (a read, maybe an fsync'ed write): off the event loop once serving."""
        if self.settings.model_path is not None or served.path != version_path(self.models_dir, served.version):
            return
        try:
            record_last_good(self.models_dir, served.version)
        except OSError as exc:  # a read-only folder: the fallback then uses the newest good version
            logger.warning("could not record %s as the last good version: %s", served.version, exc)

    def _report(self) -> None:
        served = self.current
        self.registry.publish(
            {
                "version": served.version if served else None,
                "loaded_at": served.loaded_at.isoformat(timespec="milliseconds") if served else None,
                "device": str(self.device),
                "last_reload_error": self.last_reload_error,
                "problem": self.problem,
                "reloads": self.reloads,
            }
        )

    def _fail(self, version: str, problem: str, transient: bool = False) -> ReloadError:
        self.reloads["failure"] += 1
        metrics.reload_failed()
        self.last_reload_error = {"version": version, "error": problem, "at": _now()}
        logger.warning("reload of %s rejected, still serving %s: %s", version, self.serving_version, problem)
        self._report()
        return ReloadError(problem, transient)

    @property
    def serving_version(self) -> str | None:
        return self.current.version if self.current else None

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self, version: str | None = None) -> ServedModel:
        """Load ``version`` (default: the pointer's), validate, swap; the pointer is not moved.

        Raises :class:`ReloadError` (old model still serving) or ``ValueError`` for a bad name.
        """
        async with self._lock:
            names_current = version is None or version == _pointer_or_none(self.models_dir)
            if version is None:
                try:
                    version = read_pointer(self.models_dir)
                except PointerError as exc:
                    raise self._fail("?", f"CURRENT pointer is invalid: {exc}") from None
                except OSError as exc:
                    raise self._fail("?", f"CURRENT pointer could not be read: {exc}", transient=True) from None
                if version is None:
                    raise self._fail("?", f"no CURRENT pointer in {self.models_dir}")
            path = version_path(self.models_dir, version)  # ValueError for unsafe names
            if self.current is not None and self.current.version == version and self.current.path == path:
                if names_current:
                    self._clear_problem()
                return self.current
            try:
                served = await asyncio.to_thread(self.load_candidate, path)
            except CheckpointError as exc:
                error = self._fail(version, exc.problem, exc.transient)
                if names_current and not exc.transient:
                    self._set_problem(exc.path, exc.problem, f"{self.serving_version} (kept)")
                raise error from None
            return await self._swapped(served, names_current)

    async def publish(self, version: str) -> ServedModel:
        """Validate ``version`` on this worker, make it current for every worker, swap it in.

        Raises :class:`ReloadError` (nothing moved, the old model still serving) or
        ``ValueError`` for a bad name.
        """
        async with self._lock:
            try:
                served = await asyncio.to_thread(publish_version, self.models_dir, version, self.load_candidate)
            except CheckpointError as exc:
                raise self._fail(version, exc.problem, exc.transient) from None
            return await self._swapped(served, names_current=True)

    async def rollback(self) -> tuple[Rollback, ServedModel]:
        """Roll back (``registry.rollback``: the version before the current one) and swap it in.

        Raises :class:`ReloadError` when the target fails, :class:`CheckpointError` when there
        is nothing to roll back to.
        """
        async with self._lock:
            tried: list[str] = []

            def gate(path: Path) -> ServedModel:
                tried.append(path.stem)
                return self.load_candidate(path)

            try:
                target, served = await asyncio.to_thread(rollback_version, self.models_dir, gate)
            except CheckpointError as exc:
                if not tried:
                    raise  # nothing to roll back to
                raise self._fail(tried[-1], exc.problem, exc.transient) from None
            return target, await self._swapped(served, names_current=True)

    async def _swapped(self, served: ServedModel, names_current: bool) -> ServedModel:
        self.reloads["success"] += 1
        self._retry = None
        if names_current:
            self.problem = None
        self._swap(served)
        logger.info("now serving %s (canary accuracy %.1f%%)", served.version, 100 * served.canary_accuracy)
        await asyncio.to_thread(self._record_last_good, served)
        return served

    async def poll(self) -> None:
        """One look at the pointer; reload when it names something new, not rejected, not backing off."""
        try:
            version = read_pointer(self.models_dir)
        except PointerError as exc:
            key = (f"invalid:{exc.problem}", 0, 0)
            if key != self._rejected:
                self._rejected = key
                self._fail("?", f"CURRENT pointer is invalid: {exc}")
                self._set_problem(exc.path, exc.problem, f"{self.serving_version} (kept)")
            return
        except OSError as exc:  # transient: the next poll reads it again
            logger.warning("CURRENT could not be read, trying again next time: %s", exc)
            return
        if version is None:
            if self._rejected != _NO_POINTER:
                self._rejected = _NO_POINTER
                self._set_problem(self.pointer_path, "is missing or empty", f"{self.serving_version} (kept)")
            return
        if version == self.serving_version:
            self._retry = None
            self._clear_problem()
            return
        path = version_path(self.models_dir, version)
        key = _file_key(version, path)
        if key == self._rejected:
            return  # already rejected this exact file; wait until it or the pointer changes
        if self._retry is not None and self._retry[0] == version and time.monotonic() < self._retry[2]:
            return  # the last try could not read it: wait out the backoff
        try:
            await self.reload(version)
        except ReloadError as exc:
            if exc.transient:
                delay = RETRY_FIRST_DELAY
                if self._retry is not None and self._retry[0] == version:
                    delay = min(self._retry[1] * 2, RETRY_MAX_DELAY)
                self._retry = (version, delay, time.monotonic() + delay)
            else:
                self._rejected = key

    async def watch(self) -> None:
        interval = self.settings.reload_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive any surprise; log it and keep watching
                logger.exception("pointer watch failed")

    def close(self) -> None:
        self.registry.remove()


def _pointer_or_none(models_dir: Path) -> str | None:
    try:
        return read_pointer(models_dir)
    except (PointerError, OSError):
        return None
