"""End to end: the daemon on replayed sign-digit photos, taught with MockFactory buttons, showing on LEDs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, MODEL
from gpiozero.pins.mock import MockFactory
from rig import (
    BUTTONS,
    CLASSES,
    LEDS,
    PHOTOS_PER_CLASS,
    STATUS,
    NotifyListener,
    Running,
    Scene,
    digit_folders,
    photo_folders,
    wait_for,
)
from rig import make_config as rig_config

from edgeknn import config
from edgeknn.camera.sources import ReplaySource
from edgeknn.commands import AddExample, ForgetClass, Result, Save
from edgeknn.device.build import build
from edgeknn.device.daemon import Stabilizer
from edgeknn.store.knn import KnnStore


def make_config(tmp_path: Path, **overrides) -> config.Config:
    """The rig's config with the default rule and a quick hold-to-record."""
    defaults = {"store.rule": "softmax", "panel.hold_time": 0.3, "panel.hold_rate": 5.0}
    return rig_config(tmp_path, **{**defaults, **overrides})


def lit_alone(run: Running, factory: MockFactory, i: int, frames: int = 10, timeout: float = 30.0) -> bool:
    """Within ``timeout``, LED ``i`` is the only one lit and stays so, unchanged, while the loop
    classifies ``frames`` more frames (a count of frames, not a time: it holds at any frame rate)."""
    pins = [factory.pin(p) for p in LEDS]
    want = [j == i for j in range(len(pins))]
    since: tuple[int, int] | None = None  # (frames shown, LED changes) when LED i was seen lit alone

    def alone_long_enough() -> bool:
        nonlocal since
        now = (run.recorder.frames, sum(len(p.states) for p in pins))
        if [bool(p.state) for p in pins] != want or (since is not None and since[1] != now[1]):
            since = None
            return False
        since = since or now
        return now[0] - since[0] >= frames

    return wait_for(alone_long_enough, timeout)


def all_added(run: Running, timeout: float = 120.0) -> bool:
    """Wait until every example asked for is added: no command queued and none pending, and still so
    after a few more frames (a hold tick that ran just before the release may still be submitting).
    Each example embeds several views of its frame: on a busy machine that takes a while."""
    d = run.daemon

    def idle() -> bool:
        return d.commands.empty() and not d.teacher.pending

    return wait_for(idle, timeout) and run.classified() and wait_for(idle, timeout)


def test_buttons_teach_and_leds_follow_then_restart_keeps_the_store(tmp_path, factory):
    # A few photos per class, which a held button catches all of: the LEDs follow exactly. (Every photo of
    # a class, most never taught, made this a test of the model's accuracy on held-out photos, which
    # depends on the frames a busy machine's held button caught: test_scan.py and `edgeknn eval` measure it.)
    cfg = make_config(tmp_path)
    scene = Scene(photo_folders(tmp_path))
    run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
    daemon = run.daemon
    try:
        assert wait_for(lambda: daemon.frames_classified > 5)
        assert wait_for(lambda: factory.pin(STATUS).state), "status LED steady while running"
        # Teach: show each class and hold its button (hold to record), as a person would.
        for i, name in enumerate(CLASSES):
            scene.shown = name
            assert run.classified(), f"no frames classified while showing {name}"
            # Held until 4 examples are in the store (each from a frame of its own, however slowly frames
            # come: a hold adds at most one per frame). The store's count, not the asks waiting: read from
            # this thread while the loop adds, "added + waiting" may count an example twice.
            factory.pin(BUTTONS[i]).drive_low()
            assert wait_for(lambda n=name: daemon.store.counts()[n] >= 4, 120), daemon.store.counts()
            factory.pin(BUTTONS[i]).drive_high()
            # The ask that was waiting at the release is added with the next frame: it must be of this
            # class too, so nothing else is shown before it is.
            assert all_added(run), f"examples still waiting to be added: {daemon.teacher.pending}"
        taught = daemon.store.counts()
        assert all(count >= 4 for count in taught.values()), taught
        store = daemon.store  # nothing is added now: each class's examples are frames of their own
        first = np.unique(store.example_ids(), return_index=True)[1]
        frames = {
            name: len(np.unique(store.rows(first[store.labels()[first] == c]), axis=0))
            for c, name in enumerate(store.classes)
        }
        # (the scene replays PHOTOS_PER_CLASS photos per class: no more distinct frames than that)
        assert all(frames[n] >= min(taught[n], PHOTOS_PER_CLASS) for n in taught), (
            f"examples {taught}, distinct frames among them {frames}"
        )
        # Watch: the LED of the class being shown lights alone, and stays so.
        for i, name in enumerate(CLASSES):
            scene.shown = name
            assert lit_alone(run, factory, i), (
                f"class {name}: its LED never stayed lit alone; LEDs {[factory.pin(p).state for p in LEDS]}, "
                f"last labels {[r.label for r in run.recorder.readings[-15:]]}"
            )
        assert wait_for(lambda: (tmp_path / "store.npz").exists()), "autosave wrote the store"
    finally:
        run.stop()
    saved = KnnStore.load(tmp_path / "store.npz", daemon.embedder.identity)
    assert saved.counts() == daemon.store.counts()
    # Restart: a new daemon loads what the old one saved.
    again = build(cfg, opener=Scene(digit_folders()).opener, pin_factory=factory)
    try:
        assert again.store.counts() == daemon.store.counts()
    finally:
        again.shutdown()


