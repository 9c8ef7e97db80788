"""Frame sources behind one small interface: picamera2, OpenCV/V4L2, and replay of files or a video.

A source has two methods: ``read()`` blocks until it has one RGB uint8 frame (H, W, 3) and
``close()`` releases the device. ``read()`` raises CameraError when the camera fails and EOFError
when a replay that does not loop is over. A SourceError (a CameraError) is what a person must fix (a
missing folder, a library not installed): retrying cannot help. Sources:

- ``Picamera2Source``: a Raspberry Pi camera (picamera2, from apt: python3-picamera2)
- ``OpenCVSource``: a V4L2 / USB camera through OpenCV (the optional ``[cv]`` extra)
- ``ReplaySource``: a folder of images, one image, or a video file, played at a given rate

``camerauri`` builds one from a URI (the ``camera.source`` config key); ``capture.Capture`` runs
one on its own thread. picamera2 and cv2 are imported only when a source
needs them, so neither is required to use the others.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeknn.imagefiles import ImageError, find_images, is_image_file, load_rgb

log = logging.getLogger(__name__)

PICAMERA2_MISSING = (
    "picamera2 is not installed: run `sudo apt install python3-picamera2` and create the venv "
    "with `python3 -m venv --system-site-packages`"
)
OPENCV_MISSING = "OpenCV is not installed: run `pip install edgeknn[cv]` (opencv-python-headless)"
URI_HELP = "expected auto, picamera2[:N], v4l2:/dev/videoN, v4l2:N, replay:PATH[?fps=F&loop=0|1] or demo"


class CameraError(Exception):
    """A camera could not be opened, or it stopped delivering frames. The message is one line."""


class SourceError(CameraError):
    """A source that cannot work until a person changes something: a missing or empty folder, a file
    that is neither an image nor a video, a library that is not installed. Never retried."""


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


def describe_error(e: BaseException) -> str:
    """A CameraError's message as it is; any other exception with its type name."""
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
        raise SourceError(OPENCV_MISSING) from None
    return cv2


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (a test may block it in sys.modules)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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
    # picamera2's own controls that it turns into a libcamera control: it refuses them (RuntimeError "Control
    # ... is not advertised by libcamera") on a camera that lacks that control, as the kernel's vimc does.
    STANDS_FOR = {"FrameRate": "FrameDurationLimits"}
    # Seconds read() waits for a frame. Without a limit picamera2 waits forever, so a camera that vanished
    # (cable, driver, unbound device) would leave the camera thread stuck and never reopened.
    READ_TIMEOUT_S = 10.0
    _said_skipped: set[tuple[str, ...]] = set()  # what was already logged as skipped, once per process

    def __init__(self, index: int = 0, size: tuple[int, int] = (224, 224), fps: float = 30.0):
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise SourceError(f"{PICAMERA2_MISSING} ({e})") from None
        self.index = index
        self.size = (int(size[0]), int(size[1]))
        self.stream_size = (_round_up(self.size[0], 32), _round_up(self.size[1], 2))
        self.name = f"picamera2 camera {index}"
        try:
            self._camera = Picamera2(index)
        except Exception as e:
            raise CameraError(f"{self.name}: cannot open it ({describe_error(e)})") from e
        try:
            config = self._camera.create_video_configuration(
                main={"size": self.stream_size, "format": self.FORMAT},
                buffer_count=self.BUFFERS,
                controls=self._advertised({"FrameRate": float(fps)}),
                queue=False,  # wait for a fresh frame rather than take one that waited in a buffer
            )
            self._camera.configure(config)
            self._camera.start()
        except Exception as e:
            self.close()
            raise CameraError(f"{self.name}: cannot start it ({describe_error(e)})") from e

    def _advertised(self, controls: dict[str, object]) -> dict[str, object]:
        """``controls`` less those this camera does not advertise (picamera2's ``camera_controls``); says
        once per process which were skipped, as a reopen after a failure asks again."""
        advertised = getattr(self._camera, "camera_controls", None)
        if not isinstance(advertised, dict):
            return dict(controls)  # nothing to check against: picamera2 itself says what it refuses
        kept = {k: v for k, v in controls.items() if self.STANDS_FOR.get(k, k) in advertised}
        skipped = tuple(sorted(set(controls) - set(kept)))
        if skipped and skipped not in self._said_skipped:
            Picamera2Source._said_skipped.add(skipped)
            log.warning(
                "%s: the camera does not advertise %s; not set: %s",
                self.name,
                ", ".join(sorted({self.STANDS_FOR.get(k, k) for k in skipped})),
                ", ".join(skipped),
            )
        return kept

    def read(self) -> np.ndarray:
        camera = self._camera
        if camera is None:
            raise CameraError(f"{self.name}: closed")
        try:
            frame = camera.capture_array("main", wait=self.READ_TIMEOUT_S)
        except TimeoutError as e:
            # Said before closing: libcamera 0.4 aborts the process when it stops a camera that vanished.
            log.warning("%s: no frame within %gs: closing it", self.name, self.READ_TIMEOUT_S)
            # picamera2's advice after a capture timed out: cancel the queued jobs, then the camera can close.
            try:
                camera.cancel_all_and_flush()
            except Exception as flush_error:
                log.debug("%s: cancel_all_and_flush failed: %s", self.name, describe_error(flush_error))
            raise CameraError(f"{self.name}: no frame within {self.READ_TIMEOUT_S:g}s") from e
        except Exception as e:
            raise CameraError(f"{self.name}: capture failed ({describe_error(e)})") from e
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
            log.debug("%s: stop failed: %s", self.name, describe_error(e))
        finally:
            try:
                camera.close()
            except Exception as e:
                log.warning("%s: close failed: %s", self.name, describe_error(e))


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
            raise CameraError(f"{self.name}: read failed ({describe_error(e)})") from e
        if not ok or frame is None:
            raise CameraError(f"{self.name}: no frame (unplugged, or in use by another program?)")
        return _bgr_to_rgb(frame)

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()


