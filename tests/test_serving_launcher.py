"""The launcher (``mnist-serve``, ``python -m app``): its command line, its worker supervisor, and
the uvicorn internals that supervisor is built on.

The supervisor runs here as a real process: workers started each on its own socket, a killed
worker replaced, SIGHUP replacing every worker, a worker that cannot start stopping the server.
SIGTERM draining is in test_shutdown, the workers' shared metrics in test_metrics.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

import app.__main__ as launcher
from app.config import Settings
from tests.conftest import Server

BIN = Path(sys.executable).parent


def _script(name: str) -> str:
    path = shutil.which(name, path=str(BIN))
    assert path is not None, f"{name} is not installed beside {sys.executable} (pip install -e .)"
    return path


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )


# -- the command line -----------------------------------------------------------------------------


def _option_entries(help_text: str) -> dict[str, str]:
    """``--help``'s options section -> {"--port": "its help text, lines joined"}."""
    section = help_text.split("options:", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    current = ""
    for line in section.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current:
            entries[current] += " " + stripped
    return entries


def test_serve_help_lists_every_option_and_setting_with_its_default() -> None:
    result = _run(_script("mnist-serve"), "--help")
    assert result.returncode == 0, result.stderr
    entries = _option_entries(result.stdout)
    assert {"--host", "--port", "--workers", "--log-level", "--model-dir", "--device"} <= set(entries)
    for option, text in entries.items():
        if option == "-h":
            continue
        assert "(default: " in text, f"{option} does not show its default: {text!r}"
        assert f"env MNIST_{option[2:].replace('-', '_').upper()}" in text, text
    assert "(default: 8000; env MNIST_PORT)" in " ".join(entries["--port"].split())
    # Every setting, options or not, is listed with its environment variable and default.
    for name, field in Settings.model_fields.items():
        line = next((ln for ln in result.stdout.splitlines() if ln.split()[:1] == [f"MNIST_{name.upper()}"]), None)
        assert line is not None, f"MNIST_{name.upper()} missing from --help"
        assert "(default: " in line
        if field.description:
            assert field.description in line
    assert "MNIST_RUNTIME_DIR" in result.stdout


def test_serve_rejects_a_bad_option_value_before_starting() -> None:
    result = _run(sys.executable, "-m", "app", "--port", "70000")
    assert result.returncode == 2
    assert "error: --port / MNIST_PORT: Input should be less than or equal to 65535" in result.stderr
    result = _run(sys.executable, "-m", "app", env={"MNIST_GRACEFUL_TIMEOUT": "-1"})
    assert result.returncode == 2
    assert "error: MNIST_GRACEFUL_TIMEOUT: Input should be greater than 0" in result.stderr
    result = _run(sys.executable, "-m", "app", "--log-level", "loud")
    assert result.returncode == 2
    assert "invalid choice: 'loud'" in result.stderr


def _pids(server: Server) -> set[int] | None:
    """The pids of the workers serving, or None when the server does not answer."""
    # A long timeout: with a listening socket per worker, a connection that the kernel gave to a
    # killed worker's socket waits there until the replacement has started.
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            response = client.get("/model")
    except httpx.HTTPError:
        return None
    assert response.status_code == 200, response.text
    return {worker["pid"] for worker in response.json()["workers"]}


def _wait_for(server: Server, condition: Callable[[set[int]], bool], what: str, timeout: float = 180) -> set[int]:
    """Poll ``/model`` until the set of worker pids satisfies ``condition``; that set."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids(server)
        if pids is not None and condition(pids):
            return pids
        assert time.monotonic() < deadline, f"timed out waiting for {what}; server log:\n{server.log()[-4000:]}"
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.slow
def test_supervisor_replaces_killed_workers_and_restarts_on_sighup(
    server_factory: Callable[..., Server], models_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # The options override the environment: with MNIST_MODEL_DIR alone, no worker could start.
    server = server_factory(
        command=[_script("mnist-serve"), "--workers", "2", "--model-dir", str(models_dir), "--log-level", "info"],
        env={"MNIST_WORKERS": "1", "MNIST_MODEL_DIR": str(empty), "MNIST_ACCESS_LOG": "false"},
    )
    first = _wait_for(server, lambda pids: len(pids) == 2, "two workers")

    # A worker killed outright is replaced, and the replacement serves. Meanwhile, new
    # connections go to the live worker: none waits on the dead one's socket for its replacement.
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while f"Child process [{victim}] died" not in server.log():
        assert time.monotonic() < deadline, server.log()[-4000:]
        time.sleep(0.05)
    with httpx.Client(base_url=server.base_url, timeout=3, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
        for _ in range(20):
            response = fresh.get("/model")
            assert response.status_code == 200
            assert response.json()["pid"] != victim
    second = _wait_for(server, lambda pids: len(pids) == 2 and victim not in pids, "the killed worker's replacement")

    # SIGHUP replaces every worker, one at a time, while requests keep being answered.
    answered: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        # A connection per request. A request that reaches a retiring worker just as it closes
        # its connections is reset (HTTP's own race, with any server): it gets one retry, and
        # must then be answered.
        with server.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not stop.is_set():
                for attempt in (1, 2):
                    try:
                        response = client.post("/predict", json={"pixels": [0.5] * 784})
                    except httpx.TransportError as exc:
                        if attempt == 2:
                            failures.append(repr(exc))
                        continue
                    answered.append(response.status_code)
                    break

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        server.proc.send_signal(signal.SIGHUP)
        _wait_for(server, lambda pids: len(pids) == 2 and not pids & second, "every worker replaced")
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert answered
    assert set(answered) == {200}
    assert server.proc.poll() is None
    assert server.stop() == 0


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [2, 1])
def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path, workers: int) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    env = {"MNIST_RUNTIME_DIR": str(tmp_path / "runtime"), "MNIST_PORT": "0", "PYTHONUNBUFFERED": "1"}
    result = _run(
        sys.executable, "-m", "app", "--workers", str(workers), "--model-path", str(broken), env=env, timeout=180
    )
    # Not restarted over and over: the supervisor stops, with uvicorn's startup-failure status.
    assert result.returncode == STARTUP_FAILURE, result.stderr[-3000:]
    assert str(broken) in result.stderr
    if workers > 1:
        assert "failed to start, stopping the parent process" in result.stderr


# -- the uvicorn internals the supervisor relies on ------------------------------------------------

# What app/__main__.py's _Supervisor was written against (the range pinned in pyproject.toml).
# Its three overrides are copies of these methods: when uvicorn changes one, compare it with ours,
# carry the change over, then record the new digest here.
OVERRIDDEN = {
    "init_processes": "(self) -> 'None'",
    "restart_all": "(self) -> 'None'",
    "keep_subprocess_alive": "(self) -> 'None'",
}
SOURCE_SHA256 = {  # of inspect.getsource(Multiprocess.<name>) in uvicorn 0.54.0
    "init_processes": "6c69f2a36bf55750164a2e39f2bf552a9f5b456b07109ed07d165399a441290d",
    "restart_all": "438dec6d95be9fcdfdaf6ea8d2d6fd98f186c3645d94ce59c43de3bcdb148d25",
    "keep_subprocess_alive": "3ba4980aa33bcecdf3d0a725ca9c4e8d92238f72d239e522120ad6e05147fd59",
}
USED_SIGNATURES: dict[tuple[type, str], str] = {
    (multiprocess.Multiprocess, "__init__"): "(self, config: 'Config', sockets: 'list[socket]') -> 'None'",
    (multiprocess.Process, "__init__"): "(self, config: 'Config', sockets: 'list[socket]') -> 'None'",
    (multiprocess.Process, "start"): "(self) -> 'None'",
    (multiprocess.Process, "kill"): "(self) -> 'None'",
    (multiprocess.Process, "join"): "(self) -> 'None'",
    (multiprocess.Process, "terminate"): "(self) -> 'None'",
    (multiprocess.Process, "is_alive"): "(self, timeout: 'float' = 5) -> 'bool'",
    (
        multiprocess.Process,
        "wait_until_ready",
    ): "(self, timeout: 'float', should_exit: 'threading.Event | None' = None) -> 'bool'",
}


def _digest(name: str) -> str:
    source = inspect.getsource(getattr(multiprocess.Multiprocess, name))
    return hashlib.sha256(source.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_uvicorn_methods_are_unchanged(name: str) -> None:
    base = getattr(multiprocess.Multiprocess, name)
    assert str(inspect.signature(base)) == OVERRIDDEN[name], f"uvicorn {uvicorn.__version__} changed {name}"
    ours = getattr(launcher._Supervisor, name)
    assert ours is not base
    assert inspect.signature(ours) == inspect.signature(base)
    assert _digest(name) == SOURCE_SHA256[name], (
        f"uvicorn {uvicorn.__version__} changed Multiprocess.{name}: app/__main__.py's _Supervisor.{name} "
        "is a copy of it; carry the change over, then update SOURCE_SHA256"
    )


@pytest.mark.parametrize(("owner", "name"), sorted(USED_SIGNATURES, key=repr))
def test_uvicorn_methods_the_supervisor_calls_are_unchanged(owner: type, name: str) -> None:
    signature = str(inspect.signature(getattr(owner, name)))
    assert signature == USED_SIGNATURES[owner, name], f"uvicorn {uvicorn.__version__}: {owner.__name__}.{name}"


def test_uvicorn_attributes_the_supervisor_uses_exist() -> None:
    assert STARTUP_FAILURE == 3
    assert isinstance(multiprocess.Process.pid, property)
    assert isinstance(multiprocess.Process.exitcode, property)
    config = uvicorn.Config("app.__main__:serving_app", factory=True, workers=2)
    assert isinstance(config.timeout_worker_healthcheck, int | float)
    # Multiprocess.__init__ installs signal handlers: put the test process's back afterwards.
    saved = {sig: signal.getsignal(sig) for sig in multiprocess.SIGNALS}
    try:
        supervisor = multiprocess.Multiprocess(config, sockets=[])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert supervisor.processes == []
    assert supervisor.processes_num == 2
    assert not supervisor.should_exit.is_set()
    assert callable(supervisor.run)


# -- the performance pieces ----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_each_worker_gets_its_own_socket_on_one_port() -> None:
    listeners = launcher._reuseport_listeners("127.0.0.1", 0, 3)
    try:
        ports = {sock.getsockname()[1] for sock in listeners}
        assert len(ports) == 1  # port 0: all join the port the first one was given
        for sock in listeners:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.get_inheritable()  # handed to the spawned worker
            sock.listen(16)
            sock.setblocking(False)
        port = ports.pop()
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        accepted = 0
        for sock in listeners:  # one group: every connection lands on one of the three sockets
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted += 1
        assert accepted == len(clients)
        for client in clients:
            client.close()
    finally:
        for sock in listeners:
            sock.close()


@pytest.fixture
def restore_gc() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_startup_ends_with_a_frozen_heap(models_dir: Path, restore_gc: None) -> None:
    gc.unfreeze()
    served = launcher.serving_app(Settings(model_dir=models_dir, reload_interval=0, access_log=False))
    assert gc.get_freeze_count() == 0  # nothing frozen before the lifespan has run
    with TestClient(served) as client:
        assert gc.get_freeze_count() > 100_000  # imports, model and all: out of the collector's sight
        assert client.get("/health/ready").status_code == 200


def test_the_launcher_does_not_import_torch() -> None:
    """Importing torch takes ~1 s: the supervisor starts workers sooner without it (they load it)."""
    code = "import sys, app.__main__, app.protocol; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
