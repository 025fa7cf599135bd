"""``python -m app`` (or ``mnist-serve``): run uvicorn with the settings from ``MNIST_*``.

Command-line options override the matching environment variables; ``--help`` lists both.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import socket
import tempfile
import typing
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from app import metrics
from app.config import Settings, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.main import Service

__all__ = ["build_parser", "main", "serving_app"]

_logger = logging.getLogger("uvicorn.error")
_WORKER_HEALTHCHECK_S = 60

# The settings that are also command-line options, with help for those whose field has no
# description. The others are read from the environment only (listed by --help).
_OPTIONS: dict[str, str | None] = {
    "host": "address to listen on",
    "port": "TCP port to listen on; 0 picks a free one",
    "workers": "worker processes, each with its own copy of the model",
    "log_level": "log level of the service and of uvicorn",
    "model_dir": None,
    "model_path": None,
    "device": None,
    "reload_interval": None,
}
# Read from the environment outside Settings (app.workers, prometheus-client).
_OTHER_ENV = {
    "MNIST_RUNTIME_DIR": (
        f"{tempfile.gettempdir()}/mnist-serve-<supervisor pid>",
        "folder where the workers share their status and metrics",
    ),
    "PROMETHEUS_MULTIPROC_DIR": ("<runtime dir>/prometheus", "folder of the workers' metric files"),
}


def _env_name(field: str) -> str:
    return f"MNIST_{field.upper()}"


def _shown_default(field: str) -> str:
    value = Settings.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _describe(field: str) -> str:
    return Settings.model_fields[field].description or _OPTIONS.get(field) or ""


def _environment_table() -> str:
    rows = [(_env_name(name), _shown_default(name), _describe(name)) for name in Settings.model_fields]
    rows += [(name, default, text) for name, (default, text) in _OTHER_ENV.items()]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {text} (default: {default})" for name, default, text in rows]
    return "settings, as environment variables (an option above overrides its variable):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-serve`` command line: its options are the main settings, with their defaults."""
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST digit classifier over HTTP (uvicorn, one or more workers).",
        epilog=_environment_table().replace("%", "%%"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field, fallback in _OPTIONS.items():
        text = Settings.model_fields[field].description or fallback or ""
        help_text = f"{text} (default: {_shown_default(field)}; env {_env_name(field)})"
        choices = typing.get_args(Settings.model_fields[field].annotation) if field == "log_level" else None
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            choices=choices or None,
            metavar=None if choices else field.split("_")[-1].upper(),
            help=help_text.replace("%", "%%"),
        )
    return parser


def _source(loc: tuple[int | str, ...]) -> str:
    """Where a bad setting came from: its option and variable, or its variable alone."""
    if not loc:
        return "settings"
    field = str(loc[0])
    return f"--{field.replace('_', '-')} / {_env_name(field)}" if field in _OPTIONS else _env_name(field)


