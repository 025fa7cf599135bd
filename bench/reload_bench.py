"""Time from publishing a new version to every worker serving it.

    python -m bench.reload_bench [--workers 2] [--publishes 10] [--interval 1.0]

Starts the service as deployed (``python -m app`` with N workers) on a copy of the bundled
model, then publishes new valid versions one after another (the bundled weights plus tiny
noise, written and published exactly as the trainer does) and measures, for each, the time
until every worker reports the new version in ``GET /model`` and a prediction is answered by
it. Prints one row per publish and a summary. The target is under 2 s with the default
reload interval (1 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.registry import (
    canary_gate,
    current_checkpoint,
    load_model,
    publish,
    save_checkpoint,
    write_pointer,
)

ROOT = Path(__file__).resolve().parent.parent
SEVEN_PNG = (ROOT / "tests" / "fixtures" / "seven.png").read_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _store_variant(models_dir: Path, source: Path, seed: int) -> str:
    model, _ = load_model(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-4)
    path = save_checkpoint(models_dir, model, {"note": f"reload bench {seed}"}, version=f"bench-{seed:03d}")
    return path.stem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--publishes", type=int, default=10)
    parser.add_argument(
        "--interval", type=float, default=None, help="MNIST_RELOAD_INTERVAL (default: the service's default)"
    )
    args = parser.parse_args()

    bundled = current_checkpoint(ROOT / "models")
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as tmp:
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        shutil.copy2(bundled, models_dir / bundled.name)
        write_pointer(models_dir, bundled.stem)
        port = _free_port()
        env = {
            **os.environ,
            "MNIST_MODEL_DIR": str(models_dir),
            "MNIST_PORT": str(port),
            "MNIST_WORKERS": str(args.workers),
            "MNIST_ACCESS_LOG": "false",
            "MNIST_RUNTIME_DIR": str(Path(tmp) / "runtime"),
        }
        if args.interval is not None:
            env["MNIST_RELOAD_INTERVAL"] = str(args.interval)
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        info = client.get("/model").json()
                        if len(info["workers"]) == args.workers:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("service did not start; see its log")
                    time.sleep(0.05)
                interval = info["reload_interval"]
                print(f"{args.workers} workers, reload interval {interval} s, {args.publishes} publishes\n")
                print("| # | version | all workers serving after (s) |")
                print("|---:|---|---:|")
                times = []
                for index in range(args.publishes):
                    # Publish at a random phase of the watchers' polling cycle.
                    version = _store_variant(models_dir, bundled, index)
                    time.sleep(interval * (0.3 + 0.7 * ((index * 0.618) % 1.0)))
                    publish(models_dir, version, canary_gate())  # validated, then CURRENT moves last
                    started = time.perf_counter()
                    while True:
                        workers = client.get("/model").json()["workers"]
                        if len(workers) == args.workers and all(w["version"] == version for w in workers):
                            break
                        if time.perf_counter() - started > 30:
                            raise SystemExit(f"{version} not picked up by every worker within 30 s")
                        time.sleep(0.01)
                    elapsed = time.perf_counter() - started
                    answer = client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"}).json()
                    assert answer["model_version"] == version, answer
                    times.append(elapsed)
                    print(f"| {index + 1} | {version} | {elapsed:.2f} |")
                print()
                print(
                    f"publish -> every worker serving: median {statistics.median(times):.2f} s, "
                    f"max {max(times):.2f} s (target < 2 s with the default interval)"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
