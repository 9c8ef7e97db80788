"""What the tests share: waiting for a condition, a switchable replay camera, a recorder output, a daemon
running in a thread, an sd_notify listener and the "needs mosquitto" marker.

``Scene`` is the world in front of the camera: ``shown`` picks the class being shown (its photos are
replayed in a loop) and ``fault`` breaks the camera in one of the ways real ones break. With
``photo_folders`` every class shows a few photos and ``teach`` adds them all, so classification is exact
and every switch of ``shown`` is one stable label change.

A test of a device waits for an event or a count (``wait_for``, with a generous timeout) and never
assumes a rate: the suite must hold while other jobs keep every core busy. Only numpy, the camera and
the output interface are imported here; the daemon is imported when a test runs one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import DIGITS, MODEL

from edgeknn.camera.sources import CameraError, ReplaySource
from edgeknn.outputs import Output, Reading

if TYPE_CHECKING:
    from edgeknn import config
    from edgeknn.device.daemon import Daemon

CLASSES = ["1", "2", "5"]
BUTTONS, LEDS, CLEAR, STATUS = [17, 27, 22], [5, 6, 13], 26, 19
PHOTOS_PER_CLASS = 3
FAULTS = ("raise", "none", "shape", "dtype", "stall", "unplugged")

# A test that starts a Mosquitto: fails (the conftest fixture ``mosquitto``) where it is not installed.
needs_mosquitto = pytest.mark.usefixtures("mosquitto")


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, step: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return whether it became true.

    Timeouts are generous on purpose: they bound a failing test, they are not a speed requirement.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def photo_folders(root: Path) -> dict[str, Path]:
    """A folder per class under ``root`` holding links to its first few photos."""
    folders = {}
    for name in CLASSES:
        folder = root / "photos" / name
        folder.mkdir(parents=True, exist_ok=True)
        for photo in sorted((DIGITS / name).iterdir())[:PHOTOS_PER_CLASS]:
            link = folder / photo.name
            if not link.exists():
                link.symlink_to(photo)
        folders[name] = folder
    return folders


def digit_folders() -> dict[str, Path]:
    """Every photo of each class: what a camera shown the real sign digits would see."""
    return {name: DIGITS / name for name in CLASSES}


class Scene:
    """What the camera sees (``shown``: a key of ``folders``) and how it is broken (``fault``: one of
    FAULTS, or ""). ``folders`` maps each class to a photo folder (or a single photo) to replay."""

    def __init__(self, folders: dict[str, Path], fps: float = 25.0):
        self.folders = folders
        self.fps = fps
        self.shown = next(iter(folders))
        self.fault = ""
        self.opened: list[float] = []  # monotonic times the daemon's Capture opened a source
        self.sources: list[SceneSource] = []
        self._lock = threading.Lock()
        self._unstall = threading.Event()

    def opener(self) -> SceneSource:
        """The daemon's source opener: called at start and again after every failure."""
        with self._lock:
            self.opened.append(time.monotonic())
            if self.fault == "unplugged":
                raise CameraError("scene camera: cannot open it (unplugged)")
            source = SceneSource(self)
            self.sources.append(source)
            return source

    def break_(self, fault: str) -> None:
        assert fault in FAULTS, fault
        self._unstall.clear()
        self.fault = fault

    def repair(self) -> None:
        self.fault = ""
        self._unstall.set()


class SceneSource:
    def __init__(self, scene: Scene):
        self.scene = scene
        self._replays: dict[str, ReplaySource] = {}
        self._closed = threading.Event()

    def read(self) -> np.ndarray:
        scene = self.scene
        fault = scene.fault
        if fault == "stall":  # read blocks until frames come back (or the source is closed)
            while not (scene._unstall.wait(0.05) or self._closed.is_set()):
                pass
        elif fault in ("raise", "unplugged"):
            time.sleep(0.01)
            raise OSError(5, "Input/output error")
        elif fault == "none":
            return None  # type: ignore[return-value]
        elif fault == "shape":
            return np.zeros((48, 64, 4), np.uint8)
        elif fault == "dtype":
            return np.zeros((48, 64, 3), np.float32)  # type: ignore[return-value]
        if self._closed.is_set():
            raise CameraError("scene camera: closed")
        name = scene.shown
        if name not in self._replays:
            self._replays[name] = ReplaySource(scene.folders[name], fps=scene.fps, loop=True, size=(224, 224))
        return self._replays[name].read()

    def close(self) -> None:
        self._closed.set()
        for replay in self._replays.values():
            replay.close()
        self._replays.clear()


