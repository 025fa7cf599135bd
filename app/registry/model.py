"""The MLP: the one definition of the network, shared by the trainer and the service."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "pick_device"]


class MLP(nn.Module):
    """784 -> 256 -> ReLU -> 10, the classic MNIST baseline.

    Layer names (``lin_1``, ``lin_2``) are part of the checkpoint format: the keys of every
    saved ``state_dict`` are derived from them, so renaming a layer breaks old checkpoints.
    """

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, *, init: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = hidden
        self.num_classes = num_classes
        self.lin_1 = nn.Linear(in_features, hidden)
        self.lin_2 = nn.Linear(hidden, num_classes)
        if init:  # skipped for shape-only models on the meta device, where init would pull in torch._dynamo
            self.init_param()

    def init_param(self) -> None:
        """Kaiming-normal weights (suited to ReLU) and zero biases, as in the recipe."""
        for layer in (self.lin_1, self.lin_2):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin_2(torch.relu(self.lin_1(x)))

    def model_args(self) -> dict[str, int]:
        """Constructor arguments, stored in checkpoints so a reader never guesses sizes."""
        return {"in_features": self.in_features, "hidden": self.hidden, "num_classes": self.num_classes}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is taken as a torch device name."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
