"""The HTTP benchmark harness's own logic: bodies the service accepts, ratios, cell lengths, table.

The harness measures; these tests only check that what it sends and how it reports are right.
No server is started and nothing here depends on timing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from app.decode import decode_json, decode_npy, decode_uint8
from app.image import decode_png

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import http_bench  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def digits() -> http_bench.Digits:
    ten = np.frombuffer((FIXTURES / "ten_digits.u8").read_bytes(), dtype=np.uint8).reshape(10, 28, 28)
    images = np.resize(ten, (1200, 28, 28))
    return http_bench.Digits(images, np.arange(1200) % 10, "fixtures")


def test_every_workload_body_is_accepted_by_the_service_decoders(digits: http_bench.Digits) -> None:
    workloads = {w.name: w for w in http_bench.make_workloads(digits)}
    assert set(workloads) == {"json1", "png28", "png280", "json1000", "u8", "u8-bin", "npy"}
    decoded = {
        "json1": decode_json(workloads["json1"].body, 10_000)[0],
        "png28": decode_png(workloads["png28"].body, 4096 * 4096),
        "png280": decode_png(workloads["png280"].body, 4096 * 4096),
        "json1000": decode_json(workloads["json1000"].body, 10_000)[0],
        "u8": decode_uint8(workloads["u8"].body, 10_000),
        "u8-bin": decode_uint8(workloads["u8-bin"].body, 10_000),
        "npy": decode_npy(workloads["npy"].body, 10_000),
    }
    for name, x in decoded.items():
        assert x.shape == (workloads[name].items, 784), name
        assert len(workloads[name].expected) == workloads[name].items, name
    first = digits.images[0].reshape(784) / 255
    np.testing.assert_allclose(decoded["json1"][0], first, atol=1e-6)
    np.testing.assert_allclose(decoded["u8"], decoded["npy"])
    assert workloads["u8-bin"].accept == "application/octet-stream"
    assert workloads["json1"].naive_path == "/predict"
    assert workloads["json1000"].naive_path == "/predict/batch"


def test_the_drawn_png_is_dark_ink_on_white_rgb(digits: http_bench.Digits) -> None:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(http_bench.drawn_png(digits.images[0])))
    assert image.size == (280, 280)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # white paper
    assert pixels.min() < 64  # dark ink


def _cell(workload: str, server: str, c: int, requests: int, items: int = 1) -> http_bench.Cell:
    return http_bench.Cell(workload, server, c, requests, 2.0, 1.0, 2.0, 3.0, 0, items)


def test_ratios_compare_with_the_naive_server_at_the_same_concurrency() -> None:
    cells = [
        _cell("json1", "naive", 1, 200),
        _cell("json1", "naive", 64, 400),
        _cell("json1", "service-batch-on", 64, 2000),
        _cell("png28", "service-batch-on", 64, 1000),
        _cell("json1000", "naive", 64, 4, items=1000),
        _cell("u8", "service-batch-on", 64, 40, items=10_000),
        _cell("json1", "service-batch-on", 16, 900),  # no naive cell at c=16: no ratio
    ]
    http_bench.ratios(cells)
    assert [c.ratio for c in cells] == [1.0, 1.0, 5.0, 2.5, 1.0, 100.0, None]


def test_batch_cells_last_long_enough_to_see_answers() -> None:
    single = http_bench.Workload("json1", "one", "application/json", b"{}", 1, np.zeros(1))
    batch = http_bench.Workload("json1000", "batch", "application/json", b"{}", 1000, np.zeros(1000))
    assert http_bench.cell_seconds(single, 64, 5.0, base=6, cap=30, workers=2) == 6
    assert http_bench.cell_seconds(batch, 1, 0.07, base=6, cap=30, workers=2) == 6
    assert http_bench.cell_seconds(batch, 16, 0.5, base=6, cap=30, workers=2) == pytest.approx(12)
    assert http_bench.cell_seconds(batch, 64, 0.5, base=6, cap=30, workers=2) == 30


def test_table_and_acceptance_lines() -> None:
    workloads = [
        http_bench.Workload("json1", "one JSON vector", "application/json", b"{}", 1, np.zeros(1)),
        http_bench.Workload("u8", "uint8 batch", "application/octet-stream", b"", 10_000, np.zeros(1)),
    ]
    servers = [
        http_bench.Server(key, label, [], {}, "/", Path("x.log"), set())
        for key, label in (
            ("service-batch-on", "service, on"),
            ("service-batch-off", "service, off"),
            ("naive", "naive"),
        )
    ]
    cells = [
        _cell("json1", "naive", 64, 2000),
        _cell("json1", "service-batch-off", 64, 7000),
        _cell("json1", "service-batch-on", 64, 9000),
        _cell("u8", "service-batch-on", 16, 60, items=10_000),
    ]
    http_bench.ratios(cells)
    text = http_bench.table(cells, workloads, servers)
    lines = text.splitlines()
    assert lines[0].startswith("| workload | c | server | req/s | pred/s | p50 ms | p99 ms | errors | x naive |")
    # grouped by workload and concurrency, servers in their order
    assert [line.split(" | ")[2] for line in lines[2:]] == ["service, on", "service, off", "naive", "service, on"]
    assert "| 4,500 | 4,500 | 1.0 | 2.0 | 0 | 4.50 |" in lines[2]
    summary = http_bench.acceptance(cells, servers, None, workers=2)
    assert any("on 4,500 req/s, off 3,500 req/s: on wins" in line for line in summary)
    assert any(line.startswith("one JSON vector, c=64, 2 worker(s) each: 4.50x naive") for line in summary)
    assert any(line.startswith("u8: best 300,000 predictions/s (c=16") for line in summary)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_memory_of_this_process() -> None:
    memory = http_bench.Memory.of(os.getpid())
    assert memory.rss > 0
    assert 0 < memory.private <= memory.rss
    assert 0 < memory.pss <= memory.rss
    assert "MB RSS" in str(memory)


def test_quick_mode_shortens_everything() -> None:
    args = http_bench.parse_args(["--quick"])
    assert args.duration == 2.0
    assert args.rounds == 1
    assert args.concurrency_list == [1, 64]
    assert args.memory_list == [2000, 20000]
    full = http_bench.parse_args([])
    assert full.rounds == 3
    assert full.concurrency_list == [1, 16, 64]
    assert full.memory_list == [10_000, 100_000]
    assert full.server_list == {"service", "naive", "litserve"}


def test_a_cell_reports_its_median_round_and_every_error() -> None:
    rounds = [_cell("json1", "naive", 64, n) for n in (900, 1000, 1100)]
    rounds[0].errors, rounds[2].errors = 2, 3
    median = http_bench.median_cell(rounds)
    assert median.requests == 1000
    assert median.errors == 5
    assert median.rounds == 3
    assert http_bench.median_cell(rounds[:2]).requests == 900  # even count: the lower middle


def test_servers_get_the_environment_from_before_the_harness_imported_the_project(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, digits: http_bench.Digits
) -> None:
    monkeypatch.setattr(http_bench, "SERVER_ENV", {"PATH": "/usr/bin", "MNIST_WORKERS": "9", "KEEP": "1"})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a trainer's setting in the caller's environment
    args = http_bench.parse_args(["--workers", "2"])
    args.workload_list = http_bench.make_workloads(digits)
    servers = {s.key: s for s in http_bench.make_servers(args, tmp_path, tmp_path)}
    assert set(servers) == {"service-batch-on", "service-batch-off", "naive", "litserve"}
    for server in servers.values():
        assert server.env["KEEP"] == "1"
        assert "OMP_WAIT_POLICY" not in server.env
        assert server.env.get("MNIST_WORKERS", "2") == "2"  # the harness's worker count, not the caller's
    assert servers["service-batch-off"].env["MNIST_MICROBATCH"] == "false"
    assert servers["service-batch-on"].env["MNIST_MICROBATCH"] == "true"
    assert servers["service-batch-off"].workloads == {"json1", "png28", "png280"}
    assert servers["naive"].command[-4:] == ["--workers", "2", "--port", str(servers["naive"].port)]
