"""``GET /metrics``: every metric the docs name, driven by real requests and read back from
``/metrics``; the sums over every worker; and the explicit set-up (nothing happens at import).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app import metrics
from app.config import Settings
from app.main import create_app
from app.registry import load_model, read_pointer, save_checkpoint, write_pointer
from tests.conftest import ROOT, Server, constant_model, save_model

FIXTURES = Path(__file__).parent / "fixtures"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Text exposition format -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, size=(n, 784), dtype=np.uint8)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Scraper:
    """An in-process client of an app whose lifespan runs, with ``/metrics`` read as samples."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def scrape(self) -> Samples:
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return parse(response.text)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Scraper]:
    app = create_app(settings)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield Scraper(client)


def _settings(models_dir: Path, **overrides: object) -> Settings:
    return Settings(model_dir=models_dir, reload_interval=0, access_log=False, **overrides)  # type: ignore[arg-type]


class Delta:
    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


# -- each documented metric, through HTTP -----------------------------------------------------------


def test_requests_and_their_latency_by_route_and_status(models_dir: Path) -> None:
    async def run() -> Delta:
        async with serving(_settings(models_dir)) as app:
            before = await app.scrape()
            assert (await app.client.get("/model")).status_code == 200
            assert (await app.client.get("/model")).status_code == 200
            assert (await app.client.post("/predict", json={"pixels": [0.5] * 784})).status_code == 200
            assert (await app.client.post("/predict", json={"pixels": [0.5] * 3})).status_code == 422
            empty_png = await app.client.post("/predict", content=b"", headers={"content-type": "image/png"})
            assert empty_png.status_code == 400
            assert (await app.client.get("/nowhere")).status_code == 404
            # An unusual method is counted as OTHER: a client cannot grow the label set at will.
            assert (await app.client.request("BREW", "/nowhere")).status_code == 404
            return Delta(before, await app.scrape())

    delta = asyncio.run(run())
    requests, seconds = "mnist_http_requests_total", "mnist_http_request_duration_seconds"
    model = {"method": "GET", "route": "/model", "status": "200"}
    assert delta(requests, **model) == 2
    assert delta(f"{seconds}_count", **model) == 2
    assert delta(f"{seconds}_bucket", **model, le="+Inf") == 2
    assert delta(f"{seconds}_sum", **model) > 0
    assert delta(requests, method="POST", route="/predict", status="200") == 1
    assert delta(requests, method="POST", route="/predict", status="422") == 1
    assert delta(requests, method="POST", route="/predict", status="400") == 1
    assert delta(f"{seconds}_count", method="POST", route="/predict", status="400") == 1
    assert delta(requests, method="GET", route="<unmatched>", status="404") == 1
    assert delta(requests, method="OTHER", route="<unmatched>", status="404") == 1
    assert delta(requests, method="BREW", route="<unmatched>", status="404") == 0
    # The first scrape is answered before the second one is taken.
    assert delta(requests, method="GET", route="/metrics", status="200") == 1


def test_predictions_count_images_by_input_kind(models_dir: Path) -> None:
    async def run() -> Delta:
        async with serving(_settings(models_dir)) as app:
            before = await app.scrape()
            post = app.client.post
            assert (await post("/predict", json={"pixels": [0.5] * 784})).status_code == 200
            assert (await post("/predict", json={"instances": torch.rand(4, 784).tolist()})).status_code == 200
            png = (FIXTURES / "seven.png").read_bytes()
            assert (await post("/predict", content=png, headers={"content-type": "image/png"})).status_code == 200
            raw = _digits(5).tobytes()
            uint8 = await post("/predict", content=raw, headers={"content-type": "application/octet-stream"})
            assert uint8.status_code == 200
            npy = await post("/predict", content=_npy(_digits(2)), headers={"content-type": "application/x-npy"})
            assert npy.status_code == 200
            # Refused requests classify nothing.
            assert (await post("/predict", json={"pixels": [2.0] * 784})).status_code == 422
            bad = await post("/predict", content=raw[:-1], headers={"content-type": "application/octet-stream"})
            assert bad.status_code in (400, 422)
            return Delta(before, await app.scrape())

    delta = asyncio.run(run())
    assert delta("mnist_predictions_total", input_kind="json") == 5
    assert delta("mnist_predictions_total", input_kind="png") == 1
    assert delta("mnist_predictions_total", input_kind="uint8") == 5
    assert delta("mnist_predictions_total", input_kind="npy") == 2


