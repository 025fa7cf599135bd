"""Activate a stored model version: the pointer switch that a running service picks up.

    python -m training.publish                 # list versions, marking the current and last good ones
    python -m training.publish VERSION         # validate VERSION, then point CURRENT at it
    python -m training.publish --previous      # roll back to the version before the current one

Publishing is also how a rollback is done: any stored version can be made current again. All
three work on a broken folder (CURRENT missing, empty, corrupt or naming a missing file): that
is when they are needed. With a broken CURRENT, --previous goes to the last good version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.registry import (
    CheckpointError,
    canary_gate,
    default_min_accuracy,
    default_models_dir,
    inspect_folder,
    publish,
    rollback,
)

__all__ = ["main"]


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _env_min_accuracy() -> float | None:
    try:
        return default_min_accuracy()
    except ValueError:
        return None  # reported by main() as a one-line error, unless --min-accuracy overrides it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.publish",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("version", nargs="?", help="the stored version to make current; none: list the versions")
    parser.add_argument(
        "--previous", action="store_true", help="roll back to the version stored before the current one"
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="folder of versions and the CURRENT pointer ($MNIST_MODEL_DIR when set)",
    )
    parser.add_argument(
        "--min-accuracy",
        type=_accuracy,
        default=_env_min_accuracy(),
        help="canary accuracy the version must reach ($MNIST_CANARY_MIN_ACCURACY when set)",
    )
    return parser


def _list(models_dir: Path) -> int:
    state = inspect_folder(models_dir)
    for version in state.versions:
        marks = ["current"] if version == state.current else []
        marks += ["last good"] if version == state.last_good else []
        suffix = f"  ({', '.join(marks)})" if marks else ""
        print(f"{'*' if version == state.current else ' '} {version}{suffix}")
    if not state.versions:
        print(f"no versions in {models_dir}", file=sys.stderr)
    if state.current_problem is not None:
        print(f"warning: {state.current_problem}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.previous and args.version:
        parser.error("give a VERSION or --previous, not both")
    if not args.previous and not args.version:
        return _list(args.models_dir)
    try:
        min_accuracy = default_min_accuracy() if args.min_accuracy is None else args.min_accuracy
        gate = canary_gate(min_accuracy)
        if args.previous:
            target, _ = rollback(args.models_dir, gate)
            version, how = target.version, f" ({target.reason})"
        else:
            version, how = args.version, ""
            publish(args.models_dir, version, gate)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"published {version}{how}; running services pick it up within their reload interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
