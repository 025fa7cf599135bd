"""Stopping and crashing in a real container: SIGTERM drains, a killed worker is replaced."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx

from tests.container.conftest import TEN_DIGITS, TEN_LABELS, Containers, Engine, labels

SLOW_IMAGES = 2_000  # per request: 1.5 MB of uint8 pixels...
SLOW_CHUNKS = 25  # ...uploaded in 25 pieces, 0.2 s apart: each request is in flight for ~5 s
GRACE = 30  # podman/docker stop -t; the image drains for MNIST_GRACEFUL_TIMEOUT=20 s


def _slow_body() -> Iterator[bytes]:
    body = TEN_DIGITS * (SLOW_IMAGES // 10)
    step = len(body) // SLOW_CHUNKS
    for start in range(0, len(body), step):
        yield body[start : start + step]
        time.sleep(0.2)


def test_stop_lets_in_flight_requests_finish_and_exits_0(engine: Engine, containers: Containers) -> None:
    api = containers.api()
    results: list[str] = []

    def slow_request() -> None:
        try:
            response = httpx.post(
                api.url + "/predict",
                content=_slow_body(),
                headers={"content-type": "application/octet-stream"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            results.append(f"{type(exc).__name__}: {exc}")
            return
        if response.status_code != 200:
            results.append(f"{response.status_code}: {response.text[:200]}")
            return
        digits = labels(response.json())
        results.append("ok" if digits == TEN_LABELS * (SLOW_IMAGES // 10) else f"wrong labels {digits[:12]}")

    clients = [threading.Thread(target=slow_request) for _ in range(3)]
    for client in clients:
        client.start()
    time.sleep(1.5)  # every request is mid-upload when SIGTERM arrives
    started = time.monotonic()
    engine("stop", "-t", str(GRACE), api.name, timeout=GRACE + 60)
    took = time.monotonic() - started
    for client in clients:
        client.join(timeout=60)

    state = engine.inspect(api.name)["State"]
    assert results == ["ok"] * 3, results
    assert state["ExitCode"] == 0, engine.logs(api.name)
    assert took < GRACE, f"stop took {took:.1f} s: the engine had to SIGKILL"
    # It did wait for the uploads (each ~5 s), rather than dropping them and exiting at once.
    assert took > 2, f"stopped in {took:.1f} s, before the in-flight uploads could have finished"


def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(engine: Engine, containers: Containers) -> None:
    api = containers.api()
    with api.client() as client:
        workers = [w["pid"] for w in client.get("/model").json()["workers"]]
    assert len(workers) == 2, workers
    victim = workers[0]
    # The image has no kill binary (no procps); Python's os.kill is the same signal.
    engine("exec", api.name, "python", "-c", f"import os, signal; os.kill({victim}, signal.SIGKILL)")
    killed = time.monotonic()

    # Fresh connections hash over both workers' sockets; the dead one's is held by the launcher,
    # so its connections wait for the replacement instead of failing.
    for _ in range(20):
        response = httpx.post(
            api.url + "/predict", content=TEN_DIGITS, headers={"content-type": "application/octet-stream"}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert labels(response.json()) == TEN_LABELS

    deadline = killed + 120
    current: list[int] = []
    while time.monotonic() < deadline:
        current = [w["pid"] for w in httpx.get(api.url + "/model", timeout=30).json()["workers"]]
        if len(current) == 2 and victim not in current:
            break
        time.sleep(0.5)
    assert victim not in current, f"workers {current} after killing {victim}"
    assert len(current) == 2, f"workers {current} after killing {victim}"
    assert workers[1] in current  # the other worker was left alone
    assert engine.inspect(api.name)["State"]["Running"]
