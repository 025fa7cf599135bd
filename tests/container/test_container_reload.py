"""Retrain-then-reload across containers: a trainer container publishes into the API's volume.

An API container and a trainer container from the same image share one models volume. While a
bounded client load runs against the API, the trainer trains one epoch on the real MNIST
(mounted read-only) and publishes; every worker must serve the new version within 2 s of the
publish, and no request may fail. The publish instant is the mtime of the volume's ``CURRENT``
pointer (the trainer's atomic rename), read from the host side of the volume; "visible" is the
first ``GET /model`` answer in which every worker reports the new version.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.container.conftest import FIXTURES, SHARED_DATA, Containers, Engine, bundled_version, labels

SEVEN_JSON = (FIXTURES / "seven.json").read_bytes()
LOAD_THREADS = 4
MAX_REQUESTS = 50_000  # the load is bounded in count and in time
MAX_SECONDS = 420.0
VISIBLE_WITHIN = 2.0


@dataclass
class Load:
    """A few client threads, each on its own keep-alive connection, until told to stop."""

    url: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    # (sent at, version served): every answer's X-Model-Version, in wall-clock time.
    answers: list[tuple[float, str]] = field(default_factory=list)
    # (received at, {pid: version}): every worker's version, from GET /model on a fresh connection.
    views: list[tuple[float, dict[int, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _predict(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                with self.lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    self.sent += 1
                started = time.time()
                try:
                    response = client.post("/predict", content=SEVEN_JSON, headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    if response.status_code != 200 or labels(response.json()) != [7]:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        self.answers.append((started, response.headers["x-model-version"]))

    def _watch(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                # A new connection each time: the kernel spreads them over the workers' sockets.
                model = httpx.get(self.url + "/model", timeout=30).json()
            except httpx.HTTPError as exc:
                with self.lock:
                    self.failures.append(f"/model {type(exc).__name__}: {exc}")
                continue
            view = {w["pid"]: w["version"] for w in model["workers"]}
            with self.lock:
                self.sent += 1
                self.views.append((time.time(), view))
            time.sleep(0.05)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._predict) for _ in range(LOAD_THREADS)]
        self.threads.append(threading.Thread(target=self._watch))
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _watch_pointer(pointer: Path, old: str, stop: threading.Event, found: list[float]) -> None:
    """Record the mtime of CURRENT once it names something else: the publish instant."""
    while not stop.is_set():
        try:
            if pointer.read_text().strip() != old:
                found.append(os.stat(pointer).st_mtime)
                return
        except OSError:
            pass
        time.sleep(0.01)


def _mountpoint(engine: Engine, volume: str) -> Path | None:
    path = Path(engine("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())
    return path if (path / "CURRENT").is_file() else None  # Docker Desktop keeps volumes in a VM


def test_retrain_then_reload_across_containers(
    engine: Engine, containers: Containers, report: Callable[[str], None]
) -> None:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST in {SHARED_DATA}/MNIST/raw (set MNIST_SHARED_DATA)")
    volume = containers.volume()
    api = containers.api(volume=volume)
    old = bundled_version()
    pointer = _mountpoint(engine, volume)
    if pointer is None:
        pytest.skip(f"{engine.cli}: the volume's files are not visible from this host, so the publish cannot be timed")
    published: list[float] = []
    stop_watch = threading.Event()
    watcher = threading.Thread(target=_watch_pointer, args=(pointer / "CURRENT", old, stop_watch, published))
    watcher.start()
    try:
        with Load(api.url) as load:
            time.sleep(2)  # the load is running before the trainer starts
            trainer = containers.run(
                "--read-only", "--tmpfs", "/tmp",
                "-v", f"{volume}:/app/models",
                "-v", f"{SHARED_DATA}:/data:ro",
                "--health-cmd", "none" if engine.podman else "NONE",
                command=[
                    "python", "-m", "training.train", "--data-dir", "/data", "--models-dir", "/app/models",
                    "--epochs", "1", "--no-progress",
                ],
                prefix="trainer",
            )  # fmt: skip
            exit_code = int(engine("wait", trainer, timeout=MAX_SECONDS).stdout.strip().splitlines()[-1])
            assert exit_code == 0, engine.logs(trainer)
            watcher.join(timeout=10)
            assert published, f"the trainer exited 0 but CURRENT still names {old}:\n{engine.logs(trainer)}"
            new = pointer.joinpath("CURRENT").read_text().strip()
            # Keep the load on until every worker serves the new version, then 2 s more.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with load.lock:
                    if load.views and _all_on(load.views[-1][1], new):
                        break
                time.sleep(0.1)
            time.sleep(2)
    finally:
        stop_watch.set()
        watcher.join(timeout=10)

    publish = published[0]
    visible = next((at for at, view in load.views if at >= publish and _all_on(view, new)), None)
    assert visible is not None, f"no worker view ever showed {new} on every worker: {load.views[-3:]}"
    delay = visible - publish
    last_old = max((at for at, version in load.answers if version == old), default=None)
    report(
        f"retrain-then-reload: {load.sent} requests sent, {len(load.failures)} failed, "
        f"publish-to-visible {delay:.2f} s on every worker ({old} -> {new})"
    )
    assert not load.failures, load.failures[:5]
    assert delay <= VISIBLE_WITHIN
    assert {version for _, version in load.answers} == {old, new}
    # Nothing sent after every worker had switched came back from the old model.
    assert last_old is not None
    assert last_old <= visible
    logs = engine.logs(api.name)
    assert "Traceback" not in logs, logs


def _all_on(view: dict[int, str], version: str) -> bool:
    return len(view) == 2 and set(view.values()) == {version}  # the image runs MNIST_WORKERS=2
