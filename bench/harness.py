"""The HTTP benchmark: the service as deployed against its peers, one run, one table, the targets.

    bash bench/run.sh [--quick] [--record]     # or: make bench BENCH_ARGS=--quick
    python -m bench --help                     # when wrk and the servers' venvs are there

Every server gets the same number of workers (``--workers``, default ``MNIST_WORKERS`` or 2, as
in the Dockerfile) and is timed from start to ready. The service (micro-batching on and off),
the naive FastAPI endpoint and LitServe are started first and stay up, idle when not driven;
their cells are interleaved in time so that noise from elsewhere on the machine hits them alike.
The peers with venvs of their own (Triton, MLServer, BentoML, Ray Serve with its default
``max_ongoing_requests`` and with 64) run after them, one at a time, each alone on the machine.

Before it is timed, every server is sent each of its requests once and must answer them as the
service does (the same labels, and for pixel inputs every probability within 1e-4); a server
that does not is left out of that cell with the reason. Then wrk (``bench/post.lua``) drives
each cell for ``--duration`` seconds at each concurrency; single-image cells are run
``--rounds`` times and the median round is reported. The service is also timed from start to
every worker ready, and the memory of each of its workers is read from ``/proc`` after
``--memory-requests`` single-vector requests.

Prints the report (:mod:`bench.report`: the targets of :mod:`bench.targets`, every cell with
its protocol and its ratio to the naive server) and writes it, with the raw results as JSON, to
``bench/results/``; ``--record`` also makes this run the one docs/performance.md shows. wrk and
the servers share this machine's cores: compare ratios within one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import report, venvs
from bench.load import Cell, WrongAnswer, cell_seconds, check, median_cell, wrk
from bench.servers import (
    DISTRIBUTIONS,
    PEER_ENVS,
    PEERS,
    Memory,
    Server,
    make_peer,
    make_service,
    python_info,
    request,
    torch_import_memory,
)
from bench.workloads import Request, Workload, load_digits, make_workloads

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVICE = "service"
# The servers that stay up together (quiet when idle); the others run alone, one at a time.
CORE = ("service-batch-on", "service-batch-off", "naive", "litserve")
WORKLOADS = ("vector", "batch1000", "png28", "png280", "jpeg280", "phone", "u8")


@dataclass
class Run:
    """What a run gathers as it goes."""

    args: argparse.Namespace
    bodies: Path
    cells: list[Cell] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    references: dict[str, np.ndarray] = field(default_factory=dict)

    def skip(self, server: Server, workload: Workload, protocol: str, reason: str) -> None:
        print(f"   {server.label}, {workload.title}, {protocol}: not measured: {reason}", flush=True)
        self.skipped.append(
            {"server": server.label, "workload": workload.title, "protocol": protocol, "reason": reason}
        )

    def body_file(self, req: Request) -> Path:
        path = self.bodies / f"{hashlib.sha256(req.body).hexdigest()[:16]}.body"
        if not path.exists():
            path.write_bytes(req.body)
        return path


def drive(run: Run, servers: list[Server], workload: Workload) -> None:
    """Check, then time, every server's requests for ``workload``, the servers' cells interleaved."""
    args = run.args
    active: list[tuple[Server, Request]] = []
    # One request's time alone, per server and protocol: the check's until a c=1 cell measures it.
    single_s: dict[tuple[str, str], float] = {}
    for server in servers:
        for req in server.requests.get(workload.name, []):
            reference = run.references.get(workload.name)
            started = time.monotonic()
            try:
                probs = check(server, workload, req, reference)
            except WrongAnswer as exc:
                run.skip(server, workload, req.protocol, f"wrong answer: {exc}")
                continue
            except OSError as exc:
                run.skip(server, workload, req.protocol, f"no answer: {exc}")
                continue
            single_s[(server.key, req.protocol)] = time.monotonic() - started
            if reference is None and server.kind == "service":
                run.references[workload.name] = probs  # the service's answer is what peers must match
            active.append((server, req))
            if not workload.batch:
                wrk(server, workload, req, run.body_file(req), 16, 1)  # warm-up, not recorded
    rounds: dict[tuple[str, str, int], list[Cell]] = {}
    for round_ in range(1 if workload.batch else args.rounds):
        for concurrency in args.concurrency_list:
            for server, req in active:
                server.settle()
                seconds = cell_seconds(
                    workload,
                    concurrency,
                    single_s.get((server.key, req.protocol), 0.0),
                    args.duration,
                    args.batch_cap,
                    args.workers,
                )
                try:
                    cell = wrk(server, workload, req, run.body_file(req), concurrency, seconds)
                except RuntimeError as exc:
                    run.skip(server, workload, f"{req.protocol}, c={concurrency}", str(exc))
                    continue
                if concurrency == 1 and cell.requests:
                    single_s[(server.key, req.protocol)] = cell.seconds / cell.requests
                rounds.setdefault((server.key, req.protocol, concurrency), []).append(cell)
                print(
                    f"   {workload.title:22s} c={concurrency:<3d} {server.label:30s} {req.protocol:26s} "
                    f"{cell.rps:9,.1f} req/s {cell.pps:10,.0f} pred/s  p50 {cell.p50_ms:7.1f} ms  "
                    f"p99 {cell.p99_ms:7.1f} ms  errors {cell.errors}"
                    f"{f'  (round {round_ + 1})' if round_ else ''}",
                    flush=True,
                )
    for server in servers:
        server.settle()
    run.cells += [median_cell(cells) for cells in rounds.values()]


@dataclass
class MemoryReport:
    pids: list[int]
    at_first: list[Memory]
    at_second: list[Memory]
    first_requests: int
    second_requests: int
    errors: int
    after_all: list[Memory] = field(default_factory=list)
    torch_alone: Memory | None = None


def memory_run(run: Run, server: Server, workload: Workload, first: int, second: int) -> MemoryReport:
    """Memory of each worker after ~``first`` and after ~``second`` single-vector requests (wrk, c=64)."""
    req = server.requests[workload.name][0]
    pids = server.worker_pids()
    served = errors = first_count = 0
    at_first: list[Memory] = []
    while served < second:
        cell = wrk(server, workload, req, run.body_file(req), 64, 1)
        served += cell.requests
        errors += cell.errors
        if not at_first and served >= first:
            at_first, first_count = [Memory.of(pid) for pid in pids], served
    server.settle()
    return MemoryReport(pids, at_first, [Memory.of(pid) for pid in pids], first_count, served, errors)


@contextmanager
def running(servers: list[Server], attempts: int = 1) -> Iterator[list[Server]]:
    """Start the servers one after the other (each timed alone), stop them all at the end."""
    try:
        for server in servers:
            server.start(attempts=attempts)
            server.settle()  # the start's own work (imports, model loads, warm-ups) done
            server.measure_idle()
            print(
                f"   {server.label}: ready in {server.ready_s:.2f} s (port {server.port}); "
                f"idle, it uses {100 * server.idle_cores:.0f} % of a core",
                flush=True,
            )
        yield servers
    finally:
        for server in servers:
            server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a fast sanity run: 2 s cells, c=1 and 64, one round")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("MNIST_WORKERS", "2")),
        help="per server (default %(default)s)",
    )
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per cell (default 6; --quick: 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each single-image cell, median reported (default 3)"
    )
    parser.add_argument(
        "--batch-cap", type=float, default=30.0, help="longest cell for slow batch servers (default 30; --quick: 8)"
    )
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated connection counts (default %(default)s)"
    )
    parser.add_argument(
        "--servers",
        default=",".join((SERVICE, *PEERS)),
        help=f"comma-separated, any of {SERVICE}, {', '.join(PEERS)} (default: all)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all: %(default)s)")
    parser.add_argument(
        "--server-python",
        default=os.environ.get("BENCH_SERVER_PYTHON") or sys.executable,
        help="interpreter of the service, naive and LitServe (default: $BENCH_SERVER_PYTHON, else this one)",
    )
    parser.add_argument(
        "--memory-requests", default="10000,100000", help="RSS samples after these many requests, or 'none'"
    )
    parser.add_argument(
        "--device",
        help="the service's MNIST_DEVICE (default: its own, auto); for a GPU profile: --device cuda with a "
        "--server-python whose torch has CUDA, e.g. --servers service --workloads vector,u8",
    )
    parser.add_argument("--no-install", action="store_true", help="skip peers whose venv is not built yet")
    parser.add_argument("--install-timeout", type=float, default=1500, help="seconds per peer venv install")
    data_dir = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=data_dir, help="holding MNIST/raw (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the report, results and logs")
    parser.add_argument("--record", action="store_true", help="make this run the recorded one (docs/performance.md)")
    args = parser.parse_args(argv)
    if args.quick:
        if args.duration == parser.get_default("duration"):
            args.duration = 2.0
        args.rounds = 1
        args.batch_cap = 8.0
        if args.concurrency == parser.get_default("concurrency"):
            args.concurrency = "1,64"
        if args.memory_requests == parser.get_default("memory_requests"):
            args.memory_requests = "2000,20000"
    args.concurrency_list = [int(c) for c in args.concurrency.split(",")]
    args.server_list = [s for s in args.servers.split(",") if s]
    unknown = set(args.server_list) - {SERVICE, *PEERS}
    if unknown:
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}")
    args.workload_names = [w for w in args.workloads.split(",") if w]
    if set(args.workload_names) - set(WORKLOADS):
        parser.error(f"unknown workload(s) {', '.join(sorted(set(args.workload_names) - set(WORKLOADS)))}")
    args.memory_list = [] if args.memory_requests == "none" else [int(n) for n in args.memory_requests.split(",")]
    if args.memory_list and len(args.memory_list) != 2:
        parser.error("--memory-requests takes two counts, or 'none'")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _servers(
    args: argparse.Namespace, workloads: dict[str, Workload], logs: Path, runtime: Path
) -> tuple[list[Server], list[dict]]:
    """The servers to run, in table order, and a row for each peer skipped before starting (no venv)."""
    servers: list[Server] = []
    rows: list[dict] = []
    if SERVICE in args.server_list:
        for batching in (True, False):
            servers.append(
                make_service(args.server_python, args.workers, batching, workloads, logs, runtime, args.device)
            )
    for key in PEERS:
        if key not in args.server_list:
            continue
        python = args.server_python
        install_s = None
        if key in PEER_ENVS:
            prepared = venvs.ensure(venvs.ENVS[PEER_ENVS[key]], logs, args.install_timeout, install=not args.no_install)
            if prepared.python is None:
                print(f"   {key}: skipped: {prepared.reason}", flush=True)
                rows.append({"key": key, "label": key, "kind": "peer", "skipped": prepared.reason})
                continue
            python, install_s = str(prepared.python), prepared.install_s
        server = make_peer(key, python, args.workers, workloads, logs, runtime)
        server.install_s = install_s
        servers.append(server)
    return servers, rows


def _row(server: Server, skipped: str | None = None) -> dict:
    return {
        "key": server.key,
        "label": server.label,
        "kind": server.kind,
        "version": server.version,
        "notes": server.notes,
        "ready_s": server.ready_s,
        "install_s": server.install_s,
        "skipped": skipped,
    }


def _versions(server: Server) -> None:
    """The server's version: its distributions' (and for v2 servers, what their metadata says)."""
    names = ("mnist-serve",) if server.kind == "service" else DISTRIBUTIONS.get(server.key, ())
    try:
        info = python_info(server.python, names)
        server.version = ", ".join(f"{d} {info[d]}" for d in names if d in info)
        if server.key == "triton":  # the server's own version, under PyTriton's
            status, _, body = request(server.port, "GET", "/v2")
            if status == 200:
                meta = json.loads(body)
                server.version += f" ({meta.get('name', '?')} {meta.get('version', '?')})"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        server.version = f"unknown ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: run bench/run.sh (installs it with apt-get) or install wrk", file=sys.stderr)
        return 2
    digits = load_digits(args.data_dir)
    workloads = {w.name: w for w in make_workloads(digits) if w.name in args.workload_names}
    started = datetime.now(UTC)
    load_before = os.getloadavg()[0]
    print(f"{started:%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} CPUs, load average {load_before:.2f} (1 min)")
    info = python_info(args.server_python)
    print(f"digits: {digits.source}; {args.workers} worker(s) per server; {args.duration:g} s per cell")
    print(f"servers: {args.server_python} (Python {info['python']}, torch {info.get('torch', '?')})")
    args.out.mkdir(parents=True, exist_ok=True)
    memory: MemoryReport | None = None
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        scratch = Path(tmp)
        (scratch / "bodies").mkdir()
        run = Run(args, scratch / "bodies")
        print("\n== preparing the servers", flush=True)
        servers, rows = _servers(args, workloads, args.out, scratch)
        core = [s for s in servers if s.key in CORE]
        alone = [s for s in servers if s.key not in CORE]
        print("\n== starting the service and the in-venv peers", flush=True)
        with running(core):
            for server in core:
                _versions(server)
            on = next((s for s in core if s.key == "service-batch-on"), None)
            if on is not None and args.memory_list and "vector" in workloads:  # first: the growth is the service's own
                memory = memory_run(run, on, workloads["vector"], *args.memory_list)
                print(f"   memory after {memory.second_requests:,} requests: {'; '.join(map(str, memory.at_second))}")
            for workload in workloads.values():
                print(f"\n== {workload.title}", flush=True)
                drive(run, [s for s in core if workload.name in s.requests], workload)
            if memory is not None and on is not None:
                memory.after_all = [Memory.of(pid) for pid in memory.pids]
        for server in alone:
            print(f"\n== {server.label} ({server.notes})", flush=True)
            try:
                # A peer gets three starts: PyTriton, for one, gives each Python model instance 1 s
                # to reach its handshake server, which a busy machine can miss.
                with running([server], attempts=3):
                    _versions(server)
                    for workload in workloads.values():
                        if workload.name in server.requests:
                            drive(run, [server], workload)
            except RuntimeError as exc:
                print(f"   {server.label}: skipped: {exc}", flush=True)
                rows.append(_row(server, str(exc)))
                servers.remove(server)
    if memory is not None:
        memory.torch_alone = torch_import_memory(args.server_python)
    report.add_ratios(run.cells)
    git, dirty = report.git_commit()
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "machine": report.machine(),
        "os": report.os_name(),
        "commit": git,
        "dirty": dirty,
        "command": shlex.join(["python -m bench", *args.argv]).replace("'python -m bench'", "python -m bench"),
        "python": info["python"],
        "torch": info.get("torch", "?"),
        "workers": args.workers,
        "device": args.device or "auto",
        "duration_s": args.duration,
        "batch_cap_s": args.batch_cap,
        "rounds": args.rounds,
        "concurrency": args.concurrency_list,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "digits": digits.source,
    }
    memory_doc = None
    if memory is not None:
        memory_doc = {k: v for k, v in asdict(memory).items() if k != "pids"}
    results = report.Results(
        meta,
        [_row(s) for s in servers] + rows,
        run.cells,
        run.skipped,
        memory_doc,
        {w.name: w.title for w in workloads.values()},
    )
    text = report.render(results)
    print(f"\n{text}")
    stamp = f"{started:%Y%m%dT%H%M%S}"
    json_path = args.out / f"http-{stamp}.json"
    json_path.write_text(json.dumps(results.to_json(), indent=1) + "\n")
    (args.out / f"http-{stamp}.md").write_text(text)
    print(f"written: {json_path} and its .md")
    if args.record:
        report.record(json_path)
        print(f"recorded as {report.RECORDED.relative_to(ROOT)}; {report.DOC.relative_to(ROOT)} rewritten")
    return 0
