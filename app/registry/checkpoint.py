"""The checkpoint format: the only code that knows how a model is laid out on disk.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, strings, numbers,
lists, dicts), so it loads with ``torch.load(weights_only=True)`` and never runs pickled code::

    {"format": "mnist-mlp/1", "version": str, "state_dict": {...}, "model_args": {...}, "meta": {...}}

Files are written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
reader sees the old file or the new one, never half of either. Where the files sit and which
one is live is :mod:`app.registry.versions`' business.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.registry.model import MLP

__all__ = [
    "FORMAT",
    "INPUT_CONVENTION",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "build_model",
    "load_checkpoint",
    "load_model",
    "new_version_id",
    "weights_sha256",
    "write_checkpoint",
]

FORMAT = "mnist-mlp/1"
# A crafted file must not make us allocate a huge model before the shape checks reject it.
_ARG_LIMITS = {"in_features": 1 << 16, "hidden": 1 << 16, "num_classes": 1 << 12}

INPUT_CONVENTION: dict[str, Any] = {
    "shape": [784],
    "layout": "28x28 row-major, flattened",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "polarity": "white digit on black background (torchvision ToTensor of MNIST)",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    version: str
    state_dict: dict[str, torch.Tensor]
    model_args: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes, independent of how the file was pickled."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def new_version_id(sha256: str, now: datetime | None = None) -> str:
    """``20261126T143012Z-1a2b3c4d``: sortable by time, unique by content."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{sha256[:8]}"


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(path: Path, model: MLP, meta: Mapping[str, Any]) -> Path:
    """Write ``model`` to ``path`` (its stem is the version); never overwrites an existing file."""
    path = Path(path)
    state_dict = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    sha = weights_sha256(state_dict)
    if path.exists():
        raise FileExistsError(f"{path} already exists; versions are never overwritten")
    full_meta = {"input": INPUT_CONVENTION, **dict(meta), "weights_sha256": sha}
    full_meta.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    full_meta.setdefault("torch_version", str(torch.__version__))
    payload = {
        "format": FORMAT,
        "version": path.stem,
        "state_dict": state_dict,
        "model_args": model.model_args(),
        "meta": full_meta,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def _describe_load_failure(path: Path, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return (
            "refused by the safe loader (weights_only=True): the file holds Python objects other "
            "than tensors and plain data, so it may have been crafted to run code; it was not executed"
        )
    with path.open("rb") as fh:
        starts_like_zip = fh.read(4) == b"PK\x03\x04"  # torch.save files are zip archives
    if (
        (starts_like_zip and not zipfile.is_zipfile(path))
        or isinstance(exc, (EOFError, zipfile.BadZipFile))
        or "central directory" in text
        or "zip archive" in text
    ):
        return f"truncated or corrupt checkpoint file ({text})"
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {text[:200]})"


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and structurally validate a checkpoint; raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises a zoo of types for bad files; all mean "unusable"
        raise CheckpointError(path, _describe_load_failure(path, exc)) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(path, f"not an {FORMAT} checkpoint (format field: {found!r})")
    state_dict, model_args, meta = raw.get("state_dict"), raw.get("model_args"), raw.get("meta", {})
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(path, "'state_dict' must map parameter names to tensors")
    for name, tensor in state_dict.items():
        # Sparse, quantized or meta tensors would fail later in surprising ways: refuse them here.
        if tensor.layout is not torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
            raise CheckpointError(path, f"{name} is not a dense CPU tensor ({tensor.layout}, {tensor.device})")
    if not isinstance(model_args, dict) or not isinstance(meta, dict):
        raise CheckpointError(path, "'model_args' and 'meta' must be dictionaries")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError):
        raise CheckpointError(path, "'meta' must hold plain JSON data (strings, numbers, lists, dicts)") from None
    for name, value in model_args.items():
        limit = _ARG_LIMITS.get(name)
        if limit is None:
            raise CheckpointError(path, f"unknown model argument {name!r}")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise CheckpointError(path, f"model argument {name}={value!r} must be an integer in 1..{limit}")
    version = path.stem
    return Checkpoint(path=path, version=version, state_dict=state_dict, model_args=model_args, meta=meta)


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> MLP:
    """Rebuild the network from the checkpoint's own arguments and load its weights strictly."""
    # Shapes are checked on a meta-device model (no memory) before a real one is allocated, so a
    # tiny crafted file cannot make us build a huge network from its model_args.
    with torch.device("meta"):
        expected = MLP(**ckpt.model_args, init=False).state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            ckpt.path, f"state_dict keys do not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in expected.items():
        got = ckpt.state_dict[name]
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointError(
                ckpt.path,
                f"wrong shape for {name}: expected {list(tensor.shape)} for model_args "
                f"{ckpt.model_args}, got {list(got.shape)}",
            )
        if not got.is_floating_point():
            raise CheckpointError(ckpt.path, f"{name} has dtype {got.dtype}; floating-point weights expected")
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(ckpt.path, f"{name} contains NaN or infinite weights")
    stored_sha = ckpt.meta.get("weights_sha256")
    if stored_sha is not None and stored_sha != weights_sha256(ckpt.state_dict):
        raise CheckpointError(ckpt.path, "weights do not match the sha256 recorded in the checkpoint (corrupted?)")
    model = MLP(**ckpt.model_args)  # type: ignore[arg-type]  # ints, validated in load_checkpoint
    model.load_state_dict({k: v.to(torch.float32) for k, v in ckpt.state_dict.items()}, strict=True)
    return model.to(device).eval()


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[MLP, Checkpoint]:
    """Load, validate and rebuild: the model is returned on ``device`` in eval mode."""
    ckpt = load_checkpoint(path)
    return build_model(ckpt, device), ckpt