def test_model_info_and_reloads(models_dir: Path) -> None:
    """A good reload moves the info metric to the new version; a rejected one counts a failure."""
    bundled = read_pointer(models_dir)
    assert bundled is not None
    trained, _ = load_model(models_dir / f"{bundled}.pt")
    good = save_checkpoint(models_dir, trained, {"test_accuracy": None}, version="20990101T000000Z-aaaaaaaa").stem
    bad = save_model(models_dir, constant_model(), version="20990101T000000Z-bbbbbbbb").stem
    auth = {"authorization": "Bearer secret"}

    async def run() -> list[Samples]:
        async with serving(_settings(models_dir, admin_token="secret")) as app:
            start = await app.scrape()
            response = await app.client.post("/admin/reload", json={"version": good}, headers=auth)
            assert response.status_code == 200
            reloaded = await app.scrape()
            response = await app.client.post("/admin/reload", json={"version": bad}, headers=auth)
            assert response.status_code == 422
            return [start, reloaded, await app.scrape()]

    start, reloaded, rejected = asyncio.run(run())
    info, reloads = "mnist_model_info", "mnist_model_reloads_total"
    assert value(start, info, version=bundled) == 1
    assert value(reloaded, info, version=bundled) == 0
    assert value(reloaded, info, version=good) == 1
    assert Delta(start, reloaded)(reloads, result="success") == 1
    assert Delta(start, reloaded)(reloads, result="failure") == 0
    assert Delta(reloaded, rejected)(reloads, result="failure") == 1
    assert Delta(reloaded, rejected)(reloads, result="success") == 0
    assert value(rejected, info, version=good) == 1
    assert value(rejected, info, version=bad) == 0


def test_model_fallbacks_count_starts_that_could_not_serve_current(models_dir: Path, tmp_path: Path) -> None:
    """A worker whose CURRENT fails the checks serves a good version instead, and counts it."""
    bundled = read_pointer(models_dir)
    assert bundled is not None
    broken = tmp_path / "broken"
    shutil.copytree(models_dir, broken)
    refused = save_model(broken, constant_model(), version="20990101T000000Z-cccccccc").stem  # fails the canary
    write_pointer(broken, refused)

    async def run() -> tuple[Samples, Samples]:
        async with serving(_settings(models_dir)) as healthy:
            before = await healthy.scrape()
        async with serving(_settings(broken)) as fallen_back:
            assert (await fallen_back.client.get("/health/ready")).status_code == 200
            return before, await fallen_back.scrape()

    before, after = asyncio.run(run())
    delta = Delta(before, after)
    assert delta("mnist_model_fallbacks_total") == 1
    assert value(after, "mnist_model_info", version=bundled) == 1
    assert value(after, "mnist_model_info", version=refused) == 0


BURST = 48


def test_batch_size_histogram_after_a_concurrent_burst(models_dir: Path) -> None:
    """Concurrent single-digit requests are predicted in shared forward passes, each observed."""

    async def run() -> Delta:
        async with serving(_settings(models_dir, microbatch=True)) as app:
            before = await app.scrape()
            pixels = torch.rand(BURST, 784).tolist()
            answers = await asyncio.gather(*(app.client.post("/predict", json={"pixels": p}) for p in pixels))
            assert [a.status_code for a in answers] == [200] * BURST
            return Delta(before, await app.scrape())

    delta = asyncio.run(run())
    passes = delta("mnist_inference_batch_size_count")
    assert 0 < passes <= BURST
    assert delta("mnist_inference_batch_size_sum") == BURST  # every image, in some forward pass
    assert delta("mnist_inference_batch_size_bucket", le="+Inf") == passes


# Every metric the README and docs/ name, with the test above that drives it through HTTP.
TESTED = {
    "mnist_http_requests_total": test_requests_and_their_latency_by_route_and_status,
    "mnist_http_request_duration_seconds": test_requests_and_their_latency_by_route_and_status,
    "mnist_predictions_total": test_predictions_count_images_by_input_kind,
    "mnist_model_info": test_model_info_and_reloads,
    "mnist_model_reloads_total": test_model_info_and_reloads,
    "mnist_model_fallbacks_total": test_model_fallbacks_count_starts_that_could_not_serve_current,
    "mnist_inference_batch_size": test_batch_size_histogram_after_a_concurrent_burst,
}


def _documented() -> set[str]:
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "docs").rglob("*.md"))]
    return {name for text in texts for name in re.findall(r"`(mnist_[a-z_]+)", text)}


