"""What each worker process serves, shared through small files so any worker can report all.

Uvicorn's ``--workers N`` starts N processes with no shared memory; a request reaches one of
them. Each worker writes ``<runtime>/workers/<pid>.json`` whenever its model changes, and
``GET /model`` lists every live worker's file. The runtime folder is keyed by the supervisor's
pid, so two servers on one machine never mix their workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["WorkerRegistry", "default_runtime_dir", "pid_alive"]


def default_runtime_dir() -> Path:
    explicit = os.environ.get("MNIST_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    parent = multiprocessing.parent_process()
    # Under a supervisor (uvicorn --workers, our launcher) the workers share its pid;
    # a lone process keys the folder by its own.
    owner = parent.pid if parent is not None and parent.pid is not None else os.getpid()
    return Path(tempfile.gettempdir()) / f"mnist-serve-{owner}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerRegistry:
    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or default_runtime_dir()) / "workers"
        self.pid = os.getpid()

    @property
    def _own(self) -> Path:
        return self.dir / f"{self.pid}.json"

    def publish(self, status: dict[str, Any]) -> None:
        # Imported here: app.registry brings torch, and the launcher's supervisor process, which
        # imports this module for default_runtime_dir() (through app.metrics), never publishes.
        from app.registry import atomic_write

        data = json.dumps({"pid": self.pid, **status}, default=str).encode()
        try:
            atomic_write(self._own, lambda fh: fh.write(data))
        except OSError:
            pass  # reporting is best effort; serving must not depend on a writable /tmp

    def remove(self) -> None:
        self._own.unlink(missing_ok=True)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live worker's last status, ordered by pid."""
        workers = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid = status.get("pid")
            if isinstance(pid, int) and pid_alive(pid):
                workers.append(status)
            elif isinstance(pid, int):
                path.unlink(missing_ok=True)  # left behind by a killed worker
        return sorted(workers, key=lambda s: s["pid"])
