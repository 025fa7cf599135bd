"""The model lifecycle in one worker: last-good fallback at startup, problems reported, retries, admin reach."""

from __future__ import annotations

import asyncio
import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app
from app.registry import (
    CheckpointError,
    atomic_write,
    publish,
    read_last_good,
    read_pointer,
    record_last_good,
    version_path,
)
from app.store import ModelStore
from tests.helpers import publish_variant, write_bad_version

TOKEN = "s3cret-token"


def _point(models_dir: Path, content: bytes) -> None:
    """Write CURRENT as an operator's mistake would: any bytes, no checks."""
    atomic_write(models_dir / "CURRENT", lambda fh: fh.write(content))


@pytest.fixture
def folder(models_dir: Path, bundled_checkpoint: Path) -> tuple[Path, str]:
    """The bundled model plus a good variant, published (so LAST_GOOD names it)."""
    good = publish_variant(models_dir, bundled_checkpoint, seed=5, publish=False)
    publish(models_dir, good, lambda path: None)
    assert read_last_good(models_dir) == good
    return models_dir, good


def _store(models_dir: Path, **settings: object) -> ModelStore:
    return ModelStore(Settings(model_dir=models_dir, reload_interval=0, **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "file", "reason"),
    [
        ("pointer-undecodable", "CURRENT", "not UTF-8 text"),
        ("pointer-empty", "CURRENT", "is empty"),
        ("pointer-absent", "CURRENT", "does not exist"),
        ("pointer-garbage", "CURRENT", "does not name a version"),
        ("missing-file", "v990-gone.pt", "no such checkpoint file"),
        ("truncated", "v990-truncated.pt", "truncated or corrupt"),
        ("inaccurate", "v990-inaccurate.pt", "below the minimum"),
        ("nan", "v990-nan.pt", "NaN or infinite"),
    ],
)
def test_a_bad_current_starts_on_the_last_good_version(
    folder: tuple[Path, str], bundled_checkpoint: Path, kind: str, file: str, reason: str
) -> None:
    models_dir, good = folder
    if kind == "pointer-undecodable":
        _point(models_dir, b"\xff\n")
    elif kind == "pointer-empty":
        _point(models_dir, b"")
    elif kind == "pointer-absent":
        (models_dir / "CURRENT").unlink()
    elif kind == "pointer-garbage":
        _point(models_dir, b"../../etc/passwd\n")
    elif kind == "missing-file":
        _point(models_dir, b"v990-gone\n")
    else:
        write_bad_version(models_dir, bundled_checkpoint, kind, f"v990-{kind}")
    store = _store(models_dir)
    served = store.start()
    assert served.version == good
    assert store.current is served
    assert store.problem is not None
    assert store.problem["file"] == str(models_dir / file)
    assert reason in store.problem["error"]
    assert store.problem["serving"] == f"{good} (the last good version)"
    # The folder is left as the operator left it: repairing CURRENT is their call.
    assert read_last_good(models_dir) == good
    # The watch finds what startup found: nothing new to try, nothing new to report.
    problem = dict(store.problem)
    asyncio.run(store.poll())
    assert store.problem == problem
    assert store.reloads == {"success": 0, "failure": 0}
    assert store.current is served


def test_without_last_good_the_newest_version_that_passes_serves(models_dir: Path, bundled_checkpoint: Path) -> None:
    older = publish_variant(models_dir, bundled_checkpoint, seed=6)
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v980-inaccurate")
    write_bad_version(models_dir, bundled_checkpoint, "truncated", "v981-truncated")  # newest, and current
    assert read_last_good(models_dir) is None
    store = _store(models_dir)
    assert store.start().version == older
    assert store.problem is not None
    assert store.problem["file"] == str(version_path(models_dir, "v981-truncated"))
    assert store.problem["serving"] == f"{older} (the newest version that passes)"
    assert read_last_good(models_dir) == older  # served, so recorded


def test_a_stale_last_good_record_is_skipped(folder: tuple[Path, str], bundled_checkpoint: Path) -> None:
    models_dir, good = folder
    write_bad_version(models_dir, bundled_checkpoint, "truncated", "v990-truncated")
    version_path(models_dir, good).unlink()  # LAST_GOOD names a file that is gone
    store = _store(models_dir)
    assert store.start().version == bundled_checkpoint.stem  # the newest version that passes
    assert store.problem is not None
    assert "truncated" in store.problem["error"]


def test_startup_fails_only_when_no_version_passes(models_dir: Path, bundled_checkpoint: Path) -> None:
    version_path(models_dir, bundled_checkpoint.stem).unlink()
    write_bad_version(models_dir, bundled_checkpoint, "nan", "v970-nan")
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v971-inaccurate")
    with pytest.raises(CheckpointError, match="no stored version can be served") as info:
        _store(models_dir).start()
    message = str(info.value)
    assert "v970-nan.pt: lin_1.weight contains NaN" in message
    assert "v971-inaccurate.pt: canary accuracy" in message
    for path in models_dir.glob("*.pt"):
        path.unlink()
    with pytest.raises(CheckpointError, match="holds no versions"):
        _store(models_dir).start()


