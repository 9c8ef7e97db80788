"""A daemon rig for the reliability and security tests: a camera the test controls, a running daemon,
an sd_notify listener and a recorder of what the daemon showed.

``Scene`` is the world in front of the camera: ``shown`` picks the class being shown (a few sign-digit
photos each, replayed at 25 fps) and ``fault`` breaks the camera in one of the ways real ones break.
Every photo a class shows is taught (``teach``), so classification is exact and every switch of
``shown`` is one stable label change.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
from conftest import DIGITS, EXTRACTOR

from edgeknn import config
from edgeknn.camera import CameraError, ReplaySource
from edgeknn.commands import AddExample, Result
from edgeknn.daemon import Daemon, start
from edgeknn.outputs import Reading

CLASSES = ["1", "2", "5"]
BUTTONS, LEDS, CLEAR, STATUS = [17, 27, 22], [5, 6, 13], 26, 19
PHOTOS_PER_CLASS = 3
FAULTS = ("raise", "none", "shape", "dtype", "stall", "unplugged")


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def photo_folders(root: Path) -> dict[str, Path]:
    """A folder per class holding links to its first few photos."""
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


class Scene:
    """What the camera sees (``shown``) and how it is broken (``fault``: one of FAULTS, or "")."""

    def __init__(self, root: Path, fps: float = 25.0):
        self.folders = photo_folders(root)
        self.fps = fps
        self.shown = CLASSES[0]
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
    data = {
        "classes": CLASSES,
        "state_dir": str(tmp_path),
        "model": {"path": str(EXTRACTOR), "threads": 2},
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
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return config.from_dict(data)


class Recorder:
    """An output that remembers every stable label change (frame number, label) the daemon made."""

    def __init__(self):
        self.changes: list[tuple[int, str]] = []
        self.frames = 0

    def show(self, reading: Reading) -> None:
        self.frames += 1
        if reading.changed:
            self.changes.append((reading.frame, reading.label))

    def event(self, event: dict) -> None:
        pass

    def state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Running:
    """A daemon looping in a thread, as `edgeknn run` does in its main thread."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.recorder = Recorder()
        daemon.outputs.append(self.recorder)
        start(daemon)
        self.thread = threading.Thread(target=daemon.loop, name="edgeknn-main", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the main loop did not stop"
        self.daemon.shutdown()


def teach(run: Running, scene: Scene, per_class: int = 3 * PHOTOS_PER_CLASS) -> None:
    """Show each class and add every one of its photos (several times over); wait for the results."""
    results: list[Result] = []
    for i, name in enumerate(CLASSES):
        scene.shown = name
        time.sleep(0.3)  # that class's frames reach the loop
        run.daemon.submit(AddExample(class_name=name, count=per_class, source="test", reply=results.append))
        assert wait_for(lambda i=i: len(results) > i, 20), f"teaching {name} got no result"
        assert results[-1].ok, results[-1]
    scene.shown = CLASSES[0]


def stable_on(run: Running, name: str, timeout: float = 10.0) -> bool:
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