class Pacer:
    """A replay's schedule: ``wait()`` sleeps until the next frame is due at ``fps`` (0 = no wait).

    After falling behind by more than a period the schedule starts again from now, so a slow reader
    gets no burst of frames. ``close()`` from another thread interrupts a wait; ``restart()``
    forgets the schedule (after a pause). ReplaySource and the bench's replay both pace with it.
    """

    def __init__(self, fps: float = 0.0):
        self.fps = fps
        self._next_due: float | None = None
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait(self) -> bool:
        """Wait for the next frame's turn; False when closed before it came."""
        if self.fps <= 0:
            return not self.closed
        period = 1.0 / self.fps
        now = time.monotonic()
        if self._next_due is None or now - self._next_due > period:
            self._next_due = now
        elif now < self._next_due and self._closed.wait(self._next_due - now):
            return False
        self._next_due += period
        return True

    def restart(self) -> None:
        self._next_due = None

    def close(self) -> None:
        self._closed.set()


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
        self._pacer = Pacer(self.fps)
        if self.path.is_dir() or is_image_file(self.path) or not self.path.exists():
            self._images = replay_images(self.path)
        else:
            self._cv2 = _import_cv2()
            self._video = self._cv2.VideoCapture(str(self.path))
            if not self._video.isOpened():
                self._video.release()
                self._video = None
                raise SourceError(f"replay: {self.path}: cannot open it as a video or an image")

    def read(self) -> np.ndarray:
        if self._pacer.closed:
            raise CameraError(f"replay: {self.path}: closed")
        frame = self._next_video_frame() if self._cv2 is not None else self._next_image()
        if not self._pacer.wait():
            raise CameraError(f"replay: {self.path}: closed")
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
        raise SourceError(f"replay: {self.path}: no readable images")

    def _next_video_frame(self) -> np.ndarray:
        video, cv2 = self._video, self._cv2
        if video is None or cv2 is None:
            raise CameraError(f"replay: {self.path}: closed")
        ok, frame = video.read()
        if not ok:
            if not self.loop:
                raise EOFError(f"replay: {self.path}: end of video")
            video.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = video.read()
            if not ok:
                raise SourceError(f"replay: {self.path}: no frame could be read from the video")
        return _bgr_to_rgb(frame)

    def close(self) -> None:
        self._pacer.close()
        video, self._video = self._video, None
        if video is not None:
            video.release()


def replay_images(path: Path) -> list[Path]:
    """The images a replay of ``path`` (a folder or one image) plays; SourceError when there are none."""
    if not path.exists():
        raise SourceError(f"replay: {path}: no such file or folder")
    try:
        return find_images(path)
    except ImageError as e:
        raise SourceError(f"replay: {e}") from None
