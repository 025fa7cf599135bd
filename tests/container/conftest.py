"""Real containers from the real Dockerfile: the engine, the image (built once per run), helpers.

The engine is whichever of Podman and Docker *works* (``podman info`` / ``docker info`` succeed;
a ``docker`` client with no daemon behind it does not count). Where the shared
``../shared/container/podman-setup.sh`` exists (these offline VMs) it is run first: it makes a
rootful Podman usable, imports a local stand-in for the base image and prints the build
arguments that let pip inside a build reach the package index. With no working engine every
test here skips with a one-line reason.

Knobs (environment):
  MNIST_CONTAINER_ENGINE   podman or docker: use only that one
  MNIST_TEST_IMAGE         an image already built from this Dockerfile: use it, build nothing
  MNIST_TEST_BUILD_ARGS    extra build arguments, shell-quoted (e.g. --build-arg TORCH_INDEX=...)

The image is tagged ``localhost/mnist-serve:test`` and kept, so the next run's build reuses its
layers (only a pyproject.toml change rebuilds the dependency layer). Every container, volume and
compose project a test creates has a unique name and is removed at teardown.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = ROOT.parent / "shared" / "container" / "podman-setup.sh"
SHARED_DATA = Path(os.environ.get("MNIST_SHARED_DATA", ROOT.parent / "shared" / "data"))
FIXTURES = ROOT / "tests" / "fixtures"
# The first ten MNIST test images as raw uint8 (10 x 784 bytes), and their labels.
TEN_DIGITS = (FIXTURES / "ten_digits.u8").read_bytes()
TEN_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
TEST_IMAGE = "localhost/mnist-serve:test"
LABEL = "mnist-serve-test=1"
BUILD_TIMEOUT = 45 * 60
SETUP_TIMEOUT = 15 * 60

_REPORT = pytest.StashKey[list[str]]()
_STARTED = pytest.StashKey[float]()
_ENDED = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.container)
            # Whichever test comes first pays for the setup and the image build.
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT + BUILD_TIMEOUT + 600))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("container") is not None:
        item.config.stash.setdefault(_STARTED, time.monotonic())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if item.get_closest_marker("container") is not None:
        item.config.stash[_ENDED] = time.monotonic()  # after this item's fixtures are torn down


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = list(config.stash.get(_REPORT, []))
    started = config.stash.get(_STARTED, None)
    if started is None:
        return
    took = config.stash.get(_ENDED, time.monotonic()) - started
    lines.append(f"container suite: {took:.0f} s in all (engine setup and image build included)")
    terminalreporter.section("container suite")
    for line in lines:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Print a line now (seen with -s) and again in the run's summary (always seen)."""

    def add(line: str) -> None:
        print(line)
        pytestconfig.stash[_REPORT].append(line)

    return add


# --- the engine ------------------------------------------------------------------------------------


