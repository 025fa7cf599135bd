"""``python -m app`` (or ``mnist-serve``): run uvicorn with the settings from ``MNIST_*``."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import signal
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from app.config import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["main", "serving_app"]

_logger = logging.getLogger("uvicorn.error")


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
    options: dict[str, Any] = {
        "factory": True,
        "loop": _fastest("uvloop", "uvloop"),
        "http": _fastest("httptools", "httptools"),
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        # Our middleware writes one structured line per request; uvicorn's would duplicate it.
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.graceful_timeout),
    }
    if settings.workers > 1 and hasattr(socket, "SO_REUSEPORT"):
        config = uvicorn.Config("app.__main__:serving_app", **options)
        listeners = _reuseport_listeners(settings.host, settings.port, settings.workers)
        _logger.info(
            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", settings.host, listeners[0].getsockname()[1]
        )
        _Supervisor(config, listeners).run()
    else:
        uvicorn.run("app.__main__:serving_app", **options)


def _reuseport_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one address with SO_REUSEPORT: the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listeners = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]  # with port 0, the others join the port the first one got
        sock.set_inheritable(True)
        listeners.append(sock)
    return listeners


class _Supervisor(Multiprocess):
    """Uvicorn's worker supervisor, each worker listening on a socket of its own.

    With the one socket uvicorn shares between workers, whichever worker wakes first accepts a
    whole burst of new connections: 64 keep-alive connections split 53/11 or 13/51 between two
    workers in our runs, one worker saturated while the other idled (docs/performance.md). With
    a SO_REUSEPORT socket per worker the kernel spreads connections evenly. A replacement for a
    dead worker gets its predecessor's socket, which kept queueing connections meanwhile, as the
    shared socket did. Only process creation differs from uvicorn's ``Multiprocess``.
    """

    def __init__(self, config: uvicorn.Config, listeners: list[socket.socket]) -> None:
        super().__init__(config, sockets=[])
        self.listeners = listeners

    def _start(self, index: int) -> Process:
        process = Process(self.config, [self.listeners[index]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._start(index) for index in range(self.processes_num)]

    def restart_all(self) -> None:  # SIGHUP: as uvicorn's, each replacement on its slot's socket
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._start(index)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    _logger.error("worker [%s] not ready in time; keeping [%s], restart aborted", new.pid, old.pid)
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def keep_subprocess_alive(self) -> None:  # as uvicorn's, a dead worker replaced on its own socket
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or already dead
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving: the app or its model is broken, and so would be a restart.
                _logger.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            _logger.info("Child process [%s] died", process.pid)
            self.processes[index] = self._start(index)


if __name__ == "__main__":
    main()