def test_commands_from_the_queue_and_their_results(tmp_path, factory):
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    run = Running(build(cfg, opener=Scene(digit_folders()).opener))
    results: list[Result] = []
    try:
        d = run.daemon
        assert wait_for(lambda: d.frames_classified > 2)
        d.submit(AddExample(class_name="1", count=3, source="test", reply=results.append))
        d.submit(AddExample(class_name="nope", reply=results.append))
        assert wait_for(lambda: len(results) == 2)
        by_ok = {r.ok: r for r in results}
        assert by_ok[True].detail == {"class": "1", "count": 3}
        assert "nope" in by_ok[False].error
        d.submit(ForgetClass(class_name="1", reply=results.append))
        d.submit(Save(reply=results.append))
        assert wait_for(lambda: len(results) == 4)
        assert results[2].ok and results[2].detail["removed"] == 3
        assert results[3].ok and (tmp_path / "store.npz").exists()
        assert d.store.counts() == {"1": 0, "2": 0, "5": 0}
    finally:
        run.stop()


def test_commands_still_waiting_when_the_loop_stops_are_answered(tmp_path, factory):
    """A stop (or a reload) answers what it will not run: a requester never waits for nothing."""
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    run = Running(build(cfg, opener=Scene(digit_folders()).opener))
    d = run.daemon
    assert wait_for(lambda: d.frames_classified > 2)
    d.stop()
    run.thread.join(10)
    results: list[Result] = []
    d.submit(AddExample(class_name="1", count=3, source="test", reply=results.append))
    d.commands.run()  # accepted: it now waits for frames that will not come
    d.submit(Save(source="test", reply=results.append))  # still in the queue
    assert results == []
    d.shutdown()
    assert len(results) == 2 and all(not r.ok and r.error.startswith("stopping:") for r in results), results


