"""What the page watches: the camera's newest frame as JPEG, and the readings, state and events as
server-sent events. Nothing here runs on the main loop's thread but ``Feed.publish``, which only
stores a reference and wakes the web thread, and only while someone listens.

Frames are taken from the Capture (its newest frame, read-only and already model-sized, and the
source's own frame where ``prepare`` changed it) by the web thread itself, encoded there at most once
per frame and at most ``LIVE_FPS`` times a second, and only while a live view is open: no viewer, no JPEG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from edgeknn import jpeg as pictures
from edgeknn.camera.capture import Frame
from edgeknn.outputs import Reading

LIVE_FPS = 5.0  # live view frames per second, at most
READINGS_PER_S = 10.0  # confidence updates per second, at most
JPEG_QUALITY = 80
FULL_SIDE = 640  # the full frame's longer side, at most
BACKLOG = 100  # state and event messages kept for a listener that reads slowly


class LiveFrames:
    """The newest camera frame as JPEG, encoded on demand and once per frame, whoever asks: the
    model-sized frame, or (``full``) the source's own where it has a bigger one, at most FULL_SIDE."""

    def __init__(self, latest: Callable[[], Frame | None]):
        self._latest = latest
        self._cache: dict[bool, tuple[int, bytes]] = {False: (0, b""), True: (0, b"")}
        self.viewers = 0  # open live views
        self.encoded = 0  # frames encoded so far (the bench and tests read it)

    def has_full(self) -> bool:
        """Whether the source's own frame is worth offering: bigger than the model's on some side.
        A frame smaller than the model's (upscaled by ``prepare``) would only show less."""
        frame = self._latest()
        return frame is not None and frame.full is not None and _bigger(frame.full, frame.image)

    def jpeg(self, full: bool = False) -> tuple[int, bytes] | None:
        """(frame number, JPEG) of the newest frame, or None before the first one."""
        frame = self._latest()
        if frame is None:
            return None
        full = full and frame.full is not None
        number, jpeg = self._cache[full]
        if frame.number != number or not jpeg:
            if full:
                assert frame.full is not None
                picture = Image.fromarray(np.asarray(frame.full))
                picture.thumbnail((FULL_SIDE, FULL_SIDE))
                jpeg = pictures.jpeg(np.asarray(picture), JPEG_QUALITY)
            else:
                jpeg = pictures.jpeg(frame.image, JPEG_QUALITY)
            self._cache[full] = (frame.number, jpeg)
            self.encoded += 1
        return frame.number, jpeg


def _bigger(full: np.ndarray, image: np.ndarray) -> bool:
    """``full`` has more pixels than ``image`` along its width or its height."""
    return full.shape[0] > image.shape[0] or full.shape[1] > image.shape[1]


class Listener:
    """One open event stream: its queued state and event messages, and the last reading it sent."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.messages: deque[str] = deque(maxlen=BACKLOG)
        self.sent = 0  # the Feed's reading number it last sent


def sse(event: str, data: object) -> str:
    """One server-sent event (the data is one line of JSON)."""
    text = json.dumps(data, separators=(",", ":"), default=str)  # default: a value JSON lacks, as text
    return f"event: {event}\ndata: {text}\n\n"


class Feed:
    """Hands readings, state and events from the main loop to the open event streams.

    ``publish`` runs on the main loop's thread and costs it next to nothing: a reading is only kept
    (the newest, as the Reading itself: the web thread makes it JSON), and the web thread is woken for
    it only when a stream waits for one, so at most READINGS_PER_S times a second per stream, not
    once per frame. State and events (rare) always wake it.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listeners: set[Listener] = set()
        self.reading: Reading | None = None
        self.number = 0  # counts readings
        self.state: dict | None = None
        self.waiting = 0  # streams waiting for something to send (changed on the web thread only)
        self._pending = False

    def publish(self, kind: str, data: Any) -> None:
        """From any thread: a "reading" (a Reading), a "state" or an "event" (dicts) for the streams."""
        if kind == "state":
            self.state = data
        if not self.listeners or self.loop is None:
            return
        if kind == "reading":
            self.reading, self.number = data, self.number + 1
            if self._pending or not self.waiting:
                return
            self._pending = True
        with contextlib.suppress(RuntimeError):  # the web thread's loop is closed: the page is closing
            self.loop.call_soon_threadsafe(self._deliver, kind, data)

    def _deliver(self, kind: str, data: Any) -> None:
        if kind == "reading":
            self._pending = False
        for listener in self.listeners:
            if kind != "reading":
                listener.messages.append(sse(kind, data))
            listener.wake.set()

    def news(self, listener: Listener) -> str:
        """What ``listener`` has not sent yet, as server-sent events ("" if nothing)."""
        chunks = list(listener.messages)
        listener.messages.clear()
        reading, number = self.reading, self.number
        if reading is not None and number != listener.sent:
            listener.sent = number
            chunks.append(sse("reading", reading_json(reading)))
        return "".join(chunks)


def reading_json(reading: Reading) -> dict:
    return {
        "label": reading.label,
        "confidence": round(reading.confidence, 4),
        "scores": {k: round(v, 4) for k, v in reading.scores.items()},
        "similarity": round(reading.similarity, 4),
        "candidate": reading.candidate,
        "frame": reading.frame,
        "inference_ms": round(reading.inference_ms, 1),
    }
