"""HTTP benchmark: the service as deployed against the usual FastAPI endpoint and LitServe, one run.

    bash bench/run.sh [--quick]          # or: make bench BENCH_ARGS=--quick
    python bench/http_bench.py --help    # when wrk is already installed

Starts each server in turn on 127.0.0.1, with the same number of worker processes
(``--workers``, default ``MNIST_WORKERS`` or 2, as in the Dockerfile and compose.yaml):

* ``service``: ``python -m app``, exactly as deployed (access log on, pointer watch on), with
  micro-batching on and then off (``MNIST_MICROBATCH``);
* ``naive``: ``bench/naive_app.py``, the plain FastAPI endpoint (pydantic ``list[float]``,
  ``torch.tensor(list)``, a forward, ``.tolist()``), under uvicorn's defaults;
* ``litserve``: ``bench/litserve_app.py``, LitServe serving the same checkpoint.

All servers are started (one at a time, each timed from start to ready) and stay up, idle when
not driven. Each is checked with one request per workload (status 200 and the right answer),
then driven by ``wrk -t1`` (``bench/post.lua``) for ``--duration`` seconds per concurrency level,
the servers' cells interleaved so that noise from elsewhere on the machine hits them alike;
single-image cells are run three times (``--rounds``) and the median round is reported.
Workloads are real MNIST test digits: one JSON vector, one 28x28 PNG, one 280x280 RGB PNG as a
drawing pad sends it, a JSON batch of 1,000 vectors, and 10,000 raw uint8 images (also as
``.npy``, and with the compact ``Accept: application/octet-stream`` response).

The service is also timed from start to every worker ready, and the resident memory of each of
its workers is read from ``/proc`` after ~10,000 and after ~100,000 single-vector requests.

Prints one table (requests/s, predictions/s, p50 and p99 latency, errors = non-2xx responses
plus socket errors, and the ratio to the naive baseline at the same concurrency) and the
acceptance figures of docs/performance.md; writes both, with the raw numbers as JSON, to
``bench/results/``. wrk and the servers share this machine's cores, so compare ratios within
one run, on a quiet machine (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

# The environment the servers get, taken before anything is imported from the project: importing
# `training` sets OMP_WAIT_POLICY=ACTIVE for the trainer, which a deployed server does not have.
SERVER_ENV = dict(os.environ)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LUA = ROOT / "bench" / "post.lua"
RESULTS = ROOT / "bench" / "results"
# The servers' interpreter. bench/run.sh points it at .venv-serve: the service's dependencies
# with a CPU build of torch, as the Docker image installs them (not the dev venv's CUDA build).
SERVER_PYTHON = os.environ.get("BENCH_SERVER_PYTHON") or sys.executable


# --------------------------------------------------------------------------------------------
# Request bodies: real MNIST test digits


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 [N, 28, 28], white digit on black
    labels: np.ndarray  # int [N]
    source: str


def load_digits(data_dir: Path, count: int) -> Digits:
    """The first ``count`` MNIST test digits, or the ten fixture digits repeated when MNIST is absent."""
    import torch

    # One thread: a parallel op would leave an OpenMP worker spinning in this process (seen using
    # a whole core for the rest of a run, next to the servers being measured).
    torch.set_num_threads(1)
    try:
        from training.data import load_mnist

        test = load_mnist(data_dir, train=False, limit=count)
        images = (test.x.numpy().reshape(-1, 28, 28) * 255).round().astype(np.uint8)
        return Digits(images, test.y.numpy(), f"MNIST test set ({data_dir})")
    except Exception as exc:  # no data, no network: fall back to the committed fixtures
        fixture = ROOT / "tests" / "fixtures" / "ten_digits.u8"
        print(f"MNIST not available ({type(exc).__name__}: {exc}); using {fixture} repeated", file=sys.stderr)
        ten = np.frombuffer(fixture.read_bytes(), dtype=np.uint8).reshape(10, 28, 28)
        images = np.resize(ten, (count, 28, 28))
        labels = _label_fixture(ten)
        return Digits(images, np.resize(labels, count), str(fixture))


def _label_fixture(ten: np.ndarray) -> np.ndarray:
    from app.inference import predict_proba
    from app.registry import load_model, read_pointer, version_path

    version = read_pointer(ROOT / "models")
    assert version, "models/CURRENT is missing"
    model, _ = load_model(version_path(ROOT / "models", version))
    return predict_proba(model, ten.reshape(10, 784).astype(np.float32) / 255).argmax(axis=1)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_png(digit: np.ndarray) -> bytes:
    """A 280x280 RGB PNG as the digit pad (or a phone photo) sends it: dark ink on white paper."""
    ink = Image.fromarray(digit, mode="L").resize((200, 200), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(ink, (40, 40))
    paper = 255 - np.asarray(canvas)
    return _png(Image.fromarray(np.stack([paper] * 3, axis=-1), mode="RGB"))


def _vector(digit: np.ndarray) -> list[float]:
    # What a Python client sends: float64 pixels in [0, 1] (json.dumps writes the same text).
    return (digit.reshape(784).astype(np.float64) / 255).tolist()


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    content_type: str
    body: bytes
    items: int  # images per request
    expected: np.ndarray  # MNIST labels of those images
    accept: str = ""
    timeout_s: int = 10
    naive_path: str | None = None  # the naive and LitServe servers' route for it, if they have one

    @property
    def batch(self) -> bool:
        return self.items > 1


def make_workloads(digits: Digits) -> list[Workload]:
    images, labels = digits.images, digits.labels
    one, one_label = images[0], labels[:1]
    bulk = images[:10_000]
    npy = io.BytesIO()
    np.save(npy, bulk.reshape(-1, 784))
    json_batch = orjson.dumps({"instances": [_vector(d) for d in images[:1000]]})
    u8 = Workload(
        "u8",
        f"uint8 batch of {len(bulk):,}",
        "application/octet-stream",
        bulk.tobytes(),
        len(bulk),
        labels[: len(bulk)],
        timeout_s=120,
    )
    u8_binary = replace(u8, name="u8-bin", title=f"{u8.title}, binary answer", accept="application/octet-stream")
    return [
        Workload(
            "json1",
            "one JSON vector",
            "application/json",
            orjson.dumps({"pixels": _vector(one)}),
            1,
            one_label,
            naive_path="/predict",
        ),
        Workload("png28", "one 28x28 PNG", "image/png", _png(Image.fromarray(one, mode="L")), 1, one_label),
        Workload("png280", "one 280x280 RGB PNG", "image/png", drawn_png(one), 1, one_label),
        Workload(
            "json1000",
            "JSON batch of 1,000",
            "application/json",
            json_batch,
            1000,
            labels[:1000],
            timeout_s=120,
            naive_path="/predict/batch",
        ),
        u8,
        u8_binary,
        Workload(
            "npy",
            f".npy batch of {len(bulk):,}",
            "application/x-npy",
            npy.getvalue(),
            len(bulk),
            labels[: len(bulk)],
            timeout_s=120,
        ),
    ]


# --------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One server under test, started in its own process group so that all its processes stop."""

    key: str
    label: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    log_path: Path
    workloads: set[str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    ready_s: float | None = None

    def start(self, timeout: float = 120) -> None:
        log = self.log_path.open("wb")
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = self.started_s + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _, _ = request(self.port, "GET", self.ready_path, timeout=2)
                if status == 200:
                    self.ready_s = time.monotonic() - self.started_s
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.label} not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The serving processes: uvicorn's spawned workers, or the process itself with one worker."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        workers = [pid for pid in children if b"spawn_main" in _cmdline(pid)]
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
            pending += _children(pid)
        return total

    def settle(self, timeout: float = 60) -> None:
        """Wait until the server has finished the work wrk left in flight (it uses < 5 % of a core)."""
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.cpu_seconds()
            if now - before < 0.25 * 0.05:
                return
            before = now
        print(f"   ({self.label} still busy after {timeout:g} s; going on)", flush=True)


