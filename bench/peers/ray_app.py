"""Ray Serve serving the same weights: a deployment of ``--replicas`` replicas behind Ray's proxy.

    python -m bench.peers.ray_app --port 8000 --replicas 2 [--max-ongoing 64]   # from the repo root

``POST /predict`` takes ``{"pixels": [784 floats]}`` and ``POST /predict/batch`` takes
``{"instances": [[784 floats], ...]}``, answered like the service's ``/predict``; ``GET /health``
answers once the deployment is running. ``--max-ongoing`` sets the replicas'
``max_ongoing_requests`` (Ray's default, 5, when not given): the most requests one replica takes
at a time, the rest waiting in Ray's proxy. Starts a local Ray instance of its own (no dashboard,
no usage stats) and stops it on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from bench.peers.model import Predictor


def _prediction(probs: np.ndarray) -> dict[str, Any]:
    return {"probabilities": probs.tolist(), "label": int(probs.argmax())}


class Mnist:
    def __init__(self) -> None:
        self.predictor = Predictor()

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse({"status": "ready"})
        doc = await request.json()
        if request.url.path.rstrip("/").endswith("/batch"):
            probs = self.predictor(np.asarray(doc["instances"], np.float32).reshape(-1, 784))
            return JSONResponse({"predictions": [_prediction(row) for row in probs]})
        return JSONResponse(_prediction(self.predictor(np.asarray(doc["pixels"], np.float32).reshape(1, 784))[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-ongoing", type=int, default=None, help="max_ongoing_requests (default: Ray's)")
    args = parser.parse_args()
    options: dict[str, Any] = {"num_replicas": args.replicas}
    if args.max_ongoing is not None:
        options["max_ongoing_requests"] = args.max_ongoing
    ray.init(num_cpus=args.replicas, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(serve.deployment(Mnist).options(**options).bind(), route_prefix="/")

    def stop(signum: int, frame: object) -> None:
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
