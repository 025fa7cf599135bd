"""The HTTP benchmark harness (``python -m bench``): a real quick run, and its report.

The quick run starts the service and the naive FastAPI peer (no peer venvs: those installs are
far too slow for a test, and ``--no-install`` makes sure none starts), sends every body, checks
the answers and times one short cell each. The rest checks what the report makes of results.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from bench import report, venvs
from bench.load import Cell, cell_seconds, median_cell
from bench.report import Results
from bench.servers import make_service
from bench.targets import TARGETS
from bench.workloads import Digits, load_digits, make_workloads, probabilities, v2_binary, v2_png_binary

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def digits() -> Digits:
    ten = np.frombuffer((FIXTURES / "ten_digits.u8").read_bytes(), dtype=np.uint8).reshape(10, 28, 28)
    return Digits(np.resize(ten, (1200, 28, 28)), np.arange(1200) % 10, "fixtures")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (scripts/test-deps.sh installs it)")
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "bench", "--quick", "--servers", "service,naive", "--workloads", "vector,batch1000,png28",
        "--concurrency", "16", "--duration", "1", "--memory-requests", "300,600", "--no-install", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = out.glob("http-*.json")
    return json.loads(results.read_text()), done.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_a_quick_run_measures_every_protocol_of_the_service_and_the_naive_peer(quick_run: tuple[dict, str]) -> None:
    doc, stdout = quick_run
    assert "building .venv-peer" not in stdout  # no peer venv was installed
    servers = {s["key"]: s for s in doc["servers"]}
    assert list(servers) == ["service-batch-on", "service-batch-off", "naive"]
    assert all(s["ready_s"] > 0 and not s["skipped"] for s in servers.values())
    cells = {(c["workload"], c["server"], c["protocol"]): c for c in doc["cells"]}
    assert set(cells) == {
        ("vector", "service-batch-on", "/predict JSON"),
        ("vector", "service-batch-on", "v2 JSON"),
        ("vector", "service-batch-off", "/predict JSON"),
        ("vector", "service-batch-off", "v2 JSON"),
        ("vector", "naive", "/predict JSON"),
        ("batch1000", "service-batch-on", "/predict JSON"),
        ("batch1000", "service-batch-on", "v2 binary FP32"),
        ("batch1000", "naive", "/predict JSON"),
        ("png28", "service-batch-on", "image/png"),
        ("png28", "service-batch-on", "v2 BYTES PNG, binary"),
        ("png28", "service-batch-off", "image/png"),
        ("png28", "service-batch-off", "v2 BYTES PNG, binary"),
    }
    assert doc["skipped"] == []  # every body was answered, and answered right
    for cell in cells.values():
        assert cell["concurrency"] == 16
        assert cell["requests"] > 0
        # Errors are the service's business, not the harness's: here, only that they add up.
        assert set(cell["details"]) == {"status", "connect", "read", "write", "timeout"}
        assert cell["errors"] == sum(cell["details"].values())
        assert cell["ratio"] is not None  # against the naive server at the same concurrency
    assert cells[("vector", "naive", "/predict JSON")]["ratio"] == 1.0
    assert cells[("batch1000", "naive", "/predict JSON")]["items"] == 1000
    memory = doc["memory"]
    assert memory["first_requests"] >= 300
    assert len(memory["at_second"]) == 2  # one sample per worker
    assert [t["name"] for t in doc["targets"]] == [t.name for t in TARGETS]
    assert doc["meta"]["machine"]["cores"] >= 1
    assert doc["meta"]["concurrency"] == [16]
    # What the run printed is the report of its results file.
    assert report.render(Results.from_json(doc)) in stdout


def test_workloads_carry_real_digits_in_every_form(digits: Digits) -> None:
    workloads = {w.name: w for w in make_workloads(digits)}
    assert list(workloads) == ["vector", "batch1000", "png28", "png280", "jpeg280", "phone", "u8"]
    assert workloads["batch1000"].items == 1000
    assert workloads["u8"].items == 1200  # all there are, up to 10,000
    phone = Image.open(io.BytesIO(workloads["phone"].images[0]))
    assert (phone.format, phone.mode, phone.size) == ("JPEG", "RGB", (4032, 3024))
    drawn = Image.open(io.BytesIO(workloads["png280"].images[0]))
    assert (drawn.format, drawn.mode, drawn.size) == ("PNG", "RGB", (280, 280))
    pixels = np.asarray(drawn)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # white paper
    assert pixels.min() < 64  # dark ink


def test_v2_binary_bodies_declare_their_json_header(digits: Digits) -> None:
    workloads = {w.name: w for w in make_workloads(digits)}
    req = v2_binary(workloads["batch1000"], "mnist_batch")
    size = int(req.headers["inference-header-content-length"])
    header = orjson.loads(req.body[:size])
    assert header["inputs"][0]["shape"] == [1000, 784]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == len(req.body) - size == 1000 * 784 * 4
    assert req.path == "/v2/models/mnist_batch/infer"
    png = v2_png_binary(workloads["png28"], shape=(1, 1))
    size = int(png.headers["inference-header-content-length"])
    assert orjson.loads(png.body[:size])["inputs"][0]["shape"] == [1, 1]
    assert png.body[size + 4 :] == workloads["png28"].images[0]  # 4-byte length, then the file


def test_a_v2_answer_reads_back_from_json_or_binary_outputs(digits: Digits) -> None:
    req = v2_binary(make_workloads(digits)[0])
    probs = np.eye(10, dtype="<f4")[[3, 7]]
    head = orjson.dumps(
        {
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
                {"name": "probabilities", "datatype": "FP32", "shape": [2, 10], "parameters": {"binary_data_size": 80}},
            ]
        }
    )
    body = head + np.array([3, 7], "<i8").tobytes() + probs.tobytes()
    read = probabilities(req, {"inference-header-content-length": str(len(head))}, body)
    assert read.argmax(axis=1).tolist() == [3, 7]
    as_json = orjson.dumps(
        {"outputs": [{"name": "probabilities", "shape": [2, 10], "data": probs.reshape(-1).tolist()}]}
    )
    assert probabilities(req, {}, as_json).argmax(axis=1).tolist() == [3, 7]
    with pytest.raises(ValueError, match="no 'probabilities' output"):
        probabilities(req, {}, b'{"outputs": [{"name": "label", "data": [3]}]}')


def test_digits_load_from_mnist_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 784, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + images.tobytes()
    )
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 2, 1]))
    digits = load_digits(tmp_path, 2)
    np.testing.assert_array_equal(digits.images, images[:2])
    assert digits.labels.tolist() == [7, 2]
    missing = load_digits(tmp_path / "nowhere", 12)  # falls back to the fixture digits
    assert missing.images.shape == (12, 28, 28)
    assert missing.labels.tolist() == [*range(10), 0, 1]


def _cell(workload: str, server: str, protocol: str, requests: int, c: int = 64, items: int = 1) -> Cell:
    return Cell(workload, server, protocol, c, requests, 2.0, 1.0, 2.0, 3.0, 0, items)


def _results(cells: list[Cell]) -> Results:
    servers = [
        {"key": "service-batch-on", "label": "service, on", "kind": "service", "ready_s": 1.5},
        {"key": "service-batch-off", "label": "service, off", "kind": "service", "ready_s": 1.7},
        {"key": "naive", "label": "naive FastAPI", "kind": "peer", "ready_s": 1.0},
        {"key": "triton", "label": "Triton", "kind": "peer", "ready_s": 9.0, "version": "nvidia-pytriton 0.7.0"},
        {"key": "bentoml", "label": "BentoML", "kind": "peer", "skipped": "install failed"},
    ]
    report.add_ratios(cells)
    meta = {
        "date": "2026-11-30T04:00:00+00:00",
        "machine": {"cpu": "Some CPU", "cores": 2, "ram_gib": 23.5, "gpu": None},
        "os": "Linux",
        "commit": "0123456789abcdef",
        "dirty": False,
        "command": "python -m bench",
        "python": "3.11.7",
        "torch": "2.13.0+cpu",
        "workers": 2,
        "duration_s": 6.0,
        "batch_cap_s": 30.0,
        "rounds": 3,
        "concurrency": [64],
        "load_before": 0.1,
        "load_after": 1.9,
    }
    return Results(meta, servers, cells, [], None, {"vector": "one vector"})


def test_targets_judge_a_run_and_say_what_was_not_measured() -> None:
    results = _results(
        [
            _cell("vector", "naive", "/predict JSON", 2000),
            _cell("vector", "triton", "v2 JSON", 3000),
            _cell("vector", "service-batch-on", "/predict JSON", 20000),
            _cell("vector", "service-batch-on", "v2 JSON", 15000),
            _cell("vector", "service-batch-off", "/predict JSON", 12000),
        ]
    )
    judged = {t["name"]: t for t in report.evaluate(results)}
    assert list(judged) == [t.name for t in TARGETS]
    assert judged["predict-vs-naive"]["value"] == pytest.approx(10.0)
    assert judged["predict-vs-best-peer"]["value"] == pytest.approx(20000 / 3000)
    assert "Triton, v2 JSON" in judged["predict-vs-best-peer"]["detail"]
    assert judged["v2-vs-triton"]["value"] == pytest.approx(5.0)
    assert judged["v2-vs-predict"]["value"] == pytest.approx(0.75)
    assert judged["v2-vs-predict"]["met"] is False
    assert judged["microbatching-default"]["met"] is True
    assert judged["start-to-ready"]["value"] == pytest.approx(1.7)
    assert judged["png280-vs-naive"]["met"] is None  # not measured in this run
    assert judged["rss-per-worker"]["met"] is None


def test_the_doc_block_is_rendered_from_the_results_and_checked(tmp_path: Path) -> None:
    results = _results(
        [_cell("vector", "naive", "/predict JSON", 2000), _cell("vector", "service-batch-on", "/predict JSON", 9000)]
    )
    run = tmp_path / "run.json"
    run.write_text(json.dumps(results.to_json()))
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nProse.\n\n{report.BEGIN}\nold figures\n{report.END}\n\nMore prose.\n")
    recorded = tmp_path / "recorded.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "bench.report", *args, "--doc", str(doc), "--recorded", str(recorded)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert cli("--record", str(run)).returncode == 0
    text = doc.read_text()
    assert text.startswith("# Performance\n\nProse.\n\n")
    assert text.endswith("\n\nMore prose.\n")
    assert "2026-11-30 04:00 UTC, commit `0123456789ab`" in text
    assert "Some CPU, 2 cores, 23.5 GiB RAM, no GPU" in text
    assert "| one vector | 64 | service, on | /predict JSON | 4,500 | 4,500 | 1.0 | 2.0 | 0 | 4.50 |" in text
    assert "| one vector, c=64: /predict JSON vs naive FastAPI | 4.50x | >= 4.00x | yes |" in text
    assert "| BentoML | - | skipped: install failed | - |" in text
    assert cli("--check").returncode == 0
    doc.write_text(text.replace("4,500 | 4,500", "9,999 | 9,999"))
    stale = cli("--check")
    assert stale.returncode == 1
    assert "-| one vector | 64 | service, on | /predict JSON | 9,999" in stale.stdout
    assert cli("--write").returncode == 0
    assert doc.read_text() == text


def test_the_committed_performance_doc_is_the_recorded_run() -> None:
    assert report.check_doc(Results.load(report.RECORDED), report.DOC) == []


def test_a_cell_reports_its_median_round_and_every_error() -> None:
    rounds = [_cell("vector", "naive", "/predict JSON", n) for n in (900, 1000, 1100)]
    rounds[0].errors, rounds[2].errors = 2, 3
    median = median_cell(rounds)
    assert (median.requests, median.errors, median.rounds) == (1000, 5, 3)
    assert median_cell(rounds[:2]).requests == 900  # even count: the lower middle


def test_batch_cells_last_long_enough_to_see_answers(digits: Digits) -> None:
    single, batch = make_workloads(digits)[:2]
    assert cell_seconds(single, 64, 5.0, base=6, cap=30, workers=2) == 6
    assert cell_seconds(batch, 1, 0.07, base=6, cap=30, workers=2) == 6
    assert cell_seconds(batch, 16, 0.5, base=6, cap=30, workers=2) == pytest.approx(12)
    assert cell_seconds(batch, 64, 0.5, base=6, cap=30, workers=2) == 30


def test_the_service_gets_the_harness_settings_not_the_callers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, digits: Digits
) -> None:
    monkeypatch.setenv("MNIST_WORKERS", "9")
    monkeypatch.setenv("MNIST_MICROBATCH", "true")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a trainer's setting in the caller's environment
    workloads = {w.name: w for w in make_workloads(digits)}
    off = make_service(sys.executable, 2, False, workloads, tmp_path, tmp_path)
    assert off.env["MNIST_WORKERS"] == "2"
    assert off.env["MNIST_MICROBATCH"] == "false"
    assert "OMP_WAIT_POLICY" not in off.env
    assert "u8" not in off.requests  # big requests skip the micro-batcher: measured once, with it on
    assert "MNIST_DEVICE" not in off.env  # the service's own default
    assert make_service(sys.executable, 2, True, workloads, tmp_path, tmp_path, "cuda").env["MNIST_DEVICE"] == "cuda"
    on = make_service(sys.executable, 2, True, workloads, tmp_path, tmp_path)
    assert [r.protocol for r in on.requests["u8"]] == [
        "uint8, JSON answer",
        "uint8, binary answer",
        ".npy, JSON answer",
    ]


def test_a_peer_without_its_venv_is_skipped_when_installs_are_off(tmp_path: Path) -> None:
    env = venvs.PeerEnv("absent-for-test", ("nothing",), "nothing")
    prepared = venvs.ensure(env, tmp_path, timeout_s=1, install=False)
    assert prepared.python is None
    assert "not built" in prepared.reason
    assert not env.path.exists()
