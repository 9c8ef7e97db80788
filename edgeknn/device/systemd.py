"""Life under systemd: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and journald-friendly logging.

The notify protocol is one datagram to $NOTIFY_SOCKET, so the standard library does it; outside
systemd every call is a no-op.

Only READY waits when the socket's queue is full (systemd must hear it, or it fails the start);
every other message is sent from the frame loop or on the way out, and one that cannot be queued now
is dropped: a manager that is not reading must not stop the loop (a blocked ``WATCHDOG=1`` send
would hold the loop, and with it the stop on SIGTERM, for as long as nobody reads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class Notifier:
    """Sends sd_notify messages; ``watchdog()`` is rate-limited to half the configured interval."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        self._watchdog_every = usec / 2e6 if usec else 0.0
        self._last_ping = 0.0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, message: str, wait: bool = False) -> None:
        """Send ``message``; unless ``wait``, drop it if the socket's queue is full (see the module)."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), 0 if wait else socket.MSG_DONTWAIT, self._address)
        except OSError as e:  # systemd went away, or is not reading now; nothing we can do about it
            logging.getLogger(__name__).debug("sd_notify failed: %s", e)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}", wait=True)

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Call from the frame loop: a loop that stops calling this gets restarted by systemd."""
        if not self._watchdog_every:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_every:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    @contextlib.contextmanager
    def pinging(self) -> Iterator[None]:
        """Ping the watchdog from a thread of its own while the loop is busy elsewhere (a reload builds a
        new model, store and camera: tens of seconds on a loaded board, past WatchdogSec)."""
        if not self._watchdog_every:
            yield
            return
        done = threading.Event()

        def ping() -> None:
            while not done.wait(min(1.0, self._watchdog_every)):
                self.watchdog()

        thread = threading.Thread(target=ping, name="edgeknn-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class _JournalFormatter(logging.Formatter):
    """``<6>INFO edgeknn.device.daemon: message``: journald reads the priority prefix and adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{_PRIORITY.get(record.levelname, 6)}>{text}"


def setup_logging(level: str) -> None:
    """Log to stderr: with timestamps in a terminal, without them under systemd (journald adds them)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
