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
import stat
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch

from app.registry.model import MLP

__all__ = [
    "FORMAT",
    "INPUT_CONVENTION",
    "IN_FEATURES",
    "MAX_DIRECTORY_BYTES",
    "MAX_FILE_BYTES",
    "MAX_HIDDEN",
    "MAX_PICKLE_BYTES",
    "NUM_CLASSES",
    "OUT_OF_MEMORY",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "build_model",
    "expected_shapes",
    "load_checkpoint",
    "load_model",
    "new_version_id",
    "weights_sha256",
    "write_checkpoint",
]

FORMAT = "mnist-mlp/1"
# The service classifies 28x28 digits into 10 classes: any other input or output size is refused
# from ``model_args`` alone, before anything is built.
IN_FEATURES = 784
NUM_CLASSES = 10
_ARG_DEFAULTS = {"in_features": IN_FEATURES, "hidden": 256, "num_classes": NUM_CLASSES}
# A crafted file must not make us allocate a huge model: 4096 hidden units is 16x the recipe's
# and ~13 MB of float32 weights.
MAX_HIDDEN = 4096
# The largest file a checkpoint can be: float64 weights at MAX_HIDDEN are ~26 MB, plus metadata.
MAX_FILE_BYTES = 64 * 1024 * 1024
# A checkpoint's zip directory lists about ten records in ~1 KB; this allows for far more.
MAX_DIRECTORY_BYTES = 64 * 1024
# The pickled structure (names, model_args, meta; the tensors' bytes are separate records).
MAX_PICKLE_BYTES = 1024 * 1024
_END_RECORD = 22  # bytes in a zip's end-of-central-directory record, without its comment

