"""Triton Inference Server via PyTriton, serving the same weights: the peer for the v2 protocol.

    python -m bench.peers.triton --port 8000 --instances 2     # from the repository root

Three models, each with ``--instances`` Python instances (the bench gives it the service's worker
count) and Triton's dynamic batcher on:

* ``mnist``: input FP32 ``[-1, 784]``, output ``probabilities`` FP32 ``[-1, 10]``, batches of
  at most 64 rows formed by the dynamic batcher from concurrent requests;
* ``mnist_batch``: the same model for big requests (up to 10,000 rows in one request);
* ``mnist_png``: input BYTES ``[-1, 1]`` of PNG files, output as ``mnist``.

Known trap: Triton's Python backend stub links against ``libpython``; when a different Python of
the same version is installed system-wide, the stub may load that one and fail to import the
venv's packages. The bench puts the interpreter's own ``lib`` folder first on
``LD_LIBRARY_PATH`` (:mod:`bench.servers`).
"""

from __future__ import annotations

import argparse
import socket

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.model import Predictor, png_rows

MAX_DYNAMIC_BATCH = 64
MAX_REQUEST_ROWS = 10_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _vector_fn(predictor: Predictor):
    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 - the tensor's name on the wire
        return {"probabilities": predictor(input)}

    return infer


def _png_fn(predictor: Predictor):
    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002
        return {"probabilities": predictor(png_rows([bytes(item) for item in input.reshape(-1)]))}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (gRPC and metrics get free ports)")
    parser.add_argument("--instances", type=int, default=2, help="model instances (default %(default)s)")
    args = parser.parse_args()
    predictors = [Predictor() for _ in range(args.instances)]
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=_free_port(),
        metrics_port=_free_port(),
    )
    probabilities = [Tensor(name="probabilities", dtype=np.float32, shape=(10,))]
    vector = [Tensor(name="input", dtype=np.float32, shape=(784,))]
    batcher = DynamicBatcher(max_queue_delay_microseconds=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="mnist",
            infer_func=[_vector_fn(p) for p in predictors],
            inputs=vector,
            outputs=probabilities,
            config=ModelConfig(max_batch_size=MAX_DYNAMIC_BATCH, batcher=batcher),
            strict=True,
        )
        triton.bind(
            model_name="mnist_batch",
            infer_func=[_vector_fn(p) for p in predictors],
            inputs=vector,
            outputs=probabilities,
            config=ModelConfig(max_batch_size=MAX_REQUEST_ROWS, batcher=batcher),
            strict=True,
        )
        triton.bind(
            model_name="mnist_png",
            infer_func=[_png_fn(p) for p in predictors],
            inputs=[Tensor(name="input", dtype=np.bytes_, shape=(1,))],
            outputs=probabilities,
            config=ModelConfig(max_batch_size=MAX_DYNAMIC_BATCH, batcher=batcher),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
