"""Snapshots: the newest frame saved as a JPEG in a folder that keeps only the newest ``KEEP`` of them.

Names carry the time to the microsecond (``20261130-221850-123456.jpg``), so they sort in the order
they were taken, and a file is created only if its name is free (a ``-1``, ``-2`` … is added if not), so
no snapshot ever overwrites another. After each one the oldest are deleted beyond ``KEEP``; only files
named as snapshots are, so anything else a person puts in the folder stays.

``Snapshotter`` takes them off the loop thread: the JPEG is encoded and written on a thread of its
own, then handed to ``publish`` (the MQTT link's image topic, which Home Assistant shows as an image
entity). With ``interval_s`` it also publishes (without a file) the newest frame that often.
"""

from __future__ import annotations

import datetime
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from edgeknn import jpeg as pictures
from edgeknn.commands import Result

log = logging.getLogger(__name__)

KEEP = 100  # snapshots kept in the folder; the oldest go first
MAX_SIDE = 640  # a snapshot's longer side, at most (the camera's own frame, shrunk: as the live view)
QUALITY = 90  # JPEG quality
NAME = re.compile(r"\d{8}-\d{6}(-\d{6})?(-\d+)?\.jpg")  # also the one-second names of earlier versions
MAX_WAITING = 200  # snapshot requests waiting for the encoder; past that one is answered "busy"


def save_snapshot(image: np.ndarray | bytes, folder: Path, keep: int = KEEP) -> Path:
    """Write ``image`` (RGB uint8, or JPEG bytes) as a new JPEG in ``folder``, prune the folder, return
    the file's path.

    Raises OSError (a full disk, a read-only folder); a file that could not be written whole is removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path, n = folder / f"{stamp}.jpg", 0
    while True:
        try:
            file = open(path, "xb")  # noqa: SIM115 (closed below; "x": never overwrite)
            break
        except FileExistsError:
            n += 1
            path = folder / f"{stamp}-{n}.jpg"
    try:
        with file:
            if isinstance(image, bytes):
                file.write(image)
            else:
                file.write(pictures.jpeg(image, QUALITY))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    prune(folder, keep)
    return path


def prune(folder: Path, keep: int = KEEP) -> None:
    """Delete the oldest snapshots in ``folder`` beyond the newest ``keep``."""
    names = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_file() and NAME.fullmatch(entry.name)
    )
    for name in names[: max(len(names) - keep, 0)]:
        (folder / name).unlink(missing_ok=True)


Publish = Callable[[bytes], str | None]  # JPEG -> the topic it went to (None: not sent, e.g. offline)


class Snapshotter:
    """Snapshots encoded, saved and published on a thread of their own, so the loop never waits on it.

    ``take`` is the snapshot command: a file in ``folder`` and ``publish``; ``tick`` is called with
    every classified frame and publishes one (no file) every ``interval_s`` seconds when there is a
    ``publish`` and nothing is being encoded. ``close`` ends the thread after the waiting requests.
    """

    def __init__(self, folder: Path, interval_s: float = 0.0):
        self.folder = Path(folder)
        self.interval_s = interval_s
        self.publish: Publish | None = None
        self._jobs: queue.Queue[tuple[np.ndarray, Callable[[Result], None] | None] | None] = queue.Queue(
            MAX_WAITING
        )
        self._due = time.monotonic() + interval_s
        self._ticking = threading.Event()  # a periodic snapshot waits or is being made
        self._thread: threading.Thread | None = None

    def take(self, image: np.ndarray, done: Callable[[Result], None]) -> None:
        """Save ``image`` in ``folder`` and publish it; ``done`` gets the result (from the snapshot thread):
        ``{"file": …, "topic": …}``, the topic only when it was published."""
        self._put((image, done), lambda: done(Result(False, f"busy: {MAX_WAITING} snapshots already wait")))

    def tick(self, image: np.ndarray) -> None:
        """Publish ``image`` if the interval is due (cheap otherwise: called for every frame)."""
        if self.interval_s <= 0 or self.publish is None or self._ticking.is_set():
            return
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.interval_s
        self._ticking.set()
        self._put((image, None), self._ticking.clear)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _put(self, job: tuple[np.ndarray, Callable[[Result], None] | None], full: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgeknn-snapshots", daemon=True)
            self._thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            full()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            image, done = job
            try:
                result = self._make(image, save=done is not None)
            except Exception as e:  # a snapshot must never end the thread
                log.exception("snapshot failed")
                result = Result(False, f"snapshot: {e}")
            finally:
                if done is None:
                    self._ticking.clear()
            if done is not None:
                done(result)

    def _make(self, image: np.ndarray, save: bool) -> Result:
        detail: dict[str, str] = {}
        if max(image.shape[:2]) > MAX_SIDE:
            picture = Image.fromarray(np.asarray(image))
            picture.thumbnail((MAX_SIDE, MAX_SIDE))
            image = np.asarray(picture)
        try:
            jpeg = pictures.jpeg(image, QUALITY)
            if save:
                detail["file"] = str(save_snapshot(jpeg, self.folder))
        except OSError as e:  # a full disk, a read-only folder: one line in the result and the log
            return Result(False, f"snapshot: cannot write to {self.folder}: {e.strerror or e}")
        if self.publish is not None:
            try:
                topic = self.publish(jpeg)
            except Exception:
                log.exception("snapshot: cannot publish it")
                topic = None
            if topic:
                detail["topic"] = topic
        return Result(True, detail=detail)
