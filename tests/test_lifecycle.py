"""The device's life under mistakes and faults: reloads (SIGHUP) that are refused keep everything,
SIGTERM always wins, repeated reloads leak nothing, a failing save is retried with backoff and said
once, stopping with unsaved examples is a failure, and a big save does not stall the loop.

Subprocess tests run `edgeknn run` as systemd does (an sd_notify listener, signals) and teach it through
its keyboard panel (lines on stdin). A save is made to fail by putting a file where the store's folder
was: that fails for root too, where a read-only folder would not.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from conftest import MODEL
from rig import CLASSES, NotifyListener, Running, Scene, make_config, photo_folders, wait_for
from test_reliability import proc_figures, toml

from edgeknn.commands import AddExample, ForgetClass, Result, Save
from edgeknn.device.saving import Saver
from edgeknn.outputs import Output
from edgeknn.store import file as storefile
from edgeknn.store.knn import KnnStore

REPO = Path(__file__).resolve().parent.parent


class Device:
    """`edgeknn run` in a subprocess: its config file, its log (a file: a pipe could fill), sd_notify."""

    def __init__(self, tmp_path: Path, **sections):
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.config = tmp_path / "edgeknn.toml"
        photo_folders(tmp_path)
        self.data = {
            "classes": CLASSES,
            "state_dir": str(self.state),
            "model": {"path": str(MODEL), "threads": 1},
            "store": {"rule": "nearest", "autosave_s": 3600.0},
            "camera": {"source": f"replay:{tmp_path / 'photos' / '1'}?fps=20"},
            "panel": {"kind": "keyboard"},
            "mqtt": {"enabled": False},
            "web": {"enabled": False},
        }
        for section, values in sections.items():
            self.data.setdefault(section, {}).update(values)
        self.write_config()
        self.notify = NotifyListener(tmp_path / "notify")
        self.log_path = tmp_path / "daemon.log"
        env = {**os.environ, **self.notify.environ(watchdog_usec=400_000)}
        with open(self.log_path, "w") as log_out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeknn", "run", "--config", str(self.config)],
                stdin=subprocess.PIPE,
                stderr=log_out,
                cwd=REPO,
                env=env,
                text=True,
            )
        assert self.wait_log("running:"), self.log

    def write_config(self, text: str | None = None) -> None:
        self.config.write_text(toml(self.data) if text is None else text)

    @property
    def store_path(self) -> Path:
        return self.state / "store.npz"

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = 60.0) -> bool:
        return wait_for(lambda: self.log.count(text) >= count or self.proc.poll() is not None, timeout) and (
            self.log.count(text) >= count
        )

    def teach(self, examples: int) -> None:
        """Add ``examples`` examples of class 1 through the keyboard panel (a burst of key presses: each
        is an example); wait until all are added."""
        before = self.log.count("example added")
        for _ in range(examples):
            self.proc.stdin.write("1\n")
            self.proc.stdin.flush()
        assert self.wait_log("example added", before + examples), self.log

    def looping(self, timeout: float = 30.0) -> bool:
        """True once the loop feeds the watchdog again (a few pings from now on)."""
        since = time.monotonic()
        wait_for(lambda: self.notify.pings(since=since) >= 3 or self.proc.poll() is not None, timeout)
        return self.notify.pings(since=since) >= 3 and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.notify.path.exists():
            self.notify.close()


def break_folder(folder: Path) -> Path:
    """Make every save into ``folder`` fail (a file where the folder was); return where it went."""
    aside = folder.with_name(folder.name + ".aside")
    folder.mkdir(parents=True, exist_ok=True)
    folder.rename(aside)
    folder.write_text("not a folder")
    return aside


def repair_folder(folder: Path, aside: Path) -> None:
    folder.unlink()
    aside.rename(folder)


def stored_examples(path: Path) -> int:
    return len(KnnStore.load(path, _model_id()))


_MODEL_ID: list[str] = []


def _model_id() -> str:
    if not _MODEL_ID:
        from edgeknn.model.embedder import Embedder

        _MODEL_ID.append(Embedder(MODEL, 1).identity)
    return _MODEL_ID[0]


# --- case 1: a reload while saves fail keeps the examples ------------------------------------------


def test_reload_while_saves_fail_is_refused_and_keeps_the_examples(tmp_path):
    device = Device(tmp_path)
    try:
        device.teach(5)
        aside = break_folder(device.state)
        device.signal(signal.SIGHUP)
        assert device.wait_log("reload refused"), device.log
        assert device.looping(), f"the old daemon keeps running\n{device.log}"
        repair_folder(device.state, aside)
        code = device.stop()
    finally:
        device.close()
    log = device.log
    assert "configuration reloaded" not in log, log
    assert code == 0, log
    assert stored_examples(device.store_path) == 5, "no example is lost across the refused reload"


# --- case 4: a file that is invalid or cannot be built changes nothing -----------------------------


def test_reload_of_a_bad_config_changes_nothing(tmp_path):
    device = Device(tmp_path)
    try:
        device.teach(2)
        good = device.config.read_text()
        bad = [
            good.replace("[mqtt]", '[mqtt]\nport = "abc"'),  # invalid
            good.replace("autosave_s", "autosve_s"),  # a misspelt key
            good.replace(str(MODEL), "/nonexistent/model.tflite"),  # parses, cannot be built
            good.replace(f"replay:{tmp_path / 'photos' / '1'}?fps=20", "webcam"),  # a bad camera source
        ]
        for n, text in enumerate(bad, 1):
            device.write_config(text)
            device.signal(signal.SIGHUP)
            assert device.wait_log("reload refused", n), device.log
            assert device.looping(), f"the old daemon keeps running after {text!r}\n{device.log}"
        device.write_config(good.replace("autosave_s = 3600.0", "autosave_s = 1800.0"))
        device.signal(signal.SIGHUP)
        assert device.wait_log("configuration reloaded"), device.log
        assert device.looping(), device.log
        device.teach(1)  # the new daemon's panel reads the keyboard
        code = device.stop()
    finally:
        device.close()
    assert code == 0, device.log
    assert "Traceback" not in device.log, device.log
    assert stored_examples(device.store_path) == 3


# --- case 5: SIGTERM always wins; repeated reloads leak nothing ------------------------------------


def test_sigterm_right_after_two_reloads_stops_the_daemon(tmp_path):
    for gap in (0.02, 0.08, 0.2):
        device = Device(tmp_path / f"gap{gap}")
        try:
            device.signal(signal.SIGHUP)
            time.sleep(gap)
            device.signal(signal.SIGHUP)
            time.sleep(gap / 2)
            code = device.stop(timeout=15)
        finally:
            device.close()
        assert code == 0, f"gap {gap}: {device.log}"
        assert "stopped" in device.log.splitlines()[-1], device.log


def test_repeated_reloads_leak_no_threads_fds_or_memory(tmp_path):
    device = Device(tmp_path)
    reloads = int(os.environ.get("EDGEKNN_RELOADS", "20"))
    try:
        assert device.looping(), device.log
        figures = {0: proc_figures(device.proc.pid)}
        for n in range(1, reloads + 1):
            device.signal(signal.SIGHUP)
            assert device.wait_log("configuration reloaded", n), device.log
            assert device.wait_log("running:", n + 1), device.log
            if n in (3, reloads):
                assert device.looping(), device.log
                figures[n] = proc_figures(device.proc.pid)
        code = device.stop()
    finally:
        device.close()
    print("(RSS kB, fds, threads) after so many reloads:", figures)
    (rss0, fds0, threads0), (rss1, fds1, threads1) = figures[3], figures[reloads]
    assert code == 0, device.log
    assert threads1 <= threads0 and fds1 <= fds0, figures
    assert rss1 - rss0 < 40_000, f"RSS grew {rss1 - rss0} kB over {reloads - 3} reloads"


# --- case 3: stopping with examples that could not be saved is a failure -----------------------------


def test_sigterm_with_unsaved_examples_that_cannot_be_saved_exits_non_zero(tmp_path):
    device = Device(tmp_path)
    try:
        device.teach(2)
        break_folder(device.state)
        code = device.stop()
    finally:
        device.close()
    lines = device.log.splitlines()
    assert code == 1, device.log
    assert "stopped with unsaved examples" in lines[-1] and "cannot save" in lines[-1], device.log
    assert [line for line in lines if "ERROR" in line] == [lines[-1]], "one line says it"


# --- case 10: a failing save backs off, is said once, keeps the examples; big saves run aside ---------


class Events(Output):
    def __init__(self) -> None:
        self.events: list[dict] = []

    def event(self, event: dict) -> None:
        self.events.append(event)


def test_a_failing_save_backs_off_is_said_once_and_clears_when_a_save_succeeds(tmp_path, caplog, monkeypatch):
    from edgeknn.device.build import build

    monkeypatch.setattr("edgeknn.device.saving.RETRY_FIRST_S", 600.0)  # no retry within the test: one attempt
    caplog.set_level(logging.INFO)
    store_path = str(tmp_path / "store" / "store.npz")
    cfg = make_config(tmp_path, **{"panel.kind": "none", "store.autosave_s": 0.05, "store.path": store_path})
    scene = Scene(photo_folders(tmp_path))
    run = Running(build(cfg, opener=scene.opener))
    events = Events()
    run.daemon.outputs.append(events)
    results: list[Result] = []
    try:
        assert run.classified()
        folder = cfg.store_path().parent
        aside = break_folder(folder)
        run.daemon.submit(AddExample(class_name="1", count=3, source="test", reply=results.append))
        assert wait_for(lambda: results), "the examples were added"
        assert wait_for(lambda: run.daemon.state()["error"]), "the failed save is the state's error"
        started = run.daemon.frames_classified
        assert run.classified(40), "the loop goes on"
        assert run.daemon.frames_classified - started >= 40
        failing = [
            r for r in caplog.records if "cannot save" in r.getMessage() and r.levelno >= logging.ERROR
        ]
        assert len(failing) == 1, [r.getMessage() for r in failing]
        assert [e["event"] for e in events.events].count("error") == 1, events.events
        assert run.daemon.saver.attempts == 1, "the next autosave waits for the backoff"
        assert len(run.daemon.store) == 3, "the examples are kept in memory"
        repair_folder(folder, aside)
        run.daemon.submit(Save(source="test", reply=results.append))
        assert wait_for(lambda: len(results) == 2)
        assert results[-1].ok, results[-1]
        assert wait_for(lambda: run.daemon.state()["error"] == "")
        assert "saving works again" in caplog.text
    finally:
        run.stop()
    assert stored_examples(cfg.store_path()) == 3


def test_saver_retries_with_a_doubling_delay_up_to_its_bound(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("edgeknn.device.saving.time.monotonic", lambda: clock[0])
    store = KnnStore(4, "m")
    folder = tmp_path / "state"
    folder.write_text("not a folder")
    saver = Saver(store, folder / "store.npz", 0.0, lambda _: None, first_retry_s=5, max_retry_s=40)
    store.add("a", np.ones(4, np.float32))
    saver.changed()
    tries = []
    for _ in range(20 * 60):  # 20 minutes of autosave checks, one a second
        before = saver.attempts
        saver.autosave()
        saver.wait()
        if saver.attempts > before:
            tries.append(clock[0] - 1000)
        clock[0] += 1
    gaps = np.diff(tries).tolist()
    assert gaps[:4] == [5, 10, 20, 40] and set(gaps[4:]) == {40}, gaps
    assert saver.error and saver.dirty


def test_when_saved_waits_for_a_save_that_covers_the_change(tmp_path, monkeypatch):
    """A callback registered after a change runs once a save with that change succeeds: not after a
    failed one, nor after an autosave whose snapshot was taken before the change."""
    store = KnnStore(4, "m")
    saver = Saver(store, tmp_path / "store.npz", 0.0, lambda _: None, first_retry_s=0, max_retry_s=0)
    called: list[str] = []
    saver.when_saved(lambda: called.append("clean"))  # nothing unsaved: at once
    assert called == ["clean"]
    release = threading.Event()
    write = storefile.write

    def held(*args, **kwargs):
        release.wait(30)
        return write(*args, **kwargs)

    monkeypatch.setattr("edgeknn.device.saving.storefile.write", held)
    store.add("a", np.ones(4, np.float32))
    saver.changed()
    saver.autosave()  # a snapshot with "a" is being written
    store.add("b", np.ones(4, np.float32))
    saver.changed()
    saver.when_saved(lambda: called.append("b"))
    release.set()
    saver.wait()
    assert called == ["clean"] and saver.dirty  # that save had "a" only

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgeknn.device.saving.storefile.write", full)
    assert not saver.save()
    assert called == ["clean"]
    monkeypatch.setattr("edgeknn.device.saving.storefile.write", write)
    assert saver.save()
    assert called == ["clean", "b"]


def test_an_autosave_does_not_stall_the_loop(tmp_path, monkeypatch):
    """The autosave writes a snapshot on its own thread: while the file write is held up, the loop
    classifies, teaches and forgets; the file then holds the snapshot as it was, and the next autosave
    the rest."""
    from edgeknn.device.build import build

    release, writing = threading.Event(), threading.Event()
    written: list[tuple[int, ...]] = []
    real_write = storefile.write

    def slow_write(path, arrays, pictures=None):
        if threading.current_thread().name == "edgeknn-save":
            writing.set()
            release.wait(30)
        written.append(tuple(arrays["labels"].tolist()))
        real_write(path, arrays, pictures)

    monkeypatch.setattr(storefile, "write", slow_write)
    cfg = make_config(tmp_path, **{"panel.kind": "none", "store.autosave_s": 0.05})
    run = Running(build(cfg, opener=Scene(photo_folders(tmp_path)).opener))
    results: list[Result] = []
    try:
        assert run.classified()
        run.daemon.submit(AddExample(class_name="1", count=2, source="test", reply=results.append))
        assert wait_for(writing.is_set), "an autosave started"
        assert run.classified(20), "the loop classifies while the save is written"
        run.daemon.submit(AddExample(class_name="2", count=1, source="test", reply=results.append))
        run.daemon.submit(ForgetClass(class_name="1", source="test", reply=results.append))
        assert wait_for(lambda: len(results) == 3)
        assert all(r.ok for r in results), results
        release.set()
        assert wait_for(lambda: not run.daemon.saver.dirty), "the next autosave saves the rest"
    finally:
        release.set()
        run.stop()
    assert written[:2] == [(0, 0), (1,)], written
    assert stored_examples(cfg.store_path()) == 1


def test_a_manager_that_stops_reading_never_holds_the_loop(tmp_path):
    """sd_notify is a datagram to a socket whose queue holds 10 (net.unix.max_dgram_qlen): while its
    reader is busy or gone, the loop's WATCHDOG and STATUS sends (and STOPPING on the way out) are
    dropped, never waited on; a blocked ping held the loop, and so the stop on SIGTERM, for good."""
    import socket

    from edgeknn.device.systemd import Notifier

    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, never read
    unread.bind(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2"})  # always due
    done = threading.Event()

    def loop() -> None:
        for _ in range(100):
            notifier.watchdog()
            notifier.status("ok camera")
        notifier.stopping()
        done.set()

    thread = threading.Thread(target=loop, daemon=True)
    try:
        thread.start()
        assert done.wait(20), "the loop waited for a reader of the notify socket"
        unread.settimeout(1)
        assert unread.recv(4096) == b"WATCHDOG=1", "what fitted in the queue was sent"
    finally:
        notifier.close()
        unread.close()


def test_the_watchdog_is_pinged_while_a_reload_builds(tmp_path):
    """A reload builds a new model, store and camera on the loop's thread: on a loaded board that outlasts
    WatchdogSec (seen: systemd killed the daemon mid-reload), so a thread pings meanwhile."""
    from rig import NotifyListener

    from edgeknn.device.systemd import Notifier

    listener = NotifyListener(tmp_path / "notify")
    notifier = Notifier(listener.environ(watchdog_usec=400_000))  # a ping due every 0.2 s
    with notifier.pinging():
        time.sleep(1.5)  # the loop, busy building
    pings = [t for t, m in listener.messages if m == "WATCHDOG=1"]
    assert len(pings) >= 3, listener.messages
    count = len(listener.messages)
    time.sleep(0.6)
    assert len(listener.messages) == count, "the pinging thread stopped with the block"
