"""``GET /metrics``: Prometheus text that covers every worker, and what each metric counts."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app import metrics
from app.config import Settings
from app.main import create_app
from app.registry import load_model, read_pointer, save_checkpoint
from tests.conftest import Server, constant_model, save_model

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


@pytest.mark.e2e
def test_metrics_add_up_every_worker(server_factory: Callable[..., Server], models_dir: Path, tmp_path: Path) -> None:
    server = server_factory(
        command=[sys.executable, "-m", "app"],
        env={"MNIST_WORKERS": "2", "MNIST_MODEL_DIR": str(models_dir), "MNIST_ACCESS_LOG": "false"},
    )
    version = read_pointer(models_dir)
    pids: dict[int, int] = {}
    # A fresh connection per request: the kernel hands each to whichever worker accepts first.
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
        buffer = io.BytesIO()
        np.save(buffer, _digits(2))
        npy = client.post("/predict", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
        assert npy.status_code == 200
        assert client.post("/predict", json={"pixels": [0.5] * 3}).status_code == 422

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
            assert value(samples, "mnist_http_requests_total", **ok) == 5
            bad = {"method": "POST", "route": "/predict", "status": "422"}
            assert value(samples, "mnist_http_requests_total", **bad) == 1
            assert value(samples, "mnist_predictions_total", input_kind="json") == 3
            assert value(samples, "mnist_predictions_total", input_kind="uint8") == 5
            assert value(samples, "mnist_predictions_total", input_kind="npy") == 2
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


def test_a_server_derives_its_own_metrics_folder(tmp_path: Path) -> None:
    """A folder derived by a parent process (a test run) is not inherited: it would mix servers' numbers."""
    code = "import os, app.metrics; print(app.metrics.MULTIPROC_DIR); print(os.environ['PROMETHEUS_MULTIPROC_DIR'])"
    base = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", metrics._DERIVED_MARK)}

    def run(**env: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, check=True
        )
        return result.stdout.split()

    runtime = tmp_path / "runtime"
    assert run(MNIST_RUNTIME_DIR=str(runtime)) == [str(runtime / "prometheus")] * 2
    inherited = str(tmp_path / "parent" / "prometheus")
    assert (
        run(MNIST_RUNTIME_DIR=str(runtime), PROMETHEUS_MULTIPROC_DIR=inherited, **{metrics._DERIVED_MARK: inherited})
        == [str(runtime / "prometheus")] * 2
    )
    explicit = str(tmp_path / "explicit")
    assert run(MNIST_RUNTIME_DIR=str(runtime), PROMETHEUS_MULTIPROC_DIR=explicit) == [explicit] * 2


def test_stale_live_gauges_are_cleared(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    for pid in (dead, alive, os.getpid()):
        (tmp_path / f"gauge_livemax_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    metrics._clear_live_gauges(tmp_path, stale_only=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    # Dead workers' and this process's earlier live gauges go; counters always stay in the sums.
    assert names == sorted(
        [f"counter_{dead}.db", f"counter_{alive}.db", f"counter_{os.getpid()}.db"] + [f"gauge_livemax_{alive}.db"]
    )


def test_reloads_and_model_version(models_dir: Path) -> None:
    """In-process: a good reload moves the info metric to the new version, a rejected one counts a failure."""
    bundled = read_pointer(models_dir)
    assert bundled is not None
    trained, _ = load_model(models_dir / f"{bundled}.pt")
    good = save_checkpoint(models_dir, trained, {"test_accuracy": None}, version="20990101T000000Z-aaaaaaaa").stem
    bad = save_model(models_dir, constant_model(), version="20990101T000000Z-bbbbbbbb").stem
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, admin_token="secret", access_log=False))
    auth = {"authorization": "Bearer secret"}

    async def run() -> list[Samples]:
        seen: list[Samples] = []

        async def scrape(client: httpx.AsyncClient) -> None:
            response = await client.get("/metrics")
            assert response.status_code == 200
            seen.append(parse(response.text))

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await scrape(client)
                response = await client.post("/admin/reload", json={"version": good}, headers=auth)
                assert response.status_code == 200
                await scrape(client)
                response = await client.post("/admin/reload", json={"version": bad}, headers=auth)
                assert response.status_code == 422
                await scrape(client)
                # Predictions are counted per image and input kind; errors per status.
                batch = torch.rand(4, 784).tolist()
                assert (await client.post("/predict", json={"instances": batch})).status_code == 200
                assert (
                    await client.post("/predict", content=b"", headers={"content-type": "image/png"})
                ).status_code == 400
                assert (await client.request("BREW", "/nowhere")).status_code == 404
                await scrape(client)
        return seen

    start, reloaded, rejected, predicted = asyncio.run(run())
    reloads = "mnist_model_reloads_total"
    assert value(start, "mnist_model_info", version=bundled) == 1
    assert value(reloaded, "mnist_model_info", version=bundled) == 0
    assert value(reloaded, "mnist_model_info", version=good) == 1
    assert value(reloaded, reloads, result="success") == value(start, reloads, result="success") + 1
    assert value(reloaded, reloads, result="failure") == value(start, reloads, result="failure")
    assert value(rejected, reloads, result="failure") == value(reloaded, reloads, result="failure") + 1
    assert value(rejected, reloads, result="success") == value(reloaded, reloads, result="success")
    assert value(rejected, "mnist_model_info", version=good) == 1
    assert value(rejected, "mnist_model_info", version=bad) == 0

    def delta(name: str, **labels: str) -> float:
        return value(predicted, name, **labels) - value(rejected, name, **labels)

    assert delta("mnist_predictions_total", input_kind="json") == 4
    assert delta("mnist_http_requests_total", method="POST", route="/predict", status="400") == 1
    assert delta("mnist_http_requests_total", method="OTHER", route="<unmatched>", status="404") == 1
    assert delta("mnist_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_batch_size_histogram() -> None:
    before = parse(metrics.render().decode())
    for size in (1, 3, 3, 64):
        metrics.observe_batch(size)
    after = parse(metrics.render().decode())

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mnist_inference_batch_size_count") == 4
    assert delta("mnist_inference_batch_size_sum") == 71
    assert delta("mnist_inference_batch_size_bucket", le="2.0") == 1
    assert delta("mnist_inference_batch_size_bucket", le="4.0") == 3
    assert delta("mnist_inference_batch_size_bucket", le="64.0") == 4