def test_every_documented_metric_is_exposed_and_tested(models_dir: Path) -> None:
    documented = _documented()
    assert documented, "the docs name no mnist_ metric: has the metrics table moved?"
    assert documented <= set(TESTED), f"documented metrics without an HTTP-level test: {documented - set(TESTED)}"

    async def run() -> str:
        async with serving(_settings(models_dir)) as app:
            assert (await app.client.post("/predict", json={"pixels": [0.5] * 784})).status_code == 200
            return (await app.client.get("/metrics")).text

    exposed = {sample for sample, _ in parse(asyncio.run(run()))}
    for name in documented:
        assert any(sample == name or sample.startswith(name + "_") for sample in exposed), f"{name} not in /metrics"


# -- every worker in one scrape ---------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_add_up_every_worker(server_factory: Callable[..., Server], models_dir: Path, tmp_path: Path) -> None:
    server = server_factory(
        command=[sys.executable, "-m", "app", "--workers", "2"],
        env={"MNIST_MODEL_DIR": str(models_dir), "MNIST_ACCESS_LOG": "false"},
    )
    version = read_pointer(models_dir)
    pids: dict[int, int] = {}
    # A fresh connection per request: the kernel hands each to either worker's socket.
    with server.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while len(pids) < 2:
            assert sum(pids.values()) < 400, f"400 requests all reached one worker: {pids}"
            response = client.get("/model")
            assert response.status_code == 200
            pid = response.json()["pid"]
            pids[pid] = pids.get(pid, 0) + 1
        sent = sum(pids.values())

        for _ in range(3):
            assert client.post("/predict", json={"pixels": [0.5] * 784}).status_code == 200
        raw = client.post(
            "/predict", content=_digits(5).tobytes(), headers={"content-type": "application/octet-stream"}
        )
        assert raw.status_code == 200
        npy = client.post("/predict", content=_npy(_digits(2)), headers={"content-type": "application/x-npy"})
        assert npy.status_code == 200
        assert client.post("/predict", json={"pixels": [0.5] * 3}).status_code == 422
        time.sleep(0.5)  # each worker writes its per-request metrics out within 0.1 s (metrics.flush)
        before_burst = parse(client.get("/metrics").text)

    # A concurrent burst of single digits, over both workers.
    statuses: list[int] = []

    def burst() -> None:
        with server.client() as one:
            statuses.extend(one.post("/predict", json={"pixels": [0.25] * 784}).status_code for _ in range(6))

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 48

    time.sleep(0.5)  # each worker writes its per-request metrics out within 0.1 s (metrics.flush)
    with server.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        # Whichever worker answers the scrape, it reports the sums over both.
        for _ in range(4):
            scrape = client.get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["content-type"].startswith("text/plain")
            samples = parse(scrape.text)
            model = {"method": "GET", "route": "/model", "status": "200"}
            assert value(samples, "mnist_http_requests_total", **model) == sent, pids
            assert value(samples, "mnist_http_request_duration_seconds_count", **model) == sent
            assert value(samples, "mnist_http_request_duration_seconds_bucket", **model, le="+Inf") == sent
            assert value(samples, "mnist_http_request_duration_seconds_sum", **model) > 0
            ok = {"method": "POST", "route": "/predict", "status": "200"}
            assert value(samples, "mnist_http_requests_total", **ok) == 5 + 48
            bad = {"method": "POST", "route": "/predict", "status": "422"}
            assert value(samples, "mnist_http_requests_total", **bad) == 1
            assert value(samples, "mnist_predictions_total", input_kind="json") == 3 + 48
            assert value(samples, "mnist_predictions_total", input_kind="uint8") == 5
            assert value(samples, "mnist_predictions_total", input_kind="npy") == 2
            burst_delta = Delta(before_burst, samples)
            assert burst_delta("mnist_inference_batch_size_sum") == 48
            assert 0 < burst_delta("mnist_inference_batch_size_count") <= 48
            # Both workers serve the bundled version: the info gauge is 1, not 2 (livemax).
            assert value(samples, "mnist_model_info", version=str(version)) == 1
            assert value(samples, "mnist_model_reloads_total", result="success") == 0

    runtime = tmp_path / f"runtime-{server.base_url.rsplit(':', 1)[1]}"
    files = {p.name.rpartition("_")[0] for p in (runtime / "prometheus").glob("*.db")}
    assert {"counter", "histogram", "gauge_livemax"} <= files
    assert server.stop() == 0
    # Stopped workers serve nothing: their info series drop to 0 (their counters stay).
    after = _collect(runtime / "prometheus")
    assert value(after, "mnist_model_info", version=str(version)) == 0
    assert value(after, "mnist_http_requests_total", method="GET", route="/model", status="200") == sent


