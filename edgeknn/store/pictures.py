"""The pictures of a store's examples: a JPEG per example that has one, kept in memory until a save writes
it to ``<store>.pictures/`` (``pictures_dir``), then read from there when asked for.

That folder's files are this module's too: one ``<id>.jpg`` per example, each written atomically
(``write_pictures``, called by ``file.write`` before the store file) and removed once the saved store no
longer lists it (``remove_pictures_except``, after the store file).

The store file keeps each picture's size and CRC-32, so a lost or damaged picture file is noticed (its
size when the store is loaded, its checksum when it is read) and costs that picture, nothing else.
``get`` may be called from another thread (a web page) while the loop adds, drops and saves.

A store built beside the live one (``staged.py``: a fleet's pack) keeps its pictures in a staging folder
of its own (``Staging``), written as they stream in, never all in memory; the first save copies them one
at a time (``to_write``'s lazy ``Copy``) and the folder goes once nothing reads from it any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterator, Mapping
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


def write_pictures(folder: Path, pictures: Mapping[int, bytes]) -> None:
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


class Staging:
    """A folder of pictures that belongs to no store file (``Pictures.staged``): removed, on a thread of
    its own, once nothing holds this object any more (the store saved its pictures home, and no save or
    export in flight reads from it). What a killed process leaves is ``sweep``'s."""

    PREFIX = "incoming-"

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=self.PREFIX, suffix=".pictures", dir=parent))
        self.remove = weakref.finalize(self, _remove_later, self.path)  # call it: removed now (once)
        self.remove.atexit = False

    @classmethod
    def sweep(cls, parent: Path) -> None:
        """Remove the staging folders in ``parent`` (at start: no store reads from one yet)."""
        for folder in parent.glob(f"{cls.PREFIX}*.pictures"):
            shutil.rmtree(folder, ignore_errors=True)


def _remove_later(path: Path) -> None:
    threading.Thread(target=shutil.rmtree, args=(path, True), name="edgeknn-staging", daemon=True).start()


class Copy(Mapping[int, bytes]):
    """The pictures a save copies from another folder (a staging one), each read when the save writes it:
    one picture in memory at a time, not all of them. Holds ``owner`` (and so its staging folder)."""

    def __init__(self, owner: Pictures, ids: list[int]):
        self.owner, self._ids = owner, ids
        self._staging = owner._staging

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __getitem__(self, example_id: int) -> bytes:
        data = self.owner.get(example_id) if example_id in self._ids else None
        if data is None:
            raise KeyError(example_id)
        return data

    def items(self):  # type: ignore[override]
        """(id, JPEG) of each picture still readable, read one at a time (a lost one is skipped)."""
        return ((i, data) for i in self._ids if (data := self.owner.get(i)) is not None)


class Pictures:
    """(size, crc32) of each example's picture; the bytes of those not saved yet (``_unsaved``), and the
    folder the saved ones are in. The lock guards all three against ``get`` on another thread."""

    def __init__(self, folder: Path | None = None, known: dict[int, tuple[int, int]] | None = None):
        self._known: dict[int, tuple[int, int]] = known or {}
        self._unsaved: dict[int, bytes] = {}
        self._folder = folder
        self._staging: Staging | None = None  # the folder is a staging one (``staged``)
        self._lock = threading.Lock()

    @classmethod
    def staged(cls, parent: Path) -> Pictures:
        """Pictures kept in a new staging folder in ``parent`` (``put_file``), for a store built beside
        the live one: its pictures never sit in memory."""
        staging = Staging(parent)
        pictures = cls(staging.path)
        pictures._staging = staging
        return pictures

    def discard(self) -> None:
        """These pictures will never be saved (a store built beside, refused): the staging folder goes."""
        if self._staging is not None:
            self._staging.remove()

    def put_file(self, example_id: int, data: bytes) -> None:
        """Write ``data`` (``check``ed) as the picture of ``example_id`` into the staging folder (no
        fsync: a staging folder outlives no crash) and keep only its size and CRC-32."""
        assert self._staging is not None and self._folder is not None
        with open(picture_path(self._folder, example_id), "wb") as f:
            f.write(data)
        with self._lock:
            self._known[example_id] = (len(data), zlib.crc32(data))

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
        """Keep ``data`` (``check``ed) as the picture of ``example_id`` until a save writes it (in the
        staging folder, when there is one: ``staged``)."""
        if self._staging is not None:
            self.put_file(example_id, data)
            return
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

    def to_write(self, path: Path) -> Mapping[int, bytes]:
        """The pictures a save to ``path`` must write: those not yet saved, or all of them when the
        pictures live elsewhere (a save to another file copies them, read one at a time: ``Copy``)."""
        with self._lock:
            home, unsaved, ids = self._folder, dict(self._unsaved), sorted(self._known)
        if home is None or home == pictures_dir(Path(path)):
            return unsaved
        return Copy(self, ids)

    def saved(self, path: Path, written: Mapping[int, bytes]) -> None:
        """A save to ``path`` wrote ``written`` (``to_write``): they are read from there now. A save that
        copied another store's pictures (this one replaced it meanwhile: ``staged.swap``) moves nothing."""
        with self._lock:
            home, mine = self._folder, isinstance(written, Copy) and written.owner is self
            if home is not None and home != pictures_dir(Path(path)) and not mine:
                return
            self._folder, self._staging = pictures_dir(Path(path)), None  # the staging folder may go
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
            return PictureLoan(dict(self._known), dict(self._unsaved), self._folder, self._staging)

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

    def __init__(self, known: dict[int, tuple[int, int]], unsaved: dict[int, bytes], folder: Path | None,
                 staging: Staging | None = None):  # fmt: skip
        self.known, self._unsaved, self._folder = known, unsaved, folder
        self._staging = staging  # held: its folder stays while the export reads it

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