INPUT_CONVENTION: dict[str, Any] = {
    "shape": [784],
    "layout": "28x28 row-major, flattened",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "polarity": "white digit on black background (torchvision ToTensor of MNIST)",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem.

    ``transient`` marks a failure to *read* the file (an I/O or memory error), as opposed to a
    file that was read and refused: only the second kind is worth remembering as a rejection.
    """

    def __init__(self, path: Path | str, problem: str, transient: bool = False) -> None:
        self.path = Path(path)
        self.problem = problem
        self.transient = transient
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
    if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "central directory" in text or "zip archive" in text:
        return f"truncated or corrupt checkpoint file ({text})"
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {text[:200]})"


# Out of memory, from Python or from torch's allocator (torch.OutOfMemoryError since torch 2.5).
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, *OUT_OF_MEMORY)


def _unavailable(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a file that could not be read *this time* (I/O or memory), worth retrying."""
    what = "out of memory" if isinstance(exc, OUT_OF_MEMORY) else f"{type(exc).__name__}: {exc}"
    return CheckpointError(path, f"could not be read, will retry ({what})", transient=True)


def _check_container(path: Path) -> None:
    """Size and zip layout, from the file's size and its central directory only.

    ``torch.save`` writes a zip archive of uncompressed records: a file that is bigger than any
    checkpoint we write, not a zip, or holds a compressed record (which could inflate to any size
    inside ``torch.load``) is refused before the loader reads it.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(path, "no such checkpoint file") from None
    except OSError as exc:
        raise _unavailable(path, exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(path, "not a regular file")
    size = info.st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(path, f"file of {size} bytes is over the {MAX_FILE_BYTES}-byte limit for a checkpoint")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
            if magic != b"PK\x03\x04":
                raise CheckpointError(
                    path,
                    "truncated or corrupt checkpoint file (empty)"
                    if not magic
                    else "not a PyTorch checkpoint (torch.save writes zip archives; this file is not one)",
                )
            directory = _central_directory_size(fh, size)
            if directory is not None and directory > MAX_DIRECTORY_BYTES:
                raise CheckpointError(
                    path, f"zip directory of {directory} bytes: a checkpoint's has a dozen records (~1 KB)"
                )
            fh.seek(0)
            with zipfile.ZipFile(fh) as archive:
                records = archive.infolist()
                compressed = [i.filename for i in records if i.compress_type != zipfile.ZIP_STORED]
                pickled = max((i.file_size for i in records if i.filename.endswith("data.pkl")), default=0)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(path, "no such checkpoint file") from None
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(path, _describe_load_failure(path, zipfile.BadZipFile(str(exc)))) from None
    except _READ_ERRORS as exc:
        raise _unavailable(path, exc) from None
    if compressed:
        raise CheckpointError(path, f"compressed records {compressed[:3]}: torch.save never compresses")
    if pickled > MAX_PICKLE_BYTES:
        # Unpickling builds Python objects several times the size of their bytes.
        raise CheckpointError(
            path, f"a data.pkl of {pickled} bytes: a checkpoint's structure and metadata take a few KB"
        )


def _central_directory_size(fh: BinaryIO, size: int) -> int | None:
    """The size the zip's end record declares for its central directory (None: no end record).

    ``zipfile`` reads and parses the whole directory when it opens an archive, one object per
    record: bounding the declared size first keeps a crafted directory from costing more than
    the few records a checkpoint has.
    """
    tail_length = min(size, _END_RECORD + 0xFFFF)  # the end record, then a comment of up to 64 KiB
    fh.seek(size - tail_length)
    tail = fh.read(tail_length)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END_RECORD:
        return None
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    locator = at - 20  # torch writes zip64 records: their locator sits just before the end record
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        fh.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
        record = fh.read(56)
        if record[:4] == b"PK\x06\x06":
            directory = int.from_bytes(record[40:48], "little")
    return directory


def expected_shapes(model_args: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``MLP(**model_args)``, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        model = MLP(**model_args, init=False)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _check_model_args(path: Path, model_args: dict[Any, Any]) -> dict[str, int]:
    for name, value in model_args.items():
        if name not in _ARG_DEFAULTS:
            raise CheckpointError(path, f"unknown model argument {name!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(path, f"model argument {name}={value!r} must be an integer")
    args = {**_ARG_DEFAULTS, **model_args}
    if args["in_features"] != IN_FEATURES or args["num_classes"] != NUM_CLASSES:
        raise CheckpointError(
            path,
            f"model_args {model_args} do not take {IN_FEATURES} pixels to {NUM_CLASSES} classes "
            f"(in_features={args['in_features']}, num_classes={args['num_classes']})",
        )
    if not 0 < args["hidden"] <= MAX_HIDDEN:
        raise CheckpointError(path, f"model argument hidden={args['hidden']!r} must be an integer in 1..{MAX_HIDDEN}")
    return dict(model_args)


def _check_tensors(path: Path, state_dict: dict[str, torch.Tensor], model_args: Mapping[str, int]) -> None:
    """Layout, keys, shapes and storage: metadata only, nothing proportional to the declared sizes."""
    for name, tensor in state_dict.items():
        # Sparse, quantized or meta tensors would fail later in surprising ways: refuse them here.
        if tensor.layout is not torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
            raise CheckpointError(path, f"{name} is not a dense CPU tensor ({tensor.layout}, {tensor.device})")
    expected = expected_shapes(model_args)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            path, f"state_dict keys do not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        got = state_dict[name]
        if tuple(got.shape) != shape:
            raise CheckpointError(
                path,
                f"wrong shape for {name}: expected {list(shape)} for model_args {model_args}, got {list(got.shape)}",
            )
        if not got.is_floating_point():
            raise CheckpointError(path, f"{name} has dtype {got.dtype}; floating-point weights expected")
        # A stride-0 (expanded) or overlapping view claims far more elements than its storage
        # holds: anything that reads it element by element (isfinite, a copy) would allocate
        # the claimed size. Saved parameters are contiguous, each in a storage of its own.
        needed = got.numel() * got.element_size()
        if not got.is_contiguous() or got.storage_offset() != 0 or got.untyped_storage().nbytes() != needed:
            raise CheckpointError(
                path,
                f"{name} is not a contiguous tensor in a storage of its own size (stride {list(got.stride())}, "
                f"storage {got.untyped_storage().nbytes()} bytes for {needed}): saved parameters always are",
            )


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read and structurally validate a checkpoint; raises :class:`CheckpointError`.

    Every check that bounds the work comes first: the file's size and zip layout before the
    loader reads it; then the architecture (784 in, 10 out, a bounded hidden size) and each
    tensor's keys, shape and storage, all from metadata. Only then may later steps (finite
    weights, the sha256, building the model) touch the values. An I/O or memory error is raised
    as a *transient* :class:`CheckpointError`: the file may well be fine on the next attempt.
    """
    path = Path(path)
    _check_container(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(path, "no such checkpoint file") from None
    except _READ_ERRORS as exc:
        raise _unavailable(path, exc) from None
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
    if not isinstance(model_args, dict) or not isinstance(meta, dict):
        raise CheckpointError(path, "'model_args' and 'meta' must be dictionaries")
    model_args = _check_model_args(path, model_args)
    _check_tensors(path, state_dict, model_args)
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError):
        raise CheckpointError(path, "'meta' must hold plain JSON data (strings, numbers, lists, dicts)") from None
    return Checkpoint(path=path, version=path.stem, state_dict=state_dict, model_args=model_args, meta=meta)


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> MLP:
    """Rebuild the network from the checkpoint's own arguments and load its weights strictly.

    ``ckpt`` comes from :func:`load_checkpoint`, whose checks bound every size used here.
    """
    for name, tensor in ckpt.state_dict.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(ckpt.path, f"{name} contains NaN or infinite weights")
    stored_sha = ckpt.meta.get("weights_sha256")
    if stored_sha is not None and stored_sha != weights_sha256(ckpt.state_dict):
        raise CheckpointError(ckpt.path, "weights do not match the sha256 recorded in the checkpoint (corrupted?)")
    try:
        model = MLP(**ckpt.model_args, init=False)
        model.load_state_dict({k: v.to(torch.float32) for k, v in ckpt.state_dict.items()}, strict=True)
        return model.to(device).eval()
    except OUT_OF_MEMORY as exc:
        raise _unavailable(ckpt.path, exc) from None


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[MLP, Checkpoint]:
    """Load, validate and rebuild: the model is returned on ``device`` in eval mode."""
    ckpt = load_checkpoint(path)
    return build_model(ckpt, device), ckpt