def _settings_from(argv: Sequence[str] | None) -> Settings:
    """Options -> ``MNIST_*`` variables (which spawned workers inherit), then validated settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for field in _OPTIONS:
        value = getattr(args, field)
        if value is not None:
            os.environ[_env_name(field)] = value
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        parser.error("; ".join(f"{_source(error['loc'])}: {error['msg']}" for error in exc.errors()))
    except ValueError as exc:  # pick_device: a device that this machine does not have
        parser.error(str(exc))


def serving_app(settings: Settings | None = None) -> Service:
    """The app, whose startup ends by moving every object alive then out of the collector's sight.

    Uvicorn calls this factory in each worker. Imports and model loading leave hundreds of
    thousands of tracked objects (torch, FastAPI, pydantic; loading a checkpoint pulls in
    torch._dynamo and sympy), and a full collection walking them takes long enough to set the
    p99 latency under load (docs/performance.md). Frozen once startup is done, they are never
    walked again; what requests allocate is collected as usual.
    """
    from app.main import create_app

    app = create_app(settings)
    startup = app.api.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[Any]:
        async with startup(api) as state:
            gc.freeze()
            yield state

    app.api.router.lifespan_context = lifespan
    return app


def _http_protocol() -> type | str:
    """httptools with request heads bounded in size and time (app.protocol), or h11 without httptools."""
    if importlib.util.find_spec("httptools") is None:
        return "h11"  # bounds heads itself (h11_max_incomplete_event_size)
    from app.protocol import GuardedHttpToolsProtocol

    return GuardedHttpToolsProtocol


def _fastest(preferred: str, module: str) -> str:
    # uvloop and httptools come with uvicorn[standard]; "auto" would pick them too, but silently
    # fall back: naming them makes the choice visible, and the fallback keeps other platforms working.
    return preferred if importlib.util.find_spec(module) is not None else "auto"


def main(argv: Sequence[str] | None = None) -> None:
    settings = _settings_from(argv)
    # Settled here, before any worker starts: they inherit the folder through the environment.
    metrics.share_folder()
    # Uvicorn drains in-flight requests on SIGTERM, then re-raises the signal through the handler
    # that was installed before it started. A no-op handler here turns that completed, graceful
    # shutdown into exit status 0 (what orchestrators expect) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    options: dict[str, Any] = {
        "factory": True,
        "loop": _fastest("uvloop", "uvloop"),
        # httptools with request heads bounded in size and time (app.protocol); h11 where it is missing.
        "http": _http_protocol(),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # Set on purpose (app.config, README "Configuration"): idle keep-alive connections close
        # after keepalive_timeout; past max_connections per worker uvicorn answers 503 at once;
        # the kernel queues up to backlog connections per listening socket.
        "timeout_keep_alive": settings.keepalive_timeout,
        "limit_concurrency": settings.max_connections,
        "backlog": settings.backlog,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        # Our middleware writes one structured line per request; uvicorn's would duplicate it.
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.graceful_timeout),
        # How long a new worker may take to start serving (SIGHUP restarts wait for it) and a live
        # one to answer the supervisor's ping. A worker imports torch, loads the model and runs
        # the canary: uvicorn's default of 5 s is too short on a busy machine, where a restart
        # would be aborted and a worker still starting be killed as hung.
        "timeout_worker_healthcheck": _WORKER_HEALTHCHECK_S,
    }
    if settings.workers > 1 and hasattr(socket, "SO_REUSEPORT"):
        config = uvicorn.Config("app.__main__:serving_app", **options)
        listeners = _reuseport_listeners(settings.host, settings.port, settings.workers)
        _logger.info(
            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", settings.host, listeners[0].getsockname()[1]
        )
        supervisor = _Supervisor(config, listeners)
        supervisor.run()
        if supervisor.startup_failed:
            # As uvicorn exits with a single worker: a server that never served must not exit 0.
            raise SystemExit(STARTUP_FAILURE)
    else:
        uvicorn.run("app.__main__:serving_app", **options)


def _reuseport_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one address with SO_REUSEPORT: the kernel spreads connections over them.

    Bound, not listening: a worker's socket joins the group (and receives connections) when the
    worker's server listens on it, which uvicorn does once the app's startup is complete.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listeners: list[socket.socket] = []
    for _ in range(count):
        listeners.append(_reuseport_socket(family, (host, port)))
        port = listeners[-1].getsockname()[1]  # with port 0, the others join the port the first one got
    return listeners


def _reuseport_socket(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class _Supervisor(Multiprocess):
    """Uvicorn's worker supervisor, each worker listening on a socket of its own.

    With the one socket uvicorn shares between workers, whichever worker wakes first accepts a
    whole burst of new connections, so a burst of keep-alive connections can leave one worker
    saturated while another idles (docs/performance.md). With a SO_REUSEPORT socket per worker
    the kernel spreads connections evenly. A SIGHUP replacement starts on its predecessor's
    socket; a dead worker's socket is closed and its replacement gets a new one
    (:meth:`_renew_listener`).

    Only that differs from uvicorn's ``Multiprocess``: the three methods below are copies of
    uvicorn's with ``Process(config, sockets)`` replaced by ``_start(index)`` (and, for a dead
    worker, ``_renew_listener``), written against the uvicorn range pinned in pyproject.toml.
    tests/test_serving_launcher.py fails when the methods they copy, or the attributes they
    use, change in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, listeners: list[socket.socket]) -> None:
        super().__init__(config, sockets=[])
        self.listeners = listeners
        self.startup_failed = False

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

    def keep_subprocess_alive(self) -> None:  # as uvicorn's, a dead worker replaced on a new socket
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
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            self._renew_listener(index)
            _logger.info("Child process [%s] died", process.pid)
            self.processes[index] = self._start(index)

    def _renew_listener(self, index: int) -> None:
        """Close a dead worker's socket; its replacement gets a new one, listening once it is ready.

        Closed, the socket leaves the SO_REUSEPORT group, so the kernel gives new connections to
        the live workers while the replacement starts (which takes seconds: torch, the model,
        the canary); kept, it would go on queueing its share of them until the replacement
        served. Connections already waiting in its backlog are reset, as they would be by a
        server that restarts.
        """
        old = self.listeners[index]
        self.listeners[index] = _reuseport_socket(old.family, old.getsockname())
        old.close()


if __name__ == "__main__":
    main()
