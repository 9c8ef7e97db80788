"""Which frame source a ``camera.source`` URI names, and what can be known about it before it opens.

``source_opener`` parses the URI at once (a malformed one is a ValueError) and returns a function
that opens the source (``Capture`` calls it again after a failure); ``check_source`` raises the
SourceErrors a person must fix (a missing folder, a library not installed) without opening a device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

from edgeknn import assets
from edgeknn.camera.sources import (
    OPENCV_MISSING,
    PICAMERA2_MISSING,
    URI_HELP,
    CameraError,
    OpenCVSource,
    Picamera2Source,
    ReplaySource,
    Source,
    SourceError,
    describe_error,
    installed,
    replay_images,
)
from edgeknn.imagefiles import ImageError, is_image_file, load_rgb

log = logging.getLogger("edgeknn.camera.sources")

# The demo's pace: its 20 photos of a class show for 10 s, long enough to teach it, then the next class.
DEMO_FPS = 2.0


def source_opener(uri: str, size: tuple[int, int], fps: float) -> Callable[[], Source]:
    """Check ``uri`` now; return a function that opens it (``Capture`` calls it again after a failure).

    URIs: ``auto`` (picamera2, else the first V4L2 camera), ``picamera2``, ``picamera2:N``,
    ``v4l2:/dev/videoN``, ``v4l2:N``, ``replay:PATH?fps=F&loop=0|1`` (fps defaults to ``fps``,
    loop to 1; a relative PATH is taken from the current folder), ``demo`` (the package's demo photos,
    class after class, ``DEMO_FPS`` a second: ``edgeknn demo``). ``size`` is the model's
    (width, height). A malformed URI raises ValueError at once; a camera that is absent raises
    CameraError only when opened (see ``check_source`` for what can be known before).
    """
    scheme, colon, rest = uri.partition(":")
    if uri == "auto":
        return lambda: _open_auto(size, fps)
    if uri == "demo":
        return lambda: ReplaySource(assets.DEMO_PHOTOS, DEMO_FPS, True, size)
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


def check_source(uri: str) -> None:
    """Raise SourceError now for what a person must fix before ``uri`` can ever give a frame.

    Checked without opening a device: a replay's path, its images (a single image is decoded) or
    OpenCV for a video, and the library a camera needs (picamera2, OpenCV; for ``auto`` one of them).
    A folder whose images are all unreadable, or a camera that is absent, shows only when opened.
    ``uri`` is well formed (``source_opener`` accepted it).
    """
    scheme, _, rest = uri.partition(":")
    if scheme == "replay":
        path = Path(rest.partition("?")[0]).expanduser().absolute()
        if path.is_dir() or is_image_file(path) or not path.exists():
            images = replay_images(path)
            if images == [path]:  # one image: whether it decodes is cheap to know now
                try:
                    load_rgb(path, 64)
                except ImageError as e:
                    raise SourceError(f"replay: {e}") from None
        elif not installed("cv2"):
            raise SourceError(f"replay: {path}: not an image; to play it as a video, {OPENCV_MISSING}")
    elif scheme == "v4l2" and not installed("cv2"):
        raise SourceError(OPENCV_MISSING)
    elif scheme == "picamera2" and not installed("picamera2"):
        raise SourceError(PICAMERA2_MISSING)
    elif uri == "auto" and not (installed("picamera2") or installed("cv2")):
        raise SourceError(f"no camera library (auto): {PICAMERA2_MISSING}; or {OPENCV_MISSING}")


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
    reasons, permanent = [], True
    candidates: list[tuple[str, Callable[[], Source]]] = [
        ("picamera2", lambda: Picamera2Source(0, size, fps)),
        ("v4l2:0", lambda: OpenCVSource(0)),
    ]
    for name, open_ in candidates:
        try:
            source = open_()
        except Exception as e:
            reasons.append(describe_error(e))
            permanent = permanent and isinstance(e, SourceError)
            continue
        log.info("camera: auto found %s%s", name, f" ({'; '.join(reasons)})" if reasons else "")
        return source
    error = SourceError if permanent else CameraError  # no library for either: a person must install one
    raise error("no camera found (auto): " + "; ".join(reasons))
