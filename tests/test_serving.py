"""The request pipeline's budgets: what a request may cost is bounded before the work starts.

In-process tests (httpx over ASGI, the lifespan running) for the queue deadline, the in-flight
cap and the cgroup CPU reader; real uvicorn for what only a socket shows: stalled uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.serving import available_cpus, cgroup_cpu_limit
from tests.conftest import Server

FIXTURES = Path(__file__).parent / "fixtures"
SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()


# -- the CPU quota ---------------------------------------------------------------------------


def _cgroup(tmp_path: Path, proc_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_lines)
    return root, proc


@pytest.mark.parametrize(
    ("proc_lines", "files", "expected"),
    [
        # cgroup v2 inside a container: the group is the mount's root.
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # v2 on a host: the tightest of the group and its ancestors.
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/cpu.max": "400000 100000",
                "kubepods/pod1/cpu.max": "100000 100000",
                "kubepods/pod1/ctr/cpu.max": "max 100000",
            },
            1.0,
        ),
        # cgroup v1: cfs quota over period, -1 is no limit.
        (
            "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n",
            {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
            3.0,
        ),
        (
            "12:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
        ),
        # garbage files: no limit rather than a crash
        ("0::/\n", {"cpu.max": "lots\n"}, None),
        ("nonsense\n", {}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, proc_lines: str, files: dict[str, str], expected: float | None) -> None:
    root, proc = _cgroup(tmp_path, proc_lines, files)
    assert cgroup_cpu_limit(root, proc) == expected


def test_available_cpus_rounds_a_quota_up_and_never_passes_affinity(tmp_path: Path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert available_cpus(root, proc) == 1  # half a CPU still gets one slot
    root, proc = _cgroup(tmp_path / "big", "0::/\n", {"cpu.max": "6400000 100000\n"})
    assert available_cpus(root, proc) == affinity  # a 64-CPU quota on this machine: its CPUs
    assert available_cpus(tmp_path / "missing", tmp_path / "missing-proc") == affinity


# -- queue deadline and in-flight cap ------------------------------------------------------------


class _Slow(torch.nn.Module):
    """The served model, one second slower per forward: a worker that cannot keep up."""

    def __init__(self, model: torch.nn.Module, seconds: float) -> None:
        super().__init__()
        self.model = model
        self.seconds = seconds
        self.num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.model(x)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def _client(settings: Settings, slow: float = 0.0) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.lifespan():
        store = app.state.store
        if slow:
            store.current = dataclasses.replace(store.current, model=_Slow(store.current.model, slow))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


def _big_png() -> bytes:
    # More pixels than the event loop decodes inline: it needs a compute slot.
    buffer = io.BytesIO()
    Image.open(io.BytesIO(SEVEN_PNG)).resize((600, 600)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.anyio
async def test_a_request_that_would_wait_past_the_queue_deadline_gets_503_retry_after(models_dir: Path) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, compute_slots=1, queue_timeout=0.3)
    body = _big_png()
    async with _client(settings, slow=1.0) as client:

        async def post() -> httpx.Response:
            return await client.post("/predict", content=body, headers={"content-type": "image/png"})

        async def post_v2() -> httpx.Response:
            doc = np.zeros((200, 784), np.uint8)
            tensor = {"name": "input", "datatype": "UINT8", "shape": [200, 784], "data": doc.ravel().tolist()}
            return await client.post("/v2/models/mnist/infer", json={"inputs": [tensor]})

        first = asyncio.create_task(post())
        await asyncio.sleep(0.1)  # the first holds the only slot for a second
        queued, queued_v2 = await asyncio.gather(post(), post_v2())
        done = await first
    assert done.status_code == 200
    assert done.json()["label"] == 7
    for response, key in ((queued, "detail"), (queued_v2, "error")):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "server busy" in response.json()[key]


@pytest.mark.anyio
async def test_the_deadline_counts_waiting_for_the_worker_not_for_the_upload(models_dir: Path) -> None:
    from app.errors import InputError
    from app.routes.predict import Options, answer

    settings = Settings(model_dir=models_dir, reload_interval=0, queue_timeout=0.3)
    body = orjson.dumps({"pixels": [0.0] * 784})

    def receive_after(delay: float) -> object:
        async def receive() -> dict[str, object]:
            await asyncio.sleep(delay)  # a slow upload
            return {"type": "http.request", "body": body, "more_body": False}

        return receive

    app = create_app(settings)
    async with app.lifespan():
        pipeline = app.state.pipeline

        async def predict(started: float, upload: float) -> int:
            result, _ = await answer(
                pipeline,
                receive_after(upload),
                media="application/json",
                content_type="application/json",
                declared=len(body),
                started=started,
                options=Options(),
            )
            return result.count

        now = time.perf_counter()
        # An upload that takes longer than the deadline is not a wait: answered.
        assert await predict(now, upload=0.5) == 1
        # A request that arrived 0.5 s ago and is only now being handled (a blocked event loop,
        # say) has waited past the deadline: refused without being computed.
        with pytest.raises(InputError) as refused:
            await predict(time.perf_counter() - 0.5, upload=0.0)
        assert refused.value.status_code == 503
        assert refused.value.headers == {"Retry-After": "1"}
        assert "waited over 0.3 s" in refused.value.detail


@pytest.mark.anyio
async def test_too_many_requests_in_flight_get_503(models_dir: Path) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_inflight=1, compute_slots=1)
    body = _big_png()
    async with _client(settings, slow=0.5) as client:
        responses = await asyncio.gather(
            *(client.post("/predict", content=body, headers={"content-type": "image/png"}) for _ in range(3))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503]
    assert all("requests in progress" in r.json()["detail"] for r in responses if r.status_code == 503)


@pytest.mark.anyio
async def test_image_budgets_refuse_before_decoding(models_dir: Path) -> None:
    settings = Settings(
        model_dir=models_dir, reload_interval=0, max_image_pixels=300 * 300, max_request_pixels=500 * 500
    )
    big = _big_png()  # 600x600
    small = SEVEN_PNG  # 280x280
    import base64

    def v2(images: list[bytes]) -> dict[str, object]:
        data = [base64.b64encode(i).decode() for i in images]
        return {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(images)], "data": data}]}

    async with _client(settings) as client:
        one_big = await client.post("/predict", content=big, headers={"content-type": "image/png"})
        assert one_big.status_code == 413
        assert "over the per-image limit of 90,000" in one_big.json()["detail"]
        over_request = await client.post("/v2/models/mnist/infer", json=v2([small] * 4))  # 4 x 78,400 pixels
        assert over_request.status_code == 413
        assert "over the per-request limit of 250,000" in over_request.json()["error"]
        fine = await client.post("/v2/models/mnist/infer", json=v2([small] * 3))
        assert fine.status_code == 200
        many = await client.post("/v2/models/mnist/infer", json=v2([small] * 65))
        assert many.status_code == 413
        assert "65 images in one request is over the limit of 64" in many.json()["error"]


@pytest.mark.anyio
async def test_json_bodies_have_their_own_size_limit(models_dir: Path) -> None:
    settings = Settings(model_dir=models_dir, reload_interval=0, max_json_bytes=10_000)
    async with _client(settings) as client:
        response = await client.post("/predict", json={"instances": [[0.0] * 784] * 4})
        assert response.status_code == 413
        assert "over the limit of 10000 bytes" in response.json()["detail"]
        # The same images as uint8 are within the body limit.
        raw = np.zeros((4, 784), np.uint8).tobytes()
        ok = await client.post("/predict", content=raw, headers={"content-type": "application/octet-stream"})
        assert ok.status_code == 200


# -- stalled uploads, against a real server ------------------------------------------------------


def _stall(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\0" * 100)  # headers and a first bit, then nothing
    return sock


@pytest.mark.e2e
def test_stalled_uploads_hold_no_slot_and_time_out_with_408(server_factory, models_dir: Path) -> None:  # noqa: ANN001
    server: Server = server_factory(
        env={"MNIST_MODEL_DIR": str(models_dir), "MNIST_RELOAD_INTERVAL": "0", "MNIST_BODY_TIMEOUT": "3"}
    )
    port = int(server.base_url.rsplit(":", 1)[1])
    stalled = [_stall(port, 100_000 + i) for i in range(16)]
    try:
        batch = np.random.default_rng(0).integers(0, 256, (5000, 784), dtype=np.uint8).tobytes()
        started = time.monotonic()
        with server.client() as client:
            response = client.post("/predict", content=batch, headers={"content-type": "application/octet-stream"})
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 5000
        assert elapsed < 10
        # Each stalled upload is answered 408 once its body timeout passes, and its connection closed.
        for sock in stalled:
            sock.settimeout(10)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"connection: close" in answer.lower()
            assert b"request body not received within 3 s" in answer
    finally:
        for sock in stalled:
            sock.close()
    with server.client() as client:
        assert client.get("/health/ready").status_code == 200


def test_the_access_log_cannot_be_forged_through_the_path(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(model_dir=models_dir, reload_interval=0))) as client:
        with caplog.at_level("INFO", logger="app.access"):
            response = client.get("/predict%0Arequest_id=forged%20status=200%22")
    assert response.status_code in (404, 405)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert len(lines) == 1
    assert "\n" not in lines[0]
    assert 'path="/predict%0Arequest_id=forged%20status=200%22"' in lines[0]


@pytest.mark.anyio
async def test_work_for_a_client_that_left_is_not_started(models_dir: Path) -> None:
    from app.errors import InputError
    from app.routes.predict import Options, answer

    body = _big_png()  # computed in a thread, after admission
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    calls: list[int] = []

    class Counting(torch.nn.Module):
        num_classes = 10

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return torch.zeros(len(x), 10)

    app = create_app(Settings(model_dir=models_dir, reload_interval=0))
    async with app.lifespan():
        store = app.state.store
        store.current = dataclasses.replace(store.current, model=Counting())
        with pytest.raises(InputError) as gone:
            await answer(
                app.state.pipeline,
                receive,
                media="image/png",
                content_type="image/png",
                declared=len(body),
                started=time.perf_counter(),
                options=Options(),
            )
    assert gone.value.status_code == 499
    assert calls == []  # nothing was computed for nobody
