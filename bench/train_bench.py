"""Train the default recipe two ways in one run and compare wall time and accuracy.

    python -m bench.train_bench --data-dir ../shared/data [--epochs 10] [--sequential]

1. ``in-memory``: the project's trainer (``training.train.fit_epochs``, what ``fit`` and the
   CLI run): the dataset held as one tensor, shuffled batches sliced from it.
2. ``dataloader``: the textbook baseline, ``DataLoader(MNIST(transform=ToTensor()),
   batch_size=256, shuffle=True)`` for training and a ``DataLoader`` over the test set for the
   per-epoch test accuracy, converting every PIL image on every epoch.

Both do the recipe's work: the same model, init, optimizer (``make_optimizer``), loss, batch
size, seed and device, and after every epoch the mean loss, train accuracy and test accuracy.
Each trainer's time includes loading its data (train and test). The final accuracy of both is
measured the same way on the 10,000 test images.

The two run epoch by epoch in turn (in-memory epoch 1, DataLoader epoch 1, in-memory epoch 2...)
and each one's epochs are timed and summed. On a shared machine the host's load drifts over a
run; interleaving makes both trainers sample the same stretch of it, so a busy minute does not
land on one of them only. ``--sequential`` runs one after the other instead. Prints a table with
the speed-up ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ToTensor

import training  # noqa: F401 - sets the OpenMP wait policy before torch loads, for both trainers
from app.registry import MLP, pick_device
from training.data import load_mnist, mnist_dataset
from training.train import DEFAULT_SEED, evaluate, fit_epochs, make_optimizer

Epochs = Generator[tuple[MLP, dict[str, float]], None, None]
Batch = tuple[torch.Tensor, torch.Tensor]


def train_in_memory(data_dir: Path, epochs: int, batch_size: int, lr: float, seed: int, device: torch.device) -> Epochs:
    train = load_mnist(data_dir, train=True).to(device)
    test = load_mnist(data_dir, train=False).to(device)
    yield from fit_epochs(train, test, epochs, batch_size, lr, seed, progress=False)


def train_dataloader(
    data_dir: Path, epochs: int, batch_size: int, lr: float, seed: int, device: torch.device
) -> Epochs:
    torch.manual_seed(seed)
    model = MLP().to(device)
    optimizer = make_optimizer(model, lr)
    train_set = cast("Dataset[Batch]", mnist_dataset(data_dir, train=True, transform=ToTensor()))
    test_set = cast("Dataset[Batch]", mnist_dataset(data_dir, train=False, transform=ToTensor()))
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test_set, batch_size=batch_size)
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in loader:
            xb, yb = images.view(len(images), -1).to(device), labels.to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        model.eval()
        test_correct, test_seen = 0, 0
        with torch.inference_mode():
            for images, labels in test_loader:
                logits = model(images.view(len(images), -1).to(device))
                test_correct += int((logits.argmax(1) == labels.to(device)).sum())
                test_seen += len(labels)
        yield (
            model,
            {
                "epoch": epoch,
                "loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "test_accuracy": test_correct / test_seen,
            },
        )


class Timed:
    """One trainer's epochs, each ``next()`` timed; the wall time is their sum."""

    def __init__(self, label: str, epochs: Epochs, total: int) -> None:
        self.label, self.epochs, self.total = label, epochs, total
        self.seconds = 0.0
        self.model: MLP | None = None

    def step(self) -> None:
        started = time.perf_counter()
        self.model, entry = next(self.epochs)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        print(
            f"  {self.label:<10} epoch {entry['epoch']:2d}/{self.total}  {seconds:5.2f} s  loss {entry['loss']:.4f}"
            f"  train_acc {entry['train_accuracy']:.2%}  test_acc {entry['test_accuracy']:.2%}",
            flush=True,
        )

    def finish(self) -> MLP:
        self.epochs.close()
        assert self.model is not None
        return self.model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sequential", action="store_true", help="all in-memory epochs first, then the DataLoader's")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    device = pick_device(args.device)
    order = "one after the other" if args.sequential else "interleaved epoch by epoch"
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {args.epochs} epochs, {order}"
    )

    recipe = (args.data_dir, args.epochs, args.batch_size, args.lr, args.seed, device)
    trainers = [
        Timed("in-memory", train_in_memory(*recipe), args.epochs),
        Timed("dataloader", train_dataloader(*recipe), args.epochs),
    ]
    schedule: Iterator[Callable[[], None]]
    if args.sequential:
        schedule = (t.step for t in trainers for _ in range(args.epochs))
    else:
        schedule = (t.step for _ in range(args.epochs) for t in trainers)
    for step in schedule:
        step()

    test = load_mnist(args.data_dir, train=False).to(device)
    rows = [
        (name, t.seconds, evaluate(t.finish(), test))
        for name, t in zip(("in-memory tensors", "DataLoader(ToTensor)"), trainers, strict=True)
    ]
    baseline = rows[1][1]
    print()
    print("| trainer | wall time (s) | test accuracy | speed-up vs DataLoader |")
    print("|---|---:|---:|---:|")
    for name, seconds, accuracy in rows:
        print(f"| {name} | {seconds:.1f} | {accuracy:.2%} | {baseline / seconds:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
