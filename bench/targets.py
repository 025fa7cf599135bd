"""The acceptance targets: one table, used by the report to judge a run.

Each :class:`Target` names a measure of a run (a function of the results), how it is compared
and with what threshold. "The service" is the service as deployed: micro-batching on.
Concurrency 64 with the service's worker count is where the targets are set.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.load import Cell
    from bench.report import Results

SERVICE = "service-batch-on"
C = 64
PREDICT, V2 = "/predict JSON", "v2 JSON"
# A measured value and the figures behind it, for the report.
Measured = tuple[float, str]


@dataclass(frozen=True)
class Target:
    name: str
    metric: str
    comparison: str  # ">=", "<=" or "<"
    threshold: float
    unit: str
    measure: Callable[[Results], Measured | None]

    def met(self, value: float) -> bool:
        return bool(_OPS[self.comparison](value, self.threshold))


_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


def _rps(cell: Cell) -> str:
    return f"{cell.rps:,.0f} req/s"


def _ratio(mine: Cell | None, theirs: Cell | None, name: str) -> Measured | None:
    if mine is None or theirs is None or theirs.rps <= 0:
        return None
    return mine.rps / theirs.rps, f"{_rps(mine)} vs {_rps(theirs)} ({name})"


def _vs_naive(workload: str, protocol: str) -> Callable[[Results], Measured | None]:
    return lambda r: _ratio(r.cell(workload, SERVICE, protocol, C), r.cell("vector", "naive", PREDICT, C), "naive JSON")


def _best_peer(r: Results) -> Measured | None:
    peers = [c for c in r.cells if c.workload == "vector" and c.concurrency == C and r.kind(c.server) == "peer"]
    if not peers:
        return None
    best = max(peers, key=lambda c: c.rps)
    return _ratio(r.cell("vector", SERVICE, PREDICT, C), best, f"{r.label(best.server)}, {best.protocol}")


def _errors(r: Results) -> Measured | None:
    cells = [r.cell("vector", SERVICE, p, C) for p in (PREDICT, V2)]
    found = [c for c in cells if c is not None]
    if not found:
        return None
    return float(sum(c.errors for c in found)), ", ".join(f"{c.protocol}: {c.errors}" for c in found)


def _p99(r: Results) -> Measured | None:
    cell = r.cell("vector", SERVICE, PREDICT, C)
    return None if cell is None else (cell.p99_ms, f"p50 {cell.p50_ms:.1f} ms")


def _best_pps(workload: str, protocol: str) -> Callable[[Results], Measured | None]:
    def measure(r: Results) -> Measured | None:
        cells = [c for c in r.cells if (c.workload, c.server, c.protocol) == (workload, SERVICE, protocol)]
        if not cells:
            return None
        best = max(cells, key=lambda c: c.pps)
        return best.pps, f"c={best.concurrency}, {best.errors} errors"

    return measure


def _ready(r: Results) -> Measured | None:
    times = {s["key"]: s["ready_s"] for s in r.servers if s["kind"] == "service" and s.get("ready_s") is not None}
    if not times:
        return None
    return max(times.values()), ", ".join(f"{k.removeprefix('service-')} {v:.2f} s" for k, v in times.items())


def _rss(r: Results) -> Measured | None:
    if not r.memory:
        return None
    rss = [m["rss"] for m in r.memory["at_second"]]
    return max(rss), f"after {r.memory['second_requests']:,} requests: " + ", ".join(f"{x:.0f}" for x in rss) + " MB"


def _growth(r: Results) -> Measured | None:
    if not r.memory:
        return None
    growth = [
        100 * (b["rss"] - a["rss"]) / a["rss"] for a, b in zip(r.memory["at_first"], r.memory["at_second"], strict=True)
    ]
    span = f"{r.memory['first_requests']:,} to {r.memory['second_requests']:,} requests"
    return max(growth), f"{span}: " + ", ".join(f"{g:+.1f} %" for g in growth)


def _microbatching(r: Results) -> Measured | None:
    return _ratio(r.cell("vector", SERVICE, PREDICT, C), r.cell("vector", "service-batch-off", PREDICT, C), "off")


TARGETS: tuple[Target, ...] = (
    Target(
        "predict-vs-naive",
        "one vector, c=64: /predict JSON vs naive FastAPI",
        ">=",
        4.0,
        "x",
        _vs_naive("vector", PREDICT),
    ),
    Target("predict-vs-best-peer", "one vector, c=64: /predict JSON vs the fastest peer", ">=", 4.0, "x", _best_peer),
    Target(
        "v2-vs-triton",
        "one vector, c=64: v2 JSON vs Triton's v2 JSON",
        ">=",
        3.0,
        "x",
        lambda r: _ratio(r.cell("vector", SERVICE, V2, C), r.cell("vector", "triton", V2, C), "Triton"),
    ),
    Target(
        "v2-vs-predict",
        "one vector, c=64: v2 JSON vs /predict JSON, same service",
        ">=",
        0.8,
        "x",
        lambda r: _ratio(r.cell("vector", SERVICE, V2, C), r.cell("vector", SERVICE, PREDICT, C), "/predict"),
    ),
    Target("vector-errors", "one vector, c=64: errors (/predict and v2 JSON)", "<=", 0, "", _errors),
    Target("predict-p99", "one vector, c=64: /predict JSON p99 latency", "<", 30, "ms", _p99),
    Target(
        "png28-vs-naive",
        "one 28x28 PNG, c=64: vs naive FastAPI's JSON",
        ">=",
        2.0,
        "x",
        _vs_naive("png28", "image/png"),
    ),
    Target(
        "png280-vs-naive",
        "one 280x280 RGB PNG, c=64: vs naive FastAPI's JSON",
        ">=",
        1.2,
        "x",
        _vs_naive("png280", "image/png"),
    ),
    Target(
        "u8-binary",
        "uint8 batches of 10,000, binary answer: predictions/s",
        ">=",
        300_000,
        "/s",
        _best_pps("u8", "uint8, binary answer"),
    ),
    Target(
        "json-batch",
        "JSON batches of 1,000 to /predict: predictions/s",
        ">=",
        20_000,
        "/s",
        _best_pps("batch1000", PREDICT),
    ),
    Target("start-to-ready", "service start to every worker ready", "<", 5.0, "s", _ready),
    Target("rss-per-worker", "resident memory per worker", "<", 400, "MB", _rss),
    Target("rss-growth", "resident memory growth per worker", "<=", 10, "%", _growth),
    Target(
        "microbatching-default",
        "one vector, c=64: micro-batching on (the default) vs off",
        ">=",
        1.0,
        "x",
        _microbatching,
    ),
)
