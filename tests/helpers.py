"""Small helpers shared by tests: PNG encoding, MNIST-to-"drawn" image transforms, a server in a thread."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from PIL import Image

from app.registry import MLP, atomic_write, load_model, save_checkpoint, write_pointer


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def mnist_png(digit: np.ndarray) -> bytes:
    """A 28x28 MNIST digit (float in [0,1]) as an 8-bit greyscale PNG, white on black."""
    return png_bytes(Image.fromarray((np.asarray(digit).reshape(28, 28) * 255).round().astype(np.uint8), mode="L"))


def drawn_like_a_person(digit: np.ndarray, index: int, mode: str) -> bytes:
    """Turn an MNIST digit into what a person draws: black ink on white, 280x280, off-centre.

    The digit is scaled up to 140-200 px, placed with a thick margin at an offset that varies
    with ``index``, and saved as RGB or as RGBA (transparent paper, opaque ink).
    """
    ink = (np.asarray(digit).reshape(28, 28) * 255).round().astype(np.uint8)
    size = 140 + (index * 7) % 61
    big = Image.fromarray(ink, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    left = 20 + (index * 13) % (260 - size - 20 + 1) if size < 240 else 20
    top = 20 + (index * 29) % (260 - size - 20 + 1) if size < 240 else 20
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(big, (left, top))
    coverage = np.asarray(canvas)
    if mode == "RGB":
        paper = 255 - coverage
        return png_bytes(Image.fromarray(np.stack([paper] * 3, axis=-1), mode="RGB"))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)  # black ink...
    rgba[..., 3] = coverage  # ...whose opacity is the stroke; the paper is fully transparent
    return png_bytes(Image.fromarray(rgba, mode="RGBA"))


def publish_variant(models_dir: Path, source: Path, seed: int, publish: bool = True) -> str:
    """A new valid version: ``source``'s weights plus tiny noise (same accuracy, new sha256)."""
    model, _ = load_model(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-4)
    path = save_checkpoint(
        models_dir, model, {"test_accuracy": None, "note": f"variant {seed}"}, version=f"v{seed:03d}-ok"
    )
    if publish:
        write_pointer(models_dir, path.stem)
    return path.stem


def write_bad_version(models_dir: Path, source: Path, kind: str, version: str, marker: Path | None = None) -> str:
    """Publish a version that must be rejected: truncated, wrong-shapes, nan, inaccurate or pickle."""
    path = models_dir / f"{version}.pt"
    if kind == "truncated":
        data = source.read_bytes()
        atomic_write(path, lambda fh: fh.write(data[: len(data) // 3]))
    elif kind == "wrong-shapes":
        raw = torch.load(source, weights_only=True)
        raw["state_dict"]["lin_2.weight"] = raw["state_dict"]["lin_2.weight"][:, :128]
        raw["meta"].pop("weights_sha256", None)
        atomic_write(path, lambda fh: torch.save(raw, fh))
    elif kind == "nan":
        raw = torch.load(source, weights_only=True)
        raw["state_dict"]["lin_1.weight"][0, :10] = float("nan")
        raw["meta"].pop("weights_sha256", None)
        atomic_write(path, lambda fh: torch.save(raw, fh))
    elif kind == "inaccurate":
        torch.manual_seed(0)
        save_checkpoint(models_dir, MLP(), {"note": "untrained: fails the accuracy gate"}, version=version)
    elif kind == "pickle":
        assert marker is not None
        payload = {"format": "mnist-mlp/1", "state_dict": {}, "model_args": {}, "meta": {"x": RunsCode(marker)}}
        atomic_write(path, lambda fh: torch.save(payload, fh))
    else:
        raise ValueError(kind)
    write_pointer(models_dir, version)
    return version


class RunsCode:
    """Unpickling this creates ``marker``: the canary for code execution during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


@contextlib.contextmanager
def serving(app: Any, **config: Any) -> Iterator[int]:
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port; yields the port (``config``: uvicorn.Config)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
