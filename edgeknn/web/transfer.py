"""The page's download and upload of the examples, as an archive (``store/archive.py``), with bounded memory.

Download: the loop lends the store's rows (``LendExamples``, a few ms, no copy); a thread of its own
writes the archive into the response 64 KB at a time, each piece waiting until the client takes it, with
its exact size as Content-Length (a cut stream is an error to the client, never a short file).

Upload (``?mode=add``, the default, or ``?mode=replace``): the body goes to an unnamed temporary file
beside the store (never whole in memory, at most ``MAX_UPLOAD_BYTES``); a thread of its own reads and
checks it; the loop only applies it (``ImportExamples``). The reply is the outcome: the page waits for
it, and if it stops waiting first the import is called off (``Claim``), never applied later.

A stop or reload (``close``) answers every transfer in flight at once; their threads are daemons that
stop at their next piece, so a process never waits for one to exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from edgeknn.commands import Command, ImportExamples, LendExamples, Result
from edgeknn.store import archive, exchange
from edgeknn.throttle import Throttle

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 512 << 20  # an archive of a full default store (10 classes x 1000 examples) fits
PIECE = 1 << 16  # bytes sent or received at a time
IMPORT_WAIT_S = 120.0  # the loop takes a queued import within this (it runs between frames)
CLOSING = "the device is stopping or reloading: nothing was imported; upload again in a moment"

T = TypeVar("T")


class Stopped(Exception):
    """The transfer was called off (the device stops or reloads, the client went away)."""


class Transfers:
    """The download and upload handlers; ``run`` puts a command on the daemon's queue and waits."""

    def __init__(self, run: Callable[[Command], Awaitable[Result]], submit: Callable[[Command], None],
                 state_dir: Path, headers: dict[str, str]):  # fmt: skip
        self._run, self._submit, self.state_dir, self.headers = run, submit, Path(state_dir), headers
        self._closing: asyncio.Event | None = None  # made on the web thread's loop
        self._stop = threading.Event()  # the same for the transfers' threads
        self._busy: set[asyncio.Task] = set()
        self._failures = Throttle(log)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/examples.tar", self.download),
            web.post("/api/examples.tar", self.upload),
            web.get("/api/store.json", self.download),  # the page's links before the archive
            web.post("/api/store.json", self.upload),
        ]

    async def close(self) -> None:
        """Answer every transfer in flight now (the device stops or reloads) and wait for them a moment."""
        self._stop.set()
        self._closing_event().set()
        if self._busy:
            await asyncio.wait(list(self._busy), timeout=5.0)

    def _closing_event(self) -> asyncio.Event:
        if self._closing is None:
            self._closing = asyncio.Event()
        return self._closing

    # --- download -----------------------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        try:
            return await self._download(request)
        finally:
            self._busy.discard(task)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        result = await self._run(LendExamples(source="web"))
        if not result.ok:
            return _json({"ok": False, "error": result.error}, 503)
        lent, give_back = result.detail["lent"], result.detail["give_back"]
        try:
            manifest = exchange.manifest_of(lent)
            response = web.StreamResponse(headers={**self.headers, "Cache-Control": "no-store"})
            response.content_type = "application/x-tar"
            response.content_length = archive.size(manifest)
            response.headers["Content-Disposition"] = 'attachment; filename="edgeknn-examples.tar"'
            await response.prepare(request)
            loop = asyncio.get_running_loop()

            def write(stop: threading.Event) -> None:
                sender = _Sender(loop, response, stop)
                exchange.write_lent(sender, lent)
                sender.send()

            try:
                await self._thread("edgeknn-download", write)
            except (Stopped, ConnectionError, archive.ArchiveError, asyncio.CancelledError) as e:
                why = str(e) or "the device is stopping or reloading, or the client went away"
                self._failures.log(logging.WARNING, "web: a download of the examples was cut short: %s", why)
                if request.transport is not None:
                    request.transport.close()  # short of its Content-Length: the client sees an error
                return response
            await response.write_eof()
            return response
        finally:
            give_back()

    # --- upload -------------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        mode = request.query.get("mode", "add")
        if mode not in exchange.MODES:
            return _json({"ok": False, "error": f"mode: expected add or replace, got {mode[:20]!r}"}, 400)
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
            return await _closed(request, _json({"ok": False, "error": _too_big()}, 413), self.headers)
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        try:
            with tempfile.TemporaryFile(dir=self.state_dir, prefix=".upload-") as file:  # unnamed
                return await self._upload(request, file, mode)
        except Stopped:
            return await _closed(request, _json({"ok": False, "error": CLOSING}, 503), self.headers)
        except OSError as e:
            return _json({"ok": False, "error": f"import: cannot keep the upload ({e.strerror or e})"}, 507)
        finally:
            self._busy.discard(task)

    async def _upload(self, request: web.Request, file: Any, mode: str) -> web.Response:
        size = 0
        while chunk := await self._or_closing(request.content.read(PIECE)):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                return await _closed(request, _json({"ok": False, "error": _too_big()}, 413), self.headers)
            file.write(chunk)
        file.seek(0)
        start = time.monotonic()
        try:
            bundle = await self._thread("edgeknn-upload", lambda stop: _read(file, stop))
        except archive.ArchiveError as e:
            return _json({"ok": False, "error": f"import: {e}"}, 400)
        took = time.monotonic() - start
        log.info(
            "web: an upload of %d examples (%d bytes) read and checked in %.1f s",
            len(bundle.examples),
            size,
            took,
        )
        command = ImportExamples(export=bundle, mode=mode, source="web")
        result = await self._settled(command)
        later = result.error.startswith(("busy:", "stopping", "reloading"))  # try again: nothing changed
        status = 200 if result.ok else 503 if later else 400
        return _json({"ok": result.ok, "error": result.error, **result.detail}, status)

    async def _settled(self, command: ImportExamples) -> Result:
        """The import's outcome: the loop's reply; or, when the device is closing or does not take it
        within IMPORT_WAIT_S, called off (``Claim``): unless the loop took it first, then its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()

        def settle(result: Result) -> None:
            if not future.done():
                future.set_result(result)

        def reply(result: Result) -> None:  # the loop's thread
            with contextlib.suppress(RuntimeError):  # the web thread's loop is gone
                loop.call_soon_threadsafe(settle, result)

        object.__setattr__(command, "reply", reply)
        self._submit(command)
        try:
            return await self._or_closing(asyncio.wait_for(asyncio.shield(future), IMPORT_WAIT_S))
        except (Stopped, TimeoutError):
            if command.claim.abandon():
                why = CLOSING if self._stop.is_set() else f"the device did not take it in {IMPORT_WAIT_S:g} s"
                return Result(False, f"busy: {why}; nothing was imported")
            return await future  # the loop has it: its reply comes once it is applied (a bounded step)
        except asyncio.CancelledError:  # the client went away: the import is called off if not taken
            command.claim.abandon()
            raise

    # --- the pieces ---------------------------------------------------------------------------------

    async def _or_closing(self, step: Awaitable[T]) -> T:
        """``step``, unless the device starts closing first (Stopped)."""
        closing = self._closing_event()
        if closing.is_set():
            raise Stopped
        task = asyncio.ensure_future(step)
        waiter = asyncio.ensure_future(closing.wait())
        try:
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            raise Stopped
        return task.result()

    async def _thread(self, name: str, work: Callable[[threading.Event], T]) -> T:
        """``work(stop)`` on a daemon thread of its own (never the default executor, whose threads a
        process waits for at exit); ``stop`` is set when the device closes or this request is cancelled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        stop = threading.Event()

        def settle(value: Any, error: BaseException | None) -> None:  # on the web thread
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        def body() -> None:
            value, error = None, None
            try:
                value = work(stop)
            except BaseException as e:  # handed to the awaiting request
                error = e
            with contextlib.suppress(RuntimeError):  # the web thread's loop is gone
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=body, name=name, daemon=True).start()
        try:
            return await self._or_closing(asyncio.shield(future))
        finally:
            stop.set()
            future.add_done_callback(_retrieved)  # its outcome may come after nobody waits for it


