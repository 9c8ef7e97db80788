"""What one client may take from the page's server: connections (per address and in all), the time and
bytes a request's headers may take, the time its body may take, and the log lines its bad requests cost.

aiohttp bounds each header line (``max_line_size``, ``max_field_size``) and closes a connection idle
between requests (``keepalive_timeout``), but it counts no connections, and a request that never ends
its headers or its body holds a descriptor for ever (aiohttp 3.8, Bookworm's, not even the first
request's headers are timed). A slowloris of a thousand such requests took every descriptor of a
device under systemd's 1 024: its camera could not open the next image. So each connection gets a
``Guarded`` protocol in front of aiohttp's own: refused at once (a 503) past ``MAX_PER_ADDRESS`` from
one address (an IPv6 /64 counts as one) or ``MAX_CONNECTIONS`` in all, closed when its headers take
longer than ``HEADER_TIMEOUT_S`` or ``MAX_HEAD_BYTES``, or its body longer than ``body_timeout``.
The server's middleware tells it where each request starts (headers complete) and ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Callable
from typing import Any

from edgeknn.smallfiles import transient
from edgeknn.throttle import Throttle

log = logging.getLogger("edgeknn.web.server")

MAX_CONNECTIONS = 128  # open at once in all: a few browsers need ~10 each; far below 1 024 descriptors
MAX_PER_ADDRESS = 24  # from one address (a browser opens 6, plus the live view and the event stream)
HEADER_TIMEOUT_S = 10.0  # from a request's first byte (or the connection's opening) to its last header
MAX_HEAD_BYTES = 64 * 1024  # a request's headers in all (aiohttp bounds each line, 3.8 not their number)
KEEPALIVE_S = 15.0  # an idle connection between two requests (aiohttp's keepalive_timeout)
BODY_BASE_S = 15.0  # a body may take this long,
BODY_MIN_RATE = 32 * 1024  # plus a second per this many bytes of it (32 MB: ~17 minutes)
LOG_INTERVAL_S = 60.0  # one line a minute per kind of refusal, whatever the flood
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 38\r\n"
    b"Retry-After: 10\r\nConnection: close\r\n\r\ntoo many connections: try again later\n"
)


def address_key(host: str) -> str:
    """Who a peer address counts as: the address, an IPv4-mapped one as IPv4, an IPv6 one by its /64
    (one home gets a /64: the addresses inside it cost an attacker nothing)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def connection_limit() -> int:
    """MAX_CONNECTIONS, or a quarter of the descriptors this process may open where that is fewer:
    the camera, the store, the pictures and MQTT keep the other three quarters."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(8, min(MAX_CONNECTIONS, soft // 4))


def body_timeout(content_length: int | None, max_body: int) -> float:
    """Seconds a request body of ``content_length`` bytes (None: chunked, up to ``max_body``) may take."""
    size = max_body if content_length is None else min(content_length, max_body)
    return BODY_BASE_S + size / BODY_MIN_RATE


class Connections:
    """The server's protocol factory: counts open connections per address and in all, and gives each
    one a ``Guarded`` in front of aiohttp's handler (``factory``, the runner's server)."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        max_body: int,
        total: int = MAX_CONNECTIONS,
        per_address: int = MAX_PER_ADDRESS,
    ):
        self.factory, self.max_body = factory, max_body
        self.total, self.per_address = total, per_address
        self.open: dict[str, int] = {}
        self.live: set[Guarded] = set()  # the admitted connections, for ``close_all``
        self.count = 0  # open now
        self.refused = 0  # refused since the start: over a limit (tests and the bench read them)
        self.closed = 0  # closed for taking too long or sending too much
        self._busy = Throttle(log, LOG_INTERVAL_S)
        self._slow = {kind: Throttle(log, LOG_INTERVAL_S) for kind in ("head", "size", "body")}

    def __call__(self) -> Guarded:
        return Guarded(self)

    def admit(self, key: str) -> bool:
        mine = self.open.get(key, 0)
        if self.count >= self.total or mine >= self.per_address:
            self.refused += 1
            which = "from one address" if mine >= self.per_address else "in all"
            limit = self.per_address if mine >= self.per_address else self.total
            self._busy.log(logging.WARNING, "web: refused a connection from %s: %d open %s already",
                           key, limit, which)  # fmt: skip
            return False
        self.open[key] = mine + 1
        self.count += 1
        return True

    def release(self, key: str) -> None:
        self.count -= 1
        left = self.open.get(key, 1) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    def close_all(self) -> None:
        """Cut every open connection: a server that stops (or reloads, in the same process) leaves no
        socket that accepts a request and never answers (a browser's kept-alive socket hung for good)."""
        for guard in list(self.live):
            guard.abort()

    def too_slow(self, key: str, kind: str, why: str) -> None:
        """A connection closed for ``kind`` ("head", "size" or "body"): one line a minute per kind."""
        self.closed += 1
        self._slow[kind].log(logging.WARNING, "web: closed a connection from %s: %s", key, why)


