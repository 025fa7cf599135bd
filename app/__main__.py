"""``python -m app`` (or ``mnist-serve``): run uvicorn with the settings from ``MNIST_*``."""

from __future__ import annotations

import signal

import uvicorn

from app.config import get_settings

__all__ = ["main"]


def main() -> None:
    settings = get_settings()
    # Uvicorn drains in-flight requests on SIGTERM, then re-raises the signal through the handler
    # that was installed before it started. A no-op handler here turns that completed, graceful
    # shutdown into exit status 0 (what orchestrators expect) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
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