@dataclass
class Engine:
    cli: str
    build_args: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.cli} {shlex.join(args)} -> {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    @property
    def podman(self) -> bool:
        return self.cli == "podman"

    def inspect(self, name: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self("inspect", name).stdout)[0]

    def healthcheck(self, name: str) -> bool:
        """Run the image's HEALTHCHECK once (Podman) or read Docker's verdict; True when healthy."""
        if self.podman:
            return self("healthcheck", "run", name, check=False, timeout=30).returncode == 0
        state = self.inspect(name)["State"].get("Health") or {}
        return bool(state.get("Status") == "healthy")

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return (result.stdout + result.stderr)[-4000:]


def _setup_podman() -> list[str]:
    """Run the shared setup script; the build arguments it prints."""
    result = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=SETUP_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        # The script exists to make containers work on this machine: its failure is a failure.
        pytest.fail(f"{SETUP_SCRIPT} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("PODMAN_BUILD_ARGS", "LOCAL_INDEX"):
            values[key] = shlex.split(value)[0] if value.strip() else ""
    args = shlex.split(values.get("PODMAN_BUILD_ARGS", ""))
    if values.get("LOCAL_INDEX"):
        args += ["--build-arg", f"TORCH_INDEX={values['LOCAL_INDEX']}"]
    # The script imports a stand-in under the base image's tag (no registry is reachable), which
    # has its own digest: build from the tag instead of the Dockerfile's pinned digest.
    args += ["--build-arg", "BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm"]
    return args


def _works(cli: str) -> str | None:
    """None when ``cli info`` succeeds, else why not (one short phrase)."""
    if shutil.which(cli) is None:
        return "not installed"
    try:
        result = subprocess.run([cli, "info"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "`info` timed out"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["failed"])[-1]
        return f"`{cli} info` failed ({last[:100]})"
    return None


@pytest.fixture(scope="session")
def engine() -> Engine:
    wanted = os.environ.get("MNIST_CONTAINER_ENGINE", "").strip()
    candidates = [wanted] if wanted else ["podman", "docker"]
    build_args: list[str] = []
    if "podman" in candidates and SETUP_SCRIPT.is_file() and os.geteuid() == 0:
        build_args = _setup_podman()
    reasons = []
    for cli in candidates:
        why = _works(cli)
        if why is None:
            engine = Engine(cli, build_args if cli == "podman" else [])
            if engine.podman and "--format" not in engine.build_args:
                engine.build_args += ["--format", "docker"]  # OCI images drop HEALTHCHECK
            engine.build_args += shlex.split(os.environ.get("MNIST_TEST_BUILD_ARGS", ""))
            return engine
        reasons.append(f"{cli}: {why}")
    pytest.skip("no working container engine (" + "; ".join(reasons) + ")")


@pytest.fixture(scope="session")
def image(engine: Engine, report: Callable[[str], None], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image, built once per run from this checkout's Dockerfile with the default extras."""
    given = os.environ.get("MNIST_TEST_IMAGE")
    if given:
        engine("image", "inspect", given)
        return given
    log = tmp_path_factory.mktemp("build") / "build.log"
    previous = _image_id(engine, TEST_IMAGE)
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            [engine.cli, "build", *engine.build_args, "--label", LABEL, "-t", TEST_IMAGE, str(ROOT)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=BUILD_TIMEOUT,
        )
    took = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"{engine.cli} build failed after {took:.0f} s:\n{log.read_text()[-4000:]}")
    # The previous run's image, untagged by this build, goes; the intermediate images (the layer
    # cache, which carry the label too, so no label-filtered prune) stay for the next run.
    if previous and previous != _image_id(engine, TEST_IMAGE):
        engine("rmi", previous, check=False, timeout=600)
    size = int(engine("image", "inspect", "--format", "{{.Size}}", TEST_IMAGE).stdout.strip())
    report(f"image {TEST_IMAGE}: built in {took:.0f} s with {engine.cli}, {size / 1e9:.2f} GB (EXTRAS=train)")
    return TEST_IMAGE


def _image_id(engine: Engine, name: str) -> str | None:
    found = engine("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return found.stdout.strip() or None if found.returncode == 0 else None


# --- containers, volumes and HTTP ---------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"mnist-test-{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Api:
    name: str
    url: str

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]


class Containers:
    """Starts containers and volumes with unique names; removes them all at teardown."""

    def __init__(self, engine: Engine, image: str) -> None:
        self.engine, self.image = engine, image
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self) -> str:
        name = unique("models")
        self.engine("volume", "create", "--label", LABEL, name)
        self.volumes.append(name)
        return name

    def run(self, *args: str, command: list[str] | None = None, prefix: str = "c") -> str:
        name = unique(prefix)
        self.names.append(name)
        self.engine("run", "-d", "--name", name, "--label", LABEL, *args, self.image, *(command or []), timeout=180)
        return name

    def api(self, *args: str, volume: str | None = None, env: dict[str, str] | None = None) -> Api:
        """The service as production runs it: read-only root, tmpfs /tmp, one published port."""
        port = free_port()
        options = ["--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8000", "--stop-timeout", "30"]
        if volume is not None:
            options += ["-v", f"{volume}:/app/models"]
        for key, value in (env or {}).items():
            options += ["-e", f"{key}={value}"]
        name = self.run(*options, *args, prefix="api")
        api = Api(name, f"http://127.0.0.1:{port}")
        wait_ready(self.engine, api)
        return api

    def cleanup(self) -> None:
        for name in self.names:
            # -v: the anonymous volume the image's VOLUME gets when no named one is mounted there.
            now = ["--time", "0"] if self.engine.podman else []
            self.engine("rm", "--force", "--volumes", *now, name, check=False, timeout=120)
        for name in self.volumes:
            self.engine("volume", "rm", "-f", name, check=False)


def wait_ready(engine: Engine, api: Api, workers: int = 2, timeout: float = 180) -> None:
    """Until every worker (the image runs MNIST_WORKERS=2) has loaded the model and reports it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(api.url + "/health/ready", timeout=5).status_code == 200:
                model = httpx.get(api.url + "/model", timeout=5).json()
                if len(model["workers"]) == workers and all(w["version"] for w in model["workers"]):
                    return
        except httpx.HTTPError:
            pass
        state = engine.inspect(api.name)["State"]
        if not state.get("Running"):
            raise AssertionError(f"{api.name} exited ({state.get('ExitCode')}):\n{engine.logs(api.name)}")
        time.sleep(0.5)
    raise AssertionError(f"{api.name} not ready after {timeout:.0f} s:\n{engine.logs(api.name)}")


@pytest.fixture(scope="module")
def containers(engine: Engine, image: str) -> Iterator[Containers]:
    made = Containers(engine, image)
    yield made
    made.cleanup()


def labels(answer: dict) -> list[int]:  # type: ignore[type-arg]
    """The digits in a /predict answer: one image answers a prediction, several a batch."""
    return [p["label"] for p in answer["predictions"]] if "predictions" in answer else [answer["label"]]


def bundled_version() -> str:
    return (ROOT / "models" / "CURRENT").read_text().strip()
