"""Logging set-up shared by the service and its launcher.

The service logs one access line per request: at thousands of requests a second, writing each
line to stderr on its own (a lock, a format, a ``write`` system call) is a measurable share of a
small request's cost. :class:`LineBuffer` holds lines and writes them in batches: within
``FLUSH_SECONDS``, at ``BUFFER_BYTES``, at once for a WARNING or worse (with everything before
it, in order), and at exit. A worker killed with SIGKILL loses at most the last
``FLUSH_SECONDS`` of lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

__all__ = ["BUFFER_BYTES", "FLUSH_SECONDS", "LineBuffer", "configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FLUSH_SECONDS = 0.1
BUFFER_BYTES = 64 * 1024


class _Formatter(logging.Formatter):
    """The standard format, with the date and time text made once per second, not per line."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float | None = None) -> str:
        """``created`` (time.time()) as logging's default date format writes it, "%s,%03d"."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        if msecs is None:  # as LogRecord computes it
            msecs = (created - second) * 1000 + 0.0
        return f"{self._stamp},{int(msecs):03d}"


class LineBuffer(logging.StreamHandler):
    """A stream handler that writes its lines in batches (see the module's docstring)."""

    def __init__(self, stream: TextIO, interval: float = FLUSH_SECONDS, limit: int = BUFFER_BYTES) -> None:
        super().__init__(stream)
        self.interval = interval
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._wake = threading.Event()
        self._flusher_pid = 0  # the process whose flusher thread runs
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._hold(line, record.levelno)

    def line(self, logger: logging.Logger, level: int, message: str) -> bool:
        """Write ``message`` as ``logger.log(level, message)`` would, without a LogRecord, when
        this handler is the only one that would see it; False (nothing written) otherwise.

        The access log's hot path: one line per request spends most of its cost on logging's
        machinery (record, filters, handler walk, formatter), not on the line.
        """
        if logger.filters or logger.handlers or not logger.propagate or self.filters or level < self.level:
            return False
        parent = logger.parent
        if parent is None or parent.handlers != [self] or parent.filters or type(self.formatter) is not _Formatter:
            return False
        now = time.time()
        text = f"{self.formatter.stamp(now)} {logging.getLevelName(level)} {logger.name} {message}{self.terminator}"
        with self.lock:  # type: ignore[union-attr]
            self._hold(text, level)
        return True

    def _hold(self, text: str, level: int) -> None:
        """Buffer one line (lock held): written now for a warning or worse, a full buffer or a closed handler."""
        self._lines.append(text)
        self._size += len(text)
        if level >= logging.WARNING or self._size >= self.limit or self._closed:
            self._write()
        elif self._flusher_pid != os.getpid():  # one flusher thread per process (a forked child starts its own)
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._run, name="log-flush", daemon=True).start()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()

    def _write(self) -> None:
        if not self._lines:
            return
        data = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing to write to
            pass

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            if self._lines:
                self.flush()


def configure_logging(level: str = "info") -> None:
    """Give the ``app`` loggers a buffered stderr handler unless the host (uvicorn, pytest) configured one."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_mnist", False) for h in logger.handlers):
        handler = LineBuffer(sys.stderr)
        handler.setFormatter(_Formatter(_FORMAT))
        handler._mnist = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
