"""MLServer serving the same weights: a custom runtime, and the launcher that writes its settings.

    python -m bench.peers.mlserver_runtime --port 8000 --workers 2 --workdir /tmp/x   # from the repo root

The launcher writes ``settings.json`` (``parallel_workers``: the inference pool MLServer runs the
model in) and ``mnist/model-settings.json`` into ``--workdir``, then runs ``mlserver start``.
The model ``mnist`` takes the v2 protocol's FP32 ``[N, 784]`` tensor in JSON, or PNG files as a
BYTES ``[N]`` tensor (base64 text in JSON), and answers ``probabilities`` FP32 ``[N, 10]``.
MLServer has no binary tensor extension: every body is JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers.model import Predictor, png_rows

# How MLServer's workers import the runtime (the module's name even when it runs as __main__).
_IMPLEMENTATION = "bench.peers.mlserver_runtime.Mnist"


class Mnist(MLModel):
    async def load(self) -> bool:
        self.predictor = Predictor()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = payload.inputs[0]
        if tensor.datatype == "BYTES":
            items = tensor.data.root if hasattr(tensor.data, "root") else tensor.data
            files = [base64.b64decode(item) if isinstance(item, str) else bytes(item) for item in items]
            x = png_rows(files)
        else:
            x = NumpyCodec.decode_input(tensor).reshape(-1, 784)
        probs = self.predictor(x)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(name="probabilities", payload=probs)]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2, help="MLServer's parallel_workers (default %(default)s)")
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the settings files")
    args = parser.parse_args()
    model_dir = args.workdir / "mnist"
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": args.port,
        "grpc_port": _free_port(),
        "metrics_port": _free_port(),
        "parallel_workers": args.workers,
    }
    (args.workdir / "settings.json").write_text(json.dumps(settings))
    model = {"name": "mnist", "implementation": _IMPLEMENTATION}
    (model_dir / "model-settings.json").write_text(json.dumps(model))
    mlserver = str(Path(sys.executable).with_name("mlserver"))
    os.execv(mlserver, [mlserver, "start", str(args.workdir)])


if __name__ == "__main__":
    main()
