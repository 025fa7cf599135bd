"""A small client for the service, and its command line.

    python -m app.client digit.png                  # a PNG, JPEG or WebP (any size, any colours)
    python -m app.client pixels.json                # {"pixels": [...]} or {"instances": [...]}
    python -m app.client batch.npy --top-k 3        # a .npy array, uint8 0-255 or float 0-1
    python -m app.client digit.png --url http://host:8000
    mnist-client --help                             # the same program, installed as a command

Prints the predicted label and the most probable classes for each input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx

__all__ = ["DigitClient", "ServiceError", "build_parser", "main"]

_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",
    ".npy": "application/x-npy",
    ".bin": "application/octet-stream",
}


class ServiceError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class DigitClient:
    """``with DigitClient("http://127.0.0.1:8000") as c: c.predict_png(data)``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, **kwargs: Any) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, **kwargs)

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, content: bytes, content_type: str, top_k: int | None) -> dict[str, Any]:
        params = {"top_k": top_k} if top_k else None
        response = self._http.post("/predict", content=content, headers={"content-type": content_type}, params=params)
        if response.status_code != 200:
            try:
                detail = str(response.json().get("detail", response.text))
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        result: dict[str, Any] = response.json()
        return result

    def predict_png(self, png: bytes, top_k: int | None = None) -> dict[str, Any]:
        return self._post(png, "image/png", top_k)

    def predict_pixels(self, pixels: list[float], top_k: int | None = None) -> dict[str, Any]:
        import orjson

        return self._post(orjson.dumps({"pixels": pixels}), "application/json", top_k)

    def predict_file(self, path: Path, top_k: int | None = None) -> dict[str, Any]:
        content_type = _TYPES.get(path.suffix.lower())
        if content_type is None:
            raise ValueError(f"{path}: unknown file type; use one of {', '.join(_TYPES)}")
        return self._post(path.read_bytes(), content_type, top_k)

    def model(self) -> dict[str, Any]:
        response = self._http.get("/model")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def _describe(prediction: dict[str, Any], top_k: int) -> str:
    probs = prediction["probabilities"]
    best = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    ranked = ", ".join(f"{i}: {probs[i]:.1%}" for i in best)
    return f"label {prediction['label']}  ({ranked})"


def _top_k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= k <= 10:
        raise argparse.ArgumentTypeError(f"{k} is out of range: there are 10 classes, show 1 to 10")
    return k


def _timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-client",
        description="Classify handwritten digits with a running service (python -m app.client works too).",
    )
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="inputs: images (.png, .jpg, .webp), .json ({pixels} or {instances}), .npy, .bin (raw uint8)",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service address (default: %(default)s)")
    parser.add_argument(
        "--top-k", type=_top_k, default=3, metavar="K", help="classes to show per input, 1-10 (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        metavar="S",
        help="seconds to wait for each answer (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = 0
    with DigitClient(args.url, timeout=args.timeout) as client:
        for path in args.files:
            try:
                result = client.predict_file(path)
            except (ServiceError, ValueError, OSError, httpx.HTTPError) as exc:
                print(f"{path}: error: {exc}", file=sys.stderr)
                status = 1
                continue
            predictions = result.get("predictions", [result])
            for index, prediction in enumerate(predictions):
                where = f"{path}[{index}]" if "predictions" in result else str(path)
                version = prediction.get("model_version", result.get("model_version"))
                print(f"{where}: {_describe(prediction, args.top_k)}  model {version}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
