"""compose.yaml, brought up for real: the API serves, the trainer retrains into the shared volume."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from tests.container.conftest import FIXTURES, ROOT, SHARED_DATA, Engine, bundled_version, free_port, labels, unique

SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()


def _compose_cli(engine: Engine) -> list[str] | None:
    if engine.podman:
        return ["podman-compose"] if shutil.which("podman-compose") else None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return ["docker", "compose"] if probe.returncode == 0 else None


def test_compose_serves_and_its_trainer_retrains_into_the_shared_volume(engine: Engine, image: str) -> None:
    cli = _compose_cli(engine)
    if cli is None:
        tool = "podman-compose" if engine.podman else "the docker compose plugin"
        pytest.skip(f"{tool} is not installed (scripts/test-deps.sh installs podman-compose with apt where it can)")
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST in {SHARED_DATA}/MNIST/raw (set MNIST_SHARED_DATA)")
    project = unique("compose")
    port = free_port()
    env = {**os.environ, "MNIST_IMAGE": image, "MNIST_HOST_PORT": str(port), "MNIST_DATA": str(SHARED_DATA)}
    base = [*cli, "-p", project, "-f", str(ROOT / "compose.yaml")]

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*base, *args], capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, (
            f"{' '.join(args)} -> {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        return result

    url = f"http://127.0.0.1:{port}"
    try:
        # Name the service: podman-compose 1.0 ignores profiles and would start the trainer too.
        compose("up", "-d", "--no-build", "api")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        answer = httpx.post(url + "/predict", content=SEVEN_PNG, headers={"content-type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert labels(answer.json()) == [7]
        assert answer.headers["x-model-version"] == bundled_version()

        # The trainer service as compose.yaml defines it (volumes, read-only root, tmpfs), one epoch
        # (a shorter run can miss the canary's 90 % bar, and the trainer then rightly won't publish).
        trained = compose(
            "run", "--rm", "trainer",
            "python", "-m", "training.train", "--data-dir", "/data", "--models-dir", "/app/models",
            "--no-progress", "--epochs", "1",
            timeout=600,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        model: dict[str, object] = {}
        while time.monotonic() < deadline:
            model = httpx.get(url + "/model", timeout=30).json()
            if model["version"] != bundled_version():
                break
            time.sleep(0.5)
        assert model["version"] != bundled_version(), f"still the bundled model:\n{trained.stdout[-2000:]}"
        assert str(model["version"]) in trained.stdout + trained.stderr  # the version the trainer published
    finally:
        subprocess.run(
            [*base, "down", "-v"], capture_output=True, env=env, timeout=300, stdin=subprocess.DEVNULL, check=False
        )
        for volume in (f"{project}_models", f"{project}_mnist-data"):
            engine("volume", "rm", "-f", volume, check=False)