_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
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


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def torch_build(python: str) -> str:
    """``torch.__version__`` as the servers' interpreter sees it (``2.13.0+cpu``, ``2.14.1+cu130``)."""
    code = "import torch; print(torch.__version__)"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout.strip()


def make_servers(args: argparse.Namespace, logs: Path, runtime: Path) -> list[Server]:
    python = args.server_python
    workers = str(args.workers)
    base = {k: v for k, v in SERVER_ENV.items() if not k.startswith(("MNIST_", "PROMETHEUS_"))}
    base["PYTHONUNBUFFERED"] = "1"
    singles = {"json1", "png28", "png280"}
    servers: list[Server] = []
    for batching in ("on", "off"):
        key = f"service-batch-{batching}"
        env = {
            **base,
            "MNIST_HOST": "127.0.0.1",
            "MNIST_WORKERS": workers,
            "MNIST_RUNTIME_DIR": str(runtime / key),
            "MNIST_MICROBATCH": "true" if batching == "on" else "false",
        }
        servers.append(
            Server(
                key,
                f"service, micro-batching {batching}",
                [python, "-m", "app"],
                env,
                "/health/ready",
                logs / f"{key}.log",
                # Big requests never go through the micro-batcher: one run of them is enough.
                {w.name for w in args.workload_list} if batching == "on" else singles,
            )
        )
    servers.append(
        Server(
            "naive",
            "naive FastAPI",
            [python, "-m", "uvicorn", "bench.naive_app:app", "--host", "127.0.0.1", "--workers", workers],
            base,
            "/health/ready",
            logs / "naive.log",
            {"json1", "json1000"},
        )
    )
    servers.append(
        Server(
            "litserve",
            "LitServe",
            [python, str(ROOT / "bench" / "litserve_app.py"), "--workers", workers],
            base,
            "/health",
            logs / "litserve.log",
            {"json1", "json1000"},
        )
    )
    for server in servers:
        server.port = free_port()
        flag = "--port"
        if server.key.startswith("service"):
            server.env["MNIST_PORT"] = str(server.port)
        else:
            server.command += [flag, str(server.port)]
    return [s for s in servers if s.key.split("-batch")[0] in args.server_list or s.key in args.server_list]


