"""Train the default recipe two ways in one run and compare wall time and accuracy.

    python bench/train_bench.py --data-dir ../shared/data [--epochs 10]

1. ``in-memory``: the project's trainer (``training.train.fit``): the dataset held as one tensor,
   shuffled batches sliced from it.
2. ``dataloader``: the textbook baseline, ``DataLoader(MNIST(transform=ToTensor()),
   batch_size=256, shuffle=True)`` for training and a ``DataLoader`` over the test set for the
   per-epoch test accuracy, converting every PIL image on every epoch.

Both do the recipe's work: the same model, init, optimizer (``make_optimizer``), loss, batch
size, seed and device, and after every epoch the mean loss, train accuracy and test accuracy.
The final accuracy of both is measured the same way on the 10,000 test images. Prints a table
with the speed-up ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.transforms import ToTensor  # noqa: E402

import training  # noqa: E402, F401 - sets the OpenMP wait policy before torch loads, for both trainers
from app.config import pick_device  # noqa: E402
from app.model import MLP  # noqa: E402
from training.data import load_mnist, mnist_dataset  # noqa: E402
from training.train import DEFAULT_SEED, evaluate, fit, make_optimizer  # noqa: E402


def train_dataloader(data_dir: Path, epochs: int, batch_size: int, lr: float, seed: int, device: torch.device) -> MLP:
    torch.manual_seed(seed)
    model = MLP().to(device)
    optimizer = make_optimizer(model, lr)
    dataset = mnist_dataset(data_dir, train=True, transform=ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    test_loader = DataLoader(mnist_dataset(data_dir, train=False, transform=ToTensor()), batch_size=batch_size)  # type: ignore[arg-type]
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
        print(
            f"  dataloader epoch {epoch:2d}/{epochs}  loss {loss_sum / seen:.4f}  train_acc {correct / seen:.2%}"
            f"  test_acc {test_correct / test_seen:.2%}",
            flush=True,
        )
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {args.epochs} epochs")

    test = load_mnist(args.data_dir, train=False).to(device)
    rows = []

    started = time.perf_counter()
    train = load_mnist(args.data_dir, train=True).to(device)
    model, _ = fit(
        train,
        test,
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        progress=False,
        log=lambda line: print("  in-memory  " + line, flush=True),
    )
    rows.append(("in-memory tensors", time.perf_counter() - started, evaluate(model, test)))

    started = time.perf_counter()
    model = train_dataloader(args.data_dir, args.epochs, args.batch_size, args.lr, args.seed, device)
    rows.append(("DataLoader(ToTensor)", time.perf_counter() - started, evaluate(model, test)))

    baseline = rows[1][1]
    print()
    print("| trainer | wall time (s) | test accuracy | speed-up vs DataLoader |")
    print("|---|---:|---:|---:|")
    for name, seconds, accuracy in rows:
        print(f"| {name} | {seconds:.1f} | {accuracy:.2%} | {baseline / seconds:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
