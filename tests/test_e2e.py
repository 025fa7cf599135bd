"""End-to-end: a real uvicorn process, the README's commands, the client CLI, startup failures."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Server, free_port

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).parent / "fixtures"


def test_launcher_serves_the_bundled_model(server_factory: Callable[..., Server], bundled_checkpoint: Path) -> None:
    """`python -m app` (what `make serve` runs) with no model settings serves models/CURRENT."""
    server = server_factory(command=[sys.executable, "-m", "app"])
    with server.client() as client:
        info = client.get("/model").json()
        assert info["version"] == bundled_checkpoint.stem
        assert info["path"] == str(bundled_checkpoint)
        response = client.post(
            "/predict", content=(FIXTURES / "seven.png").read_bytes(), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200
        assert response.json()["label"] == 7
        assert response.headers["x-request-id"]
    assert server.stop() == 0
    log = server.log()
    assert re.search(r'request_id=\w+ method=POST path="/predict" status=200 duration_ms=[\d.]+', log)


def _readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work_as_written(server_factory: Callable[..., Server], models_dir: Path) -> None:
    commands = [c for c in _readme_curls() if "/admin/" not in c]
    assert len(commands) >= 3, "the README should show curl examples"
    server = server_factory(env={"MNIST_MODEL_DIR": str(models_dir)})
    for command in commands:
        command = command.split("#", 1)[0].replace("http://127.0.0.1:8000", server.base_url)
        command = command.replace("localhost:8000", server.base_url.removeprefix("http://"))
        args = shlex.split(command)
        pipe = args.index("|") if "|" in args else len(args)
        result = subprocess.run(args[:pipe], cwd=ROOT, capture_output=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout, command
        assert b'"detail"' not in result.stdout, (command, result.stdout)


def test_client_cli(server_factory: Callable[..., Server], models_dir: Path, tmp_path: Path) -> None:
    server = server_factory(env={"MNIST_MODEL_DIR": str(models_dir)})
    not_png = tmp_path / "notes.png"
    not_png.write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "app.client", str(FIXTURES / "seven.png"), str(FIXTURES / "seven.json"),
         str(not_png), "--url", server.base_url, "--top-k", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1  # one input failed
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(re.search(r": label 7  \(7: \d+\.\d%, \d: \d+\.\d%\)  model \S+", line) for line in lines), lines
    assert "notes.png: error: HTTP 415: the body is not a PNG, JPEG or WebP image" in result.stderr


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("truncated", "truncated or corrupt checkpoint file"),
        ("missing", "no such checkpoint file"),
        ("no pointer", "no stored version can be served"),
        ("wrong shapes", "wrong shape for lin_1.weight"),
    ],
)
def test_bad_checkpoint_stops_startup_with_one_clear_line(
    tmp_path: Path, bundled_checkpoint: Path, setup: str, expected: str
) -> None:
    import torch

    env = {"MNIST_MODEL_DIR": str(tmp_path)}
    bad = tmp_path / "bad.pt"
    if setup == "truncated":
        bad.write_bytes(bundled_checkpoint.read_bytes()[:5000])
        env["MNIST_MODEL_PATH"] = str(bad)
    elif setup == "missing":
        env["MNIST_MODEL_PATH"] = str(bad)
    elif setup == "wrong shapes":
        raw = torch.load(bundled_checkpoint, weights_only=True)
        raw["state_dict"]["lin_1.weight"] = raw["state_dict"]["lin_1.weight"][:, :700]
        torch.save(raw, bad)
        env["MNIST_MODEL_PATH"] = str(bad)
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)],
        cwd=ROOT, env={**_base_env(), **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "cannot start" in line]
    assert len(errors) >= 1
    assert expected in errors[0]
    assert str(bad if setup != "no pointer" else tmp_path / "CURRENT") in errors[0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
