"""Driving a server: one check of the answer per request, then wrk at fixed concurrency.

A :class:`Cell` is one server, one workload in one protocol, at one concurrency: requests,
latency percentiles and errors (non-2xx responses plus socket errors) as wrk counted them.
Throughput counts only the requests answered with a 2xx; latency percentiles are of all answers.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.servers import Server, request
from bench.workloads import Request, Workload, probabilities

LUA = Path(__file__).resolve().parent / "post.lua"
# Answers match the service's when every label is the same and no probability is further off.
ATOL = 1e-4


@dataclass
class Cell:
    workload: str
    server: str
    protocol: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    items: int
    details: dict[str, int] = field(default_factory=dict)
    rounds: int = 1
    ratio: float | None = None  # to the naive server at the same concurrency (bench.report)

    @property
    def answered(self) -> int:
        """Requests answered with a 2xx: a server shedding load answers fast, but predicts nothing."""
        return self.requests - self.details.get("status", 0)

    @property
    def rps(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def pps(self) -> float:
        return self.rps * self.items


class WrongAnswer(Exception):
    """A server's answer to a check request: not a 200, unreadable, or not the expected predictions."""


def check(server: Server, workload: Workload, req: Request, reference: np.ndarray | None) -> np.ndarray:
    """Send ``req`` once; its probabilities, which must match ``reference`` (or MNIST's labels).

    With a reference (the service's answer to the same images) every label must be the same, and
    for pixel inputs every probability within :data:`ATOL`. Images are decoded by each server
    its own way, so only their labels are compared. Without one, at least 90 % of the labels must
    be MNIST's (all of them for a single image).
    """
    status, headers, body = request(server.port, "POST", req.path, req.body, req.all_headers(), workload.timeout_s)
    if status != 200:
        raise WrongAnswer(f"answered {status}: {body[:200].decode(errors='replace')}")
    try:
        probs = probabilities(req, headers, body)
    except (ValueError, KeyError, TypeError) as exc:
        raise WrongAnswer(f"unreadable answer ({type(exc).__name__}: {exc}): {body[:200]!r}") from None
    if len(probs) != workload.items:
        raise WrongAnswer(f"{len(probs)} predictions for {workload.items} images")
    if reference is not None:
        if not np.array_equal(probs.argmax(axis=1), reference.argmax(axis=1)):
            raise WrongAnswer("labels differ from the service's")
        off = float(np.abs(probs - reference).max())
        if not workload.images and off > ATOL:
            raise WrongAnswer(f"probabilities differ from the service's by up to {off:.2g} (> {ATOL:g})")
    else:
        accuracy = float((probs.argmax(axis=1) == workload.labels).mean())
        if accuracy < (0.9 if workload.batch else 1.0):
            raise WrongAnswer(f"accuracy {accuracy:.3f} against MNIST's labels")
    return probs


def wrk(server: Server, workload: Workload, req: Request, body_file: Path, concurrency: int, seconds: float) -> Cell:
    env = {
        **os.environ,
        "BENCH_BODY": str(body_file),
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in req.all_headers().items()),
    }
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={workload.timeout_s}s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{server.port}{req.path}",
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
        protocol=req.protocol,
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


def cell_seconds(workload: Workload, concurrency: int, single_s: float, base: float, cap: float, workers: int) -> float:
    """How long to drive a cell: ``base``, or for batches long enough to see ~3 rounds of requests.

    ``single_s`` is the mean latency of one request alone (from the c=1 cell). A server that
    computes its queued batches all at once (a threadpool) answers none of them for
    ``concurrency / workers * single_s`` seconds; a shorter cell would report nothing at all.
    """
    if not workload.batch:
        return base
    return max(base, min(cap, 3 * concurrency * single_s / workers))


def median_cell(cells: list[Cell]) -> Cell:
    """The round with the median throughput (the lower middle for an even count), with every round's errors."""
    ordered = sorted(cells, key=lambda c: c.rps)
    middle = ordered[(len(ordered) - 1) // 2]
    errors = sum(c.errors for c in cells)
    details = {k: sum(c.details.get(k, 0) for c in cells) for k in middle.details}
    return replace(middle, errors=errors, details=details, rounds=len(cells))
