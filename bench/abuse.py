"""Hostile requests against the real service: what each one costs a worker, and that it survives.

    python -m bench.abuse                 # prints the table
    python -m bench.abuse --record        # and writes it to docs/hostile-requests.md

Starts ``python -m app`` (one worker, the bundled model, default settings) on a free
127.0.0.1 port and sends each request below once. For every row it measures, on the worker
process: the peak-RSS growth (``VmHWM`` reset through ``/proc/PID/clear_refs`` just before the
request, compared with ``VmRSS`` then) and the wall time to the answer. A row passes when the
answer is a 4xx/503 (or a correct 200), within 2 s and 100 MB, and the worker still answers
``/health/ready`` afterwards. Needs Linux and permission to write the worker's ``clear_refs``
(the process's owner or root).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "hostile-requests.md"
MAX_SECONDS = 2.0
MAX_GROWTH_MB = 100.0


@dataclass
class Attack:
    name: str
    route: str
    sent: str  # what the client sends, in words
    send: Callable[[str, int], httpx.Response | tuple[int, str]]
    ok: Callable[[int, str], bool] = lambda status, body: 400 <= status < 500 or status == 503


@dataclass
class Row:
    attack: Attack
    status: int
    detail: str
    seconds: float
    growth_mb: float
    alive: bool
    answered_as_expected: bool

    @property
    def passed(self) -> bool:
        return (
            self.answered_as_expected and self.seconds <= MAX_SECONDS and self.growth_mb <= MAX_GROWTH_MB and self.alive
        )


# -- bodies ----------------------------------------------------------------------------------


def _png(image: Image.Image, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def _declaring_png(width: int, height: int) -> bytes:
    """A small, valid PNG that declares ``width x height`` 1-bit pixels (all black): decodes to megabytes."""
    row = b"\0" + b"\0" * ((width + 7) // 8)
    data = zlib.compress(row * height, 9)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF header is rewritten to declare ``width x height``."""
    out = io.BytesIO()
    Image.new("L", (16, 16), 128).save(out, "JPEG")
    data = bytearray(out.getvalue())
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (16, 16), 128).save(out, "WEBP", lossless=True)
    data = bytearray(out.getvalue())
    # VP8L header: 14-bit width-1 and height-1 after the signature byte 0x2f.
    at = data.find(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = (width - 1) | ((height - 1) << 14) | (int.from_bytes(data[at + 1 : at + 5], "little") & ~((1 << 28) - 1))
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def _phone_jpeg() -> bytes:
    """A 12-megapixel (4000x3000) phone-like JPEG of a digit on paper, ~3 MB."""
    rng = np.random.default_rng(0)
    paper = Image.new("L", (4000, 3000), 200)
    ImageDraw.Draw(paper).line([(2000, 900), (2000, 2100)], fill=40, width=120)
    noisy = np.asarray(paper, dtype=np.int16) + rng.integers(-12, 13, (3000, 4000), dtype=np.int16)
    rgb = np.repeat(np.clip(noisy, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=92)
    return out.getvalue()


def _v2(tensor: dict[str, object]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", **tensor}]})


# -- the attacks -----------------------------------------------------------------------------


def _post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[str, int], httpx.Response]:
    def send(base: str, port: int) -> httpx.Response:
        return httpx.post(base + path, content=body, headers=headers or {}, timeout=30)

    return send


def _raw(request: bytes, then: Callable[[socket.socket], None] | None = None) -> Callable[[str, int], tuple[int, str]]:
    def send(base: str, port: int) -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            if then is not None:
                then(sock)
            answer = _read_response(sock)
        head = answer.split(b"\r\n", 1)[0].decode("latin-1")
        status = int(head.split()[1]) if head.startswith("HTTP/") else 0
        return status, answer.split(b"\r\n\r\n", 1)[-1][:200].decode("latin-1", "replace")

    return send


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response: up to the end of its Content-Length body, or the connection's end."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and len(body) >= int(value):
                        return answer
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


def _stalled_then_batch(base: str, port: int) -> httpx.Response:
    stalled = []
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    )
    for _ in range(16):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head)
        stalled.append(sock)
    try:
        batch = np.zeros((5000, 784), np.uint8).tobytes()
        return httpx.post(
            base + "/predict", content=batch, headers={"content-type": "application/octet-stream"}, timeout=30
        )
    finally:
        for sock in stalled:
            sock.close()


