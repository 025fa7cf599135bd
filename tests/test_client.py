"""``mnist-client`` (``python -m app.client``): its command line, its errors, and a real service."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, free_port

FIXTURES = Path(__file__).parent / "fixtures"


def _client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = shutil.which("mnist-client", path=str(Path(sys.executable).parent))
    assert script is not None, f"mnist-client is not installed beside {sys.executable} (pip install -e .)"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def test_help_shows_every_option_with_its_default() -> None:
    result = _client("--help")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("options:", 1)[1]
    # One entry per option: its line, and the indented lines that continue its help.
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", section) if entry.strip()]
    assert entries[0].startswith("-h, --help")
    assert entries[1:] == [
        "--url URL service address (default: http://127.0.0.1:8000)",
        "--top-k K classes to show per input, 1-10 (default: 3)",
        "--timeout S seconds to wait for each answer (default: 30.0)",
    ]
    assert ".png" in result.stdout
    assert ".npy" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "0 is out of range"),
        (["--top-k", "11"], "11 is out of range"),
        (["--top-k", "three"], "'three' is not a whole number"),
        (["--timeout", "0"], "0 is not a positive number of seconds"),
        (["--timeout", "nan"], "nan is not a positive number of seconds"),
        ([], "the following arguments are required: files"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(args: list[str], message: str) -> None:
    files = [] if not args else [str(FIXTURES / "seven.png")]
    result = _client(*args, *files)
    assert result.returncode == 2
    assert message in result.stderr


def test_each_input_that_fails_is_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a digit")
    missing = tmp_path / "missing.png"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = _client(str(notes), str(missing), str(FIXTURES / "seven.png"), "--url", url, "--timeout", "5")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith(f"{notes}: error: ")
    assert "unknown file type" in lines[0]
    assert lines[1].startswith(f"{missing}: error: ")
    assert "No such file" in lines[1]
    assert lines[2].startswith(f"{FIXTURES / 'seven.png'}: error: ")
    assert result.stdout == ""


@pytest.mark.e2e
def test_classifies_every_file_type_with_a_real_service(
    server_factory: Callable[..., Server], models_dir: Path, tmp_path: Path
) -> None:
    server = server_factory(env={"MNIST_MODEL_DIR": str(models_dir), "MNIST_ACCESS_LOG": "false"})
    seven = Image.open(FIXTURES / "seven.png").convert("L")
    jpeg, webp = tmp_path / "seven.jpg", tmp_path / "seven.webp"
    seven.save(jpeg, quality=95)
    seven.save(webp, lossless=True)
    digits = np.random.default_rng(0).integers(0, 256, size=(2, 784), dtype=np.uint8)
    npy, raw = tmp_path / "two.npy", tmp_path / "two.bin"
    buffer = io.BytesIO()
    np.save(buffer, digits)
    npy.write_bytes(buffer.getvalue())
    raw.write_bytes(digits.tobytes())
    files = [FIXTURES / "seven.png", jpeg, webp, FIXTURES / "seven.json", npy, raw]

    result = _client(*map(str, files), "--url", server.base_url, "--top-k", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 + 2 + 2  # one line per image: the .npy and .bin files hold two each
    for path in files[:4]:
        line = next(line for line in lines if line.startswith(f"{path}: "))
        assert re.search(r": label 7 {2}\(7: \d+\.\d%\) {2}model \S+$", line), line
    assert sum(line.startswith(f"{npy}[") for line in lines) == 2
    assert sum(line.startswith(f"{raw}[") for line in lines) == 2
