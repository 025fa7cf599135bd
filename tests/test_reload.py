"""Reload logic in-process: validation before the swap, the pointer watch, the admin route."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.registry import atomic_write, read_last_good, read_pointer
from app.store import ModelStore, ReloadError
from tests.helpers import publish_variant, write_bad_version

TOKEN = "s3cret-token"
SEVEN_PNG = (Path(__file__).parent / "fixtures" / "seven.png").read_bytes()


@pytest.fixture
def store(models_dir: Path) -> ModelStore:
    store = ModelStore(Settings(model_dir=models_dir, reload_interval=0))
    store.start()
    return store


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated or corrupt"),
        ("wrong-shapes", "wrong shape for lin_2.weight"),
        ("nan", "NaN or infinite"),
        ("inaccurate", "below the minimum"),
        ("pickle", "refused by the safe loader"),
    ],
)
def test_bad_versions_are_rejected_and_the_old_model_keeps_serving(
    store: ModelStore, models_dir: Path, bundled_checkpoint: Path, tmp_path: Path, kind: str, reason: str
) -> None:
    before = store.current
    marker = tmp_path / "code-ran"
    version = write_bad_version(models_dir, bundled_checkpoint, kind, f"v900-{kind}", marker)
    asyncio.run(store.poll())
    assert store.current is before
    assert store.last_reload_error is not None
    assert store.last_reload_error["version"] == version
    assert reason in store.last_reload_error["error"]
    assert store.last_reload_error["at"]
    assert store.reloads == {"success": 0, "failure": 1}
    assert not marker.exists()
    # The same rejected file is not retried on every poll.
    asyncio.run(store.poll())
    assert store.reloads["failure"] == 1


def test_poll_swaps_to_a_valid_new_version(store: ModelStore, models_dir: Path, bundled_checkpoint: Path) -> None:
    old = store.current
    assert old is not None
    version = publish_variant(models_dir, bundled_checkpoint, seed=1)
    asyncio.run(store.poll())
    assert store.current is not old
    assert store.current is not None
    assert store.current.version == version
    assert store.reloads == {"success": 1, "failure": 0}
    assert not store.current.model.training
    asyncio.run(store.poll())  # nothing new: nothing happens
    assert store.reloads["success"] == 1


def test_explicit_publish_moves_both_pointers(store: ModelStore, models_dir: Path, bundled_checkpoint: Path) -> None:
    first = store.serving_version
    second = publish_variant(models_dir, bundled_checkpoint, seed=2, publish=False)
    served = asyncio.run(store.publish(second))
    assert served.version == second
    assert read_pointer(models_dir) == second
    assert read_last_good(models_dir) == second
    asyncio.run(store.publish(str(first)))  # rollback
    assert store.serving_version == first
    assert read_pointer(models_dir) == first
    assert read_last_good(models_dir) == first
    with pytest.raises(ValueError, match="invalid model version"):
        asyncio.run(store.reload("../etc/passwd"))


def test_failed_publish_raises_and_keeps_the_pointer(
    store: ModelStore, models_dir: Path, bundled_checkpoint: Path
) -> None:
    current = store.serving_version
    write_bad_version(models_dir, bundled_checkpoint, "nan", "v901-nan")
    from app.registry import write_pointer

    write_pointer(models_dir, str(current))
    with pytest.raises(ReloadError, match="NaN"):
        asyncio.run(store.publish("v901-nan"))
    assert read_pointer(models_dir) == current
    assert store.serving_version == current


# -- the admin route ---------------------------------------------------------------------------


@pytest.fixture
def admin_client(models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model_dir=models_dir, reload_interval=0, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        yield client


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_admin_is_404_without_a_configured_token(models_dir: Path) -> None:
    with TestClient(create_app(Settings(model_dir=models_dir, reload_interval=0))) as client:
        assert client.post("/admin/reload").status_code == 404
        assert client.post("/admin/reload", headers=_auth()).status_code == 404


def test_admin_requires_the_right_token(admin_client: TestClient) -> None:
    missing = admin_client.post("/admin/reload")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert admin_client.post("/admin/reload", headers={"authorization": "Basic abc"}).status_code == 401
    assert admin_client.post("/admin/reload", headers=_auth("wrong")).status_code == 403
    assert admin_client.post("/admin/reload", headers=_auth(TOKEN + "x")).status_code == 403
    ok = admin_client.post("/admin/reload", headers=_auth())
    assert ok.status_code == 200
    assert ok.json()["version"] == ok.json()["previous"]


def test_admin_reload_publish_and_rollback(
    admin_client: TestClient, models_dir: Path, bundled_checkpoint: Path
) -> None:
    first = admin_client.get("/model").json()["version"]
    second = publish_variant(models_dir, bundled_checkpoint, seed=3, publish=False)

    response = admin_client.post("/admin/reload", json={"version": second}, headers=_auth())
    assert response.status_code == 200
    assert response.json()["version"] == second
    assert response.json()["previous"] == first
    assert read_pointer(models_dir) == second
    predicted = admin_client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"})
    assert predicted.json()["model_version"] == second

    rollback = admin_client.post("/admin/reload", json={"version": first}, headers=_auth())
    assert rollback.status_code == 200
    assert rollback.json()["version"] == first
    assert read_pointer(models_dir) == first
    assert admin_client.get("/model").json()["version"] == first


def test_admin_reload_errors(admin_client: TestClient, models_dir: Path, bundled_checkpoint: Path) -> None:
    current = admin_client.get("/model").json()["version"]
    unknown = admin_client.post("/admin/reload", json={"version": "20990101T000000Z-nothere"}, headers=_auth())
    assert unknown.status_code == 404
    assert "no stored version" in unknown.json()["detail"]
    assert admin_client.post("/admin/reload", json={"version": "../x"}, headers=_auth()).status_code == 422
    assert admin_client.post("/admin/reload", json={"versoin": "x"}, headers=_auth()).status_code == 422

    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v902-bad")
    from app.registry import write_pointer

    write_pointer(models_dir, current)
    rejected = admin_client.post("/admin/reload", json={"version": "v902-bad"}, headers=_auth())
    assert rejected.status_code == 422
    assert "below the minimum" in rejected.json()["detail"]
    assert f"still serving {current}" in rejected.json()["detail"]
    info = admin_client.get("/model").json()
    assert info["version"] == current
    assert info["last_reload_error"]["version"] == "v902-bad"
    assert "below the minimum" in info["last_reload_error"]["error"]
    assert read_pointer(models_dir) == current


def test_unusual_tensors_are_rejections_not_errors(
    admin_client: TestClient, models_dir: Path, bundled_checkpoint: Path
) -> None:
    """A checkpoint torch can write but the service cannot use (sparse weights): a recorded rejection, never a 500."""
    raw = torch.load(bundled_checkpoint, weights_only=True)
    raw["state_dict"]["lin_1.weight"] = raw["state_dict"]["lin_1.weight"].to_sparse()
    raw["meta"].pop("weights_sha256", None)
    version = "v904-sparse"
    atomic_write(models_dir / f"{version}.pt", lambda fh: torch.save(raw, fh))
    response = admin_client.post("/admin/reload", json={"version": version}, headers=_auth())
    assert response.status_code == 422
    assert admin_client.get("/model").json()["last_reload_error"]["version"] == version
    assert admin_client.post("/predict", json={"pixels": [0.0] * 784}).status_code == 200


def test_publish_runs_the_same_gate_as_the_service(models_dir: Path, bundled_checkpoint: Path) -> None:
    from training.publish import main as publish_main

    current = read_pointer(models_dir)
    write_bad_version(models_dir, bundled_checkpoint, "inaccurate", "v903-untrained")
    from app.registry import write_pointer

    write_pointer(models_dir, str(current))
    assert publish_main(["v903-untrained", "--models-dir", str(models_dir)]) == 1
    assert read_pointer(models_dir) == current
    assert publish_main(["v903-untrained", "--models-dir", str(models_dir), "--min-accuracy", "0"]) == 0
    assert read_pointer(models_dir) == "v903-untrained"


def test_admin_checks_the_token_before_reading_the_body(models_dir: Path, admin_client: TestClient) -> None:
    with TestClient(create_app(Settings(model_dir=models_dir, reload_interval=0))) as disabled:
        assert disabled.post("/admin/reload", content=b"{not json").status_code == 404
    assert admin_client.post("/admin/reload", content=b"x" * 10_000_000).status_code == 401
    assert admin_client.post("/admin/reload", content=b"x" * 10_000, headers=_auth()).status_code == 413
    malformed = admin_client.post("/admin/reload", content=b"{not json", headers=_auth())
    assert malformed.status_code == 422
    assert 'expected {"version": "..."}' in malformed.json()["detail"]
