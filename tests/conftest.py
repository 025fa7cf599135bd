"""Shared fixtures: the real MNIST copy, small deterministic models, and real uvicorn servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.registry import MLP, read_pointer, save_checkpoint, version_path, write_pointer

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MNIST_SHARED_DATA", ROOT.parent / "shared" / "data"))
BUNDLED_DIR = ROOT / "models"


def _bundled_path() -> Path:
    version = read_pointer(BUNDLED_DIR)
    assert version, "the repository must ship models/CURRENT"
    return version_path(BUNDLED_DIR, version)


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The model committed in models/ (trained with the default recipe)."""
    return _bundled_path()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of ../shared/data (torchvision extracts next to the raw files)."""
    raw = SHARED_DATA / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"real MNIST not found at {raw} (set MNIST_SHARED_DATA); this test needs the real digits")
    root = tmp_path_factory.mktemp("mnist")
    shutil.copytree(raw, root / "MNIST" / "raw")
    for path in (root / "MNIST" / "raw").iterdir():
        path.chmod(0o644)
    return root


@pytest.fixture(scope="session")
def mnist_test(mnist_root: Path):  # noqa: ANN201 - MnistTensors
    from training.data import load_mnist

    return load_mnist(mnist_root, train=False)


@pytest.fixture
def models_dir(tmp_path: Path, bundled_checkpoint: Path) -> Path:
    """A models folder holding a copy of the bundled model, published as current."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy2(bundled_checkpoint, directory / bundled_checkpoint.name)
    write_pointer(directory, bundled_checkpoint.stem)
    return directory


def constant_model(bias_label: int = 3) -> MLP:
    """A deterministic model whose answer does not depend on the input: logits favour one label."""
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.lin_2.bias[bias_label] = 2.0
    return model


def save_model(directory: Path, model: MLP, version: str | None = None, **meta: object) -> Path:
    return save_checkpoint(directory, model, {"test_accuracy": None, **meta}, version=version)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real uvicorn process on a free port, stopped at teardown."""

    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
        self.proc = proc
        self.base_url = base_url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    command: list[str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60,
) -> Server:
    port = free_port()
    full_env = {
        **os.environ,
        "MNIST_HOST": "127.0.0.1",
        "MNIST_PORT": str(port),
        "MNIST_RUNTIME_DIR": str(tmp_path / f"runtime-{port}"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    cmd = command or [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(args or []),
    ]
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.base_url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()}")
            time.sleep(0.1)
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def factory(**kwargs: object) -> Server:
        server = start_server(tmp_path, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()