def _ok_200(label: int | None = None) -> Callable[[int, str], bool]:
    def ok(status: int, body: str) -> bool:
        return status == 200 and (label is None or f'"label":{label}' in body)

    return ok


def attacks() -> list[Attack]:
    strings = {"pixels": ["x" * 30_000] + [""] * 784}
    declaring = _declaring_png(4096, 4096)
    bytes_gzip = gzip.compress(
        _v2({"datatype": "BYTES", "shape": [20], "data": [base64.b64encode(declaring).decode()] * 20})
    )
    bomb = gzip.compress(b"0" * 200_000_000, 9)
    npy_head = (
        b"\x93NUMPY\x01\x00"
        + b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000, 784), }".ljust(117)
        + b"\n"
    )
    tiny = _png(Image.new("L", (2, 2), 0))
    multipart_boundary = "b0undary"
    multipart = (
        (
            f'--{multipart_boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + declaring
        + f"\r\n--{multipart_boundary}--\r\n".encode()
    )
    huge_headers = b"POST /predict HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
    json = {"content-type": "application/json"}
    return [
        Attack(
            "strings in JSON pixels",
            "/predict (fast lane)",
            "one 30,000-char string + 784 empty ones, 65 KB",
            _post("/predict", orjson.dumps(strings), json),
        ),
        Attack(
            "strings in v2 FP32 data",
            "/v2 infer (fast lane)",
            "the same strings as a FP32 tensor's data",
            _post("/v2/models/mnist/infer", _v2({"datatype": "FP32", "shape": [1, 784], "data": strings["pixels"]})),
        ),
        Attack(
            "gzip'd PNGs declaring 4096x4096",
            "/v2 infer",
            "20 BYTES PNGs of 4096x4096 1-bit, gzip, ~3 KB",
            _post("/v2/models/mnist/infer", bytes_gzip, {"content-encoding": "gzip"}),
        ),
        Attack(
            "multipart PNG declaring 4096x4096",
            "/predict multipart",
            "one 2 KB PNG of 4096x4096 pixels",
            _post("/predict", multipart, {"content-type": f"multipart/form-data; boundary={multipart_boundary}"}),
        ),
        Attack(
            "16 stalled uploads, then a batch",
            "/predict",
            "16 x Content-Length: 100000 and no body; then 5,000 uint8 images",
            _stalled_then_batch,
            _ok_200(),
        ),
        Attack(
            "deeply nested JSON",
            "/predict (fast lane)",
            "50,000 nested [ ]",
            _post("/predict", b'{"pixels": ' + b"[" * 25_000 + b"]" * 25_000 + b"}", json),
        ),
        Attack(
            "huge integers",
            "/predict (fast lane)",
            "784 integers of 400 digits each",
            _post("/predict", b'{"pixels": [' + b",".join([b"9" * 400] * 784) + b"]}", json),
        ),
        Attack(
            "lying .npy header",
            "/predict",
            ".npy declaring 10^9 x 784 uint8, 128 bytes sent",
            _post("/predict", npy_head, {"content-type": "application/x-npy"}),
        ),
        Attack(
            "gzip bomb",
            "/v2 infer",
            "200 MB of '0' gzip'd to ~200 KB",
            _post("/v2/models/mnist/infer", bomb, {"content-encoding": "gzip"}),
        ),
        Attack(
            "base64 bomb in v2 BYTES",
            "/v2 infer",
            "one 6 MB base64 string (not an image)",
            _post("/v2/models/mnist/infer", _v2({"datatype": "BYTES", "shape": [1], "data": ["A" * 6_000_000]})),
        ),
        Attack(
            "many tiny images",
            "/v2 infer",
            "10,000 2x2 PNGs in one BYTES tensor",
            _post(
                "/v2/models/mnist/infer",
                _v2({"datatype": "BYTES", "shape": [10_000], "data": [base64.b64encode(tiny).decode()] * 10_000}),
            ),
        ),
        Attack(
            "JPEG declaring 65000x65000",
            "/predict (fast lane)",
            "a 700-byte JPEG with a rewritten header",
            _post("/predict", _jpeg_declaring(65_000, 65_000), {"content-type": "image/jpeg"}),
        ),
        Attack(
            "WebP declaring 16384x16384",
            "/predict (fast lane)",
            "a tiny lossless WebP, rewritten header",
            _post("/predict", _webp_declaring(16_384, 16_384), {"content-type": "image/webp"}),
        ),
        Attack(
            "PNG at the per-image limit",
            "/predict",
            "a 2 KB PNG of 2048x2048 (blank)",
            _post("/predict", _declaring_png(2048, 2048), {"content-type": "image/png"}),
        ),
        Attack(
            "12-megapixel phone JPEG",
            "/predict",
            "a real 4000x3000 JPEG, ~3 MB (legitimate)",
            _post("/predict", _phone_jpeg(), {"content-type": "image/jpeg"}),
            _ok_200(1),
        ),
        Attack(
            "v2 shape promising 10,000 images",
            "/v2 infer (fast lane)",
            "shape [10000, 784], 784 values",
            _post("/v2/models/mnist/infer", _v2({"datatype": "FP32", "shape": [10_000, 784], "data": [0.0] * 784})),
        ),
        Attack(
            "JSON batch of 10,000",
            "/predict",
            '{"instances": 10,000 x 784 zeros}, ~31 MB',
            _post("/predict", orjson.dumps({"instances": np.zeros((10_000, 784), np.uint8).tolist()}), json),
        ),
        Attack(
            "Content-Length of 10 GB",
            "/predict",
            "declares 10 GB, sends 1 KB",
            _raw(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: 10000000000\r\n\r\n" + b"\0" * 1024
            ),
        ),
        Attack("200 KB of headers", "/predict", "one 200 KB header line", _raw(huge_headers)),
        Attack(
            "newline in the URL",
            "/predict%0Aforged",
            "a %0A that would forge an access-log line",
            _post("/predict%0Arequest_id=forged", b"{}", json),
            lambda status, body: status == 404,
        ),
    ]


# -- measuring ---------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _measure(attack: Attack, base: str, port: int, pid: int) -> Row:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb(pid, "VmRSS")
    started = time.perf_counter()
    try:
        result = attack.send(base, port)
    except httpx.HTTPError as exc:
        result = (0, f"client error: {type(exc).__name__}")
    seconds = time.perf_counter() - started
    status, detail = (result.status_code, result.text) if isinstance(result, httpx.Response) else result
    growth = (_status_kb(pid, "VmHWM") - before) / 1024
    try:
        alive = httpx.get(base + "/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        alive = False
    return Row(attack, status, " ".join(detail.split())[:90], seconds, growth, alive, attack.ok(status, detail))


def _start(port: int) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m app`` as deployed, one worker; returns the launcher and the worker's pid."""
    env = {
        **os.environ,
        "MNIST_LOG_LEVEL": "warning",
        "MNIST_RUNTIME_DIR": f"/tmp/mnist-abuse-{port}",
        "MNIST_HOST": "127.0.0.1",
        "MNIST_PORT": str(port),
        "MNIST_WORKERS": "1",
    }
    command = [sys.executable, "-m", "app"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc, int(httpx.get(f"http://127.0.0.1:{port}/model", timeout=5).json()["pid"])
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the service did not become ready in 60 s")


def table(rows: list[Row]) -> str:
    lines = [
        "| request | route | sent | answer | time s | peak RSS growth MB | alive | pass |",
        "| --- | --- | --- | --- | --: | --: | --- | --- |",
    ]
    for row in rows:
        answer = f"{row.status} {row.detail[:70]}".replace("|", "\\|")
        lines.append(
            f"| {row.attack.name} | {row.attack.route} | {row.attack.sent} | {answer} | {row.seconds:.2f} | "
            f"{row.growth_mb:.1f} | {'yes' if row.alive else 'NO'} | {'yes' if row.passed else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write the table to {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc, worker = _start(port)
    base = f"http://127.0.0.1:{port}"
    try:
        rows = [_measure(attack, base, port, worker) for attack in attacks()]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = table(rows)
    print(text)
    failed = [row.attack.name for row in rows if not row.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        DOC.write_text(
            "# Hostile requests\n\n"
            "What each request costs the worker of `python -m app` (one worker, default settings, the bundled model), "
            "measured by `python -m bench.abuse --record`: peak-RSS growth of the worker (VmHWM reset just "
            f"before the request) and wall time to the answer. Every row must answer within {MAX_SECONDS:g} s "
            f"and {MAX_GROWTH_MB:g} MB with a 4xx/503 or a correct 200, and leave the worker serving.\n\n"
            f"Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit.stdout.strip()}, "
            f"{os.cpu_count()} CPUs.\n\n{text}\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
