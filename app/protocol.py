"""Uvicorn's httptools protocol with the two guards on request heads that it lacks.

Uvicorn bounds a request's body (the app reads it, app.serving) and idle keep-alive connections
(``timeout_keep_alive``), but not the head: httptools buffers a header line of any length (a
100 MB header grows the worker by 190 MB), and a connection that sends half a request line and
then nothing, or nothing at all, is kept open forever. :class:`GuardedHttpToolsProtocol` adds:

* ``max_head_bytes``: a request head (request line and headers) larger than this is answered
  ``431`` and the connection closed;
* ``head_timeout``: a head must arrive within this many seconds of the connection opening or
  of the previous response; else ``408`` and the connection is closed.

It also writes each response's head and first body chunk to the socket together (uvicorn writes
them separately: two ``send`` system calls, and often two TCP segments, for every small answer),
and hands the fast lane's requests (app.fast_lane) to the app's :class:`~app.fast_lane.DirectLane`
without the ASGI layers (uvicorn's proxy-headers middleware is applied as uvicorn would): the
protocol writes the lane's whole answer at once. Everything else goes through the ASGI app.

``python -m app`` (the launcher) serves with it, limits from the settings; :func:`guarded_protocol`
makes a variant with other limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from app.config import get_settings

if TYPE_CHECKING:  # app.fast_lane imports torch: the launcher, which imports this module, must not
    from app.fast_lane import DirectLane, LaneRequest, Response

__all__ = ["GuardedHttpToolsProtocol", "guarded_protocol"]

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    # None: from the settings (MNIST_MAX_HEADER_BYTES, MNIST_HEADER_TIMEOUT). The launcher passes
    # this class itself to uvicorn, which pickles it to each worker process.
    max_head_bytes: int | None = None
    head_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._max_head: int = settings.max_header_bytes if self.max_head_bytes is None else self.max_head_bytes
        self._timeout: float = settings.header_timeout if self.head_timeout is None else self.head_timeout
        self._in_head = True  # waiting for, or reading, a request head
        self._head_bytes = 0  # of the current head, as parsed (request target and headers)
        self._streamed = 0  # bytes received while a head stays incomplete
        self._refused = False
        self._watch = _HeadWatch.of(self.server_state, self.loop, self._timeout)
        self._lane = _direct_lane(self.config)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        in_head_before = self._in_head
        super().data_received(data)
        # A head still incomplete after this chunk is growing inside httptools' buffers: stop it
        # here. (A chunk that completes a head is checked, as parsed, in on_headers_complete.)
        if in_head_before and self._in_head and not self._refused:
            self._streamed += len(data)
            if self._streamed > self._max_head:
                self._refuse(431, f"request head over {self._max_head} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._streamed = 0
        if self not in self._watch.deadlines:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if self._head_bytes > self._max_head:
            self._refuse(431, f"request head over {self._max_head} bytes")
            return  # no request cycle: the app never sees it
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Uvicorn makes every request's cycle (and then calls this to run it, pipelined ones later).
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = _Cycle
            # Not when uvicorn substituted its own app (the 503 of limit_concurrency).
            cycle.lane = self._lane if app is self.app else None  # type: ignore[attr-defined]
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Keep-alive: the next head is timed from here (uvicorn's own keep-alive timeout, which
        # is shorter, closes an idle connection first; this one covers a head that starts and stalls).
        self._in_head = True
        self._head_bytes = self._streamed = 0
        if not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._watch.deadlines[self] = self.loop.time() + self._timeout
        self._watch.start()

    def _disarm(self) -> None:
        self._watch.deadlines.pop(self, None)

    def _head_timed_out(self) -> None:
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self._timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._disarm()
        body = message.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


class _HeadWatch:
    """The head deadlines of a server's connections, kept by one sweep instead of a timer each.

    A timer per request (armed after each response, cancelled when the next head is complete)
    costs more than the deadline check itself. The sweep runs every quarter of the timeout (at
    most once a second) while any connection waits for a head, so a head is refused between
    the timeout and the timeout plus one sweep interval.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.interval = min(1.0, max(timeout / 4, 0.01))
        self.deadlines: dict[GuardedHttpToolsProtocol, float] = {}
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, server_state: Any, loop: asyncio.AbstractEventLoop, timeout: float) -> _HeadWatch:
        """The watch of this server (its connections share the server state), made on first use."""
        watches: dict[float, _HeadWatch] = server_state.__dict__.setdefault("_mnist_head_watch", {})
        watch = watches.get(timeout)
        if watch is None or watch.loop is not loop:
            watch = watches[timeout] = cls(loop, timeout)
        return watch

    def start(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        late = [protocol for protocol, deadline in self.deadlines.items() if deadline <= now]
        for protocol in late:
            del self.deadlines[protocol]
            protocol._head_timed_out()
        if self.deadlines:
            self.start()


class _HeldHead:
    """Stands in for the transport from a response's start until its first body chunk.

    What is written meanwhile (the status line and headers) is held and written with that chunk;
    a close writes it first. Everything else is the transport's.
    """

    __slots__ = ("transport", "parts")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def release(self) -> None:
        if self.parts and not self.transport.is_closing():
            self.transport.write(b"".join(self.parts))
            self.parts.clear()

    def close(self) -> None:
        self.release()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    return None


_Lane = tuple["DirectLane", "ProxyHeadersMiddleware | None", "Callable[[Any], LaneRequest | None]"]


def _direct_lane(config: Any) -> _Lane | None:
    """The served app's direct lane, the proxy-headers step uvicorn puts before the app, and
    :func:`app.fast_lane.eligible`.

    None (every request through ASGI) unless the app uvicorn loaded is exactly a service with a
    lane, behind at most uvicorn's proxy-headers middleware: any other wrapper must see every request.
    """
    from app.fast_lane import DirectLane, eligible  # in a worker, where the app has imported it

    app = config.loaded_app
    proxy = None
    if type(app) is ProxyHeadersMiddleware:
        proxy = ProxyHeadersMiddleware(_no_app, trusted_hosts=config.forwarded_allow_ips)
        app = app.app
    lane = getattr(app, "lane", None)
    return (lane, proxy, eligible) if isinstance(lane, DirectLane) else None


class _Cycle(RequestResponseCycle):
    """Uvicorn's request cycle, plus: the direct lane, and a response's head and first body chunk in one write.

    ``send`` is uvicorn's, with the transport swapped for a :class:`_HeldHead` between the
    response's start and its first body message: the head is released by that message (after
    its own write, with no ``await`` in between), by a close, or, for a response with no body
    write (HEAD), when the body message returns.
    """

    lane: _Lane | None = None

    async def run_asgi(self, app: Any) -> None:
        scope: Any = self.scope  # uvicorn's typed dict; the lane takes any ASGI scope
        request = self.lane[2](scope) if self.lane is not None else None
        if request is None:
            await super().run_asgi(app)
            return
        lane, proxy, _ = self.lane  # type: ignore[misc]
        try:
            if proxy is not None:
                await proxy(self.scope, self.receive, self.send)  # rewrites the client and scheme, as uvicorn does
            receive: Any = self.receive
            answer = await lane.respond(request, scope, receive)
            if answer is not None:
                await self._write_whole(answer)
        except BaseException as exc:  # as uvicorn's run_asgi does
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        finally:
            self.on_response = lambda: None

    async def _write_whole(self, answer: Response) -> None:
        """What uvicorn's send does for a start and a whole body, in one write."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        status, headers, body = answer
        content = [STATUS_LINE[status]]
        for name, value in (*self.default_headers, *headers):
            if b"\r" in value or b"\n" in value:
                raise RuntimeError("Invalid HTTP header value.")
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content.extend((b"\r\n", body))
        self.response_started = True
        self.waiting_for_100_continue = False
        self.transport.write(b"".join(content))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    async def send(self, message: Any) -> None:
        transport = self.transport
        if type(transport) is _HeldHead:
            try:
                await super().send(message)
            finally:
                self.transport = transport.transport
                transport.release()
            return
        if message["type"] != "http.response.start" or self.response_started:
            await super().send(message)
            return
        held = _HeldHead(transport)
        self.transport = held  # type: ignore[assignment]
        try:
            await super().send(message)
        except BaseException:
            self.transport = transport
            held.release()
            raise
        if not held.parts:  # nothing was written (the client had left)
            self.transport = transport


def guarded_protocol(max_head_bytes: int, head_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout},
    )
