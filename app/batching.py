"""Dynamic micro-batching: concurrent small requests share one forward pass.

A forward over one row costs about as much as over sixteen (the work is fixed per call: module
dispatch, kernel launch, softmax), so when many single-digit requests are in flight at once,
running them as one ``[N, 784]`` batch saves most of the per-call cost.

No timer is needed for that. The event loop runs, in one turn, every request task whose bytes
arrived together; each decodes its input and calls :meth:`MicroBatcher.predict`, which queues the
rows and schedules one flush with ``call_soon``. The flush runs after all those tasks, so it sees
every row they queued, runs one forward per model version and hands each request its own rows.
A lone request waits for nothing but one turn of the loop. ``max_wait`` > 0 holds a batch open
longer (``call_later``) for the rare server that gains from it; ``max_rows`` flushes early.

Guarantees:

* Rows from two model versions never share a forward: pending work is grouped by the
  ``ServedModel`` object each request read from the store.
* Each caller gets exactly its rows, in order, whatever else shared the batch.
* Errors stay with their request: when a shared forward fails, every request of that batch is
  retried alone, so only the one that fails on its own sees an exception.
* A caller that went away (client disconnect cancels its task) is skipped, not failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

__all__ = ["Forward", "MicroBatcher"]

logger = logging.getLogger("app.batching")


class _Served(Protocol):
    """What the batcher needs of :class:`app.store.ServedModel`."""

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def device(self) -> torch.device: ...


Forward = Callable[[torch.nn.Module, np.ndarray, torch.device], np.ndarray]


@dataclass
class _Group:
    served: _Served
    rows: int = 0
    items: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = field(default_factory=list)


class MicroBatcher:
    """Coalesce concurrent :meth:`predict` calls into one forward per model version.

    ``forward(model, x, device)`` returns probabilities ``[len(x), 10]``; it runs on the event
    loop, so the batcher is meant for small inputs (``max_rows`` bounds a forward). One instance
    serves one event loop.
    """

    def __init__(
        self,
        forward: Forward,
        max_rows: int = 64,
        max_wait: float = 0.0,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.forward = forward
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.observe = observe
        self._groups: dict[int, _Group] = {}
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def predict(self, served: _Served, x: np.ndarray) -> np.ndarray:
        """Probabilities for ``x`` (``[n, 784]`` float32), computed together with concurrent calls."""
        if len(x) >= self.max_rows:
            return self._run(served, x)  # a full batch on its own: nothing to wait for
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (a second TestClient, say): work queued on an old one has no waiter left.
            self._loop, self._groups, self._flush_handle = loop, {}, None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        # Keyed by identity (ServedModel holds dicts, so it is not hashable); the group keeps a
        # reference, so the id cannot be reused by another object while the group is pending.
        group = self._groups.get(id(served))
        if group is None or group.rows + len(x) > self.max_rows:
            if group is not None:
                self._flush_group(self._groups.pop(id(served)))
            group = self._groups[id(served)] = _Group(served)
        group.items.append((x, future))
        group.rows += len(x)
        if group.rows >= self.max_rows:
            self._flush_group(self._groups.pop(id(served)))
        elif self._flush_handle is None:
            if self.max_wait > 0:
                self._flush_handle = loop.call_later(self.max_wait, self._flush_all)
            else:
                self._flush_handle = loop.call_soon(self._flush_all)
        return await future

    @property
    def pending(self) -> int:
        """Requests queued and not yet computed."""
        return sum(len(group.items) for group in self._groups.values())

    def _flush_all(self) -> None:
        self._flush_handle = None
        groups, self._groups = self._groups, {}
        for group in groups.values():
            self._flush_group(group)

    def _run(self, served: _Served, x: np.ndarray) -> np.ndarray:
        if self.observe is not None:
            self.observe(len(x))
        return self.forward(served.model, x, served.device)

    def _flush_group(self, group: _Group) -> None:
        items = [(x, future) for x, future in group.items if not future.done()]
        if not items:
            return
        if len(items) == 1:
            self._settle_alone(group.served, *items[0])
            return
        try:
            probs = self._run(group.served, np.concatenate([x for x, _ in items]))
        except Exception:
            logger.warning("a batched forward of %d requests failed; retrying each alone", len(items), exc_info=True)
            for x, future in items:
                self._settle_alone(group.served, x, future)
            return
        start = 0
        for x, future in items:
            stop = start + len(x)
            # A copy, not a view: the caller keeps only its rows, not the whole batch.
            future.set_result(probs[start:stop].copy())
            start = stop

    def _settle_alone(self, served: _Served, x: np.ndarray, future: asyncio.Future[np.ndarray]) -> None:
        try:
            result = self._run(served, x)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