# --------------------------------------------------------------------------------------------
# Checks and load


def check_answer(server: Server, workload: Workload) -> None:
    """One request: a 200 with a prediction per image, and (nearly) MNIST's labels."""
    path = _path(server, workload)
    headers = {"content-type": workload.content_type}
    if workload.accept:
        headers["accept"] = workload.accept
    status, response_headers, body = request(server.port, "POST", path, workload.body, headers)
    if status != 200:
        raise RuntimeError(f"{server.label} answered {workload.name} with {status}: {body[:300]!r}")
    if workload.accept == "application/octet-stream":
        probs = np.frombuffer(body, dtype="<f4").reshape(-1, 10)
        labels = probs.argmax(axis=1)
    else:
        doc = orjson.loads(body)
        entries = doc["predictions"] if workload.batch else [doc]
        labels = np.array([entry["label"] for entry in entries])
    if len(labels) != workload.items:
        raise RuntimeError(f"{server.label}: {len(labels)} predictions for {workload.items} images ({workload.name})")
    accuracy = float((labels == workload.expected).mean())
    if accuracy < 0.9:
        raise RuntimeError(f"{server.label}: accuracy {accuracy:.3f} on {workload.name}: wrong answers")


def _path(server: Server, workload: Workload) -> str:
    if server.key.startswith("service"):
        return "/predict"
    assert workload.naive_path is not None
    return workload.naive_path


@dataclass
class Cell:
    workload: str
    server: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    items: int
    ratio: float | None = None
    details: dict[str, int] = field(default_factory=dict)
    rounds: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def pps(self) -> float:
        return self.rps * self.items


def wrk(server: Server, workload: Workload, body_file: Path, concurrency: int, seconds: float) -> Cell:
    env = {
        **os.environ,
        "BENCH_BODY": str(body_file),
        "BENCH_CONTENT_TYPE": workload.content_type,
        "BENCH_ACCEPT": workload.accept,
    }
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={workload.timeout_s}s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{server.port}{_path(server, workload)}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + workload.timeout_s + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    raw = json.loads(line[len("BENCH ") :])
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return Cell(
        workload=workload.name,
        server=server.key,
        concurrency=concurrency,
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        max_ms=raw["max_us"] / 1e3,
        errors=raw["status"] + socket_errors,
        items=workload.items,
        details={k: raw[k] for k in ("status", "connect", "read", "write", "timeout")},
    )


@dataclass
class MemoryReport:
    pids: list[int]
    at_first: list[Memory]
    at_second: list[Memory]
    first_requests: int
    second_requests: int
    errors: int
    after_all: list[Memory] = field(default_factory=list)  # once every workload has run
    torch_alone: Memory | None = None

    @property
    def growth(self) -> list[float]:
        return [(b.rss - a.rss) / a.rss for a, b in zip(self.at_first, self.at_second, strict=True)]