def _retrieved(future: asyncio.Future) -> None:
    """Take a finished future's exception (asyncio would log it with a traceback as never retrieved)."""
    if not future.cancelled():
        future.exception()


class _Sender(io.RawIOBase):
    """The archive's bytes from the writer's thread into the response, PIECE at a time: each piece waits
    until aiohttp has taken it (so memory stays at a piece or two), and raises once ``stop`` is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response: web.StreamResponse, stop: threading.Event):
        self._loop, self._response, self._stop = loop, response, stop
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        if len(self._buffer) >= PIECE:
            self.send()
        return len(data)

    def send(self) -> None:
        piece, self._buffer = bytes(self._buffer), bytearray()
        if not piece:
            return
        sent = asyncio.run_coroutine_threadsafe(self._response.write(piece), self._loop)
        while True:
            if self._stop.is_set():  # (not cancelled from here: its loop may be gone, and say so loudly)
                raise Stopped("the device is stopping or reloading")
            try:
                sent.result(0.5)
                return
            except concurrent.futures.TimeoutError:
                continue


class _Until(io.RawIOBase):
    """``file`` read until ``stop`` is set (then Stopped): the upload's parse ends with its request."""

    def __init__(self, file: Any, stop: threading.Event):
        self._file, self._stop = file, stop

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def readinto(self, buffer: Any) -> int:
        if self._stop.is_set():
            raise Stopped("the upload was called off")
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read(file: Any, stop: threading.Event) -> exchange.Bundle:
    return exchange.read_import(_Until(file, stop))  # type: ignore[arg-type]


async def _closed(request: web.Request, response: web.Response, headers: dict[str, str]) -> web.Response:
    """An answer before the whole body came: sent, then the connection closes without reading the rest
    (aiohttp would read it for 10 s more, its "lingering close", holding a stop or reload that long)."""
    response.headers.update(headers)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    protocol = getattr(request, "protocol", None)
    if protocol is not None and hasattr(protocol, "force_close"):
        protocol.force_close()  # (the answer is in the transport's buffer: it goes out before it closes)
    return response


def _too_big() -> str:
    return f"import: an upload of more than {MAX_UPLOAD_BYTES >> 20} MB (the largest store's archive)"


def _json(data: dict, status: int = 200) -> web.Response:
    import json

    return web.Response(text=json.dumps(data), status=status, content_type="application/json")