def test_a_pinned_model_path_never_falls_back(models_dir: Path, bundled_checkpoint: Path) -> None:
    write_bad_version(models_dir, bundled_checkpoint, "truncated", "v960-truncated")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _store(models_dir, model_path=version_path(models_dir, "v960-truncated")).start()


def _fallbacks(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "mnist_model_fallbacks":
            return sum(s.value for s in family.samples if s.name == "mnist_model_fallbacks_total")
    return 0.0


def test_the_problem_is_on_model_and_ready_and_counted(folder: tuple[Path, str], bundled_checkpoint: Path) -> None:
    models_dir, good = folder
    with TestClient(create_app(Settings(model_dir=models_dir, reload_interval=0))) as client:
        healthy = client.get("/health/ready")
        assert healthy.status_code == 200
        assert healthy.json() == {"status": "ready", "model_version": good, "problem": None}
        before = _fallbacks(client)
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v990-inaccurate")
    with TestClient(create_app(Settings(model_dir=models_dir, reload_interval=0))) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 200  # a model serves: keep sending traffic
        assert ready.json()["model_version"] == good
        problem = ready.json()["problem"]
        assert problem["file"] == str(version_path(models_dir, "v990-inaccurate"))
        assert "below the minimum" in problem["error"]
        info = client.get("/model").json()
        assert info["version"] == good
        assert info["problem"] == problem
        assert info["last_good_version"] == good
        assert info["workers"][0]["problem"] == problem
        assert _fallbacks(client) == before + 1


def test_the_watch_clears_the_problem_once_current_is_good_again(
    folder: tuple[Path, str], bundled_checkpoint: Path
) -> None:
    models_dir, good = folder
    _point(models_dir, b"\xff\n")
    store = _store(models_dir)
    store.start()
    assert store.problem is not None
    asyncio.run(store.poll())  # still broken: still reported, no reload attempted
    assert store.problem is not None
    assert store.reloads == {"success": 0, "failure": 0}
    newer = publish_variant(models_dir, bundled_checkpoint, seed=7)
    asyncio.run(store.poll())
    assert store.serving_version == newer
    assert store.problem is None
    assert read_last_good(models_dir) == newer


def test_a_watch_rejection_is_a_problem_until_current_changes(
    folder: tuple[Path, str], bundled_checkpoint: Path
) -> None:
    models_dir, good = folder
    store = _store(models_dir)
    store.start()
    assert store.problem is None
    write_bad_version(models_dir, bundled_checkpoint, "nan", "v990-nan")
    asyncio.run(store.poll())
    assert store.serving_version == good
    assert store.problem is not None
    assert "NaN" in store.problem["error"]
    assert store.problem["serving"] == f"{good} (kept)"
    _point(models_dir, f"{good}\n".encode())
    asyncio.run(store.poll())
    assert store.problem is None


def test_a_transient_read_error_is_retried_with_backoff_and_converges(
    folder: tuple[Path, str], bundled_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file (same mtime and size) that could not be *read* is tried again: it was never refused.

    The disk answers EIO to the first two reads of the new version; the worker retries after
    0.5 s, then 1 s, and converges, while a file that was read and refused is never retried.
    """
    import torch

    models_dir, good = folder
    store = _store(models_dir)
    store.start()
    newer = publish_variant(models_dir, bundled_checkpoint, seed=8)
    real_load = torch.load
    reads: list[str] = []

    def flaky_disk(path: object, *args: object, **kwargs: object) -> object:
        reads.append(str(path))
        if Path(str(path)).stem == newer and len(reads) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_load(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "load", flaky_disk)

    async def scenario() -> None:
        await store.poll()  # EIO: not a verdict on the file
        assert store.serving_version == good
        assert store.last_reload_error is not None
        assert "could not be read, will retry (OSError: [Errno 5]" in store.last_reload_error["error"]
        assert store.problem is None
        await store.poll()  # within the 0.5 s backoff: not read again
        assert len(reads) == 1
        await asyncio.sleep(0.6)
        await store.poll()  # EIO again: the next wait is 1 s
        assert len(reads) == 2
        await asyncio.sleep(0.3)
        await store.poll()  # within the 1 s backoff
        assert len(reads) == 2
        await asyncio.sleep(0.8)
        await store.poll()
        assert store.serving_version == newer

    asyncio.run(scenario())
    assert store.reloads == {"success": 1, "failure": 2}
    assert read_last_good(models_dir) == newer


# -- the admin route and the workers it reaches ----------------------------------------------


def _admin(models_dir: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(model_dir=models_dir, admin_token=TOKEN, **settings)))  # type: ignore[arg-type]


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"reload_interval": 0}, "the pointer watch is off (MNIST_RELOAD_INTERVAL=0)"),
        ({"reload_interval": 1}, "MNIST_MODEL_PATH pins every worker"),
    ],
)
def test_admin_reload_that_cannot_reach_every_worker_is_409(
    folder: tuple[Path, str], bundled_checkpoint: Path, settings: dict[str, object], why: str
) -> None:
    models_dir, good = folder
    if "pins" in why:
        settings = {**settings, "model_path": version_path(models_dir, good)}
    other = publish_variant(models_dir, bundled_checkpoint, seed=9, publish=False)
    with _admin(models_dir, workers=2, **settings) as client:
        for body in ({"version": other}, {"previous": True}, None):
            response = client.post("/admin/reload", json=body, headers=_auth())
            assert response.status_code == 409
            detail = response.json()["detail"]
            assert why in detail
            assert "would switch only this worker" in detail
        assert client.get("/model").json()["version"] == good
    assert read_pointer(models_dir) == good  # nothing moved


def test_admin_reload_with_one_worker_and_the_watch_off_is_allowed(
    folder: tuple[Path, str], bundled_checkpoint: Path
) -> None:
    models_dir, good = folder
    other = publish_variant(models_dir, bundled_checkpoint, seed=10, publish=False)
    with _admin(models_dir, reload_interval=0, workers=1) as client:
        response = client.post("/admin/reload", json={"version": other}, headers=_auth())
        assert response.status_code == 200
        body = response.json()
        assert (body["version"], body["previous"]) == (other, good)
        assert (body["workers_total"], body["workers_serving"]) == (1, 1)
    assert read_pointer(models_dir) == read_last_good(models_dir) == other


def test_admin_rollback_goes_to_the_version_before(folder: tuple[Path, str], bundled_checkpoint: Path) -> None:
    models_dir, good = folder
    newer = publish_variant(models_dir, bundled_checkpoint, seed=11, publish=False)
    with _admin(models_dir, reload_interval=0) as client:
        assert client.post("/admin/reload", json={"version": newer}, headers=_auth()).status_code == 200
        rolled = client.post("/admin/reload", json={"previous": True}, headers=_auth())
        assert rolled.status_code == 200
        assert rolled.json()["version"] == good
        assert rolled.json()["note"] == f"rolled back to {good}: the version before {newer}"
        assert read_pointer(models_dir) == good
        both = client.post("/admin/reload", json={"version": newer, "previous": True}, headers=_auth())
        assert both.status_code == 422
        # The oldest version has nothing before it.
        oldest = bundled_checkpoint.stem
        assert client.post("/admin/reload", json={"version": oldest}, headers=_auth()).status_code == 200
        nothing = client.post("/admin/reload", json={"previous": True}, headers=_auth())
        assert nothing.status_code == 409
        assert "no version older than" in nothing.json()["detail"]
        assert client.get("/model").json()["version"] == oldest


def test_admin_reload_reports_a_transient_failure_as_503(folder: tuple[Path, str]) -> None:
    models_dir, good = folder
    loop_path = models_dir / "v995-loop.pt"
    loop_path.symlink_to(loop_path)
    _point(models_dir, b"v995-loop\n")
    with _admin(models_dir, reload_interval=0) as client:
        assert client.get("/model").json()["version"] == good  # startup: retried, then fell back
        response = client.post("/admin/reload", headers=_auth())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "will retry" in response.json()["detail"]
        loop_path.unlink()
        shutil.copy2(version_path(models_dir, good), loop_path)
        assert client.post("/admin/reload", headers=_auth()).json()["version"] == "v995-loop"
        assert client.get("/health/ready").json()["problem"] is None


def test_last_good_is_written_only_when_it_changes(folder: tuple[Path, str]) -> None:
    models_dir, good = folder
    before = (models_dir / "LAST_GOOD").stat().st_mtime_ns
    assert record_last_good(models_dir, good) is False
    assert (models_dir / "LAST_GOOD").stat().st_mtime_ns == before


def test_admin_publish_that_cannot_write_the_pointer_is_503_and_changes_nothing(
    folder: tuple[Path, str], bundled_checkpoint: Path
) -> None:
    models_dir, good = folder
    other = publish_variant(models_dir, bundled_checkpoint, seed=12, publish=False)
    (models_dir / "LAST_GOOD").unlink()
    (models_dir / "LAST_GOOD").mkdir()  # cannot be replaced by a file, even by root
    with _admin(models_dir, reload_interval=0) as client:
        assert client.get("/model").json()["version"] == good  # a worker serves without recording
        response = client.post("/admin/reload", json={"version": other}, headers=_auth())
        assert response.status_code == 503
        assert "could not write the pointer" in response.json()["detail"]
        assert "nothing was published" in response.json()["detail"]
        assert client.get("/model").json()["version"] == good
    assert read_pointer(models_dir) == good


_THREADS = """
import sys, torch
from fastapi.testclient import TestClient
from threadpoolctl import threadpool_info
from app.config import Settings
from app.main import create_app
with TestClient(create_app(Settings(model_dir=sys.argv[1], reload_interval=0, torch_threads=int(sys.argv[2])))):
    blas = sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
    print(torch.get_num_threads(), *blas)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_startup_sets_torch_and_numpy_blas_threads(models_dir: Path, threads: int) -> None:
    """torch_threads applies to torch and to numpy's BLAS (the image resize), whose idle threads would spin."""
    out = subprocess.run(
        [sys.executable, "-c", _THREADS, str(models_dir), str(threads)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    assert out[0] == str(threads)
    assert out[1:] == [str(threads)]  # numpy's OpenBLAS found, and limited