def _collect(directory: Path) -> Samples:
    """What /metrics would say about ``directory``, computed in a clean process."""
    code = (
        "import sys\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from prometheus_client.multiprocess import MultiProcessCollector\n"
        "registry = CollectorRegistry()\n"
        "MultiProcessCollector(registry, path=sys.argv[1])\n"
        "sys.stdout.write(generate_latest(registry).decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(directory)], capture_output=True, text=True, timeout=60, check=True
    )
    return parse(result.stdout)


# -- the set-up -------------------------------------------------------------------------------------

_MARK = "MNIST_PROMETHEUS_DIR_DERIVED"


def _python(code: str, **env: str) -> list[str]:
    """Run ``code`` in a clean interpreter (no metrics folder inherited from this test process)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", _MARK)}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_importing_the_app_has_no_side_effects(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    code = (
        "import os, sys\n"
        "import app.metrics, app.main\n"
        "print('PROMETHEUS_MULTIPROC_DIR' in os.environ, 'prometheus_client' in sys.modules)\n"
    )
    assert _python(code, MNIST_RUNTIME_DIR=str(runtime)) == ["False", "False"]
    assert not runtime.exists()


def test_setup_settles_one_folder_per_server(tmp_path: Path) -> None:
    """The folder derived from the runtime dir, or the operator's; never one inherited from a parent."""
    code = (
        "import os, app.metrics as m\n"
        "print(m.setup()); print(m.setup()); print(os.environ['PROMETHEUS_MULTIPROC_DIR'])\n"
        "print(m.share_folder(__import__('pathlib').Path('/elsewhere')))\n"
    )
    runtime = tmp_path / "runtime"
    assert _python(code, MNIST_RUNTIME_DIR=str(runtime)) == [str(runtime / "prometheus")] * 4
    assert (runtime / "prometheus").is_dir()
    # A folder that a parent process derived for itself (a test run starting a server) is not reused.
    inherited = str(tmp_path / "parent" / "prometheus")
    env = {"MNIST_RUNTIME_DIR": str(runtime), "PROMETHEUS_MULTIPROC_DIR": inherited, _MARK: inherited}
    assert _python(code, **env) == [str(runtime / "prometheus")] * 4
    # One the operator set is used as it is.
    explicit = str(tmp_path / "explicit")
    assert _python(code, MNIST_RUNTIME_DIR=str(runtime), PROMETHEUS_MULTIPROC_DIR=explicit) == [explicit] * 4


def test_an_unusable_folder_leaves_each_worker_reporting_itself(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    code = (
        "import os, app.metrics as m\n"
        "print(m.setup()); m.observe_batch(3)\n"
        "print('PROMETHEUS_MULTIPROC_DIR' in os.environ)\n"
        "print(*(l for l in m.render().decode().splitlines() if l.startswith('mnist_inference_batch_size_sum')))\n"
    )
    # No folder: the metrics still work, /metrics then reports this process's values.
    assert _python(code, MNIST_RUNTIME_DIR=str(blocker)) == ["None", "False", "mnist_inference_batch_size_sum", "3.0"]


def test_setup_clears_the_live_gauges_of_dead_workers(tmp_path: Path) -> None:
    folder = tmp_path / "runtime" / "prometheus"
    folder.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getpid()
    for pid in (dead, alive):
        (folder / f"gauge_livemax_{pid}.db").write_bytes(b"")
        (folder / f"counter_{pid}.db").write_bytes(b"")
    _python("import app.metrics as m; m.share_folder()", MNIST_RUNTIME_DIR=str(tmp_path / "runtime"))
    # A dead worker's live gauge goes (it serves nothing); counters always stay in the sums.
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"counter_{dead}.db", f"counter_{alive}.db", f"gauge_livemax_{alive}.db"]
    )


def test_many_apps_in_one_process_share_the_metrics(models_dir: Path) -> None:
    """Set-up is idempotent: every app's lifespan calls it, and they all count into one set."""

    async def run() -> tuple[Samples, Samples]:
        async with serving(_settings(models_dir)) as first:
            before = await first.scrape()
            assert (await first.client.post("/predict", json={"pixels": [0.5] * 784})).status_code == 200
        async with serving(_settings(models_dir)) as second:
            assert (await second.client.post("/predict", json={"pixels": [0.5] * 784})).status_code == 200
            return before, await second.scrape()

    before, after = asyncio.run(run())
    assert metrics.setup() == metrics.setup()
    assert Delta(before, after)("mnist_predictions_total", input_kind="json") == 2
