"""The pictures of a store's examples: a JPEG per example that has one, kept in memory until a save writes
it to ``<store>.pictures/`` (``pictures_dir``), then read from there when asked for.

That folder's files are this module's too: one ``<id>.jpg`` per example, each written atomically
(``write_pictures``, called by ``file.write`` before the store file) and removed once the saved store no
longer lists it (``remove_pictures_except``, after the store file).

The store file keeps each picture's size and CRC-32, so a lost or damaged picture file is noticed (its
size when the store is loaded, its checksum when it is read) and costs that picture, nothing else.
``get`` may be called from another thread (a web page) while the loop adds, drops and saves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import zlib
from pathlib import Path

import numpy as np

from edgeknn import smallfiles
from edgeknn.throttle import Throttle

MAX_PICTURE_BYTES = 1 << 20  # an example's JPEG (pictures.encode makes ~15 KB): a bound, not a budget

log = logging.getLogger(__name__)
_busy = Throttle(log, 60.0)  # out of descriptors: one line a minute whatever the page asks


def check(data: bytes) -> None:
    """ValueError unless ``data`` looks like a JPEG of at most ``MAX_PICTURE_BYTES``."""
    if not data.startswith(b"\xff\xd8") or len(data) > MAX_PICTURE_BYTES:
        raise ValueError(f"a picture is a JPEG of at most {MAX_PICTURE_BYTES} bytes")


def pictures_dir(path: Path) -> Path:
    """Where the pictures of the store at ``path`` are kept: ``<store>.pictures`` beside it."""
    return path.with_name(f"{path.name}.pictures")


def picture_path(folder: Path, example_id: int) -> Path:
    return folder / f"{example_id}.jpg"


def picture_sizes(folder: Path) -> dict[int, int]:
    """The size of each picture file in ``folder`` by example id (none when it is not there)."""
    sizes: dict[int, int] = {}
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if stem.isdigit() and dot and ext == "jpg":
                with contextlib.suppress(OSError):
                    sizes[int(stem)] = entry.stat().st_size
    return sizes


def write_pictures(folder: Path, pictures: dict[int, bytes]) -> None:
    """Each picture atomically (temporary, fsync, rename), then one fsync of the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = picture_sizes(folder)
    for example_id, data in pictures.items():
        target = picture_path(folder, example_id)
        if sizes.get(example_id) == len(data):
            with contextlib.suppress(OSError):
                if smallfiles.read_small(target, len(data)) == data:  # a retried save: no write, no wear
                    continue
        tmp = folder / f".{example_id}.jpg.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_pictures_except(folder: Path, keep: set[int]) -> None:
    """Remove the pictures of examples the saved store no longer has (a failed removal is retried at
    the next save), and the temporary files of picture writers that were killed."""
    names: list[str] = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        stem, dot, ext = name.partition(".")
        stale = stem.isdigit() and dot and ext == "jpg" and int(stem) not in keep
        if name.startswith(".") and name.endswith(".tmp"):
            pid = name.rsplit(".", 2)[-2]
            stale = pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
        if stale:
            with contextlib.suppress(OSError):
                (folder / name).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Pictures:
    """(size, crc32) of each example's picture; the bytes of those not saved yet (``_unsaved``), and the
    folder the saved ones are in. The lock guards all three against ``get`` on another thread."""

    def __init__(self, folder: Path | None = None, known: dict[int, tuple[int, int]] | None = None):
        self._known: dict[int, tuple[int, int]] = known or {}
        self._unsaved: dict[int, bytes] = {}
        self._folder = folder
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, ids: np.ndarray, sizes: np.ndarray, crcs: np.ndarray) -> Pictures:
        """The pictures of the store file at ``path`` (per example id, a size of 0: none), without
        those whose file is missing or of the wrong size (one log line for all of them)."""
        known = {
            i: (size, crc)
            for i, size, crc in zip(ids.tolist(), sizes.tolist(), crcs.tolist(), strict=True)
            if size
        }
        pictures = cls(pictures_dir(Path(path)), known)
        pictures._drop_lost()
        return pictures

    def __contains__(self, example_id: int) -> bool:
        return example_id in self._known

    def add(self, example_id: int, data: bytes) -> None:
        """Keep ``data`` (``check``ed) as the picture of ``example_id`` until a save writes it."""
        with self._lock:
            self._known[example_id] = (len(data), zlib.crc32(data))
            self._unsaved[example_id] = data

    def drop(self, ids: list[int]) -> None:
        """Forget the pictures of examples that are gone (the next save removes their files)."""
        with self._lock:
            for example_id in ids:
                self._known.pop(example_id, None)
                self._unsaved.pop(example_id, None)

    def get(self, example_id: int) -> bytes | None:
        """The JPEG of an example, None when it has none (or its file is lost or damaged: said once
        in the log, and the example then has no picture). Safe to call from another thread."""
        with self._lock:
            known, data, folder = self._known.get(example_id), self._unsaved.get(example_id), self._folder
        if known is None or data is not None:
            return data
        path = picture_path(folder, example_id) if folder is not None else None
        try:
            if path is None:
                raise FileNotFoundError
            # Its size is checked before it is read (a FIFO is never opened, a huge file never read whole).
            data = smallfiles.read_small(path, min(known[0], MAX_PICTURE_BYTES))
        except OSError as e:
            if smallfiles.transient(e):  # out of descriptors: the picture is fine, ask again later
                _busy.log(logging.WARNING, "pictures: cannot open %s now (%s); trying again when asked", path,
                          e.strerror)  # fmt: skip
                return None
            problem = f"cannot read it ({smallfiles.reason(e) if e.strerror else 'missing'})"
        else:
            if (len(data), zlib.crc32(data)) == known:
                return data
            problem = "it is damaged (size or checksum differ from the store's)"
        with self._lock:
            if self._known.pop(example_id, None) is not None:
                log.warning(
                    "picture of example %d: %s %s; that example has no picture now", example_id, path, problem
                )
        return None

    def to_write(self, path: Path) -> dict[int, bytes]:
        """The pictures a save to ``path`` must write: those not yet saved, or all of them when the
        pictures live elsewhere (a save to another file copies them)."""
        with self._lock:
            home, unsaved, ids = self._folder, dict(self._unsaved), sorted(self._known)
        if home is None or home == pictures_dir(Path(path)):
            return unsaved
        out = {}
        for example_id in ids:
            data = unsaved.get(example_id) or self.get(example_id)
            if data is not None:
                out[example_id] = data
        return out

    def saved(self, path: Path, written: dict[int, bytes]) -> None:
        """A save to ``path`` wrote ``written`` (``to_write``): they are read from there now."""
        with self._lock:
            self._folder = pictures_dir(Path(path))
            for example_id in written:
                self._unsaved.pop(example_id, None)

    def arrays(self, ids: list[int]) -> dict[str, np.ndarray]:
        """The store file's ``picture_size`` and ``picture_crc`` of examples ``ids`` (0, 0: no picture)."""
        with self._lock:
            known = [self._known.get(i, (0, 0)) for i in ids]
        return {
            "picture_size": np.array([size for size, _ in known], np.int64),
            "picture_crc": np.array([crc for _, crc in known], np.uint32),
        }

    def lend(self) -> PictureLoan:
        """What an export on another thread reads: each picture's (size, crc32) now, the bytes of those
        not saved yet and the folder of the others (their files stay until a later save drops them)."""
        with self._lock:
            return PictureLoan(dict(self._known), dict(self._unsaved), self._folder)

    def _drop_lost(self) -> None:
        """Drop the pictures whose file is missing or of the wrong size (one log line for all):
        a lost picture loses nothing else. The checksum is checked when one is read."""
        if not self._known or self._folder is None:
            return
        sizes = picture_sizes(self._folder)
        lost = [i for i, (size, _) in self._known.items() if sizes.get(i) != size]
        for example_id in lost:
            del self._known[example_id]
        if lost:
            log.warning(
                "%s: %d of %d pictures are missing or damaged (examples %s); those examples have no picture",
                self._folder,
                len(lost),
                len(lost) + len(self._known),
                ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else ""),
            )


class PictureLoan:
    """The pictures as ``Pictures.lend`` found them; ``get`` from any thread."""

    def __init__(self, known: dict[int, tuple[int, int]], unsaved: dict[int, bytes], folder: Path | None):
        self.known, self._unsaved, self._folder = known, unsaved, folder

    def get(self, example_id: int) -> bytes | None:
        """The picture of ``example_id`` as lent; None when it had none, or its file is gone or changed
        since (the example was deleted and the store saved meanwhile)."""
        known = self.known.get(example_id)
        data = self._unsaved.get(example_id)
        if known is None or data is not None or self._folder is None:
            return data
        try:  # never blocks on a FIFO put in its place: opened without waiting, read only if regular
            fd = os.open(picture_path(self._folder, example_id), os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                data = f.read(known[0] + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        except OSError:
            return None
        return data if (len(data), zlib.crc32(data)) == known else None
