"""The live model: validated loading, an atomic swap, and the watch on the ``CURRENT`` pointer.

A candidate is loaded in a worker thread (requests keep flowing), checked end to end (safe
loading, architecture from its metadata, strict keys and shapes, finite weights, the canary
gate) and only then swapped in by one reference assignment. A handler reads ``store.current``
once and uses that object for the whole request, so a request never straddles two models.
Any failure leaves the old model serving and is recorded in ``last_reload_error``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app import metrics
from app.config import Settings, pick_device
from app.registry import (
    MLP,
    Canary,
    CheckpointError,
    load_canary,
    read_pointer,
    validate_candidate,
    version_path,
    write_pointer,
)
from app.workers import WorkerRegistry

__all__ = ["ModelStore", "ReloadError", "ServedModel"]

logger = logging.getLogger("app.store")


class ReloadError(Exception):
    """A candidate was rejected; the old model keeps serving."""


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
        self.reloads = {"success": 0, "failure": 0}
        self._rejected: tuple[str, int, int] | None = None
        self._lock = asyncio.Lock()

    # -- loading -----------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.settings.model_dir

    @property
    def watching(self) -> bool:
        return self.settings.model_path is None and self.settings.reload_interval > 0

    def initial_path(self) -> Path:
        if self.settings.model_path is not None:
            return self.settings.model_path
        try:
            version = read_pointer(self.models_dir)
        except (ValueError, OSError) as exc:
            raise CheckpointError(self.models_dir / "CURRENT", str(exc)) from None
        if version is None:
            raise CheckpointError(
                self.models_dir / "CURRENT",
                "no current model: train one (python -m training.train) or set MNIST_MODEL_PATH",
            )
        return version_path(self.models_dir, version)

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

    def start(self) -> ServedModel:
        """Startup: load the configured model or raise :class:`CheckpointError`."""
        served = self.load_candidate(self.initial_path())
        self._swap(served)
        return served

    def _swap(self, served: ServedModel) -> None:
        metrics.model_swapped(self.serving_version, served.version)
        self.current = served  # the swap: one reference assignment, atomic for readers
        self._report()

    def _report(self) -> None:
        served = self.current
        self.registry.publish(
            {
                "version": served.version if served else None,
                "loaded_at": served.loaded_at.isoformat(timespec="milliseconds") if served else None,
                "device": str(self.device),
                "last_reload_error": self.last_reload_error,
                "reloads": self.reloads,
            }
        )

    def _fail(self, version: str, problem: str) -> ReloadError:
        self.reloads["failure"] += 1
        metrics.reload_failed()
        self.last_reload_error = {"version": version, "error": problem, "at": _now()}
        logger.warning("reload of %s rejected, still serving %s: %s", version, self.serving_version, problem)
        self._report()
        return ReloadError(problem)

    @property
    def serving_version(self) -> str | None:
        return self.current.version if self.current else None

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self, version: str | None = None, publish: bool = False) -> ServedModel:
        """Load ``version`` (default: the pointer's), validate, swap. ``publish`` also moves the pointer.

        Raises :class:`ReloadError` (old model still serving) or ``ValueError`` for a bad name.
        """
        async with self._lock:
            if version is None:
                try:
                    version = read_pointer(self.models_dir)
                except (ValueError, OSError) as exc:
                    raise self._fail("?", f"CURRENT pointer is invalid: {exc}") from None
                if version is None:
                    raise self._fail("?", f"no CURRENT pointer in {self.models_dir}")
            path = version_path(self.models_dir, version)  # ValueError for unsafe names
            if self.current is not None and self.current.version == version and self.current.path == path:
                if publish:
                    write_pointer(self.models_dir, version)
                return self.current
            try:
                served = await asyncio.to_thread(self.load_candidate, path)
            except CheckpointError as exc:
                raise self._fail(version, exc.problem) from None
            if publish:
                write_pointer(self.models_dir, version)
            self.reloads["success"] += 1
            self._swap(served)
            logger.info("now serving %s (canary accuracy %.1f%%)", version, 100 * served.canary_accuracy)
            return served

    async def poll(self) -> None:
        """One look at the pointer; reload when it names something new and not already rejected."""
        try:
            version = read_pointer(self.models_dir)
        except (ValueError, OSError) as exc:
            key = (f"invalid:{exc}", 0, 0)
            if key != self._rejected:
                self._rejected = key
                self._fail("?", f"CURRENT pointer is invalid: {exc}")
            return
        if version is None or version == self.serving_version:
            return
        path = version_path(self.models_dir, version)
        try:
            stat = path.stat()
            key = (version, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (version, -1, -1)
        if key == self._rejected:
            return  # already rejected this exact file; wait until it or the pointer changes
        try:
            await self.reload(version)
        except ReloadError:
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
