"""The peers' virtual environments: one per peer, built on first use from PyPI with pip.

Each peer (Triton via PyTriton, MLServer, BentoML, Ray Serve) runs under its own interpreter in
``.venv-peer-<name>/`` at the repository root (git-ignored), so that their dependency trees
(which pin different versions of FastAPI, uvicorn, protobuf, numpy...) never meet the service's.
Every venv gets the same CPU build of torch as the service's bench venv (``BENCH_TORCH``), and
the project's own code reaches the peer through the working directory (``python -m`` from the
repository root), not through an install.

A venv is built once and reused while its ``.bench-installed`` stamp lists the same
requirements. A failed or timed-out install leaves no stamp: the peer is skipped with the
reason, and the next run tries again.

    python -m bench.venvs triton mlserver     # build (or check) these venvs and print what happened
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".bench-installed"
# The CPU build of torch every peer gets: the one bench/run.sh gives the service's venv.
TORCH = os.environ.get("BENCH_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("TORCH_INDEX", "https://download.pytorch.org/whl/cpu")


@dataclass(frozen=True)
class PeerEnv:
    """What one peer's venv holds: pip requirement specifiers and a module to import as a check."""

    name: str
    requirements: tuple[str, ...]
    check_import: str

    @property
    def path(self) -> Path:
        return ROOT / f".venv-peer-{self.name}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def spec(self) -> str:
        """The stamp's content: what a venv built from it holds."""
        return "\n".join((TORCH, *self.requirements)) + "\n"


ENVS: dict[str, PeerEnv] = {
    env.name: env
    for env in (
        # PyTriton bundles a Triton Inference Server binary and its Python backend stub.
        PeerEnv("triton", ("nvidia-pytriton", "numpy", "pillow"), "pytriton.triton"),
        # MLServer's workers crash at start with uvloop 0.23 (its event-loop policy changed).
        PeerEnv("mlserver", ("mlserver", "uvloop<0.22", "numpy", "pillow"), "mlserver"),
        PeerEnv("bentoml", ("bentoml", "numpy", "pillow"), "bentoml"),
        PeerEnv("ray", ("ray[serve]", "numpy", "pillow"), "ray.serve"),
    )
}


@dataclass(frozen=True)
class Prepared:
    """The outcome of :func:`ensure`: an interpreter to run the peer with, or why there is none."""

    name: str
    python: Path | None
    reason: str = ""
    install_s: float | None = None  # None: the venv was already there


def is_ready(env: PeerEnv) -> bool:
    stamp = env.path / STAMP
    return env.python.exists() and stamp.exists() and stamp.read_text() == env.spec()


def ensure(env: PeerEnv, log_dir: Path, timeout_s: float, install: bool = True) -> Prepared:
    """The peer's venv, built now if it is missing or stale and ``install`` allows it."""
    if is_ready(env):
        return Prepared(env.name, env.python)
    if not install:
        return Prepared(env.name, None, f"{env.path.name} is not built (installs are off: --no-install)")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"install-{env.name}.log"
    started = time.monotonic()
    print(f"   building {env.path.name}: {' '.join(env.spec().split())} (log {log_path})", flush=True)
    with log_path.open("w") as log:
        try:
            _install(env, log, started + timeout_s)
        except subprocess.TimeoutExpired:
            return Prepared(env.name, None, f"install timed out after {timeout_s:.0f} s (see {log_path})")
        except subprocess.CalledProcessError as exc:
            return Prepared(
                env.name, None, f"install failed ({exc.cmd[2:5]}...: exit {exc.returncode}): {_tail(log_path)}"
            )
    (env.path / STAMP).write_text(env.spec())
    return Prepared(env.name, env.python, install_s=time.monotonic() - started)


def _install(env: PeerEnv, log: IO[str], deadline: float) -> None:
    def run(command: list[str]) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(command, 0)
        print(f"$ {' '.join(command)}", file=log, flush=True)
        # A process group of its own, so that a timeout ends pip and anything it started.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(remaining)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
        if code != 0:
            raise subprocess.CalledProcessError(code, command)

    if env.path.exists() and not env.python.exists():
        shutil.rmtree(env.path)
    if not env.python.exists():
        run([os.environ.get("PYTHON3", "python3"), "-m", "venv", str(env.path)])
    pip = [str(env.python), "-m", "pip", "install", "--retries", "1", "--timeout", "30"]
    # One resolve for everything, torch included, so no peer package can pull a CUDA build in.
    run([*pip, "--extra-index-url", TORCH_INDEX, TORCH, *env.requirements])
    run([str(env.python), "-c", f"import {env.check_import}"])


def _tail(path: Path, lines: int = 3) -> str:
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(ENVS), help=f"any of {', '.join(ENVS)} (default: all)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per install (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.names:
        if name not in ENVS:
            parser.error(f"unknown peer {name!r}: pick from {', '.join(ENVS)}")
        done = ensure(ENVS[name], args.log_dir, args.timeout)
        if done.python is None:
            failed += 1
            print(f"{name}: skipped: {done.reason}", flush=True)
        elif done.install_s is None:
            print(f"{name}: ready ({done.python})", flush=True)
        else:
            print(f"{name}: installed in {done.install_s:.0f} s ({done.python})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
