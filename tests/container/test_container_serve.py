"""The image serves as production runs it: unprivileged, read-only root, healthy, every route."""

from __future__ import annotations

import pytest

from tests.container.conftest import FIXTURES, TEN_DIGITS, TEN_LABELS, Api, Containers, Engine, bundled_version, labels

SEVEN_PNG = (FIXTURES / "seven.png").read_bytes()
SEVEN_JSON = (FIXTURES / "seven.json").read_bytes()


@pytest.fixture(scope="module")
def served(containers: Containers) -> Api:
    return containers.api(volume=containers.volume())


def test_runs_as_the_unprivileged_user_on_a_read_only_root(engine: Engine, served: Api) -> None:
    config = engine.inspect(served.name)
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert engine("exec", served.name, "id", "-u").stdout.strip() == "10001"
    assert engine("exec", served.name, "id", "-g").stdout.strip() == "10001"
    # PID 1 is the launcher, as that user too (no root process in the container).
    status = engine("exec", served.name, "cat", "/proc/1/status").stdout
    assert any(line.split()[:2] == ["Uid:", "10001"] for line in status.splitlines()), status
    denied = engine("exec", served.name, "touch", "/app/written", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    engine("exec", served.name, "touch", "/tmp/written")  # the tmpfs is writable


def test_the_models_volume_starts_as_a_copy_of_the_bundled_model(engine: Engine, served: Api) -> None:
    version = bundled_version()
    listing = engine(
        "exec", served.name, "stat", "-c", "%u:%g %n", "/app/models", "/app/models/CURRENT", f"/app/models/{version}.pt"
    ).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["10001:10001"] * 3, listing
    assert engine("exec", served.name, "cat", "/app/models/CURRENT").stdout.strip() == version
    with served.client() as client:
        assert client.get("/model").json()["version"] == version


def test_healthy_through_the_images_own_healthcheck(engine: Engine, image: str, containers: Containers) -> None:
    check = engine("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image).stdout
    assert "/health/ready" in check, f"the image lost its HEALTHCHECK (build with --format docker): {check}"
    # The same check fails where nothing serves, so the pass below means something.
    idle = containers.run("--read-only", "--tmpfs", "/tmp", command=["sleep", "300"], prefix="idle")
    if engine.podman:
        assert not engine.healthcheck(idle)


def test_healthcheck_passes_on_the_serving_container(engine: Engine, served: Api) -> None:
    if engine.podman:
        assert engine.healthcheck(served.name)
    else:  # Docker runs the check itself, every 15 s after the start period
        pytest.skip("docker: the health status is asserted by Docker's own schedule (15 s interval)")


def test_predict_png_json_and_uint8(served: Api) -> None:
    with served.client() as client:
        png = client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"})
        assert png.status_code == 200, png.text
        assert labels(png.json()) == [7]
        assert png.headers["x-model-version"] == bundled_version()

        as_json = client.post("/predict", content=SEVEN_JSON, headers={"content-type": "application/json"})
        assert as_json.status_code == 200, as_json.text
        assert labels(as_json.json()) == [7]

        raw = client.post("/predict", content=TEN_DIGITS, headers={"content-type": "application/octet-stream"})
        assert raw.status_code == 200, raw.text
        assert labels(raw.json()) == TEN_LABELS

        bad = client.post("/predict", content=b"\0" * 1000, headers={"content-type": "application/octet-stream"})
        assert 400 <= bad.status_code < 500, bad.text  # a clear client error


def test_model_and_metrics(served: Api) -> None:
    with served.client() as client:
        client.post("/predict", content=SEVEN_PNG, headers={"content-type": "image/png"}).raise_for_status()
        model = client.get("/model").json()
        assert model["version"] == bundled_version()
        assert [w["version"] for w in model["workers"]] == [bundled_version()] * 2  # MNIST_WORKERS=2
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "mnist_http_requests_total" in metrics.text
        assert 'route="/predict"' in metrics.text


def test_v2_infer(served: Api) -> None:
    pixels = list(TEN_DIGITS[:784])  # the first digit, a 7
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8", "data": pixels}]}
    with served.client() as client:
        ready = client.get("/v2/models/mnist/ready")
        assert ready.status_code == 200
        answer = client.post("/v2/models/mnist/infer", json=body)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs, answer.json()
        assert outputs["label"]["data"] == [TEN_LABELS[0]], answer.json()
        assert len(outputs["probabilities"]["data"]) == 10
        assert answer.json()["model_version"] == bundled_version()
