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

from app.registry.checkpoint import Checkpoint, CheckpointError, load_model
from app.registry.model import MLP

__all__ = ["CANARY_PATH", "Canary", "CanaryFailure", "load_canary", "validate_candidate"]

CANARY_PATH = Path(__file__).resolve().parent.parent / "data" / "canary.npz"


class CanaryFailure(Exception):
    """The candidate model misbehaved on the canary set; the message says how."""


@dataclass(frozen=True)
class Canary:
    x: np.ndarray  # float32 [N, 784] in [0, 1]
    y: np.ndarray  # int64 [N]

    def check(self, model: MLP, device: torch.device, min_accuracy: float) -> float:
        """Return the canary accuracy, or raise :class:`CanaryFailure`."""
        edges = np.stack([np.zeros(784, np.float32), np.ones(784, np.float32)])
        probs = _predict_proba(model, np.concatenate([self.x, edges]), device)
        if not np.isfinite(probs).all():
            raise CanaryFailure("the model produces NaN or infinite outputs on the canary batch")
        accuracy = float((probs[: len(self.y)].argmax(axis=1) == self.y).mean())
        if accuracy < min_accuracy:
            raise CanaryFailure(
                f"canary accuracy {accuracy:.1%} on {len(self.y)} real digits is below the minimum {min_accuracy:.1%}"
            )
        return accuracy


@torch.inference_mode()
def _predict_proba(model: MLP, x: np.ndarray, device: torch.device) -> np.ndarray:
    # The plain forward pass: the gate must not depend on the service's serving code.
    return torch.softmax(model(torch.from_numpy(x).to(device)), dim=1).to("cpu").numpy()


@lru_cache
def load_canary(path: Path = CANARY_PATH) -> Canary:
    with np.load(path, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    return Canary(x=images.reshape(len(images), -1).astype(np.float32) / 255.0, y=labels.astype(np.int64))


def validate_candidate(
    path: Path, device: torch.device, min_accuracy: float, canary: Canary | None = None
) -> tuple[MLP, Checkpoint, float]:
    """Everything a checkpoint must pass before it may serve; raises :class:`CheckpointError`.

    Safe loading and the strict structural checks (``load_model``), a model that takes 784
    pixels to 10 classes, then the canary gate. The service runs this before every swap and
    ``training.publish`` before every pointer switch, so ``CURRENT`` never names a model that
    a starting worker would refuse.
    """
    try:
        model, ckpt = load_model(path, device)
    except CheckpointError:
        raise
    except Exception as exc:  # an exotic tensor or a torch corner case: still just "unusable"
        raise CheckpointError(path, f"unusable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    model.requires_grad_(False)  # a served model never needs gradients; belt and braces with inference_mode
    args = ckpt.model_args
    if args.get("in_features", 784) != 784 or args.get("num_classes", 10) != 10:
        raise CheckpointError(path, f"model_args {args} do not take 784 pixels to 10 classes")
    try:
        accuracy = (canary or load_canary()).check(model, device, min_accuracy)
    except CanaryFailure as exc:
        raise CheckpointError(path, str(exc)) from None
    return model, ckpt, accuracy
