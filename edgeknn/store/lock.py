"""One writer per store: the daemon holds an ``flock`` on ``<store>.lock`` while it runs, and every
command that writes a store takes it too, so a store is never saved over by two processes.

The lock file names its holder (pid and command) for whoever is refused. The kernel releases an
``flock`` when its holder dies, so a crash never leaves a store locked; the file itself stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeknn.store.file import StoreError

DAEMON = "edgeknn run"  # who holds the lock of a running device's store


class StoreBusy(StoreError):
    """Another process holds the store's lock: ``who`` (``DAEMON`` for a running device) and its pid."""

    def __init__(self, path: Path, who: str, pid: int | None):
        holder = f"{who} (pid {pid})" if pid else "another process"
        message = f"{path}: in use by {holder}"
        if who == DAEMON:
            message += (
                "; teach a running device with MQTT cmd/add_example or its class buttons,"
                " or stop it first (sudo systemctl stop edgeknn)"
            )
        super().__init__(message)
        self.who, self.pid = who, pid


@dataclass
class _Claim:
    fd: int
    count: int


_claims: dict[str, _Claim] = {}  # this process's store locks, by the lock file's real path
_claims_lock = threading.Lock()


def lock_path(path: Path) -> Path:
    """The lock file beside a store: ``store.npz.lock``."""
    return Path(path).with_name(f"{Path(path).name}.lock")


def claim(path: Path, who: str) -> bool:
    """Take the store's lock for this process (``who``: the command, written with the pid into the
    lock file). True when held; False when no lock can be taken here (a read-only folder, or one
    that does not exist yet: nothing else can write there either). Raises ``StoreBusy`` when another
    process holds it. Claims nest within a process (a reload builds the new daemon while the old one
    still holds the store)."""
    target = lock_path(path)
    key = os.path.realpath(target)
    with _claims_lock:
        held = _claims.get(key)
        if held is not None:
            held.count += 1
            return True
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            try:  # a lock file another user made, or a read-only file system: flock needs no write
                fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreBusy(Path(path), *holder) from None
        except OSError:  # a file system without flock
            os.close(fd)
            return False
        with contextlib.suppress(OSError):  # a read-only lock file still locks; it only names no one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {who}\n".encode(), 0)
        _claims[key] = _Claim(fd, 1)
        return True


def release(path: Path) -> None:
    """Give back one ``claim`` of this process on the store (the last one unlocks it); a store this
    process never claimed is left alone."""
    key = os.path.realpath(lock_path(path))
    with _claims_lock:
        held = _claims.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count:
            return
        del _claims[key]
        with contextlib.suppress(OSError):
            os.ftruncate(held.fd, 0)  # whoever takes it next writes its own pid: no stale one is read
        os.close(held.fd)


@contextlib.contextmanager
def claimed(path: Path, who: str) -> Iterator[None]:
    """``claim`` for the length of a command that writes a store (``StoreBusy`` when a device runs on it)."""
    held = claim(path, who)
    try:
        yield
    finally:
        if held:
            release(path)


def _holder(fd: int) -> tuple[str, int | None]:
    """Who holds a lock, as its lock file says: the command and the pid (None when it does not say)."""
    with contextlib.suppress(OSError, ValueError):
        pid, _, who = os.pread(fd, 200, 0).decode().strip().partition(" ")
        return who or "another process", int(pid)
    return "another process", None
