"""What the device says about itself: camera health, frames per second, and the state it publishes.

The state goes to the outputs (MQTT's retained ``state``) and to systemd's STATUS line when it
changed, and at least every ``STATE_EVERY_S`` otherwise, checked off the per-frame path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edgeknn.camera.capture import Capture
from edgeknn.device.systemd import Notifier
from edgeknn.outputs import Output

log = logging.getLogger(__name__)
STATE_EVERY_S = 30.0  # re-send state (fps, uptime) this often even when nothing else changed
STATE_CHECK_S = 0.5  # how often the loop rebuilds the state to see whether it changed
STALL_S = 5.0  # a camera with no frame for this long counts as down
VOLATILE = ("uptime_s", "fps", "inference_ms")  # keys whose change alone is not news


def camera_error(capture: Capture) -> str:
    """Why the camera is not ok: the capture's error, or a stall (a read that raises nothing)."""
    if capture.error:
        return capture.error
    if capture.last_frame_age() >= STALL_S and not capture.finished:
        return f"no frame for more than {STALL_S:g} s (the camera stalled)"
    return ""


def camera_status(capture: Capture) -> str:
    """``ok``, ``starting`` (no frame yet, no error) or ``down``."""
    if capture.ok and capture.last_frame_age() < STALL_S:
        return "ok"
    return "starting" if capture.frames_captured == 0 and not camera_error(capture) else "down"


class FrameRate:
    """Frames per second, counted over windows of at least a second (a mean of 1/dt overstates it)."""

    def __init__(self) -> None:
        self.count = 0
        self.fps = 0.0
        self._window = (time.monotonic(), 0)  # (start, count then)

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        elapsed = now - self._window[0]
        if elapsed >= 1.0:
            self.fps = (self.count - self._window[1]) / elapsed
            self._window = (now, self.count)


class StatePublisher:
    """Sends the state to the outputs and systemd when it changed; logs camera and broker changes."""

    def __init__(self, outputs: list[Output], notifier: Notifier, guard: Callable[..., None]):
        self.outputs, self.notifier, self._guard = outputs, notifier, guard
        self.last: dict | None = None
        self._sent_at = 0.0
        self._checked_at = 0.0

    def publish(self, build: Callable[[], dict], force: bool = False) -> None:
        """Build the state (at most every STATE_CHECK_S unless forced) and send it if it is news."""
        now = time.monotonic()
        if not force and now - self._checked_at < STATE_CHECK_S:
            return
        self._checked_at = now
        state = build()
        same = self.last is not None and all(state[k] == self.last[k] for k in state if k not in VOLATILE)
        if same and not force and now - self._sent_at < STATE_EVERY_S:
            return
        if not same:
            self._log_health(state)
        self.last, self._sent_at = state, now
        for output in self.outputs:
            self._guard(output.state, state)
        self.notifier.status(f"{state['camera']} camera, {state['examples']} examples, {state['fps']} fps")

    def _log_health(self, state: dict) -> None:
        before = self.last or {}
        for key in ("camera", "broker"):
            if before and before.get(key) != state[key]:
                log.info("%s: %s", key, state[key])
