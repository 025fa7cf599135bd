"""The canary gate: a new model must behave on real digits before it may serve.

``app/data/canary.npz`` holds 500 real MNIST test digits (uint8) with their labels, kept in the
repository so the check needs no dataset download. A candidate must give finite probabilities on
them and on edge inputs (all black, all white), and reach a minimum accuracy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from app.registry.checkpoint import OUT_OF_MEMORY, Checkpoint, CheckpointError, load_model
from app.registry.model import MLP

__all__ = [
    "CANARY_PATH",
    "DEFAULT_MIN_ACCURACY",
    "Canary",
    "CanaryFailure",
    "canary_gate",
    "default_min_accuracy",
    "load_canary",
    "validate_candidate",
]

CANARY_PATH = Path(__file__).resolve().parent.parent / "data" / "canary.npz"
DEFAULT_MIN_ACCURACY = 0.9
MIN_ACCURACY_ENV = "MNIST_CANARY_MIN_ACCURACY"


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

    Safe loading and the strict structural checks (``load_model``: 784 pixels in, 10 classes
    out, bounded sizes), then the canary gate. The service runs this before every swap and
    :func:`~app.registry.versions.publish` before every pointer switch, so ``CURRENT`` never
    names a model that a starting worker would refuse. A failure to read the file or to find
    the memory for it is raised with ``transient=True``: worth another try, not a verdict.
    """
    try:
        model, ckpt = load_model(path, device)
    except CheckpointError:
        raise
    except OUT_OF_MEMORY:
        raise CheckpointError(path, "could not be loaded, will retry (out of memory)", transient=True) from None
    except Exception as exc:  # an exotic tensor or a torch corner case: still just "unusable"
        raise CheckpointError(path, f"unusable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    model.requires_grad_(False)  # a served model never needs gradients; belt and braces with inference_mode
    try:
        accuracy = (canary or load_canary()).check(model, device, min_accuracy)
    except CanaryFailure as exc:
        raise CheckpointError(path, str(exc)) from None
    except OUT_OF_MEMORY:
        raise CheckpointError(path, "could not be checked, will retry (out of memory)", transient=True) from None
    return model, ckpt, accuracy


def canary_gate(
    min_accuracy: float = DEFAULT_MIN_ACCURACY, device: str | torch.device = "cpu"
) -> Callable[[Path], tuple[MLP, Checkpoint, float]]:
    """The gate :func:`~app.registry.versions.publish` runs for tools (the trainer, the CLI)."""
    return partial(validate_candidate, device=torch.device(device), min_accuracy=min_accuracy)


def default_min_accuracy() -> float:
    """``MNIST_CANARY_MIN_ACCURACY`` when set (the service's threshold), else 0.9.

    The tools read the variable the service reads, so a version they publish is one the
    service accepts; they import nothing of the service's settings to do it.
    """
    text = os.environ.get(MIN_ACCURACY_ENV, "").strip()
    if not text:
        return DEFAULT_MIN_ACCURACY
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise ValueError(f"{MIN_ACCURACY_ENV}={text!r} must be a number from 0 to 1")
    return value
