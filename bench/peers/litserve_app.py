"""LitServe serving the same weights, the way its documentation shows: a peer for the harness.

    python -m bench.peers.litserve_app --port 8000 --workers 2    # from the repository root

``POST /predict`` takes ``{"pixels": [784 floats]}`` and ``POST /predict/batch`` takes
``{"instances": [[784 floats], ...]}``, the bodies the harness sends to every server. Each answers
with the probabilities and the label. The model is the bundled checkpoint, loaded with
``app.registry.load_model`` (``MNIST_MODEL_PATH`` overrides it).
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls
import torch

from app.registry import load_model
from bench.peers.model import checkpoint_path


class _Mnist(ls.LitAPI):
    def setup(self, device: str) -> None:
        torch.set_num_threads(1)  # the same per-worker setting as the service
        self.model, _ = load_model(checkpoint_path(), device)
        self.device = device

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.model(x.to(self.device)), dim=1).cpu()


class PixelsAPI(_Mnist):
    # ``request`` stays unannotated: LitServe reads the annotation, and none means "the parsed JSON".
    def decode_request(self, request) -> torch.Tensor:
        return torch.tensor(request["pixels"], dtype=torch.float32).reshape(1, 784)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"probabilities": output.tolist(), "label": int(output.argmax())}


class InstancesAPI(_Mnist):
    def decode_request(self, request) -> torch.Tensor:
        return torch.tensor(request["instances"], dtype=torch.float32).reshape(-1, 784)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        labels = output.argmax(dim=1).tolist()
        return {"predictions": [{"probabilities": p, "label": k} for p, k in zip(output.tolist(), labels, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference workers and API server processes")
    parser.add_argument("--max-batch-size", type=int, default=1, help="LitServe's own batching (1: off)")
    parser.add_argument("--batch-timeout", type=float, default=0.0)
    args = parser.parse_args()
    apis = [
        PixelsAPI(api_path="/predict", max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout),
        InstancesAPI(api_path="/predict/batch"),
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=args.workers, timeout=120)
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.workers,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
