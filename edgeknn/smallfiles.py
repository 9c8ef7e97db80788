"""Reading the small files the device reads at start or on request (runtime.json, passwords, session
keys, example pictures, the config): a regular file under a size cap, or one line saying why not.

A FIFO in place of such a file would block ``open`` until a writer came (a start that hangs for ever,
a page whose every request waits), and a huge file would be read whole into memory. So the path is
``stat``-ed first (anything but a regular file is refused without being opened), opened without
blocking, ``fstat``-ed again (it may have been swapped meanwhile) and read up to the cap and no more.

Running out of file descriptors (EMFILE, ENFILE) or of kernel memory is not the file's fault: those
OSErrors are raised as they are (``transient`` says which) for the caller to try again later, never
turned into "damaged" or "missing".
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# Out of descriptors or kernel memory: a passing fault of the whole process, not of the file read.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class FileRefused(OSError):
    """The file is not a regular file, or is larger than its cap; ``str()`` is one line naming it."""

    def __init__(self, code: int, path: Path, why: str):
        super().__init__(code, f"{path}: {why}")
        self.why = why  # without the path: for a line that names it already

    def __str__(self) -> str:
        return str(self.strerror)


def transient(e: BaseException) -> bool:
    """Whether ``e`` is running out of descriptors or kernel memory (try again later)."""
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check(path: Path, st: os.stat_result, limit: int) -> None:
    """FileRefused unless ``st`` (of ``path``) is a regular file of at most ``limit`` bytes."""
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(errno.EINVAL, path, f"is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise FileRefused(errno.EFBIG, path, f"{st.st_size} bytes, larger than the {limit} expected")


def read_small(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes.

    Raises FileRefused (not a regular file, too large), FileNotFoundError and the other OSErrors of
    ``stat``/``open``/``read`` (``transient`` tells a passing one). Never blocks on a FIFO.
    """
    path = Path(path)
    check(path, os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check(path, os.fstat(fd), limit)  # swapped between the stat and the open: still refused
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # grew while read
        raise FileRefused(errno.EFBIG, path, f"larger than the {limit} bytes expected")
    return data


def reason(e: OSError) -> str:
    """An OSError in the few words a line naming the file needs: FileRefused's why, or the system's."""
    return e.why if isinstance(e, FileRefused) else e.strerror or str(e)
