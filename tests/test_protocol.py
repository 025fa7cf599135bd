"""The guarded HTTP protocol: request heads are bounded in size and time, bodies and keep-alive unaffected."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from app.protocol import guarded_protocol
from tests.helpers import serving


@pytest.fixture
def port(models_dir: Path) -> Iterator[int]:
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, access_log=False))
    with serving(app, http=guarded_protocol(16 * 1024, 1.0), log_level="warning") as bound:
        yield bound


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_head_over_the_limit_is_431_and_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        sent = 0
        try:
            while sent < 1_000_000:
                sent += sock.send(b"a" * 10_000)
                time.sleep(0.001)
        except OSError:  # the server closed the connection while we still sent
            pass
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431")
    assert b"request head over 16384 bytes" in answer


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHo"])
def test_a_head_that_does_not_arrive_in_time_is_408_and_closed(port: int, sent: bytes) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"request head not received within 1 s" in answer
    assert 0.9 < time.monotonic() - started < 5


def test_bodies_and_keep_alive_are_not_heads(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    batch = np.zeros((2000, 784), np.uint8).tobytes()  # 1.5 MB: far over the head limit
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(3):  # one connection, three requests, with pauses shorter than the head timeout
            response = client.post("/predict", content=batch, headers={"content-type": "application/octet-stream"})
            assert response.status_code == 200
            time.sleep(0.5)
        big_header = client.post("/predict", json={"pixels": [0.0] * 784}, headers={"x-pad": "a" * 8000})
        assert big_header.status_code == 200  # within the limit


@pytest.mark.e2e
def test_the_launcher_serves_with_the_guards(server_factory, models_dir: Path) -> None:  # noqa: ANN001
    import sys

    env = {"MNIST_MODEL_DIR": str(models_dir), "MNIST_RELOAD_INTERVAL": "0", "MNIST_HEADER_TIMEOUT": "1"}
    server = server_factory(env=env, command=[sys.executable, "-m", "app"])
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408")
    with server.client() as client:
        assert client.post("/predict", json={"pixels": [0.0] * 784}).status_code == 200
        too_big = client.get("/health/ready", headers={"x-pad": "a" * 70_000})
    assert too_big.status_code == 431


# -- one write per small response ------------------------------------------------------------------


class _Transport(asyncio.Transport):
    """Records what the protocol writes, call by call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _toy_app(scope: dict, receive, send) -> None:  # noqa: ANN001
    """/one: a plain answer; /stream: three chunks; /fail: an error after the response started."""
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": chunk, "more_body": chunk != b"c"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [*headers, (b"content-length", b"5")]})
    if scope["path"] == "/fail":
        raise RuntimeError("failed after the start")
    await send({"type": "http.response.body", "body": b"hello" if scope["method"] != "HEAD" else b""})


def _exchange(*requests: bytes, close: bool = False) -> _Transport:
    async def run() -> _Transport:
        config = uvicorn.Config(_toy_app, lifespan="off", log_level="critical")
        config.load()
        protocol_class = guarded_protocol(16 * 1024, 5.0)
        protocol = protocol_class(config=config, server_state=uvicorn.server.ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"".join(requests))
        for _ in range(50):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    return asyncio.run(run())


def _head(path: str, method: str = "GET", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n"


def test_a_response_head_and_body_go_out_in_one_write() -> None:
    transport = _exchange(_head("/one"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\nhello")


def test_pipelined_requests_are_answered_in_order_one_write_each() -> None:
    transport = _exchange(_head("/one"), _head("/stream"), _head("/one", "HEAD"), _head("/one"))
    first, stream, *rest = transport.writes
    assert first.endswith(b"hello")
    assert first.count(b"HTTP/1.1") == 1
    assert stream.startswith(b"HTTP/1.1 200")
    assert stream.endswith(b"\r\n\r\n1\r\na\r\n")
    assert rest[:2] == [b"1\r\nb\r\n", b"1\r\nc\r\n0\r\n\r\n"]
    head, last = rest[2:]
    assert head.startswith(b"HTTP/1.1 200")
    assert head.endswith(b"\r\n\r\n")
    assert last.endswith(b"hello")


def test_an_error_after_the_start_still_sends_the_head_then_closes() -> None:
    transport = _exchange(_head("/fail"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200")
    assert transport.closed


def test_expect_100_continue_is_sent_before_the_answer() -> None:
    request = b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    transport = _exchange(request)
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert transport.writes[1].startswith(b"HTTP/1.1 200")
    assert transport.writes[1].endswith(b"hello")
