"""Graceful shutdown: SIGTERM in the middle of requests lets every one of them finish.

"In the middle" is made certain without hooks in the app: each client sends its headers with
``Expect: 100-continue``, and uvicorn answers ``100 Continue`` only once the /predict handler
starts reading the body. The test then sends SIGTERM, waits until every worker has logged that
it is shutting down, and only then lets the clients send the rest of their bodies, slowly.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.conftest import Server

CLIENTS = 6
IMAGES = 32  # per request: 25,088 bytes, sent in 8 chunks
CHUNKS = 8


class SlowUpload:
    """One POST /predict of raw uint8 digits over a plain socket, its body sent when told."""

    def __init__(self, port: int, seed: int) -> None:
        self.body = np.random.default_rng(seed).integers(0, 256, size=(IMAGES, 784), dtype=np.uint8).tobytes()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(self.body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        self.sock.sendall(head.encode())
        self.buffer = b""
        interim = self._read_head()
        assert interim.startswith(b"HTTP/1.1 100"), interim  # the handler is reading: in flight

    def _read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed before a response head: {self.buffer!r}"
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def send_chunk(self, index: int) -> None:
        size = -(-len(self.body) // CHUNKS)
        self.sock.sendall(self.body[index * size : (index + 1) * size])

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head = self._read_head()
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            data = self.sock.recv(65536)
            assert data, "connection closed inside the response body"
            self.buffer += data
        self.sock.close()
        return int(status_line.split()[1]), headers, self.buffer[:length]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_sigterm_lets_in_flight_requests_finish(
    server_factory: Callable[..., Server], models_dir: Path, workers: int
) -> None:
    server = server_factory(
        command=[sys.executable, "-m", "app"],
        env={"MNIST_WORKERS": str(workers), "MNIST_MODEL_DIR": str(models_dir), "MNIST_GRACEFUL_TIMEOUT": "30"},
    )
    port = int(server.base_url.rsplit(":", 1)[1])
    clients = [SlowUpload(port, seed) for seed in range(CLIENTS)]

    server.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: server.log().count("Shutting down") >= workers, f"{workers} workers to begin shutting down")
    if workers == 1:
        # A lone worker closes its listening socket at once. (With several, the supervisor holds it
        # until it exits; new connections wait in the backlog and Kubernetes stops sending them.)
        _wait_for(lambda: _refused(port), "the server to stop accepting connections")
    assert server.proc.poll() is None, "the server exited with requests in flight"

    for index in range(CHUNKS):
        for client in clients:
            client.send_chunk(index)
        time.sleep(0.1)

    for client in clients:
        status, headers, body = client.response()
        assert status == 200, body
        assert headers["connection"] == "close"  # answered during the shutdown
        assert len(orjson.loads(body)["predictions"]) == IMAGES

    # uvicorn's supervisor exits 0 once its workers have drained; a lone worker re-raises SIGTERM
    # after draining, which the launcher (app/__main__.py) turns into a clean exit as well.
    assert server.proc.wait(timeout=60) == 0, server.log()
    assert "Finished server process" in server.log()
