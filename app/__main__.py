"""``python -m app`` (or ``mnist-serve``): run uvicorn with the settings from ``MNIST_*``."""

from __future__ import annotations

import uvicorn

from app.config import get_settings

__all__ = ["main"]


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        # Our middleware writes one structured line per request; uvicorn's would duplicate it.
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
    )


if __name__ == "__main__":
    main()
