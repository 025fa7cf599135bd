"""Retrain-then-reload under load: 2 workers, 16 clients, 10 publishes (5 of them bad)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.helpers import publish_variant, write_bad_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEVEN_PNG = (Path(__file__).parent / "fixtures" / "seven.png").read_bytes()
CLIENTS = 16
# Each publish stays up long enough for every worker to look at it (interval 0.25 s).
DWELL = 0.8
PLAN = ["ok", "truncated", "ok", "wrong-shapes", "nan", "ok", "inaccurate", "ok", "ok", "pickle"]


def _workers(server: Server) -> list[dict]:
    return httpx.get(f"{server.base_url}/model", timeout=10).json()["workers"]


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_publishing_ten_versions_under_load_fails_no_request(
    server_factory: Callable[..., Server], models_dir: Path, bundled_checkpoint: Path, tmp_path: Path
) -> None:
    server = server_factory(
        env={
            "MNIST_MODEL_DIR": str(models_dir),
            "MNIST_RELOAD_INTERVAL": "0.25",
            "MNIST_ACCESS_LOG": "false",
            # Reloads under load are the point, not admission: on a busy test machine 16 clients
            # can queue past the default 1 s and get an (honest) 503 that says nothing about reloads.
            "MNIST_QUEUE_TIMEOUT": "30",
        },
        args=["--workers", "2"],
    )
    assert _wait_for(lambda: len(_workers(server)) == 2, 60), "both workers should report in"

    valid = {bundled_checkpoint.stem}
    marker = tmp_path / "crafted-code-ran"
    stop = threading.Event()
    outcomes: Counter[tuple[int, str]] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"})
                    version = response.json().get("model_version", "?")
                    with lock:
                        outcomes[(response.status_code, version)] += 1
                except (httpx.HTTPError, ValueError) as exc:
                    with lock:
                        failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    last_valid = bundled_checkpoint.stem
    bad_versions = []
    try:
        time.sleep(DWELL)
        for index, kind in enumerate(PLAN):
            if kind == "ok":
                last_valid = publish_variant(models_dir, bundled_checkpoint, seed=index)
                valid.add(last_valid)
            else:
                bad_versions.append(
                    write_bad_version(models_dir, bundled_checkpoint, kind, f"v{index:03d}-{kind}", marker)
                )
            time.sleep(DWELL)
        converged = _wait_for(lambda: {w["version"] for w in _workers(server)} == {last_valid}, 10)
        time.sleep(DWELL)  # keep the load on a little after convergence
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    total = sum(outcomes.values())
    statuses = Counter(status for status, _ in outcomes.elements())
    seen_versions = {version for _, version in outcomes}
    print(f"{total} requests, statuses {dict(statuses)}, versions served {len(seen_versions)}")
    assert failures == []
    assert total > 200
    assert set(statuses) == {200}
    assert seen_versions <= valid, seen_versions - valid
    assert len(seen_versions) >= 3  # traffic really spanned several swaps
    assert converged
    workers = _workers(server)
    assert len(workers) == 2
    assert {w["version"] for w in workers} == {last_valid}
    assert not marker.exists(), "the crafted pickle's code ran"
    log = server.log()
    for version in bad_versions:
        assert f"reload of {version} rejected" in log, version
    assert "Traceback" not in log
