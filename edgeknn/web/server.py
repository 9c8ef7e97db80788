"""The device's web page: aiohttp on a thread of its own, beside the main loop, as an Output.

aiohttp because it is a maintained asyncio HTTP server with streaming responses (the live view, the
event stream) and one thread for every connection: light on a small ARM board. The page changes
nothing itself: every change is a command on the daemon's queue (``submit``), as a button's or an
MQTT message is, and the handler waits for its reply. Reads are the state the daemon publishes, the
camera's newest frame and the store's example pictures (``picture``, safe from another thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeknn import __version__, smallfiles
from edgeknn.camera.capture import Frame
from edgeknn.commands import MAX_EXAMPLES_PER_COMMAND, Command
from edgeknn.config import WebConfig
from edgeknn.outputs import Output, Reading
from edgeknn.store.names import UNKNOWN
from edgeknn.web.access import Access
from edgeknn.web.actions import Actions, json_response
from edgeknn.web.auth import AuthError
from edgeknn.web.limits import (
    HEADER_TIMEOUT_S,
    KEEPALIVE_S,
    Connections,
    Guarded,
    RequestLog,
    connection_limit,
    loop_errors,
)
from edgeknn.web.live import LIVE_FPS, READINGS_PER_S, Feed, Listener, LiveFrames, sse
from edgeknn.web.transfer import MAX_UPLOAD_BYTES

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
MAX_TLS_FILE = 1 << 20  # a certificate chain or key: a few KB
MAX_UPLOAD = 32 * 1024 * 1024  # a request body read whole; the examples' upload streams (transfer.py)
BOUNDARY = "edgeknnframe"
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}
STATIC = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def page_addresses(listen: str, port: int, scheme: str = "http") -> list[str]:
    """The addresses a person types to open the page: the listened address, or for every address
    this machine (localhost) and its address on the network, when it has one (offline: localhost only)."""
    if listen and listen not in ("0.0.0.0", "::"):
        return [f"{scheme}://{f'[{listen}]' if ':' in listen else listen}:{port}"]
    found = [f"{scheme}://localhost:{port}"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # UDP: no packet is sent, the kernel only picks the route's address
        found.append(f"{scheme}://{s.getsockname()[0]}:{port}")
    return found


class WebError(Exception):
    """The page cannot be served as configured (TLS files): one line naming the key."""


def _tls(cfg: WebConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        for path in (cfg.tls_cert, cfg.tls_key or cfg.tls_cert):  # never a FIFO (OpenSSL would wait on it)
            smallfiles.check(Path(path), os.stat(path), MAX_TLS_FILE)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise WebError(
            f"web.tls_cert/web.tls_key: cannot load {cfg.tls_cert} and {cfg.tls_key} ({e})"
        ) from None
    return context


class WebOutput(Output):
    """The page's server: started with the daemon's outputs, closed with them (a reload starts a new one)."""

    def __init__(
        self,
        cfg: WebConfig,
        state_dir: Path,
        submit: Callable[[Command], None],
        latest_frame: Callable[[], Frame | None],
        picture: Callable[[int], bytes | None],
        store_path: Path,
        teachable: bool = True,
        device: dict | None = None,
    ):
        self.cfg, self.state_dir = cfg, Path(state_dir)
        self.device = device or {}  # the page's header: {"name": the device id, "host": the host name}
        self.teachable = teachable  # False: a classifier model (its own labels): bars only, no teaching
        self.actions = Actions(submit, picture, store_path, HEADERS)
        self.frames = LiveFrames(latest_frame)
        self.feed = Feed()
        self.access = Access(cfg, self.state_dir)
        self._tls = _tls(cfg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self.connections: Connections | None = None
        self._streams: set[asyncio.Task] = set()
        self.listening = False
        self.url = ""

    # --- the Output interface (main loop's thread) ---------------------------------------------

    def start(self) -> None:
        """Make the password (first start), then listen; a port that cannot be had is said, not fatal."""
        try:
            self.access.start(secure=self._tls is not None)
        except (AuthError, OSError) as e:
            log.error("web: the page is off: %s", e)
            return
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="edgeknn-web", daemon=True)
        self._thread.start()
        started.wait(START_TIMEOUT_S)

    def show(self, reading: Reading) -> None:
        self.feed.publish("reading", reading)  # nobody watching: returns at once

    def event(self, event: dict) -> None:
        self.feed.publish("event", event)

    def state(self, state: dict) -> None:
        self.feed.publish("state", state)

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):  # RuntimeError: it ended (could not listen)
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(START_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        self._loop = self._thread = None

    # --- the web thread --------------------------------------------------------------------------

    def _serve(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(loop_errors)
        self.feed.loop = loop
        try:
            if loop.run_until_complete(self._listen()):
                self._loop = loop
                started.set()
                loop.run_forever()
        finally:
            started.set()
            self.feed.loop = None
            loop.close()

    async def _listen(self) -> bool:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_UPLOAD)
        routes = [
            web.post("/api/login", self.access.login),
            web.post("/api/logout", self.access.logout),
            web.get("/api/session", self.session),
            web.get("/api/live.mjpg", self.live),
            web.get("/api/events", self.events),
        ]
        app.add_routes(routes + self.actions.routes() + [web.get(path, self.static) for path in STATIC])
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_S, logger=RequestLog()
        )
        await self._runner.setup()
        assert self._runner.server is not None
        # Our own listening socket (not a TCPSite): every connection goes through Connections' limits.
        # bodies timed for the largest: an upload of the examples (a slow link gets its time per KB)
        self.connections = Connections(self._runner.server, MAX_UPLOAD_BYTES, connection_limit())
        where = f"{self.cfg.listen or '*'}:{self.cfg.port}"
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self.connections,
                self.cfg.listen or None,
                self.cfg.port,
                ssl=self._tls,
                backlog=128,
                reuse_address=True,
                ssl_handshake_timeout=HEADER_TIMEOUT_S if self._tls else None,
            )
        except OSError as e:  # asyncio's strerror repeats the address: say the system's words instead
            why = os.strerror(e.errno) if e.errno else str(e)
            log.error(
                "web: cannot listen on %s (%s); the page is off: set web.port (or --web) to a free port, "
                "or web.enabled = false",
                where,
                why,
            )
            await self._runner.cleanup()
            return False
        self.listening = True
        scheme = "https" if self._tls else "http"
        self.url = f"{scheme}://{self.cfg.listen or 'localhost'}:{self.cfg.port}"
        if ":" in (self.cfg.listen or ""):
            self.url = f"{scheme}://[{self.cfg.listen}]:{self.cfg.port}"
        log.info(
            "web: the page is at %s (password: %s)",
            " or ".join(page_addresses(self.cfg.listen, self.cfg.port, scheme)),
            self.access.passwords.source,
        )
        return True

    async def _shutdown(self) -> None:
        await self.actions.transfers.close()  # a download or upload in flight is answered first
        for task in list(self._streams):
            task.cancel()
        if self._server is not None:
            self._server.close()
        if self.connections is not None:
            # aiohttp 3.8 (Bookworm's) closes no connection of a server it did not start: kept-alive
            # sockets stayed open, unanswered, after a reload, and the page never came back
            self.connections.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        self.listening = False

    # --- access ----------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Tells the connection's limits (``Guarded``) where the request starts (its headers are in:
        its body's time starts) and ends (the next request's head starts); then ``_checked``."""
        guard = request.transport.get_protocol() if request.transport is not None else None
        if not isinstance(guard, Guarded):
            return await self._checked(request, handler)
        guard.request_started(request.content, request.content_length)
        try:
            return await self._checked(request, handler)
        finally:
            guard.request_ended()

    async def _checked(self, request: web.Request, handler) -> web.StreamResponse:
        """Every /api/ path but the login needs a session; every POST also its CSRF token."""
        path = request.path
        if path.startswith("/api/") and path != "/api/login":
            refused = self.access.refuse(request)
            if refused is not None:
                return refused
        try:
            response = await handler(request)
        except web.HTTPException as e:  # a 400 of ours, aiohttp's 404 and 405: the same headers
            e.headers.update(HEADERS)
            raise
        if not response.prepared:
            response.headers.update(HEADERS)
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def session(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "ok": True,
                "csrf": self.access.csrf(request),
                "unknown": UNKNOWN,
                "max_per_request": MAX_EXAMPLES_PER_COMMAND,
                "version": __version__,
                "full_frame": self.frames.has_full(),
                "teachable": self.teachable,
                "device": self.device,
                "state": self.feed.state,
            }
        )

    async def static(self, request: web.Request) -> web.Response:
        name = STATIC[request.path]
        body = (resources.files("edgeknn.web") / "static" / name).read_bytes()
        return web.Response(body=body, content_type=TYPES[Path(name).suffix], charset="utf-8")

    # --- what the page watches ---------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.StreamResponse:
        """The camera as multipart JPEG (an <img> shows it), LIVE_FPS at most, only new frames; the
        model-sized frame, or with ``?full=1`` the source's own (where it is bigger)."""
        response = web.StreamResponse(headers={**HEADERS, "Cache-Control": "no-store"})
        response.content_type = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        await response.prepare(request)
        self.frames.viewers += 1
        self._streams.add(task := asyncio.current_task())  # type: ignore[arg-type]
        sent, loop, full = 0, asyncio.get_running_loop(), request.query.get("full") == "1"
        due = loop.time()
        try:
            while True:
                due = max(due + 1 / LIVE_FPS, loop.time())  # LIVE_FPS at most, whatever the encoding took
                got = self.frames.jpeg(full)
                if got is not None and got[0] != sent:
                    sent, jpeg = got
                    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                    await response.write(head.encode() + jpeg + b"\r\n")
                await asyncio.sleep(due - loop.time())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.frames.viewers -= 1
            self._streams.discard(task)  # type: ignore[arg-type]
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``reading`` (READINGS_PER_S at most, the newest), ``state``, ``event``."""
        response = web.StreamResponse(headers={**HEADERS, "Cache-Control": "no-store"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        listener = Listener()
        self.feed.listeners.add(listener)
        self._streams.add(task := asyncio.current_task())  # type: ignore[arg-type]
        try:
            if self.feed.state is not None:
                await response.write(sse("state", self.feed.state).encode())
            while True:
                news = self.feed.news(listener)
                if not news:  # wait for some (15 s at most: then a comment keeps the connection open)
                    self.feed.waiting += 1
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(listener.wake.wait(), 15)
                    finally:
                        self.feed.waiting -= 1
                    news = self.feed.news(listener)
                listener.wake.clear()
                await response.write((news or ": keep-alive\n\n").encode())
                await asyncio.sleep(1 / READINGS_PER_S)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.feed.listeners.discard(listener)
            self._streams.discard(task)  # type: ignore[arg-type]
        return response


def web_output(cfg: WebConfig, state_dir: Path, daemon: Any) -> WebOutput:
    """The page for ``daemon`` (not started); a TLS file that cannot be loaded raises WebError."""
    return WebOutput(
        cfg,
        state_dir,
        daemon.submit,
        lambda: daemon.capture.latest(after=0, timeout=0),
        daemon.store.picture,
        daemon.store_path,
        teachable=not getattr(daemon, "classifier", False),
        device=device_names(daemon),
    )


def device_names(daemon: Any) -> dict:
    """What the page's header names: the device (its MQTT device id, as Home Assistant shows it) and
    the host it runs on (which a person types in the address bar, or finds in the router's list)."""
    cfg = getattr(daemon, "cfg", None)
    name = cfg.resolved_device_id() if cfg is not None else ""
    return {"name": name, "host": socket.gethostname()}