def make_config(tmp_path: Path, **overrides) -> config.Config:
    """The rig's config: exact k-NN ("nearest"), a 5-frame majority, MockFactory-friendly pins, no MQTT."""
    from edgeknn import config

    data: dict = {
        "classes": CLASSES,
        "state_dir": str(tmp_path),
        "model": {"path": str(MODEL), "threads": 2},
        "store": {"autosave_s": 0.5, "rule": "nearest"},
        "stabilizer": {"mode": "window", "frames": 5},
        "panel": {
            "kind": "gpio",
            "buttons": BUTTONS,
            "leds": LEDS,
            "clear_button": CLEAR,
            "status_led": STATUS,
        },
        "mqtt": {"enabled": False},
        "web": {"enabled": False},  # tests of the page turn it on (tests/test_web.py), on a free port
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return config.from_dict(data)


class Recorder(Output):
    """An output that remembers every reading the daemon showed (and so its stable label changes)."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def show(self, reading: Reading) -> None:
        self.readings.append(reading)

    @property
    def frames(self) -> int:
        """How many frames the daemon has classified and shown."""
        return len(self.readings)

    @property
    def changes(self) -> list[tuple[int, str]]:
        """Every stable label change, as (frame number, label)."""
        return [(r.frame, r.label) for r in list(self.readings) if r.changed]


class Running:
    """A daemon looping in a thread, as `edgeknn run` does in its main thread."""

    def __init__(self, daemon: Daemon):
        from edgeknn.device.lifecycle import start

        self.daemon = daemon
        self.recorder = Recorder()
        daemon.outputs.append(self.recorder)
        start(daemon)
        self.thread = threading.Thread(target=daemon.loop, name="edgeknn-main", daemon=True)
        self.thread.start()

    def classified(self, count: int = 5, timeout: float = 20.0) -> bool:
        """Wait until ``count`` more frames have been classified. After switching ``Scene.shown``: the
        loop now sees the newly shown class (a frame or two in flight may be of the one before)."""
        start = self.recorder.frames
        return wait_for(lambda: self.recorder.frames >= start + count, timeout)

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the main loop did not stop"
        self.daemon.shutdown()


def teach(run: Running, scene: Scene, per_class: int = 3 * PHOTOS_PER_CLASS) -> None:
    """Show each class and add every one of its photos (several times over); wait for the results."""
    from edgeknn.commands import AddExample, Result

    results: list[Result] = []
    for i, name in enumerate(CLASSES):
        scene.shown = name
        assert run.classified(), f"no frames classified while showing {name}"
        run.daemon.submit(AddExample(class_name=name, count=per_class, source="test", reply=results.append))
        assert wait_for(lambda i=i: len(results) > i), f"teaching {name} got no result"
        assert results[-1].ok, results[-1]
    scene.shown = CLASSES[0]


def stable_on(run: Running, name: str, timeout: float = 20.0) -> bool:
    """Wait until ``name`` is the stable label."""
    return wait_for(lambda: run.daemon.stabilizer.label == name, timeout)


class NotifyListener:
    """A NOTIFY_SOCKET stand-in: records every sd_notify datagram with its arrival time."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-notify", daemon=True)
        self._thread.start()

    def environ(self, watchdog_usec: int = 200_000) -> dict:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(watchdog_usec)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def pings(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for t, m in list(self.messages) if since <= t <= until and "WATCHDOG=1" in m)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        os.unlink(self.path)