class Guarded(asyncio.Protocol):
    """One connection: admitted or refused, then aiohttp's handler behind the time and size limits.

    Between requests it is "in the head": from the first byte (or the opening) the headers must be
    complete within HEADER_TIMEOUT_S and MAX_HEAD_BYTES; ``request_started`` (the middleware: aiohttp
    parsed them) starts the body's time, ``request_ended`` the next head. An idle connection is
    aiohttp's (``keepalive_timeout``); one still writing a response is never cut.
    """

    def __init__(self, connections: Connections):
        self._c = connections
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self.key = "?"
        self._loop = asyncio.get_running_loop()
        self._in_head, self._head_bytes, self._head_started = True, 0, 0.0
        self._head_done, self._tail = False, b""  # the head's blank line came (bytes after it: a body)
        self._first = True  # no request yet: the head's clock runs from the opening
        self._body: Any = None  # the last request's body (a StreamReader): its bytes are not a head's
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.key = address_key(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
        if not self._c.admit(self.key):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(BUSY)
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]
        self._c.live.add(self)
        self._inner = self._c.factory()
        self._head_started = self._loop.time()
        self._arm(HEADER_TIMEOUT_S, self._check_head)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._transport is None:
            return
        self._transport = None
        self._c.live.discard(self)
        self._c.release(self.key)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        """Close the connection at once, unsent bytes dropped (``connection_lost`` follows)."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._in_head and not self._head_done and (self._body is None or self._body.is_eof()):
            if not self._head_bytes and not self._first:
                self._head_started = self._loop.time()
                self._arm(HEADER_TIMEOUT_S, self._check_head)
            end = (self._tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(end - len(self._tail), 0)
            self._head_done, self._tail = end >= 0, data[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                self._close("size", f"request headers over {MAX_HEAD_BYTES} bytes")
                return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # --- from the server's middleware -----------------------------------------------------------

    def request_started(self, content: Any, content_length: int | None) -> None:
        """aiohttp has the headers of a request whose body is ``content`` (a StreamReader)."""
        self._in_head, self._first, self._body = False, False, content
        self._cancel()
        if not content.is_eof():
            limit = body_timeout(content_length, self._c.max_body)
            self._arm(limit, lambda: self._check_body(content, limit))

    def request_ended(self) -> None:
        """The handler returned: the next bytes are the next request's head, once its body is in (a
        handler that answered without reading it: aiohttp reads the rest while the body's time runs)."""
        self._in_head, self._head_bytes, self._head_done, self._tail = True, 0, False, b""
        if self._body is None or self._body.is_eof():
            self._cancel()

    # --- the clock --------------------------------------------------------------------------------

    def _check_head(self) -> None:
        self._timer = None
        transport = self._transport
        if (
            transport is None
            or not self._in_head
            or self._head_done
            or (not self._first and not self._head_bytes)
        ):
            return  # a request is being handled, or the connection idles (aiohttp's keep-alive)
        late = self._head_started + HEADER_TIMEOUT_S - self._loop.time()
        if late > 0 or transport.get_write_buffer_size():  # not yet, or still answering the last one
            self._arm(max(late, 1.0), self._check_head)
            return
        self._close("head", f"no complete request headers within {HEADER_TIMEOUT_S:g} s")

    def _check_body(self, content: Any, limit: float) -> None:
        self._timer = None
        if not content.is_eof():
            self._close("body", f"its request body took over {limit:.0f} s")

    def _arm(self, delay: float, check: Callable[[], object]) -> None:
        self._cancel()
        self._timer = self._loop.call_later(delay, check)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self, kind: str, why: str) -> None:
        if self._transport is not None:
            self._c.too_slow(self.key, kind, why)
            self._transport.abort()


def loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The web loop's exception handler: running out of descriptors (asyncio's accept retries after a
    second) is one line a minute, not a traceback each time; anything else as asyncio says it."""
    if transient(context.get("exception") or Exception()):
        _loop_busy.log(logging.WARNING, "web: %s (%s); accepting again shortly", context.get("message"),
                       context["exception"].strerror)  # fmt: skip
        return
    loop.default_exception_handler(context)


_loop_busy = Throttle(log, LOG_INTERVAL_S)


class RequestLog(logging.LoggerAdapter):
    """aiohttp's ``logger`` for its request handlers. A request it could not parse (a bad URL, an
    oversized header: the client's fault, and anyone can send them) is one line a minute per kind,
    never a traceback; a client gone in the middle of a request is no line at all; whatever else it
    logs (a handler's own failure: ours) goes through as it was."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._kinds: dict[str, Throttle] = {}

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, ConnectionError):  # the client went (or was closed for its limits): no line
            return
        if level > logging.DEBUG and _clients_fault(error):
            kind = type(error).__name__
            if kind not in self._kinds and len(self._kinds) < 32:
                self._kinds[kind] = Throttle(log, LOG_INTERVAL_S)
            throttle = self._kinds.get(kind) or Throttle(log, LOG_INTERVAL_S)
            who = args[0] if args and "%s" in str(msg) else "a client"
            what = " ".join(str(error).split())[:160]
            throttle.log(logging.WARNING, "web: refused a bad request from %s (%s: %s)", who, kind, what)
            return
        super().log(level, msg, *args, **kwargs)


def _clients_fault(error: object) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(error, HttpProcessingError | UnicodeError)
