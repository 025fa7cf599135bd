"""The servers under test: how each is started, known ready, stopped, and what it is sent.

Every server runs in its own process group on 127.0.0.1 with the same number of workers (or
instances, or replicas) as the service, started from the repository root:

* ``service-batch-on`` / ``service-batch-off``: ``python -m app`` exactly as deployed, with
  micro-batching on (the default) and off;
* ``naive``: :mod:`bench.peers.naive` under ``uvicorn --workers N``; ``litserve``:
  :mod:`bench.peers.litserve_app` (both in the service's bench venv);
* ``triton``, ``mlserver``, ``bentoml``, ``ray``, ``ray-64``: in their own venvs
  (:mod:`bench.venvs`), ``ray`` with Ray's default ``max_ongoing_requests`` and ``ray-64``
  with 64.

The harness only talks to them over HTTP. This module also reads ``/proc``: a server's process
tree, its CPU time (to wait until it is idle) and each worker's memory.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench import workloads as wl
from bench.workloads import Request, Workload

ROOT = Path(__file__).resolve().parent.parent
# Every peer the harness knows, in the order the table lists them.
PEERS = ("naive", "litserve", "triton", "mlserver", "bentoml", "ray", "ray-64")
# Stands for the port in a server's command and environment: a free one is picked at each start.
PORT = "{port}"
# The peers that need a venv of their own (bench.venvs), by server key.
PEER_ENVS = {"triton": "triton", "mlserver": "mlserver", "bentoml": "bentoml", "ray": "ray", "ray-64": "ray"}


def shown(path: Path) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@dataclass
class Server:
    """One server under test, started in its own process group so that all its processes stop."""

    key: str
    label: str
    kind: str  # "service" or "peer"
    command: list[str]
    env: dict[str, str]
    ready_path: str
    log_path: Path
    python: str  # the interpreter of its venv
    # Workload name -> the requests this server is sent for it (one per protocol it speaks).
    requests: dict[str, list[Request]] = field(default_factory=dict)
    workers: int = 1
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    ready_s: float | None = None
    version: str = ""
    notes: str = ""
    install_s: float | None = None  # how long building its venv took, in this run
    idle_cores: float = 0.0  # CPU it uses with nothing to do, in cores

    def start(self, timeout: float = 180, attempts: int = 1) -> None:
        """Start and wait until ready; ``attempts`` > 1 tries again (on a fresh port) after a failed start."""
        for attempt in range(1, attempts + 1):
            try:
                self._start(timeout)
                return
            except RuntimeError as exc:
                self.stop()
                if attempt == attempts:
                    raise
                print(f"   {self.label}: {exc}; starting again", flush=True)

    def _start(self, timeout: float) -> None:
        # The port is picked now, not when the server was defined: another program may have taken
        # one picked minutes ago, and would then answer the readiness check in its place.
        self.port = free_port()
        command = [part.replace(PORT, str(self.port)) for part in self.command]
        env = {k: v.replace(PORT, str(self.port)) for k, v in self.env.items()}
        log = self.log_path.open("ab")
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = self.started_s + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {shown(self.log_path)}")
            try:
                status, _, _ = request(self.port, "GET", self.ready_path, timeout=2)
                if status == 200:
                    self.ready_s = time.monotonic() - self.started_s
                    if self.kind == "service":
                        self._wait_all_workers(deadline)
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.label} not ready after {timeout:g} s; see {shown(self.log_path)}")

    def _wait_all_workers(self, deadline: float) -> None:
        """Every worker has loaded the model: ``GET /model`` lists them all."""
        while time.monotonic() < deadline:
            status, _, body = request(self.port, "GET", "/model")
            if status == 200 and len(orjson.loads(body).get("workers", ())) >= self.workers:
                self.ready_s = time.monotonic() - self.started_s
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.label}: not all {self.workers} workers ready; see {shown(self.log_path)}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The serving processes: uvicorn's spawned workers, or the process itself with one worker."""
        assert self.proc is not None
        workers = [pid for pid in children(self.proc.pid) if b"spawn_main" in _cmdline(pid)]
        return workers or [self.proc.pid]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's whole process tree so far."""
        assert self.proc is not None
        pending, total = [self.proc.pid], 0.0
        while pending:
            pid = pending.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICKS
            pending += children(pid)
        return total

    def measure_idle(self, seconds: float = 2.0) -> None:
        """The share of a core the server uses on its own, with no request in flight (after start)."""
        before = self.cpu_seconds()
        time.sleep(seconds)
        self.idle_cores = max(0.0, (self.cpu_seconds() - before) / seconds)

    def settle(self, timeout: float = 60) -> None:
        """Wait until the server has finished the work wrk left in flight.

        Idle means using less than 5 % of a core more than it does on its own (Ray's control
        processes, for one, poll all the time: :meth:`measure_idle`).
        """
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.cpu_seconds()
            if now - before < 0.25 * (0.05 + self.idle_cores):
                return
            before = now
        print(f"   ({self.label} still busy after {timeout:g} s; going on)", flush=True)


