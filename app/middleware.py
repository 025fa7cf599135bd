"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task and a copy per request).

* ``RequestContextMiddleware``: request id (``X-Request-ID`` in, echoed out, generated when
  absent), one structured access line per request, and the latency/status observation.
* ``StartupErrorMiddleware``: a failed startup is reported as one log line, not a traceback.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import LineBuffer

__all__ = ["RequestContextMiddleware", "StartupErrorMiddleware"]

access_logger = logging.getLogger("app.access")
_ACCESS = 'request_id=%s method=%s path="%s" status=%d duration_ms=%.2f client=%s'
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Observer = Callable[[str, str, int, float], None]


class _RequestIds:
    """Request ids as uuid4().hex looks (32 hex digits), at a fraction of its cost.

    A random 64-bit prefix per process (drawn again in a forked child) and a counter: unique
    across workers and restarts without drawing 16 random bytes for every request.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_request_id = _RequestIds().new


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, access_log: bool = True, observe: Observer | None = None) -> None:
        self.app = app
        self.access_log = access_log
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = self.begin(scope)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.finish(scope, status)

    def begin(self, scope: Scope) -> tuple[bytes, bytes]:
        """A request starts: its id and start time into its state; returns the X-Request-ID header."""
        started = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _SAFE_ID.match(candidate) else ""
                break
        request_id = request_id or new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # When the request arrived, as the pipeline's queue deadline counts it (app.serving).
        state["started"] = started
        return (b"x-request-id", request_id.encode("latin-1"))

    def finish(self, scope: Scope, status: int) -> None:
        """A request is answered (or its client left): the latency observation and the access line."""
        state = scope["state"]
        if state.get("client_left"):  # nothing was sent: nginx's 499, not the 500 it would default to
            status = 499
        elapsed = time.perf_counter() - state["started"]
        route = scope.get("route")
        # The route template (/predict): the router's match, or the fast lane's own label.
        path_label = getattr(route, "path", None) or state.get("route_template") or "<unmatched>"
        if self.observe is not None:
            self.observe(scope["method"], path_label, status, elapsed)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            client = scope.get("client")
            host = client[0] if client else "-"
            args = (state["request_id"], scope["method"], _loggable(scope["path"]), status, elapsed * 1000, host)
            parent = access_logger.parent
            handlers = parent.handlers if parent is not None else ()
            if len(handlers) == 1 and type(handlers[0]) is LineBuffer:
                # The service's own handler, alone: the line straight into its buffer (app.logs).
                if handlers[0].line(access_logger, logging.INFO, _ACCESS % args):
                    return
            # What .info() does minus findCaller: its stack walk is a large share of the line's
            # cost on the hottest path, and the caller is always this line.
            record = access_logger.makeRecord(access_logger.name, logging.INFO, __file__, 0, _ACCESS, args, None)
            access_logger.handle(record)


def _loggable(path: str) -> str:
    """The path as one log field: percent-decoded, a %0A in a URL would start a forged log line."""
    if path.isprintable() and '"' not in path:
        return path
    return quote(path, safe="/:@!$&'()*+,;=-._~")


class StartupErrorMiddleware:
    """Replace the traceback Starlette puts in ``lifespan.startup.failed`` with our one line."""

    def __init__(self, app: ASGIApp, message: Callable[[], str | None]) -> None:
        self.app = app
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                short = self.message()
                if short:
                    message = {**message, "message": short}
            await send(message)

        await self.app(scope, receive, send_short)