def memory_run(server: Server, workload: Workload, body_file: Path, first: int, second: int) -> MemoryReport:
    """Memory of each worker after ~``first`` and after ~``second`` single-vector requests (wrk, c=64)."""
    pids = server.worker_pids()
    served = errors = first_count = 0
    at_first: list[Memory] = []
    while served < second:
        cell = wrk(server, workload, body_file, 64, 1)
        served += cell.requests
        errors += cell.errors
        if not at_first and served >= first:
            at_first, first_count = [Memory.of(pid) for pid in pids], served
    server.settle()
    return MemoryReport(pids, at_first, [Memory.of(pid) for pid in pids], first_count, served, errors)


def cell_seconds(workload: Workload, concurrency: int, single_s: float, base: float, cap: float, workers: int) -> float:
    """How long to drive a cell: ``base``, or for batches long enough to see ~3 rounds of requests.

    ``single_s`` is the mean latency of one request alone (from the c=1 cell). A server that
    computes its queued batches all at once (a threadpool) answers none of them for
    ``concurrency / workers * single_s`` seconds; a shorter cell would report nothing at all.
    """
    if not workload.batch:
        return base
    return max(base, min(cap, 3 * concurrency * single_s / workers))


# --------------------------------------------------------------------------------------------
# Report


def ratios(cells: list[Cell]) -> None:
    """Each cell against the naive FastAPI endpoint at the same concurrency.

    Single-image workloads compare requests/s with the naive one-vector JSON endpoint (the usual
    way); batch workloads compare predictions/s with its JSON batch endpoint.
    """
    naive = {(c.workload, c.concurrency): c for c in cells if c.server == "naive"}
    for cell in cells:
        reference = naive.get(("json1000" if cell.items > 1 else "json1", cell.concurrency))
        if reference is not None and reference.pps > 0:
            cell.ratio = cell.pps / reference.pps


