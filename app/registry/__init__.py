"""The model registry: the model lifecycle shared by the service, the trainer and the tools.

* :mod:`~app.registry.model`: the MLP, the one definition of the network;
* :mod:`~app.registry.checkpoint`: the file format (atomic save, safe load, structural checks);
* :mod:`~app.registry.canary`: the behaviour gate a model passes before it may serve;
* :mod:`~app.registry.versions`: the versions folder and its ``CURRENT`` pointer.

It imports nothing else of ``app``, so ``training/`` can use it without the HTTP service.
"""

from app.registry.canary import CANARY_PATH, Canary, CanaryFailure, load_canary, validate_candidate
from app.registry.checkpoint import (
    FORMAT,
    INPUT_CONVENTION,
    Checkpoint,
    CheckpointError,
    atomic_write,
    build_model,
    load_checkpoint,
    load_model,
    new_version_id,
    weights_sha256,
    write_checkpoint,
)
from app.registry.model import MLP
from app.registry.versions import (
    POINTER_NAME,
    SUFFIX,
    check_version,
    list_versions,
    read_pointer,
    save_checkpoint,
    version_path,
    write_pointer,
)

__all__ = [
    "CANARY_PATH",
    "FORMAT",
    "INPUT_CONVENTION",
    "MLP",
    "POINTER_NAME",
    "SUFFIX",
    "Canary",
    "CanaryFailure",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "build_model",
    "check_version",
    "list_versions",
    "load_canary",
    "load_checkpoint",
    "load_model",
    "new_version_id",
    "read_pointer",
    "save_checkpoint",
    "validate_candidate",
    "version_path",
    "weights_sha256",
    "write_checkpoint",
    "write_pointer",
]
