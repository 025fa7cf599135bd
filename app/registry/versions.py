"""The versions folder: stored versions side by side, the ``CURRENT`` pointer and ``LAST_GOOD``.

Versions sit in one folder as ``<version>.pt``. A small text file ``CURRENT`` names the live one;
``LAST_GOOD`` names the last version that passed every check and was made current or served, so
a worker can still start when ``CURRENT`` is broken. Both are written atomically
(:func:`~app.registry.checkpoint.atomic_write`): a reader sees the old file or the new one.

Publishing and rollback are implemented here, once, for the service, the trainer and the CLI:
:func:`publish` runs the caller's gate (the canary, on the caller's device) and only then moves
the pointers; :func:`rollback` picks the version to go back to and publishes it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from app.registry.checkpoint import CheckpointError, atomic_write, new_version_id, weights_sha256, write_checkpoint
from app.registry.model import MLP

__all__ = [
    "LAST_GOOD_NAME",
    "POINTER_NAME",
    "SUFFIX",
    "FolderState",
    "PointerError",
    "Rollback",
    "check_version",
    "current_checkpoint",
    "default_models_dir",
    "inspect_folder",
    "list_versions",
    "publish",
    "read_last_good",
    "read_pointer",
    "record_last_good",
    "rollback",
    "rollback_target",
    "save_checkpoint",
    "version_path",
    "write_pointer",
]

POINTER_NAME = "CURRENT"
LAST_GOOD_NAME = "LAST_GOOD"
SUFFIX = ".pt"
# Versions become file names and appear in URLs: keep them to a safe alphabet.
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always used with fullmatch
# A pointer holds one name and a newline; reading more than this is never needed.
_MAX_POINTER_BYTES = 4096
_BUNDLED_MODELS = Path(__file__).resolve().parent.parent.parent / "models"

T = TypeVar("T")


class PointerError(CheckpointError, ValueError):
    """A pointer file (``CURRENT``, ``LAST_GOOD``) whose content does not name a version."""


def default_models_dir() -> Path:
    """``MNIST_MODEL_DIR`` when set (the folder the service reads), else the bundled ``models/``."""
    explicit = os.environ.get("MNIST_MODEL_DIR")
    return Path(explicit) if explicit else _BUNDLED_MODELS


def check_version(version: str) -> str:
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid model version {version!r}: use letters, digits, '.', '_' and '-' only")
    return version


def version_path(models_dir: Path, version: str) -> Path:
    return Path(models_dir) / f"{check_version(version)}{SUFFIX}"


def list_versions(models_dir: Path) -> list[str]:
    """Stored versions, oldest first (version ids sort by creation time)."""
    directory = Path(models_dir)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob(f"*{SUFFIX}") if _VERSION_RE.fullmatch(p.stem))


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


# -- the pointers ----------------------------------------------------------------------------


def read_pointer(models_dir: Path, name: str = POINTER_NAME) -> str | None:
    """The version a pointer file names; None when the file is absent or empty.

    Raises :class:`PointerError` for content that is not a version name (undecodable bytes, a
    path, several lines) and ``OSError`` when the file exists but cannot be read now.
    """
    path = Path(models_dir) / name
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_POINTER_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_POINTER_BYTES:
        raise PointerError(path, f"is over {_MAX_POINTER_BYTES} bytes: not a pointer to a version")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PointerError(path, f"holds bytes that are not UTF-8 text ({data[:20]!r}), not a version name") from None
    if not text:
        return None
    if not _VERSION_RE.fullmatch(text):
        raise PointerError(path, f"does not name a version ({text[:80]!r})")
    return text


def read_last_good(models_dir: Path) -> str | None:
    return read_pointer(models_dir, LAST_GOOD_NAME)


def write_pointer(models_dir: Path, version: str, name: str = POINTER_NAME) -> None:
    """Atomically point ``CURRENT`` (or ``name``) at ``version``, which must be stored."""
    path = version_path(models_dir, version)
    if not path.is_file():
        raise FileNotFoundError(f"cannot point {name} at {version}: {path} does not exist")
    atomic_write(Path(models_dir) / name, lambda fh: fh.write(f"{version}\n".encode()))


def record_last_good(models_dir: Path, version: str) -> bool:
    """Record ``version`` as the last good one; a no-op (False) when it already is.

    Called after every successful publish and swap, so by every worker: skipping an unchanged
    file keeps them from rewriting it, and a read-only folder that already names it is fine.
    """
    try:
        if read_last_good(models_dir) == version:
            return False
    except (PointerError, OSError):
        pass  # a corrupt or unreadable record is simply replaced
    write_pointer(models_dir, version, LAST_GOOD_NAME)
    return True


@dataclass(frozen=True)
class FolderState:
    """What the folder holds, read without ever raising: the repair tools start from this."""

    directory: Path
    versions: list[str]
    current: str | None  # the name CURRENT holds, when it holds a valid one (the file may be missing)
    last_good: str | None  # LAST_GOOD's version when it names a stored one
    # Why CURRENT does not name a stored version (None when it does): the file at fault, what is
    # wrong, and which kind of wrong: "absent", "empty", "invalid", "unreadable" or "missing-file".
    problem_file: Path | None = None
    problem: str | None = None
    problem_kind: str | None = None

    @property
    def pointer_path(self) -> Path:
        return self.directory / POINTER_NAME

    @property
    def current_problem(self) -> str | None:
        """The problem as one line naming the file, or None."""
        return None if self.problem is None else f"{self.problem_file}: {self.problem}"


def inspect_folder(models_dir: Path) -> FolderState:
    directory = Path(models_dir)
    pointer = directory / POINTER_NAME
    versions = list_versions(directory)
    current: str | None = None
    problem_file: Path | None = pointer
    problem: str | None = None
    kind: str | None = None
    try:
        current = read_pointer(directory)
    except PointerError as exc:
        problem, kind = exc.problem, "invalid"
    except OSError as exc:
        problem, kind = f"could not be read ({type(exc).__name__}: {exc})", "unreadable"
    if problem is None:
        if current is None:
            problem, kind = ("is empty", "empty") if pointer.exists() else ("does not exist", "absent")
        elif current not in versions:
            problem_file = version_path(directory, current)
            problem, kind = f"no such checkpoint file ({POINTER_NAME} names {current})", "missing-file"
    try:
        last_good = read_last_good(directory)
    except (PointerError, OSError):
        last_good = None
    return FolderState(
        directory=directory,
        versions=versions,
        current=current,
        last_good=last_good if last_good in versions else None,
        problem_file=problem_file if problem is not None else None,
        problem=problem,
        problem_kind=kind,
    )


def current_checkpoint(models_dir: Path | None = None) -> Path:
    """The checkpoint file ``CURRENT`` names (benches, tools); :class:`CheckpointError` if none."""
    state = inspect_folder(models_dir if models_dir is not None else default_models_dir())
    if state.problem is not None or state.current is None:
        raise CheckpointError(state.problem_file or state.pointer_path, state.problem or "names no version")
    return version_path(state.directory, state.current)


# -- publish and rollback --------------------------------------------------------------------


def publish(models_dir: Path, version: str, gate: Callable[[Path], T]) -> T:
    """Make ``version`` current: ``gate(path)`` first, then ``LAST_GOOD`` and ``CURRENT``.

    ``gate`` is the full check a server runs before serving (``canary.canary_gate(...)``, or a
    worker's own validated load); it raises :class:`CheckpointError` and then nothing moves.
    Its result is returned, so a worker swaps in exactly the model that passed. Raises
    ``ValueError`` for an unsafe name.
    """
    path = version_path(models_dir, version)
    result = gate(path)
    # LAST_GOOD first: if CURRENT cannot be written either, nothing claims the version is live.
    record_last_good(models_dir, version)
    write_pointer(models_dir, version)
    return result


class Rollback(NamedTuple):
    version: str
    reason: str


def rollback_target(models_dir: Path) -> Rollback:
    """The version a rollback goes to, and why; :class:`CheckpointError` when there is none.

    With ``CURRENT`` naming a version (stored or not), the newest stored version older than it.
    With ``CURRENT`` absent, empty or unreadable, ``LAST_GOOD``, else the newest stored version.
    """
    state = inspect_folder(models_dir)
    if state.current is not None:
        older = [v for v in state.versions if v < state.current]
        if not older:
            raise CheckpointError(state.pointer_path, f"no version older than {state.current} in {state.directory}")
        missing = "" if state.current in state.versions else " (its file is missing)"
        return Rollback(older[-1], f"the version before {state.current}{missing}")
    if state.last_good is not None:
        return Rollback(state.last_good, f"the last good version, as {state.current_problem}")
    if state.versions:
        return Rollback(state.versions[-1], f"the newest stored version, as {state.current_problem}")
    raise CheckpointError(state.pointer_path, f"no stored versions in {state.directory}")


def rollback(models_dir: Path, gate: Callable[[Path], T]) -> tuple[Rollback, T]:
    """Publish :func:`rollback_target` through the same gate as :func:`publish`."""
    target = rollback_target(models_dir)
    return target, publish(models_dir, target.version, gate)
