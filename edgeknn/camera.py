"""Frame sources behind one small interface, and the camera thread that keeps only the newest frame.

A source has two methods: ``read()`` blocks until it has one RGB uint8 frame (H, W, 3) and
``close()`` releases the device. ``read()`` raises CameraError when the camera fails and EOFError
when a replay that does not loop is over. Sources:

- ``Picamera2Source``: a Raspberry Pi camera (picamera2, from apt: python3-picamera2)
- ``OpenCVSource``: a V4L2 / USB camera through OpenCV (the optional ``[cv]`` extra)
- ``ReplaySource``: a folder of images, one image, or a video file, played at a given rate

``open_source`` and ``source_opener`` build one from a URI (the ``camera.source`` config key).
``Capture`` runs a source on its own thread and reopens it after failures. picamera2 and cv2 are
imported only when a source needs them, so neither is required to use the others.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl

import numpy as np

from edgeknn.imagefiles import ImageError, find_images, is_image_file, load_rgb

log = logging.getLogger(__name__)

PICAMERA2_MISSING = (
    "picamera2 is not installed: run `sudo apt install python3-picamera2` and create the venv "
    "with `python3 -m venv --system-site-packages`"
)
OPENCV_MISSING = "OpenCV is not installed: run `pip install edgeknn[cv]` (opencv-python-headless)"
URI_HELP = "expected auto, picamera2[:N], v4l2:/dev/videoN, v4l2:N or replay:PATH[?fps=F&loop=0|1]"

INITIAL_BACKOFF = 0.5


class CameraError(Exception):
    """A camera could not be opened, or it stopped delivering frames. The message is one line."""


class Source(Protocol):
    """Where frames come from."""

    def read(self) -> np.ndarray:
        """Block until the next frame; return it as RGB uint8 (H, W, 3).

        Raises CameraError on failure and EOFError when a replay that does not loop is over.
        """
        ...

    def close(self) -> None:
        """Release the device. Safe to call more than once."""
        ...


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, CameraError) else f"{type(e).__name__}: {e}"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _centre_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Cut a frame the ISP made slightly larger (its width is rounded up) back to the size asked."""
    h, w = image.shape[:2]
    if (w, h) == (width, height) or w < width or h < height:
        return image
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV's BGR (or BGRA) frame as contiguous RGB."""
    if frame.ndim == 3 and frame.shape[2] >= 3:
        return np.ascontiguousarray(frame[..., 2::-1])
    return frame


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise CameraError(OPENCV_MISSING) from None
    return cv2


class Picamera2Source:
    """A Raspberry Pi camera through picamera2, delivering frames at about the model's input size.

    The ISP scales the sensor image down in hardware, so the CPU never resizes a full frame. We ask
    for a small ``main`` stream rather than the ``lores`` stream: on a Pi 4 and older, ``lores`` can
    only be YUV420 (a Pi 5 allows RGB there), and one small RGB stream needs no colour conversion
    on any Pi. Its format is "BGR888", which picamera2 stores as R,G,B bytes per pixel (its
    "RGB888" is stored B,G,R), so frames need no channel swap. The stream's width is rounded up to
    a multiple of 32 pixels (the hardware's row alignment); the extra columns are cropped here.
    ``size`` is (width, height), as picamera2 and Pillow count it.
    """

    FORMAT = "BGR888"
    BUFFERS = 3

    def __init__(self, index: int = 0, size: tuple[int, int] = (224, 224), fps: float = 30.0):
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise CameraError(f"{PICAMERA2_MISSING} ({e})") from None
        self.index = index
        self.size = (int(size[0]), int(size[1]))
        self.stream_size = (_round_up(self.size[0], 32), _round_up(self.size[1], 2))
        self.name = f"picamera2 camera {index}"
        try:
            self._camera = Picamera2(index)
        except Exception as e:
            raise CameraError(f"{self.name}: cannot open it ({_describe(e)})") from e
        try:
            config = self._camera.create_video_configuration(
                main={"size": self.stream_size, "format": self.FORMAT},
                buffer_count=self.BUFFERS,
                controls={"FrameRate": float(fps)},
                queue=False,  # wait for a fresh frame rather than take one that waited in a buffer
            )
            self._camera.configure(config)
            self._camera.start()
        except Exception as e:
            self.close()
            raise CameraError(f"{self.name}: cannot start it ({_describe(e)})") from e

    def read(self) -> np.ndarray:
        camera = self._camera
        if camera is None:
            raise CameraError(f"{self.name}: closed")
        try:
            frame = camera.capture_array("main")
        except Exception as e:
            raise CameraError(f"{self.name}: capture failed ({_describe(e)})") from e
        if isinstance(frame, np.ndarray) and frame.ndim == 3:
            frame = _centre_crop(frame, *self.size)
        return frame

    def close(self) -> None:
        """Stop and close the camera; close() runs even if stop() fails, so the device is freed."""
        camera, self._camera = self._camera, None
        if camera is None:
            return
        try:
            camera.stop()
        except Exception as e:
            log.debug("%s: stop failed: %s", self.name, _describe(e))
        finally:
            try:
                camera.close()
            except Exception as e:
                log.warning("%s: close failed: %s", self.name, _describe(e))