def test_each_reading_is_of_its_own_frame_while_the_next_one_is_embedded(tmp_path):
    """The inference thread embeds frame N+1 while frame N is classified: no reading may get
    another frame's embedding, and the frames come in order."""
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    scene = Scene(digit_folders(), fps=0)  # as fast as it can: a newer frame is always there
    daemon = build(cfg, opener=scene.opener)
    for name, folder in zip(CLASSES, ("1", "2", "5"), strict=True):
        for path in sorted((DIGITS / folder).iterdir())[:3]:
            daemon.store.add(name, daemon.embedder.embed(np.asarray(ReplaySource(path, loop=False).read())))
    daemon.capture.start()
    try:
        readings, overlapped = [], 0
        # until 20 readings overlapped the next frame's embedding (a count, not a share: with both cores
        # busy the inference thread sometimes has nothing new yet; 19 of 40 was seen under load)
        while (overlapped < 20 or len(readings) < 40) and len(readings) < 400:
            reading = daemon.step(timeout=5)
            assert reading is not None
            overlapped += daemon._next is not None  # the next frame was being embedded meanwhile
            daemon.settle()
            own = daemon.store.classify(daemon.embedder.embed(daemon._frame.image))
            assert reading.frame == daemon._frame.number
            assert reading.similarity == pytest.approx(own.similarity, abs=1e-6)
            readings.append(reading)
            if len(readings) % 10 == 0:
                scene.shown = CLASSES[len(readings) // 10 % 3]
        assert [r.frame for r in readings] == sorted({r.frame for r in readings})
        assert overlapped >= 20
    finally:
        daemon.shutdown()


def test_stabilizer_modes():
    s = Stabilizer("consecutive", 3)
    changes = [s.update(x) for x in ["a", "a", "b", "a", "a", "a", "b"]]
    assert changes == [False, False, False, False, False, True, False]
    assert s.label == "a"
    w = Stabilizer("window", 3)
    labels = []
    for x in ["a", "b", "a", "b", "b", "c"]:
        w.update(x)
        labels.append(w.label)
    assert labels == ["a", "a", "a", "b", "b", "b"]


def test_no_gpio_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"}
    config_file = tmp_path / "edgeknn.toml"
    config_file.write_text(
        f'classes = ["1", "2", "5"]\nstate_dir = "{tmp_path}"\n[model]\npath = "{MODEL}"\n'
        f'[mqtt]\nenabled = false\n[camera]\nsource = "replay:{DIGITS / "1"}"\n'  # a source that works
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edgeknn", "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if Path("/dev/gpiochip0").exists():
        pytest.skip("this machine has GPIO")
    assert proc.returncode == 78
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and 'panel.kind = "keyboard" or "none"' in errors[0]
    assert "Traceback" not in proc.stderr


def test_run_as_a_newcomer_would_then_sigterm(tmp_path):
    """`edgeknn teach`, then `edgeknn run --source replay:... --panel none`: predictions, READY, SIGTERM."""
    store = tmp_path / "store.npz"
    for name in CLASSES:
        photos = sorted((DIGITS / name).iterdir())[:3]
        subprocess.run(
            [sys.executable, "-m", "edgeknn", "teach", "--store", str(store), "--class", name,
             "--model", str(MODEL), *map(str, photos)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    # systemd's end of NOTIFY_SOCKET, read all along as systemd does (a socket left unread fills after
    # 10 datagrams: then only what the daemon may drop, never its loop, waits)
    notify = NotifyListener(tmp_path / "notify")
    env = {**os.environ, **notify.environ(watchdog_usec=2_000_000)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeknn", "run", "--source", f"replay:{DIGITS}?fps=30", "--panel", "none",
         "--mqtt", "none", "--model", str(MODEL), "--store", str(store)],
        stderr=subprocess.PIPE, text=True, env={**env, "HOME": str(tmp_path)},
    )  # fmt: skip
    lines: list[str] = []  # stderr, read as it comes: the test waits for the first prediction

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:

        def said(text: str) -> bool:
            return any(text in m for _, m in list(notify.messages))

        assert wait_for(lambda: said("READY=1") or proc.poll() is not None, 120), "".join(lines)
        assert wait_for(lambda: said("WATCHDOG=1"), 30), notify.messages
        assert wait_for(lambda: any("prediction: " in line for line in lines), 60), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(10)
    finally:
        proc.kill()
        notify.close()
    err = "".join(lines)
    assert proc.returncode == 0, err
    predictions = [line for line in err.splitlines() if "prediction:" in line]
    assert predictions, err
    assert any(f"prediction: {name} " in err for name in CLASSES), predictions
    assert "stopped" in err.splitlines()[-1]
    assert KnnStore.load(store, _model_id(store)).counts() == {name: 3 for name in CLASSES}


def _model_id(store: Path) -> str:
    with np.load(store) as f:
        return str(f["model_id"])


class _SteppedClock:
    """The time module as the camera thread sees it after the wall clock stepped a year ahead (NTP at
    boot, a manual ``date``); its monotonic clock, as the kernel's, did not move."""

    STEP_S = 365 * 24 * 3600.0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.STEP_S


def test_latency_is_measured_on_a_monotonic_clock(tmp_path, monkeypatch):
    """A frame read just before a step of the wall clock: its latency is still milliseconds (it was
    -3.15e10 ms, from capture ts to now on the wall clock)."""
    from edgeknn.camera import capture

    monkeypatch.setattr(capture, "time", _SteppedClock())
    cfg = rig_config(tmp_path, **{"panel.kind": "none"})
    run = Running(build(cfg, opener=Scene(digit_folders()).opener))
    try:
        assert run.classified(5, 30)
        latencies = [r.latency_ms for r in list(run.recorder.readings)]
        assert all(0 <= ms < 60_000 for ms in latencies), latencies[:5]
    finally:
        run.stop()
