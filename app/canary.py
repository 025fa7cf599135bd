"""The canary gate: a new model must behave on real digits before it may serve.

``app/data/canary.npz`` holds 500 real MNIST test digits (uint8) with their labels, kept in the
repository so the check needs no dataset download. A candidate must give finite probabilities on
them and on edge inputs (all black, all white), and reach a minimum accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from app.inference import predict_proba
from app.model import MLP

__all__ = ["CANARY_PATH", "Canary", "CanaryFailure", "load_canary"]

CANARY_PATH = Path(__file__).resolve().parent / "data" / "canary.npz"


class CanaryFailure(Exception):
    """The candidate model misbehaved on the canary set; the message says how."""


@dataclass(frozen=True)
class Canary:
    x: np.ndarray  # float32 [N, 784] in [0, 1]
    y: np.ndarray  # int64 [N]

    def check(self, model: MLP, device: torch.device, min_accuracy: float) -> float:
        """Return the canary accuracy, or raise :class:`CanaryFailure`."""
        edges = np.stack([np.zeros(784, np.float32), np.ones(784, np.float32)])
        probs = predict_proba(model, np.concatenate([self.x, edges]), device)
        if not np.isfinite(probs).all():
            raise CanaryFailure("the model produces NaN or infinite outputs on the canary batch")
        accuracy = float((probs[: len(self.y)].argmax(axis=1) == self.y).mean())
        if accuracy < min_accuracy:
            raise CanaryFailure(
                f"canary accuracy {accuracy:.1%} on {len(self.y)} real digits is below the minimum {min_accuracy:.1%}"
            )
        return accuracy


@lru_cache
def load_canary(path: Path = CANARY_PATH) -> Canary:
    with np.load(path, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    return Canary(x=images.reshape(len(images), -1).astype(np.float32) / 255.0, y=labels.astype(np.int64))
