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
# A connection queued on a killed worker's socket before the launcher replaced it is reset.
RESET_ERRORS = {"ReadError", "RemoteProtocolError", "ConnectError"}
RESET_WINDOW = 3.0


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

    # Requests on fresh connections (the kernel hashes them over the workers' sockets) until the
    # replacement serves. Until the launcher notices the death (it checks every 0.5 s) the dead
    # worker's socket still takes its share of new connections, and the launcher resets those
    # when it closes that socket (app/__main__.py, _renew_listener); after that, every request
    # must be answered.
    outcomes: list[tuple[float, str]] = []
    current: list[int] = []
    while time.monotonic() < killed + 120:
        try:
            response = httpx.post(
                api.url + "/predict",
                content=TEN_DIGITS,
                headers={"content-type": "application/octet-stream"},
                timeout=60,
            )
            good = response.status_code == 200 and labels(response.json()) == TEN_LABELS
            outcomes.append((time.monotonic() - killed, "ok" if good else f"{response.status_code} {response.text}"))
            current = [w["pid"] for w in httpx.get(api.url + "/model", timeout=30).json()["workers"]]
        except httpx.TransportError as exc:
            outcomes.append((time.monotonic() - killed, type(exc).__name__))
        if len(current) == 2 and victim not in current and len(outcomes) >= 20:
            break
        time.sleep(0.05)

    assert victim not in current, f"workers {current} after killing {victim}"
    assert len(current) == 2, f"workers {current} after killing {victim}"
    assert workers[1] in current  # the other worker was left alone
    failed = [(round(at, 2), what) for at, what in outcomes if what != "ok"]
    assert all(what in RESET_ERRORS and at < RESET_WINDOW for at, what in failed), failed
    assert sum(what == "ok" for _, what in outcomes) >= 20 - len(failed)
    assert outcomes[-1][1] == "ok"
    assert engine.inspect(api.name)["State"]["Running"]
