"""Prediction and response encoding: float32 ``[N, 784]`` in, probabilities and JSON bytes out."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import torch

from app.decode import unit_scale
from app.registry import MLP

__all__ = ["encode_binary", "encode_predictions", "predict_proba", "top_k_pairs"]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


# Big CPU batches run this many rows at a time: the activations of a chunk stay in cache and
# the answers are bit-identical; a 10,000-image batch holds a tenth of the activations at once.
# (A GPU wants the whole batch at once.)
CPU_CHUNK = 1024


@torch.inference_mode()
def predict_proba(
    model: MLP, x: np.ndarray, device: torch.device | None = None, chunk_rows: int = CPU_CHUNK
) -> np.ndarray:
    """Class probabilities ``[N, 10]`` (float32, rows sum to 1) from an eval-mode model.

    ``x`` is float32 in [0, 1], or uint8 0-255 rows (``decode_uint8(..., scale=False)``), which
    are scaled here chunk by chunk with ``unit_scale``: bit-identical to scaling them first, but
    a 10,000-image batch never exists as 31 MB of floats, only as one 3 MB chunk at a time.
    """
    if device is not None and device.type != "cpu":
        tensor = torch.from_numpy(_float_rows(x)).to(device, non_blocking=True)
        return torch.softmax(model(tensor), dim=1).to("cpu").numpy()
    if len(x) <= chunk_rows:
        return torch.softmax(model(torch.from_numpy(_float_rows(x))), dim=1).numpy()
    out = torch.empty((len(x), model.num_classes), dtype=torch.float32)
    # uint8 chunks are scaled into one reused buffer; float32 chunks are views of x.
    buffer = np.empty((chunk_rows, x.shape[1]), dtype=np.float32) if x.dtype == np.uint8 else None
    for start in range(0, len(x), chunk_rows):
        chunk = x[start : start + chunk_rows]
        rows = _float_rows(chunk, None if buffer is None else buffer[: len(chunk)])
        torch.softmax(model(torch.from_numpy(rows)), dim=1, out=out[start : start + len(chunk)])
    return out.numpy()


def _float_rows(x: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """float32 rows for the model: uint8 scaled with ``unit_scale`` (into ``buffer`` if given)."""
    if x.dtype == np.uint8:
        return unit_scale(x, out=buffer)
    return np.ascontiguousarray(x, dtype=np.float32)


def top_k_pairs(row: np.ndarray, k: int) -> list[dict[str, Any]]:
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": int(i), "probability": float(row[i])} for i in order]


def _entry(row: np.ndarray, label: int, version: str, top_k: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"probabilities": row, "label": label, "model_version": version}
    if top_k:
        entry["top_k"] = top_k_pairs(row, top_k)
    return entry


def _seen(row: np.ndarray) -> dict[str, Any]:
    """What the model was given for one image: a 28x28 greyscale PNG (base64) and its 784 values."""
    from app.image import to_png_base64  # only requests that ask for it pay for the import

    pixels = _float_rows(row.reshape(1, -1))[0]
    return {"png": to_png_base64(pixels), "pixels": pixels}


def encode_predictions(
    probs: np.ndarray,
    version: str,
    batch: bool,
    top_k: int | None = None,
    inputs: np.ndarray | None = None,
) -> bytes:
    """``{"probabilities", "label", "model_version"[, "top_k"][, "input"]}``, or ``{"predictions": [...]}``.

    ``inputs``: the rows the model was given, returned as each prediction's ``input``.
    orjson writes the float32 rows straight from numpy: no ``tolist()``, no generic serializer.
    """
    labels = probs.argmax(axis=1).tolist()
    if not batch:
        entry = _entry(probs[0], labels[0], version, top_k)
        if inputs is not None:
            entry["input"] = _seen(inputs[0])
        return orjson.dumps(entry, option=_NUMPY)
    # zip over the array yields its row views in C, cheaper than indexing row by row.
    predictions = [_entry(row, label, version, top_k) for row, label in zip(probs, labels, strict=True)]
    if inputs is not None:
        for entry, row in zip(predictions, inputs, strict=True):
            entry["input"] = _seen(row)
    return orjson.dumps({"model_version": version, "predictions": predictions}, option=_NUMPY)


def encode_binary(probs: np.ndarray) -> bytes:
    """The compact response: ``N x 10`` little-endian float32 probabilities, row ``i`` for image ``i``.

    40 bytes per image and no float formatting: for bulk clients that only need the numbers.
    """
    return np.ascontiguousarray(probs, dtype="<f4").tobytes()
