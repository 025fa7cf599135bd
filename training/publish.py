"""Activate a stored model version: the pointer switch that a running service picks up.

    python -m training.publish                 # list versions, marking the current one
    python -m training.publish VERSION         # validate VERSION, then point CURRENT at it
    python -m training.publish --previous      # roll back to the version before the current one

Publishing is also how a rollback is done: any stored version can be made current again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from app.config import default_models_dir, get_settings
from app.registry import CheckpointError, list_versions, read_pointer, validate_candidate, version_path, write_pointer

__all__ = ["main", "publish"]


def publish(models_dir: Path, version: str, min_accuracy: float | None = None) -> Path:
    """Switch ``CURRENT`` to ``version`` after the same checks the service runs before serving it.

    Raises :class:`CheckpointError` naming the file and the problem; the pointer is then untouched.
    """
    path = version_path(models_dir, version)
    if min_accuracy is None:
        min_accuracy = get_settings().canary_min_accuracy
    validate_candidate(path, torch.device("cpu"), min_accuracy)
    write_pointer(models_dir, version)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.publish", description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", help="the stored version to make current")
    parser.add_argument(
        "--previous", action="store_true", help="roll back to the version stored before the current one"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=default_models_dir(), help="folder of versions (default: %(default)s)"
    )
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="canary accuracy the version must reach (default: MNIST_CANARY_MIN_ACCURACY, 0.9)",
    )
    args = parser.parse_args(argv)

    versions = list_versions(args.models_dir)
    current = read_pointer(args.models_dir)
    if args.previous:
        if current not in versions or versions.index(current) == 0:
            print(f"error: no version older than {current!r} in {args.models_dir}", file=sys.stderr)
            return 1
        args.version = versions[versions.index(current) - 1]
    if not args.version:
        for version in versions:
            print(f"{'*' if version == current else ' '} {version}")
        if not versions:
            print(f"no versions in {args.models_dir}", file=sys.stderr)
        return 0
    try:
        path = publish(args.models_dir, args.version, args.min_accuracy)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"published {args.version} ({path}); running services pick it up within their reload interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
