"""Logging set-up shared by the service and its launcher."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "info") -> None:
    """Give the ``app`` loggers a stderr handler unless the host (uvicorn, pytest) configured one."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_mnist", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._mnist = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