class OpenCVSource:
    """A V4L2 or USB camera (anything ``cv2.VideoCapture`` opens) through OpenCV; frames in RGB."""

    def __init__(self, device: str | int = 0):
        cv2 = _import_cv2()
        self.device = device
        self.name = f"v4l2 camera {device}"
        self._capture = cv2.VideoCapture(device)
        if not self._capture.isOpened():
            self._capture.release()
            self._capture = None
            raise CameraError(
                f"{self.name}: cannot open it (is it connected, and is this user in group video?)"
            )
        # Keep one frame in the driver's queue, so a read returns a recent frame rather than an old one.
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> np.ndarray:
        capture = self._capture
        if capture is None:
            raise CameraError(f"{self.name}: closed")
        try:
            ok, frame = capture.read()
        except Exception as e:
            raise CameraError(f"{self.name}: read failed ({_describe(e)})") from e
        if not ok or frame is None:
            raise CameraError(f"{self.name}: no frame (unplugged, or in use by another program?)")
        return _bgr_to_rgb(frame)

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()


class ReplaySource:
    """Frames from a folder of images (searched recursively), one image, or a video file (via OpenCV).

    Frames come at ``fps`` (0 = as fast as they decode); at the end the replay starts again, or,
    with ``loop=False``, ``read()`` raises EOFError. With ``size`` (the model's (width, height)),
    images are decoded at reduced scale, keeping at least twice the model's size, enough for its
    own crop and resize, so a 3024x3024 photo costs little. Unreadable images are skipped with a
    warning. ``close()`` from another thread interrupts a read that is waiting for its time.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 10.0,
        loop: bool = True,
        size: tuple[int, int] | None = None,
    ):
        if not (fps >= 0 and math.isfinite(fps)):
            raise ValueError(f"replay: fps must be a number >= 0, got {fps!r}")
        self.path = Path(path)
        self.fps = float(fps)
        self.loop = loop
        self._max_side = 2 * max(size) if size else None
        self._images: list[Path] = []
        self._index = 0
        self._video = None
        self._cv2 = None
        self._next_due: float | None = None
        self._closed = threading.Event()
        if not self.path.exists():
            raise CameraError(f"replay: {self.path}: no such file or folder")
        if self.path.is_dir() or is_image_file(self.path):
            try:
                self._images = find_images(self.path)
            except ImageError as e:
                raise CameraError(f"replay: {e}") from None
        else:
            self._cv2 = _import_cv2()
            self._video = self._cv2.VideoCapture(str(self.path))
            if not self._video.isOpened():
                self._video.release()
                self._video = None
                raise CameraError(f"replay: {self.path}: cannot open it as a video or an image")

    def read(self) -> np.ndarray:
        if self._closed.is_set():
            raise CameraError(f"replay: {self.path}: closed")
        frame = self._next_video_frame() if self._cv2 is not None else self._next_image()
        self._wait_for_turn()
        return frame

    def _next_image(self) -> np.ndarray:
        while self._images:
            if self._index >= len(self._images):
                if not self.loop:
                    raise EOFError(f"replay: {self.path}: all {len(self._images)} images played")
                self._index = 0
            path = self._images[self._index]
            try:
                image = load_rgb(path, self._max_side)
            except ImageError as e:
                log.warning("replay: skipping %s", e)
                del self._images[self._index]
                continue
            self._index += 1
            return image
        raise CameraError(f"replay: {self.path}: no readable images")

    def _next_video_frame(self) -> np.ndarray:
        video = self._video
        if video is None:
            raise CameraError(f"replay: {self.path}: closed")
        ok, frame = video.read()
        if not ok:
            if not self.loop:
                raise EOFError(f"replay: {self.path}: end of video")
            video.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = video.read()
            if not ok:
                raise CameraError(f"replay: {self.path}: no frame could be read from the video")
        return _bgr_to_rgb(frame)

    def _wait_for_turn(self) -> None:
        """Sleep until this frame is due; after falling behind, start the schedule again (no burst)."""
        if self.fps <= 0:
            return
        period = 1.0 / self.fps
        now = time.monotonic()
        if self._next_due is None or now - self._next_due > period:
            self._next_due = now
        elif now < self._next_due and self._closed.wait(self._next_due - now):
            raise CameraError(f"replay: {self.path}: closed")
        self._next_due += period

    def close(self) -> None:
        self._closed.set()
        video, self._video = self._video, None
        if video is not None:
            video.release()


def source_opener(uri: str, size: tuple[int, int], fps: float) -> Callable[[], Source]:
    """Check ``uri`` now; return a function that opens it (``Capture`` calls it again after a failure).

    URIs: ``auto`` (picamera2, else the first V4L2 camera), ``picamera2``, ``picamera2:N``,
    ``v4l2:/dev/videoN``, ``v4l2:N``, ``replay:PATH?fps=F&loop=0|1`` (fps defaults to ``fps``,
    loop to 1; a relative PATH is taken from the current folder). ``size`` is the model's
    (width, height). A malformed URI raises ValueError at once; a camera that is absent raises
    CameraError only when opened.
    """
    scheme, colon, rest = uri.partition(":")
    if uri == "auto":
        return lambda: _open_auto(size, fps)
    if scheme == "picamera2" and (not colon or rest.isdigit()):
        index = int(rest) if colon else 0
        return lambda: Picamera2Source(index, size, fps)
    if scheme == "v4l2" and rest:
        device: str | int = int(rest) if rest.isdigit() else rest
        return lambda: OpenCVSource(device)
    if scheme == "replay" and rest:
        path, _, query = rest.partition("?")
        if not path:
            raise ValueError(f"camera source {uri!r}: expected a folder, image or video after replay:")
        replay_fps, loop = _replay_options(uri, query, fps)
        absolute = Path(path).expanduser().absolute()
        return lambda: ReplaySource(absolute, replay_fps, loop, size)
    raise ValueError(f"camera source {uri!r}: not understood ({URI_HELP})")


def open_source(uri: str, size: tuple[int, int], fps: float) -> Source:
    """Open the source a URI names (see ``source_opener``)."""
    return source_opener(uri, size, fps)()


def _replay_options(uri: str, query: str, fps: float) -> tuple[float, bool]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"camera source {uri!r}: bad query {query!r} (expected fps=F&loop=0|1)") from None
    options = dict(pairs)
    unknown = sorted(set(options) - {"fps", "loop"})
    if unknown or len(options) != len(pairs):
        raise ValueError(f"camera source {uri!r}: expected only fps= and loop= once each, got {query!r}")
    replay_fps = fps
    if "fps" in options:
        try:
            replay_fps = float(options["fps"])
        except ValueError:
            replay_fps = -1.0
        if not (0 <= replay_fps <= 1000):
            raise ValueError(f"camera source {uri!r}: fps must be a number 0..1000 (0 = as fast as possible)")
    loop = options.get("loop", "1").lower()
    if loop not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"camera source {uri!r}: loop must be 0 or 1, got {options['loop']!r}")
    return replay_fps, loop in ("1", "true", "yes")


def _open_auto(size: tuple[int, int], fps: float) -> Source:
    """The Pi camera if there is one, else the first V4L2 camera; the error lists why each failed."""
    reasons = []
    candidates: list[tuple[str, Callable[[], Source]]] = [
        ("picamera2", lambda: Picamera2Source(0, size, fps)),
        ("v4l2:0", lambda: OpenCVSource(0)),
    ]
    for name, open_ in candidates:
        try:
            source = open_()
        except Exception as e:
            reasons.append(_describe(e))
            continue
        log.info("camera: auto found %s%s", name, f" ({'; '.join(reasons)})" if reasons else "")
        return source
    raise CameraError("no camera found (auto): " + "; ".join(reasons))


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame from a Capture.

    ``image`` is RGB uint8 (H, W, 3), already passed through the Capture's ``prepare`` when it has
    one, and read-only (a frame may be shared by several readers); ``ts`` is ``time.time()`` when
    it was read; ``number`` counts frames within one Capture, from 1.
    """

    image: np.ndarray
    ts: float
    number: int


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
    replay is over, the thread ends and ``finished`` becomes True.
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
    def frames_captured(self) -> int:
        return self._count

    def last_frame_age(self) -> float:
        """Seconds since the last good frame (since start() before the first one)."""
        return time.monotonic() - self._last_good

    def latest(self, after: int = 0, timeout: float = 1.0) -> Frame | None:
        """The newest frame if its number is above ``after``, waiting up to ``timeout`` seconds for one.

        Returns None on timeout, or at once when the capture is finished or closed and has no newer frame.
        """

        def ready() -> bool:
            frame = self._frame
            return (frame is not None and frame.number > after) or self._finished or self._closed

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
            except Exception as e:
                error = _describe(e)
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
            ts = time.time()
            if self._prepare is not None:
                image = check_frame(self._prepare(image), "prepare")
            self._publish(image, ts)

    def _publish(self, image: np.ndarray, ts: float) -> None:
        image.setflags(write=False)
        with self._new_frame:
            self._count += 1
            self._frame = Frame(image, ts, self._count)
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
                log.warning("camera: closing the source failed: %s", _describe(e))
