"""The launcher's performance pieces: a listening socket per worker, and the heap frozen after startup.

The supervisor itself (worker start, restart on its own socket, SIGTERM) runs in the end-to-end
tests that start ``python -m app`` with two workers (test_shutdown, test_metrics).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.__main__ as launcher
from app.config import get_settings


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


def test_startup_ends_with_a_frozen_heap(models_dir: Path, monkeypatch: pytest.MonkeyPatch, restore_gc: None) -> None:
    monkeypatch.setenv("MNIST_MODEL_DIR", str(models_dir))
    monkeypatch.setenv("MNIST_RELOAD_INTERVAL", "0")
    get_settings.cache_clear()
    monkeypatch.setattr("app.main.app", __import__("app.main", fromlist=["create_app"]).create_app())
    gc.unfreeze()
    served = launcher.serving_app()
    assert gc.get_freeze_count() == 0  # nothing frozen before the lifespan has run
    with TestClient(served) as client:
        assert gc.get_freeze_count() > 100_000  # imports, model and all: out of the collector's sight
        assert client.get("/health/ready").status_code == 200
    get_settings.cache_clear()
