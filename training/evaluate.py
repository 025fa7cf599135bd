"""Evaluate a checkpoint on the MNIST test set: accuracy, confusion matrix and a picture.

    python -m training.evaluate [CHECKPOINT] [--data-dir DIR]

Without a checkpoint argument the current version (``models/CURRENT``) is evaluated. The PNG
(training curves from the checkpoint's history, plus the confusion matrix) is written next to
the checkpoint as ``<version>.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from app.registry import MLP, Checkpoint, CheckpointError, current_checkpoint, default_models_dir, load_model
from training import missing_extra
from training.data import DataUnavailableError, MnistTensors, default_data_dir, load_mnist

__all__ = ["confusion_matrix", "format_confusion", "main", "plot_report"]


@torch.inference_mode()
def confusion_matrix(model: MLP, data: MnistTensors, num_classes: int = 10) -> torch.Tensor:
    """``cm[true, predicted]`` counts."""
    model.eval()
    predicted = model(data.x).argmax(1)
    flat = data.y * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def format_confusion(cm: torch.Tensor) -> str:
    n = cm.shape[0]
    lines = ["true\\pred " + " ".join(f"{j:5d}" for j in range(n))]
    for i in range(n):
        lines.append(f"{i:9d} " + " ".join(f"{int(cm[i, j]):5d}" for j in range(n)))
    return "\n".join(lines)


def plot_report(ckpt: Checkpoint, cm: torch.Tensor, accuracy: float, out: Path) -> Path:
    """Loss and accuracy per epoch beside the confusion matrix, as one PNG."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise missing_extra(exc) from None

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    history: list[dict[str, Any]] = list(ckpt.meta.get("history", []))
    fig, (ax_loss, ax_acc, ax_cm) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    if history:
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
        ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], marker="o", label="train")
        ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", label="test")
        ax_acc.legend()
    else:
        for ax in (ax_loss, ax_acc):
            ax.text(0.5, 0.5, "no history in checkpoint", ha="center", va="center", transform=ax.transAxes)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="mean cross-entropy")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax_cm.imshow(cm.numpy(), cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            value = int(cm[i, j])
            color = "white" if value > cm.max() / 2 else "black"
            ax_cm.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax_cm.set(title=f"confusion matrix (test accuracy {accuracy:.2%})", xlabel="predicted", ylabel="true")
    ax_cm.set_xticks(range(cm.shape[1]))
    ax_cm.set_yticks(range(cm.shape[0]))
    fig.suptitle(f"MNIST MLP {ckpt.version}")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint file; unset: the version CURRENT names")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="folder whose CURRENT is evaluated when no checkpoint is given ($MNIST_MODEL_DIR when set)",
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="MNIST root holding MNIST/raw")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG report")
    args = parser.parse_args(argv)

    try:
        path = args.checkpoint if args.checkpoint is not None else current_checkpoint(args.models_dir)
        model, ckpt = load_model(path)
        test = load_mnist(args.data_dir, train=False)
    except (CheckpointError, DataUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cm = confusion_matrix(model, test)
    accuracy = float(cm.diag().sum()) / len(test)
    print(f"{ckpt.version}: test accuracy {accuracy:.2%} on {len(test)} images")
    print(format_confusion(cm))
    if not args.no_plot:
        out = plot_report(ckpt, cm, accuracy, Path(path).with_suffix(".png"))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
