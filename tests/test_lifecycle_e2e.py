"""A bad CURRENT never stops a (re)start: the real launcher, two workers, clients posting throughout."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.registry import atomic_write, canary_gate, publish, version_path
from tests.conftest import Server
from tests.helpers import publish_variant, write_bad_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEVEN_PNG = (Path(__file__).parent / "fixtures" / "seven.png").read_bytes()
TOKEN = "s3cret-token"
LAUNCHER = [sys.executable, "-m", "app"]


def _point(models_dir: Path, content: bytes) -> None:
    atomic_write(models_dir / "CURRENT", lambda fh: fh.write(content))


def _workers(server: Server) -> list[dict]:
    try:
        return httpx.get(f"{server.base_url}/model", timeout=10).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _env(models_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "MNIST_MODEL_DIR": str(models_dir),
        "MNIST_WORKERS": "2",
        "MNIST_RELOAD_INTERVAL": "0.25",
        "MNIST_ACCESS_LOG": "false",
        "MNIST_ADMIN_TOKEN": TOKEN,
        # The lifecycle is the point, not admission: on a busy test machine a request can queue
        # past the default 1 s and get an (honest) 503 that says nothing about restarts.
        "MNIST_QUEUE_TIMEOUT": "30",
        **extra,
    }


class Clients:
    """A few clients posting a digit in a loop.

    A connection the server drops (a worker stopped, or killed with requests in flight or
    connections waiting in its socket's backlog, which the launcher resets) is retried on a new
    connection, up to three times, as any HTTP client or load balancer would: it never reached
    the application. Every answer must be a 200 from the last good model.
    """

    ATTEMPTS = 3

    def __init__(self, base_url: str, count: int = 4) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.outcomes: Counter[tuple[int, str]] = Counter()
        self.failures: list[str] = []
        self.retried = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def _post(self, client: httpx.Client) -> tuple[httpx.Client, httpx.Response | None, str]:
        """(the client to go on with, the response or None, what failed)."""
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                return client, client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"}), ""
            except httpx.TransportError as exc:
                client.close()
                client = httpx.Client(base_url=self.base_url, timeout=60)
                with self._lock:
                    self.retried += 1
                if attempt == self.ATTEMPTS:
                    return client, None, f"{time.strftime('%H:%M:%S')} {exc!r}"
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _loop(self) -> None:
        client = httpx.Client(base_url=self.base_url, timeout=60)
        while not self.stop.is_set():
            client, response, failure = self._post(client)
            try:
                outcome = (response.status_code, response.json().get("model_version", "?")) if response else None
            except ValueError as exc:
                outcome, failure = None, repr(exc)
            with self._lock:
                if outcome is None:
                    self.failures.append(failure)
                else:
                    self.outcomes[outcome] += 1
        client.close()

    @contextmanager
    def running(self) -> Iterator[Clients]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in self._threads:
                thread.join(90)


def _serving(server: Server, version: str, problem: str | None, exclude: frozenset[int] = frozenset()) -> bool:
    """Both workers (none of them in ``exclude``) serve ``version``, reporting ``problem`` (or none)."""
    workers = _workers(server)
    if len(workers) != 2 or {w["pid"] for w in workers} & exclude:
        return False
    for worker in workers:
        reported = (worker.get("problem") or {}).get("error")
        if worker["version"] != version or (reported is None if problem else reported is not None):
            return False
        if problem and problem not in reported:
            return False
    return True


def test_a_bad_current_never_stops_a_restart_and_no_request_fails(
    server_factory: Callable[..., Server], models_dir: Path, bundled_checkpoint: Path
) -> None:
    good = publish_variant(models_dir, bundled_checkpoint, seed=1, publish=False)
    publish(models_dir, good, canary_gate())  # CURRENT and LAST_GOOD
    env = _env(models_dir)

    # 1. CURRENT names a file that does not exist, then a full restart: the server comes up.
    _point(models_dir, b"v900-gone\n")
    server = server_factory(command=LAUNCHER, env=env)
    _wait_for(lambda: _serving(server, good, "no such checkpoint file"), 120, "both workers on the last good version")
    info = httpx.get(f"{server.base_url}/model", timeout=10).json()
    assert info["version"] == good
    assert info["problem"]["file"] == str(models_dir / "v900-gone.pt")
    assert info["problem"]["serving"] == f"{good} (the last good version)"
    ready = httpx.get(f"{server.base_url}/health/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["problem"]["file"] == str(models_dir / "v900-gone.pt")
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "mnist_model_fallbacks_total 2.0" in metrics  # one per worker

    with Clients(server.base_url).running() as clients:
        # 2. and 3. CURRENT pointed at a truncated file, then a low-accuracy model; each time a
        # rolling restart (SIGHUP) replaces both workers, which come up on the last good version.
        for kind, reason in (("truncated", "truncated or corrupt"), ("inaccurate", "below the minimum")):
            write_bad_version(models_dir, bundled_checkpoint, kind, f"v901-{kind}")
            before = frozenset(w["pid"] for w in _workers(server))
            print(f"{time.strftime('%H:%M:%S')} SIGHUP with a {kind} CURRENT")
            server.proc.send_signal(signal.SIGHUP)
            _wait_for(
                lambda before=before, reason=reason: _serving(server, good, reason, exclude=before),
                180,
                f"a restart with a {kind} CURRENT",
            )
            assert server.proc.poll() is None

        # 4. kill -9 one worker while CURRENT is still bad: its replacement serves the last good one.
        before = {w["pid"] for w in _workers(server)}
        victim = min(before)
        print(f"{time.strftime('%H:%M:%S')} kill -9 {victim}")
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: (
                _serving(server, good, "below the minimum", exclude=frozenset({victim}))
                and len({w["pid"] for w in _workers(server)} - before) == 1
            ),
            180,
            "a replacement worker",
        )
        assert server.proc.poll() is None, server.log()
        time.sleep(1)  # a little traffic on the replacement too

    print(f"{sum(clients.outcomes.values())} requests {dict(clients.outcomes)}, {clients.retried} retried")
    assert clients.failures == [], clients.failures[:5]
    assert set(clients.outcomes) == {(200, good)}, clients.outcomes
    assert sum(clients.outcomes.values()) > 20
    log = server.log()
    assert "failed to start" not in log
    assert "CURRENT cannot be served" in log
    assert "v901-inaccurate.pt: canary accuracy" in log


def test_a_transient_read_error_converges_and_admin_reload_reaches_both_workers(
    server_factory: Callable[..., Server], models_dir: Path, bundled_checkpoint: Path
) -> None:
    current = bundled_checkpoint.stem
    server = server_factory(command=LAUNCHER, env=_env(models_dir))
    _wait_for(lambda: _serving(server, current, None), 120, "both workers")

    # The new version is briefly unreadable (a symlink loop: ELOOP, even for root).
    staged = publish_variant(models_dir, bundled_checkpoint, seed=2, publish=False)
    real = version_path(models_dir, staged)
    aside = real.with_name("aside.bin")
    real.rename(aside)
    real.symlink_to(real)
    _point(models_dir, f"{staged}\n".encode())
    _wait_for(
        lambda: (
            all("will retry" in ((w.get("last_reload_error") or {}).get("error", "")) for w in _workers(server))
            and len(_workers(server)) == 2
        ),
        30,
        "both workers to fail to read it",
    )
    time.sleep(1.0)  # a few more failed tries, with backoff
    assert all(w["version"] == current for w in _workers(server))
    assert all(w["problem"] is None for w in _workers(server))  # not a verdict on the file
    real.unlink()
    aside.rename(real)
    _wait_for(lambda: _serving(server, staged, None), 30, "both workers to converge on the readable file")

    # An admin publish with the watch on: every worker serves it when the answer comes.
    other = publish_variant(models_dir, bundled_checkpoint, seed=3, publish=False)
    auth = {"authorization": f"Bearer {TOKEN}"}
    response = httpx.post(f"{server.base_url}/admin/reload", json={"version": other}, headers=auth, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], body["workers_total"], body["workers_serving"]) == (other, 2, 2)
    assert _serving(server, other, None)
    rolled = httpx.post(f"{server.base_url}/admin/reload", json={"previous": True}, headers=auth, timeout=60)
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["version"], rolled.json()["workers_serving"]) == (staged, 2)


def test_admin_reload_with_the_watch_off_is_409_and_changes_nothing(
    server_factory: Callable[..., Server], models_dir: Path, bundled_checkpoint: Path
) -> None:
    current = bundled_checkpoint.stem
    other = publish_variant(models_dir, bundled_checkpoint, seed=4, publish=False)
    server = server_factory(command=LAUNCHER, env=_env(models_dir, MNIST_RELOAD_INTERVAL="0"))
    _wait_for(lambda: _serving(server, current, None), 120, "both workers")
    auth = {"authorization": f"Bearer {TOKEN}"}
    for body in ({"version": other}, {"previous": True}, None):
        response = httpx.post(f"{server.base_url}/admin/reload", json=body, headers=auth, timeout=60)
        assert response.status_code == 409, response.text
        assert "the pointer watch is off (MNIST_RELOAD_INTERVAL=0)" in response.json()["detail"]
    assert _serving(server, current, None)
    assert (models_dir / "CURRENT").read_text().strip() == current