def table(cells: list[Cell], workloads: list[Workload], servers: list[Server]) -> str:
    titles = {w.name: w.title for w in workloads}
    labels = {s.key: s.label for s in servers}
    order = {s.key: i for i, s in enumerate(servers)}
    lines = [
        "| workload | c | server | req/s | pred/s | p50 ms | p99 ms | errors | x naive |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    position = {w.name: i for i, w in enumerate(workloads)}
    for cell in sorted(cells, key=lambda c: (position[c.workload], c.concurrency, order[c.server])):
        ratio = f"{cell.ratio:.2f}" if cell.ratio is not None else "-"
        lines.append(
            f"| {titles[cell.workload]} | {cell.concurrency} | {labels[cell.server]} | {cell.rps:,.0f} | "
            f"{cell.pps:,.0f} | {cell.p50_ms:.1f} | {cell.p99_ms:.1f} | {cell.errors} | {ratio} |"
        )
    return "\n".join(lines)


def acceptance(cells: list[Cell], servers: list[Server], memory: MemoryReport | None, workers: int) -> list[str]:
    def find(workload: str, server: str, c: int) -> Cell | None:
        return next((x for x in cells if (x.workload, x.server, x.concurrency) == (workload, server, c)), None)

    lines = []
    on, off = find("json1", "service-batch-on", 64), find("json1", "service-batch-off", 64)
    best = max((x for x in (on, off) if x is not None), key=lambda x: x.rps, default=None)
    if on and off:
        winner = "on" if on.rps >= off.rps else "off"
        lines.append(
            f"micro-batching at c=64, one JSON vector: on {on.rps:,.0f} req/s, off {off.rps:,.0f} req/s: {winner} wins"
        )
    naive = find("json1", "naive", 64)
    if best and naive:
        lines.append(
            f"one JSON vector, c=64, {workers} worker(s) each: {best.rps / naive.rps:.2f}x naive "
            f"({best.rps:,.0f} vs {naive.rps:,.0f} req/s), errors {best.errors}, p99 {best.p99_ms:.1f} ms "
            "[target >= 4x, 0 errors, p99 < 30 ms]"
        )
    for name in ("png28", "png280"):
        png = [x for x in (find(name, "service-batch-on", 64), find(name, "service-batch-off", 64)) if x]
        if png and naive:
            top = max(png, key=lambda x: x.rps)
            target = " [target >= 2x]" if name == "png28" else ""
            lines.append(
                f"{name}, c=64: {top.rps:,.0f} req/s = {top.rps / naive.rps:.2f}x naive JSON req/s, "
                f"p99 {top.p99_ms:.1f} ms{target}"
            )
    for name, target in (("u8", 300_000), ("u8-bin", 300_000), ("npy", 300_000), ("json1000", 20_000)):
        mine = [x for x in cells if x.workload == name and x.server == "service-batch-on"]
        if mine:
            top = max(mine, key=lambda x: x.pps)
            lines.append(
                f"{name}: best {top.pps:,.0f} predictions/s (c={top.concurrency}, errors {top.errors}) "
                f"[target >= {target:,}]"
            )
    for server in servers:
        if server.key.startswith("service") and server.ready_s is not None:
            lines.append(f"{server.label}: start to all {workers} worker(s) ready in {server.ready_s:.2f} s [< 5 s]")
    if memory is not None:
        growth = ", ".join(f"{100 * g:+.1f} %" for g in memory.growth)
        lines.append(
            f"memory per worker after {memory.first_requests:,} single-vector requests: "
            f"{'; '.join(map(str, memory.at_first))}; after {memory.second_requests:,}: "
            f"{'; '.join(map(str, memory.at_second))}; RSS growth {growth}; errors {memory.errors} "
            "[< 400 MB, growth <= 10 %]"
        )
        if memory.after_all:
            lines.append(f"memory per worker after every workload: {'; '.join(map(str, memory.after_all))}")
        if memory.torch_alone is not None:
            lines.append(f"for scale, a process that only imports torch: {memory.torch_alone}")
    return lines


# --------------------------------------------------------------------------------------------


@contextmanager
def running(servers: list[Server], workers: int) -> Iterator[list[Server]]:
    """Start the servers one after the other (each timed alone), stop them all at the end."""
    try:
        for server in servers:
            server.start()
            if server.key.startswith("service"):
                _wait_all_workers(server, workers)
            print(f"   {server.label}: ready in {server.ready_s:.2f} s (port {server.port})", flush=True)
            server.settle()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _wait_all_workers(server: Server, workers: int, timeout: float = 60) -> None:
    """Every worker has loaded the model: ``GET /model`` lists them all (``app.workers``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = request(server.port, "GET", "/model")
        if status == 200 and len(orjson.loads(body)["workers"]) >= workers:
            server.ready_s = time.monotonic() - server.started_s
            return
        time.sleep(0.02)
    raise RuntimeError(f"{server.label}: not all {workers} workers ready after {timeout} s")


def drive(servers: list[Server], workload: Workload, body: Path, args: argparse.Namespace) -> list[Cell]:
    """Every server that has this workload, interleaved: at each concurrency level, one cell each.

    Running the servers' cells side by side in time means a burst of load from elsewhere on the
    machine hits them alike. Single-image workloads are run ``--rounds`` times and each cell
    reports its median round (errors summed over all rounds); batch cells are long enough as is.
    """
    for server in servers:
        check_answer(server, workload)
        if not workload.batch:
            wrk(server, workload, body, 16, 1)  # warm-up, not recorded
    rounds: dict[tuple[str, int], list[Cell]] = {}
    single_s = dict.fromkeys((s.key for s in servers), 0.0)
    for round_ in range(1 if workload.batch else args.rounds):
        for concurrency in args.concurrency_list:
            for server in servers:
                server.settle()
                seconds = cell_seconds(
                    workload, concurrency, single_s[server.key], args.duration, args.batch_cap, args.workers
                )
                cell = wrk(server, workload, body, concurrency, seconds)
                if concurrency == 1 and cell.requests:
                    single_s[server.key] = cell.seconds / cell.requests
                rounds.setdefault((server.key, concurrency), []).append(cell)
                print(
                    f"   {workload.title:38s} c={concurrency:<3d} {server.label:28s} {cell.rps:9,.1f} req/s "
                    f"{cell.pps:11,.0f} pred/s  p50 {cell.p50_ms:7.1f} ms  p99 {cell.p99_ms:7.1f} ms  "
                    f"errors {cell.errors}  ({cell.seconds:.0f} s{f', round {round_ + 1}' if round_ else ''})",
                    flush=True,
                )
    for server in servers:
        server.settle()
    return [median_cell(cells) for cells in rounds.values()]


def median_cell(cells: list[Cell]) -> Cell:
    """The round with the median throughput, with the errors of every round."""
    ordered = sorted(cells, key=lambda c: c.rps)
    middle = ordered[(len(ordered) - 1) // 2]
    errors = sum(c.errors for c in cells)
    details = {k: sum(c.details.get(k, 0) for c in cells) for k in middle.details}
    return replace(middle, errors=errors, details=details, rounds=len(cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast sanity run: 2 s cells, c=1 and 64, ~20k requests")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("MNIST_WORKERS", "2")))
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per cell (default 6; --quick: 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each single-image cell; the median is reported (--quick: 1)"
    )
    parser.add_argument(
        "--batch-cap", type=float, default=30.0, help="longest cell for slow batch servers (default 30; --quick: 8)"
    )
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    parser.add_argument("--servers", default="service,naive,litserve", help="any of service, naive, litserve")
    parser.add_argument(
        "--server-python",
        default=SERVER_PYTHON,
        help="interpreter the servers run under (default: $BENCH_SERVER_PYTHON, else this one)",
    )
    parser.add_argument("--workloads", default="json1,png28,png280,json1000,u8,u8-bin,npy")
    parser.add_argument("--memory-requests", default="10000,100000", help="RSS samples after these many requests")
    data_dir = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=data_dir, help="holding MNIST/raw (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the table and raw numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2.0
        args.rounds = 1
        args.batch_cap = 8.0
        if args.concurrency == parser.get_default("concurrency"):
            args.concurrency = "1,64"
        if args.memory_requests == parser.get_default("memory_requests"):
            args.memory_requests = "2000,20000"
    args.concurrency_list = [int(c) for c in args.concurrency.split(",")]
    args.server_list = set(args.servers.split(","))
    args.memory_list = [int(n) for n in args.memory_requests.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: run bench/run.sh (installs it with apt-get) or install wrk", file=sys.stderr)
        return 2
    digits = load_digits(args.data_dir, 10_000)
    wanted = args.workloads.split(",")
    args.workload_list = [w for w in make_workloads(digits) if w.name in wanted]
    workloads = {w.name: w for w in args.workload_list}
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    print(f"{started:%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} CPUs, load average {load_before[0]:.2f} (1 min)")
    build = torch_build(args.server_python)
    print(f"digits: {digits.source}; {args.workers} worker(s) per server; {args.duration:g} s per cell")
    print(f"servers: {args.server_python} (torch {build})")
    args.out.mkdir(parents=True, exist_ok=True)
    cells: list[Cell] = []
    memory: MemoryReport | None = None
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        scratch = Path(tmp)
        bodies = {}
        for workload in args.workload_list:
            bodies[workload.name] = scratch / f"{workload.name}.body"
            bodies[workload.name].write_bytes(workload.body)
        servers = [server for server in make_servers(args, args.out, scratch) if server.workloads & set(workloads)]
        print("\n== starting the servers", flush=True)
        with running(servers, args.workers):
            on = next((x for x in servers if x.key == "service-batch-on"), None)
            if on is not None and "json1" in workloads:  # first: the growth is the service's own
                first, second = args.memory_list
                memory = memory_run(on, workloads["json1"], bodies["json1"], first, second)
                memory.torch_alone = torch_import_memory(args.server_python)
                print(f"   memory after {memory.second_requests:,} requests: {'; '.join(map(str, memory.at_second))}")
            for name, workload in workloads.items():
                print(f"\n== {workload.title}", flush=True)
                cells += drive([x for x in servers if name in x.workloads], workload, bodies[name], args)
            if memory is not None and on is not None:
                memory.after_all = [Memory.of(pid) for pid in memory.pids]
    ratios(cells)
    load_after = os.getloadavg()
    text = table(cells, args.workload_list, servers)
    summary = acceptance(cells, servers, memory, args.workers)
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; {args.workers} worker(s) per server; torch {build}; "
        f"wrk -t1, {args.duration:g} s per cell, single-image cells the median of {args.rounds} rounds; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"\n{header}\n\n{text}\n")
    for line in summary:
        print(f"- {line}")
    stamp = f"{started:%Y%m%dT%H%M%S}"
    (args.out / f"http-{stamp}.md").write_text(f"{header}\n\n{text}\n\n" + "".join(f"- {x}\n" for x in summary))
    raw = {
        "header": header,
        "cells": [{**c.__dict__, "rps": c.rps, "pps": c.pps} for c in cells],
        "memory": memory.__dict__ if memory else None,
        "ready_s": {s.key: s.ready_s for s in servers},
    }
    (args.out / f"http-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"\nwritten: {args.out / f'http-{stamp}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
