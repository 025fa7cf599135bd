"""The versions folder: stored versions side by side, and the ``CURRENT`` pointer.

Versions sit in one folder as ``<version>.pt``; a small text file ``CURRENT`` names the live
one. Both are written atomically (:func:`~app.registry.checkpoint.atomic_write`), so a reader
sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.registry.checkpoint import atomic_write, new_version_id, weights_sha256, write_checkpoint
from app.registry.model import MLP

__all__ = [
    "POINTER_NAME",
    "SUFFIX",
    "check_version",
    "list_versions",
    "read_pointer",
    "save_checkpoint",
    "version_path",
    "write_pointer",
]

POINTER_NAME = "CURRENT"
SUFFIX = ".pt"
# Versions become file names and appear in URLs: keep them to a safe alphabet.
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always used with fullmatch


def check_version(version: str) -> str:
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid model version {version!r}: use letters, digits, '.', '_' and '-' only")
    return version


def version_path(models_dir: Path, version: str) -> Path:
    return Path(models_dir) / f"{check_version(version)}{SUFFIX}"


def save_checkpoint(
    models_dir: Path,
    model: MLP,
    meta: Mapping[str, Any],
    version: str | None = None,
) -> Path:
    """Write ``model`` as a new version in ``models_dir``; never overwrites an existing version."""
    if version is None:
        version = new_version_id(weights_sha256({k: v.detach() for k, v in model.state_dict().items()}))
    return write_checkpoint(version_path(models_dir, version), model, meta)


def read_pointer(models_dir: Path) -> str | None:
    """The version named by ``CURRENT``, or None when there is no pointer."""
    pointer = Path(models_dir) / POINTER_NAME
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return check_version(text) if text else None


def write_pointer(models_dir: Path, version: str) -> None:
    """Atomically point ``CURRENT`` at ``version`` (which must exist)."""
    path = version_path(models_dir, version)
    if not path.is_file():
        raise FileNotFoundError(f"cannot publish {version}: {path} does not exist")
    atomic_write(Path(models_dir) / POINTER_NAME, lambda fh: fh.write(f"{version}\n".encode()))


def list_versions(models_dir: Path) -> list[str]:
    """Stored versions, oldest first (version ids sort by creation time)."""
    directory = Path(models_dir)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob(f"*{SUFFIX}") if _VERSION_RE.fullmatch(p.stem))
