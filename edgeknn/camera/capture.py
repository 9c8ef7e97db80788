"""The camera thread: runs a frame source, keeps only the newest frame, reopens the source after failures.

The sources themselves (picamera2, OpenCV, replay) are in ``camera``; this module knows only their
``read()``/``close()`` interface.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeknn.camera.sources import CameraError, Source, SourceError, describe_error

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame from a Capture.

    ``image`` is RGB uint8 (H, W, 3), already passed through the Capture's ``prepare`` when it has
    one, and read-only (a frame may be shared by several readers); ``ts`` is ``time.time()`` when
    it was read; ``number`` counts frames within one Capture, from 1. ``full`` is the frame as the
    source gave it, kept (not copied) where ``prepare`` cropped or resized it: the web page shows it.
    ``mono`` is ``time.monotonic()`` at the same moment: ages and latencies are measured from it, so a
    step of the wall clock (NTP at boot, a manual ``date``) never shows as a latency.
    """

    image: np.ndarray
    ts: float
    number: int
    full: np.ndarray | None = None  # the frame before ``prepare``, where that changed it (read only)
    mono: float = 0.0  # time.monotonic() when it was read (0: unknown)


def check_frame(image: object, what: str = "the source") -> np.ndarray:
    """Return ``image`` if it is an RGB uint8 array (H, W, 3), else raise CameraError saying why."""
    if image is None:
        raise CameraError(f"{what} returned no frame (None)")
    if not isinstance(image, np.ndarray):
        raise CameraError(f"{what} returned a {type(image).__name__}, not an image array")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise CameraError(f"{what} returned a frame of shape {image.shape}, expected (H, W, 3)")
    if image.dtype != np.uint8:
        raise CameraError(f"{what} returned {image.dtype} pixels, expected uint8")
    return image


class Capture:
    """The camera thread: reads a source, keeps only the newest frame, reopens the source after failures.

    There is no queue: a reader slower than the camera gets the newest frame and the others are
    dropped, so no lag builds up. ``prepare`` (the model's crop and resize) runs here, on the
    camera thread, overlapping with inference on the main thread. On a failure (an exception, or
    a frame that is not RGB uint8 (H, W, 3)) the source is closed, ``ok`` becomes False with the
    reason in ``error``, and it is reopened after 0.5 s, then 1 s, 2 s, ... up to ``max_backoff``.
    A source whose read blocks raises nothing: ``last_frame_age()`` shows the stall. When a
    replay is over, the thread ends and ``finished`` becomes True. A SourceError (what a person must
    fix: a missing folder, OpenCV not installed) is not retried: the thread ends with the reason in
    ``fatal`` (and ``error``), and the daemon stops.
    """

    THREAD_NAME = "edgeknn-camera"

    def __init__(
        self,
        opener: Callable[[], Source],
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
        max_backoff: float = 10.0,
    ):
        self._opener = opener
        self._prepare = prepare
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._new_frame = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: Source | None = None
        self._frame: Frame | None = None
        self._count = 0
        self._ok = False
        self._error = ""
        self._finished = False
        self._fatal = ""
        self._closed = False
        self._last_good = time.monotonic()

    def start(self) -> Capture:
        """Start the camera thread (once); return self."""
        if self._thread is not None:
            raise RuntimeError("Capture already started")
        self._last_good = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()
        return self

    @property
    def ok(self) -> bool:
        """True while frames are coming (False before the first one and after a failure)."""
        return self._ok

    @property
    def error(self) -> str:
        """Why the last attempt failed; empty while frames are coming."""
        return self._error

    @property
    def finished(self) -> bool:
        """True when a replay that does not loop is over (no more frames will come)."""
        return self._finished

    @property
    def fatal(self) -> str:
        """Why the source can never work (a SourceError, not retried); empty otherwise."""
        return self._fatal

    @property
    def frames_captured(self) -> int:
        return self._count

    def last_frame_age(self) -> float:
        """Seconds since the last good frame (since start() before the first one)."""
        return time.monotonic() - self._last_good

    def latest(self, after: int = 0, timeout: float = 1.0) -> Frame | None:
        """The newest frame if its number is above ``after``, waiting up to ``timeout`` seconds for one.

        Returns None on timeout, or at once when the capture is finished, failed for good or closed
        and has no newer frame.
        """

        def ready() -> bool:
            frame = self._frame
            return (
                (frame is not None and frame.number > after)
                or self._finished
                or self._closed
                or bool(self._fatal)
            )

        with self._new_frame:
            self._new_frame.wait_for(ready, timeout)
            frame = self._frame
        return frame if frame is not None and frame.number > after else None

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the source, waiting up to ``timeout`` seconds. Idempotent."""
        self._stop.set()
        with self._new_frame:
            self._closed = True
            self._new_frame.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout / 2)
            if thread.is_alive():  # stuck in read(): closing the source is what may unblock it
                self._close_source()
                thread.join(timeout / 2)
            if thread.is_alive():
                log.warning("camera: the camera thread did not stop within %gs", timeout)
        self._close_source()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF
        while not self._stop.is_set():
            frames_before = self._count
            try:
                self._read_until_stopped()
                return
            except EOFError as e:
                log.info("camera: %s", e or "replay finished")
                with self._new_frame:
                    self._finished = True
                    self._ok = False
                    self._new_frame.notify_all()
                return
            except SourceError as e:
                log.debug("camera: %s; not retrying", e)  # the daemon says it once, and stops
                with self._new_frame:
                    self._ok, self._error, self._fatal = False, str(e), str(e)
                    self._new_frame.notify_all()
                return
            except Exception as e:
                error = describe_error(e)
            finally:
                self._close_source()
            if self._stop.is_set():
                return
            if self._count > frames_before:
                backoff = INITIAL_BACKOFF
            self._failed(error, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)

    def _read_until_stopped(self) -> None:
        source = self._opener()
        with self._lock:
            self._source = source
        while not self._stop.is_set():
            image = check_frame(source.read())
            ts, mono = time.time(), time.monotonic()
            full = None
            if self._prepare is not None:
                prepared = check_frame(self._prepare(image), "prepare")
                full, image = (image if prepared.shape != image.shape else None), prepared
            self._publish(image, ts, full, mono)

    def _publish(
        self, image: np.ndarray, ts: float, full: np.ndarray | None = None, mono: float | None = None
    ) -> None:
        image.setflags(write=False)
        with self._new_frame:
            self._count += 1
            self._frame = Frame(image, ts, self._count, full, time.monotonic() if mono is None else mono)
            self._last_good = time.monotonic()
            recovered = bool(self._error)
            self._ok, self._error = True, ""
            self._new_frame.notify_all()
        if recovered:
            log.info("camera: frames again")

    def _failed(self, error: str, backoff: float) -> None:
        with self._lock:
            changed = self._ok or error != self._error
            self._ok, self._error = False, error
        log.log(logging.WARNING if changed else logging.DEBUG, "camera: %s; retrying in %gs", error, backoff)

    def _close_source(self) -> None:
        with self._lock:
            source, self._source = self._source, None
        if source is not None:
            try:
                source.close()
            except Exception as e:
                log.warning("camera: closing the source failed: %s", describe_error(e))
