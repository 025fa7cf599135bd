"""The served checkpoint for a peer: the same weights the service loads, rebuilt the same way.

Only torch, numpy and Pillow are needed (plus :mod:`app.registry`, reached through the working
directory), so it runs inside every peer's own venv.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.registry import CheckpointError, current_checkpoint, load_model

ROOT = Path(__file__).resolve().parent.parent.parent


def checkpoint_path() -> Path:
    """``MNIST_MODEL_PATH`` when set, else the version ``models/CURRENT`` names."""
    explicit = os.environ.get("MNIST_MODEL_PATH")
    if explicit:
        return Path(explicit)
    try:
        return current_checkpoint(ROOT / "models")
    except CheckpointError as exc:
        raise SystemExit(f"no current model: {exc}") from None


class Predictor:
    """The model in eval mode on the CPU, one intra-op thread per process as the service's workers have."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model, _ = load_model(checkpoint_path(), "cpu")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 784]`` pixels in [0, 1] to float32 ``[N, 10]`` probabilities."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 784))
            return torch.softmax(logits, dim=1).numpy()


def png_rows(files: list[bytes]) -> np.ndarray:
    """28x28 greyscale PNGs (MNIST's own digits) to float32 rows, the way a peer's tutorial does it."""
    rows = [np.asarray(Image.open(io.BytesIO(f)).convert("L").resize((28, 28)), np.float32) for f in files]
    return np.stack(rows).reshape(-1, 784) / 255