_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Children started by any thread of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@dataclass(frozen=True)
class Memory:
    """One process's memory in MB: resident, proportional (shared pages split) and private."""

    rss: float
    pss: float
    private: float

    @classmethod
    def of(cls, pid: int) -> Memory:
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0])
        private = fields["Private_Clean"] + fields["Private_Dirty"]
        return cls(fields["Rss"] / 1024, fields["Pss"] / 1024, private / 1024)

    def __str__(self) -> str:
        return f"{self.rss:.0f} MB RSS ({self.pss:.0f} PSS, {self.private:.0f} private)"


def torch_import_memory(python: str) -> Memory:
    """What ``import torch`` alone costs a process here: the floor under any worker's RSS."""
    code = "import torch, sys; sys.stdout.write('ok'); sys.stdout.flush(); sys.stdin.read()"
    proc = subprocess.Popen([python, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if proc.stdout is None or proc.stdout.read(2) != b"ok":
            raise RuntimeError("a python process importing torch did not start")
        return Memory.of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def python_info(python: str | Path, distributions: tuple[str, ...] = ()) -> dict[str, str]:
    """``torch``'s build, Python's version and the named distributions' versions, as ``python`` sees them."""
    code = (
        "import importlib.metadata as m, platform, sys, json\n"
        "out = {'python': platform.python_version()}\n"
        "try:\n import torch; out['torch'] = torch.__version__\n"
        "except ImportError: pass\n"
        "for d in sys.argv[1:]:\n"
        " try: out[d] = m.version(d)\n"
        " except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *distributions], capture_output=True, text=True, check=True, timeout=120
    )
    return dict(orjson.loads(done.stdout))


# --------------------------------------------------------------------------------------------
# The servers and what each is sent


def _base_env() -> dict[str, str]:
    # The service's own settings come from the harness, never from the caller's environment; an
    # OpenMP wait policy a trainer set for itself is no deployed server's setting either.
    skip = ("MNIST_", "PROMETHEUS_", "OMP_WAIT_POLICY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pick(workloads: Mapping[str, Workload], build: Mapping[str, Callable[[Workload], list[Request]]]) -> dict:
    return {name: make(workloads[name]) for name, make in build.items() if name in workloads}


def service_requests(workloads: Mapping[str, Workload], batching: bool) -> dict[str, list[Request]]:
    build: dict[str, Callable[[Workload], list[Request]]] = {
        "vector": lambda w: [wl.predict_json(w), wl.v2_json(w)],
        "png28": lambda w: [wl.image_body(w, "image/png"), wl.v2_png_binary(w)],
        "png280": lambda w: [wl.image_body(w, "image/png")],
        "jpeg280": lambda w: [wl.image_body(w, "image/jpeg")],
    }
    if batching:  # big requests never go through the micro-batcher: one run of them is enough
        build |= {
            "batch1000": lambda w: [wl.predict_json(w), wl.v2_binary(w)],
            "phone": lambda w: [wl.image_body(w, "image/jpeg")],
            "u8": lambda w: [wl.uint8_body(w), wl.uint8_body(w, binary_answer=True), wl.npy_body(w)],
        }
    return _pick(workloads, build)


def _predict_style(workloads: Mapping[str, Workload]) -> dict[str, list[Request]]:
    return _pick(
        workloads,
        {"vector": lambda w: [wl.predict_json(w)], "batch1000": lambda w: [wl.predict_json(w, "/predict/batch")]},
    )


def make_service(
    python: str,
    workers: int,
    batching: bool,
    workloads: Mapping[str, Workload],
    logs: Path,
    runtime: Path,
    device: str | None = None,
) -> Server:
    key = f"service-batch-{'on' if batching else 'off'}"
    port = PORT
    env = _base_env() | {
        "MNIST_HOST": "127.0.0.1",
        "MNIST_PORT": str(port),
        "MNIST_WORKERS": str(workers),
        "MNIST_RUNTIME_DIR": str(runtime / key),
        "MNIST_MICROBATCH": "true" if batching else "false",
    }
    if device:
        env["MNIST_DEVICE"] = device
    return Server(
        key,
        f"service, micro-batching {'on' if batching else 'off'}",
        "service",
        [python, "-m", "app"],
        env,
        "/health/ready",
        logs / f"{key}.log",
        python,
        service_requests(workloads, batching),
        workers,
        0,  # chosen at start
    )


def make_peer(
    key: str, python: str, workers: int, workloads: Mapping[str, Workload], logs: Path, runtime: Path
) -> Server:
    """The peer ``key`` (one of :data:`PEERS`) under ``python``, with ``workers`` workers."""
    port = PORT
    env = _base_env() | {"PYTHONPATH": str(ROOT)}
    n = str(workers)
    if key == "naive":
        command = [python, "-m", "uvicorn", "bench.peers.naive:app", "--host", "127.0.0.1", "--port", str(port)]
        return Server(
            key,
            "naive FastAPI",
            "peer",
            [*command, "--workers", n],
            env,
            "/health/ready",
            logs / f"{key}.log",
            python,
            _predict_style(workloads),
            workers,
            0,  # chosen at start
        )
    if key == "litserve":
        command = [python, "-m", "bench.peers.litserve_app", "--port", str(port), "--workers", n]
        return Server(
            key,
            "LitServe",
            "peer",
            command,
            env,
            "/health",
            logs / f"{key}.log",
            python,
            _predict_style(workloads),
            workers,
            0,  # chosen at start
        )
    if key == "triton":
        # The Python backend stub must load this interpreter's libpython, not a system one.
        base = subprocess.run(
            [python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, check=True
        ).stdout.strip()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [f"{base}/lib", env.get("LD_LIBRARY_PATH", "")]))
        requests = _pick(
            workloads,
            {
                "vector": lambda w: [wl.v2_json(w)],
                "batch1000": lambda w: [wl.v2_binary(w, "mnist_batch")],
                "png28": lambda w: [wl.v2_png_binary(w, "mnist_png", (len(w.images), 1))],
            },
        )
        command = [python, "-m", "bench.peers.triton", "--port", str(port), "--instances", n]
        return Server(
            key,
            "Triton (PyTriton)",
            "peer",
            command,
            env,
            "/v2/models/mnist_png/ready",  # the last model bound: all are loaded
            logs / f"{key}.log",
            python,
            requests,
            workers,
            0,  # chosen at start
            notes=f"{n} instances, dynamic batching (max 64 rows)",
        )
    if key == "mlserver":
        requests = _pick(
            workloads,
            {
                "vector": lambda w: [wl.v2_json(w)],
                "batch1000": lambda w: [wl.v2_json(w)],
                "png28": lambda w: [wl.v2_png_base64(w)],
            },
        )
        workdir = runtime / key
        command = [
            python,
            "-m",
            "bench.peers.mlserver_runtime",
            "--port",
            str(port),
            "--workers",
            n,
            "--workdir",
            str(workdir),
        ]
        return Server(
            key,
            "MLServer",
            "peer",
            command,
            env,
            "/v2/models/mnist/ready",
            logs / f"{key}.log",
            python,
            requests,
            workers,
            0,  # chosen at start
            notes=f"{n} parallel workers, no adaptive batching",
        )
    if key == "bentoml":
        env |= {"BENCH_WORKERS": n, "BENTOML_DO_NOT_TRACK": "true"}
        bentoml = str(Path(python).with_name("bentoml"))
        command = [bentoml, "serve", "bench.peers.bentoml_service:Mnist", "--host", "127.0.0.1", "--port", str(port)]
        return Server(
            key,
            "BentoML",
            "peer",
            command,
            env,
            "/readyz",
            logs / f"{key}.log",
            python,
            _predict_style(workloads),
            workers,
            0,  # chosen at start
            notes=f"{n} workers, no adaptive batching",
        )
    if key in ("ray", "ray-64"):
        env |= {"RAY_USAGE_STATS_ENABLED": "0"}
        command = [python, "-m", "bench.peers.ray_app", "--port", str(port), "--replicas", n]
        label, notes = "Ray Serve", f"{n} replicas, max_ongoing_requests 5 (Ray's default)"
        if key == "ray-64":
            command += ["--max-ongoing", "64"]
            label, notes = "Ray Serve, 64 ongoing", f"{n} replicas, max_ongoing_requests 64"
        return Server(
            key,
            label,
            "peer",
            command,
            env,
            "/health",
            logs / f"{key}.log",
            python,
            _predict_style(workloads),
            workers,
            0,  # chosen at start
            notes=notes,
        )
    raise ValueError(f"unknown peer {key!r}: pick from {', '.join(PEERS)}")


# The distributions whose versions a peer's row names.
DISTRIBUTIONS = {
    "naive": ("fastapi", "uvicorn"),
    "litserve": ("litserve",),
    "triton": ("nvidia-pytriton",),
    "mlserver": ("mlserver",),
    "bentoml": ("bentoml",),
    "ray": ("ray",),
    "ray-64": ("ray",),
}
