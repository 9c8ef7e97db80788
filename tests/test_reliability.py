"""Reliability: power cuts while saving, broker chaos, camera faults, broken configs and files, a soak.

Each test drives the real daemon (in-process with gpiozero's MockFactory, or `edgeknn run` as a child
process) against a real Mosquitto (edgeknn.bench.broker) and the real model. Figures a test measures are
printed (``pytest -s`` shows them) for the release notes.
"""

from __future__ import annotations

import json
import logging
import os
import random
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
from mqttclient import Subscriber
from powercut_child import CAPACITY, MODEL_ID
from rig import (
    CLASSES,
    LEDS,
    STATUS,
    NotifyListener,
    Running,
    Scene,
    make_config,
    needs_mosquitto,
    photo_folders,
    stable_on,
    teach,
    wait_for,
)

from edgeknn.bench.broker import Broker, free_port
from edgeknn.device import status
from edgeknn.device.build import build
from edgeknn.device.systemd import Notifier
from edgeknn.outputs import Output
from edgeknn.store.file import StoreError
from edgeknn.store.knn import KnnStore, StoreSettings

HERE = Path(__file__).resolve().parent


def report(text: str) -> None:
    print(f"\n[figures] {text}")


# --- 1. power cuts ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_power_cuts_while_saving_never_lose_a_saved_example(tmp_path):
    """SIGKILL a process that saves in a loop, hundreds of times: the store always loads, whole."""
    path = tmp_path / "store.npz"
    rng = random.Random(20261122)
    server = subprocess.Popen(
        [sys.executable, str(HERE / "powercut_child.py"), str(path), "64"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cuts, unreadable, most_temporaries, mid_save, last_saved_cut = 0, [], 0, 0, 0
    deadline = time.monotonic() + 600  # bounds a hung fork server; 300 cuts take well under a minute idle
    try:
        while cuts < 300 and time.monotonic() < deadline:
            server.stdin.write(b"go\n")
            server.stdin.flush()
            kind, pid = server.stdout.readline().split()
            assert kind == b"pid"
            time.sleep(rng.uniform(0, 0.04))  # a random moment: starting, adding, writing, renaming
            os.kill(int(pid), signal.SIGKILL)
            saved = 0
            while True:
                line = server.stdout.readline().split()
                assert line, f"the fork server died: {server.stderr.read().decode()}"
                if line[0] == b"saved":
                    saved = int(line[1])
                elif line[0] == b"dead":
                    assert line[1] == pid
                    break
                else:
                    raise AssertionError(f"child said {b' '.join(line).decode()}")
            cuts += 1
            if saved:
                last_saved_cut = cuts
            try:
                store = KnnStore.load(path, MODEL_ID, StoreSettings(rule="nearest", capacity=CAPACITY))
            except StoreError as e:
                if not saved and "not found" in str(e):
                    continue  # killed before its very first save
                unreadable.append(str(e))
                break
            n = len(store)
            assert n >= saved, f"cut {cuts}: {n} examples on disk, but save #{saved} had returned"
            rows = store.rows()
            which = np.rint(rows[:, 0] / rows[:, 1])  # example i is (i + 1, 1, 1, ...)
            assert np.array_equal(which, np.arange(1, n + 1)), "examples missing or out of order"
            # a class exists from its first example on: after one save only c0 does
            classes = ("c0", "c1", "c2")[:n]
            assert store.counts() == {c: len(range(i, n, 3)) for i, c in enumerate(classes)}
            mid_save += n == saved and path.with_name(f".{path.name}.{int(pid)}.tmp").exists()
            # Temporary files of killed writers are cleaned up by the next save: they never pile up. At
            # most one per writer killed since a save last returned (how many that is depends on the
            # machine's speed: a busy one kills more writers before they finish a save).
            temporaries = list(tmp_path.glob(".store.npz.*.tmp"))
            most_temporaries = max(most_temporaries, len(temporaries))
            unswept = cuts - last_saved_cut + 1
            assert len(temporaries) <= unswept, f"cut {cuts}: {len(temporaries)} temporaries, {unswept} kills"
    finally:
        server.stdin.close()
        server.wait(10)
    assert not unreadable, unreadable
    assert cuts >= 200, f"only {cuts} power cuts in the time allowed"
    final = KnnStore.load(path, MODEL_ID, StoreSettings(rule="nearest", capacity=CAPACITY))
    final.save(path)
    assert not list(tmp_path.glob(".store.npz.*.tmp")), "the next save removes every temporary file left"
    report(
        f"power cuts: {cuts} kills survived, {len(unreadable)} unreadable stores, {len(final)} examples "
        f"saved, {mid_save} kills left a half-written temporary file, at most {most_temporaries} at once"
    )


# --- 2. broker chaos -------------------------------------------------------------------------------


def mqtt_config(port: int, host: str = "127.0.0.1", device: str = "chaos", **more) -> dict:
    return {
        "mqtt.enabled": True,
        "mqtt.host": host,
        "mqtt.port": port,
        "mqtt.device_id": device,
        "mqtt.discovery": False,
        "mqtt.heartbeat_s": 0.0,
        **{f"mqtt.{k}": v for k, v in more.items()},
    }


def lit(factory: MockFactory) -> list[bool]:
    return [bool(factory.pin(p).state) for p in LEDS]


def blinking(factory: MockFactory, timeout: float = 20.0) -> bool:
    """The status LED changes state at least twice (SLOW_BLINK is 1 s on, 1 s off)."""
    pin = factory.pin(STATUS)
    before = len(pin.states)
    return wait_for(lambda: len(pin.states) - before >= 2, timeout)


def steady(factory: MockFactory, hold: float = 1.3, timeout: float = 20.0) -> bool:
    """Within ``timeout``, the status LED is lit and stays lit for longer than a blink's on-time.

    The daemon updates the LED from its state, checked twice a second, so a slow blink may still be
    in its on-phase when this starts: one lit moment alone proves nothing.
    """
    pin = factory.pin(STATUS)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pin.state:
            time.sleep(0.05)
            continue
        before = len(pin.states)
        time.sleep(hold)
        if pin.state and len(pin.states) == before:
            return True
    return False


def json_messages(sub: Subscriber, prefix: str) -> list[dict]:
    """Live (not retained) JSON messages the daemon published under ``prefix``, in arrival order."""
    out = []
    for m in list(sub.messages):
        if m.retain or not m.topic.startswith(prefix) or not m.payload.startswith(b"{"):
            continue
        out.append({"topic": m.topic, **json.loads(m.payload)})
    return out


@needs_mosquitto
@pytest.mark.slow
def test_broker_chaos_loses_no_state_change(tmp_path, factory, subscriber):
    """Kill the broker 5 times during a replay run: LEDs keep following, every label change arrives."""
    b = Broker(tmp_path / "broker", persistence=True).start()
    base = "edgeknn/chaos"
    try:
        watcher = subscriber(b.port, [f"{base}/#"], client_id="chaos-watcher", session_expiry=300)
        subscribed = time.time()
        scene = Scene(photo_folders(tmp_path))
        cfg = make_config(tmp_path, **mqtt_config(b.port))
        run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
        d = run.daemon
        try:
            assert wait_for(lambda: d.broker_status() == "ok")
            teach(run, scene)
            db = b.directory / "mosquitto.db"  # saved every second or two: the watcher's session is on disk
            assert wait_for(lambda: db.exists() and db.stat().st_mtime > subscribed + 0.05), (
                "no broker autosave"
            )

            def delivered(change: tuple[int, str]) -> bool:
                return any(
                    m["topic"] == f"{base}/prediction" and (m["frame"], m["label"]) == change
                    for m in json_messages(watcher, base)
                )

            first = len(run.recorder.changes)
            names = iter(CLASSES[1:] + CLASSES * 10)
            for _ in range(5):
                name = next(names)  # a change while the broker is up arrives at once
                scene.shown = name
                assert stable_on(run, name)
                assert wait_for(lambda: delivered(run.recorder.changes[-1]))
                b.kill()
                assert wait_for(lambda: d.broker_status() == "down")
                frames = run.recorder.frames
                for _ in range(2):  # changes while it is down: the LEDs follow
                    name = next(names)
                    scene.shown = name
                    assert stable_on(run, name)
                    assert wait_for(lambda n=name: lit(factory) == [c == n for c in CLASSES])
                assert wait_for(lambda f=frames: run.recorder.frames > f + 25), "the daemon kept classifying"
                assert d.state()["broker"] == "down"
                b.start()
                assert wait_for(lambda: all(map(delivered, run.recorder.changes[first:])), 30), (
                    f"changes {run.recorder.changes[first:]} not all delivered; "
                    f"got {[(m['frame'], m['label']) for m in json_messages(watcher, base + '/prediction')]}"
                )
                assert wait_for(lambda: d.broker_status() == "ok")
        finally:
            run.stop()
        changes = run.recorder.changes[first:]
        lost = [c for c in changes if not delivered(c)]
        # QoS 1 is at-least-once: a restarted broker may deliver a message again. seq is what lets a
        # subscriber drop such a copy; every message seen for the first time must be newer than the last.
        first_seen: dict[int, dict] = {}
        copies, out_of_order, newest = 0, [], 0
        for m in json_messages(watcher, base):
            if m["seq"] in first_seen:
                assert first_seen[m["seq"]] == m, f"two different messages with seq {m['seq']}"
                copies += 1
                continue
            first_seen[m["seq"]] = m
            if m["seq"] < newest:
                out_of_order.append((newest, m["seq"], m["topic"]))
            newest = max(newest, m["seq"])
        assert not lost
        assert not out_of_order, f"seq went back (newest, then seq, topic): {out_of_order[:5]}"
        report(
            f"broker chaos: 5 broker kills and restarts, {len(changes)} label changes, {len(lost)} lost, "
            f"{len(first_seen)} messages in seq order, {copies} redelivered copies dropped by seq"
        )
    finally:
        b.kill()


@needs_mosquitto
def test_reconnect_announces_even_if_an_old_message_is_never_acknowledged(tmp_path, subscriber, monkeypatch):
    """The announce after a reconnect waits for paho's re-sent backlog, but not forever."""
    from edgeknn.config import MqttConfig
    from edgeknn.mqtt import connection
    from edgeknn.mqtt.link import MqttLink

    monkeypatch.setattr(connection, "BACKLOG_WAIT_S", 0.5)
    b = Broker(tmp_path / "broker").start()
    link = MqttLink(
        MqttConfig(host="127.0.0.1", port=b.port, discovery=False),
        base_topic="edgeknn/ack",
        device_id="ack",
        classes=["1"],
        submit=lambda command: None,
        version="t",
    )
    try:
        link.start()
        assert wait_for(lambda: link.connected)
        b.kill()
        assert wait_for(lambda: not link.connected)
        acks = link._connection.acks
        acks.sent(65000)  # a message paho will never get acknowledged
        b.start()
        watcher = subscriber(b.port, ["edgeknn/ack/availability"])
        # the broker came back empty (no persistence): an "online" it holds, live or retained (the link
        # may announce before the watcher subscribes, under load), is the link's announce after the outage
        assert watcher.wait_for(lambda m: m.text == "online", 15)
        assert 65000 not in acks.unacked, "not waited for again"
    finally:
        link.close()
        b.kill()


@needs_mosquitto
@pytest.mark.parametrize("where", ["broker down", "closed port", "unresolvable name"])
def test_unreachable_broker_is_said_once_per_outage_and_joined_when_it_can(
    tmp_path, factory, subscriber, caplog, where
):
    caplog.set_level(logging.DEBUG, logger="edgeknn.mqtt")
    b = Broker(tmp_path / "broker") if where == "broker down" else None  # made, not started
    host, port = {
        "broker down": ("127.0.0.1", b.port if b else 0),
        "closed port": ("127.0.0.1", free_port()),  # nothing listens there
        "unresolvable name": ("nonexistent.invalid", 1883),
    }[where]
    scene = Scene(photo_folders(tmp_path))
    run = Running(
        build(make_config(tmp_path, **mqtt_config(port, host)), opener=scene.opener, pin_factory=factory)
    )
    d = run.daemon
    try:
        started = time.monotonic()

        def retries() -> int:
            return sum("cannot reach broker" in r.getMessage() for r in caplog.records)

        assert blinking(factory), "status LED blinks while the broker is away"
        # several seconds and several connection attempts, while the daemon classifies
        assert wait_for(lambda: retries() >= 2 and time.monotonic() - started > 4, 30), caplog.text
        assert wait_for(lambda: run.recorder.frames > 50), "the daemon classifies with the broker away"
        said = [r for r in caplog.records if r.name == "edgeknn.mqtt" and r.levelno >= logging.WARNING]
        assert len(said) == 1, [r.getMessage() for r in said]
        assert f"cannot reach broker at {host}:{port}: " in said[0].getMessage()
        assert d.state()["broker"] == "down"
        if b is None:
            return
        b.start()
        assert wait_for(lambda: d.broker_status() == "ok"), "connects once the broker is there"
        watcher = subscriber(b.port, ["edgeknn/chaos/availability"])
        assert watcher.wait_for(lambda m: m.text == "online", 20)
        assert steady(factory)
        connected = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
        assert connected == [f"mqtt: connected to {host}:{port}"]
    finally:
        run.stop()
        if b is not None:
            b.kill()


# --- 3. camera faults ------------------------------------------------------------------------------

EXPECTED_CAMERA_ERROR = {
    "raise": "OSError: [Errno 5] Input/output error",
    "none": "returned no frame (None)",
    "shape": "shape (48, 64, 4), expected (H, W, 3)",
    "dtype": "float32 pixels, expected uint8",
    "stall": "no frame for more than",
    "unplugged": "cannot open it (unplugged)",
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(EXPECTED_CAMERA_ERROR))
def test_camera_fault_is_reported_retried_and_recovered(tmp_path, factory, monkeypatch, caplog, fault):
    monkeypatch.setattr("edgeknn.camera.capture.INITIAL_BACKOFF", 0.2)  # the same doubling, sooner
    monkeypatch.setattr(status, "STALL_S", 1.5)
    caplog.set_level(logging.INFO, logger="edgeknn")
    notify = NotifyListener(tmp_path / "notify")
    scene = Scene(photo_folders(tmp_path))
    d = build(
        make_config(tmp_path), opener=scene.opener, pin_factory=factory, notifier=Notifier(notify.environ())
    )
    run = Running(d)
    try:
        assert wait_for(lambda: d.state()["camera"] == "ok" and run.recorder.frames > 10)
        assert wait_for(lambda: factory.pin(STATUS).state)
        opened = len(scene.opened)
        broke = time.monotonic()
        scene.break_(fault)
        assert wait_for(lambda: d.state()["camera"] == "down"), d.state()
        assert wait_for(lambda: EXPECTED_CAMERA_ERROR[fault] in d.state()["camera_error"]), d.state()
        assert blinking(factory), "status LED blinks slowly while the camera is down"
        if fault != "stall":  # a stalled read raises nothing: nothing to retry until it returns
            assert wait_for(lambda: len(scene.opened) >= opened + 3), "the camera is reopened"
            times = scene.opened[opened:]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert all(gap >= 0.95 * 0.4 * 2**i for i, gap in enumerate(gaps)), f"no backoff: {gaps}"
        frames = run.recorder.frames
        assert wait_for(lambda: time.monotonic() - broke > 2.0 and notify.pings(since=broke + 0.5) >= 2), (
            "the watchdog is pinged while only the camera is broken"
        )
        assert run.recorder.frames == frames, "no frames, nothing classified"
        repaired = time.monotonic()
        scene.repair()
        assert wait_for(lambda: d.state()["camera"] == "ok" and run.recorder.frames > frames + 10)
        assert d.state()["camera_error"] == ""
        assert steady(factory), "status LED steady again"
        assert wait_for(lambda: notify.pings(since=repaired) >= 2)
        assert "camera: frames again" in caplog.text or fault == "stall"
        downs = [r for r in caplog.records if r.getMessage() == "camera: down"]
        assert len(downs) == 1, "the outage is logged once"
    finally:
        run.stop()
        notify.close()


def test_watchdog_stops_only_when_the_loop_is_stuck(tmp_path):
    """The loop pings; an output that blocks the loop stops the pings (so systemd restarts the service)."""
    notify = NotifyListener(tmp_path / "notify")
    scene = Scene(photo_folders(tmp_path))
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    d = build(cfg, opener=scene.opener, notifier=Notifier(notify.environ()))
    inside, release = threading.Event(), threading.Event()

    class Stuck(Output):
        stuck = False

        def show(self, reading) -> None:
            if self.stuck:
                inside.set()
                release.wait(60)

    stuck = Stuck()
    d.outputs.append(stuck)
    run = Running(d)
    try:
        assert wait_for(lambda: notify.pings() >= 3)
        stuck.stuck = True
        assert inside.wait(20)
        blocked = time.monotonic()
        time.sleep(1.5)  # 15 watchdog intervals (WATCHDOG_USEC 0.2 s: a ping every 0.1 s)
        assert notify.pings(since=blocked + 0.2) == 0, "a stuck loop must not ping the watchdog"
        stuck.stuck = False
        release.set()
        resumed = time.monotonic()
        assert wait_for(lambda: notify.pings(since=resumed) >= 3)
    finally:
        release.set()
        run.stop()
        notify.close()


# --- 5. bad configuration and files ----------------------------------------------------------------


def toml(data: dict) -> str:
    """Just enough TOML for these configs: top-level keys, then one table per section."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{section}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def good_config(tmp_path: Path) -> dict:
    photo = sorted((DIGITS / "1").iterdir())[0]
    return {
        "classes": CLASSES,
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(MODEL), "threads": 1},
        "camera": {"source": f"replay:{photo}?fps=0&loop=0"},  # one frame, then `run` ends by itself
        "panel": {"kind": "none"},
        "mqtt": {"enabled": False},
        "web": {"enabled": False},
    }


def saved_store(model_id: str) -> KnnStore:
    from edgeknn.model.embedder import Embedder

    dim = Embedder(MODEL, 1).dim  # the device's model: the store must fit it
    store = KnnStore(dim, model_id, StoreSettings(rule="nearest"))
    rng = np.random.default_rng(3)
    for name in CLASSES:
        store.add(name, rng.random(dim, dtype=np.float32))
    return store


def write_truncated(path: Path, model_id: str) -> None:
    saved_store(model_id).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_flipped(path: Path, model_id: str) -> None:
    """A valid zip whose rows no longer match the checksum (a flipped bit in the data)."""
    saved_store(model_id).save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["rows"] = arrays["rows"].copy()
    arrays["rows"][1, 7] += 0.5
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_pickled(path: Path, model_id: str) -> None:
    """A store whose class names are a pickled object that would run code when unpickled."""
    saved_store(model_id).save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["classes"] = np.array([Evil(str(path.parent / "pwned"))], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


AS_ROOT = os.geteuid() == 0
BAD = [
    # (id, config overrides, store writer, exit status, what the one line must name)
    ("wrong type", {"store": {"k": "three"}}, None, 78, 'store.k: expected an integer 1..100, got "three"'),
    (
        "out of range",
        {"mqtt": {"port": 70000}},
        None,
        78,
        "mqtt.port: expected an integer 1..65535, got 70000",
    ),
    ("unknown key", {"camera": {"fsp": 30}}, None, 78, "camera.fsp: unknown key"),
    ("bad class name", {"classes": ["cup", "a/#"]}, None, 78, "classes: expected class names of"),
    ("value for a table", {"store": 5}, None, 78, "store: expected a table [store], got 5"),
    ("not TOML", "classes = [\n", None, 78, "not valid TOML"),
    (
        "missing model",
        {"model": {"path": "/nonexistent/model.tflite"}},
        None,
        78,
        "/nonexistent/model.tflite",
    ),
    ("not a model", {"model": {"path": "CONFIG"}}, None, 78, "not a TFLite model"),
    ("bad camera source", {"camera": {"source": "webcam"}}, None, 78, "camera.source"),
    (
        "unreadable password",
        {"mqtt": {"enabled": True, "username": "u", "password_file": "/nonexistent/secret"}},
        None,
        78,
        "mqtt.password_file: cannot read /nonexistent/secret",
    ),
    ("store of another model", {}, "other model", 78, "was made with model 000000000000"),
    ("unreadable store", {}, "chmod 000", 78, "cannot read store (Permission denied)"),
    ("folder in place of the store", {}, "folder", 78, "is a folder, not a store file"),
    ("truncated store", {}, write_truncated, 0, "moved it to"),
    ("flipped bit in the store", {}, write_flipped, 0, "checksum mismatch"),
    ("garbage store", {}, "garbage", 0, "not a readable store"),
    ("pickled store", {}, write_pickled, 0, "store holds pickled objects, refused"),
]
ROOT_READS = pytest.mark.skipif(AS_ROOT, reason="root reads a chmod 000 file; the folder row covers it")
BAD_PARAMS = [
    pytest.param(*row, id=row[0], marks=[ROOT_READS] if row[2] == "chmod 000" else []) for row in BAD
]


@pytest.fixture(scope="module")
def model_id() -> str:
    from edgeknn.model.embedder import Embedder

    return Embedder(MODEL, 1).identity


@pytest.mark.parametrize(("what", "overrides", "store", "status", "culprit"), BAD_PARAMS)
def test_bad_config_or_file_is_one_line(tmp_path, model_id, what, overrides, store, status, culprit):
    """`edgeknn run` says what is wrong in one line, without a traceback; a broken store is moved aside."""
    data = good_config(tmp_path)
    config_file = tmp_path / "edgeknn.toml"
    if isinstance(overrides, str):
        config_file.write_text(overrides)
    else:
        for section, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **value}
            else:
                data[section] = value
        if data.get("model", {}).get("path") == "CONFIG":
            data["model"]["path"] = str(config_file)
        config_file.write_text(toml(data))
    path = tmp_path / "state" / "store.npz"
    path.parent.mkdir()
    if store == "other model":
        saved_store("0" * 64).save(path)
    elif store == "chmod 000":
        saved_store(model_id).save(path)
        path.chmod(0)
    elif store == "folder":
        path.mkdir()
    elif store == "garbage":
        path.write_bytes(os.urandom(3000))
    elif store is not None:
        store(path, model_id)
    before = path.read_bytes() if path.is_file() and store != "chmod 000" else None
    proc = subprocess.run(
        [sys.executable, "-m", "edgeknn", "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    err = proc.stderr
    said = [
        line
        for line in err.splitlines()
        if line.startswith("edgeknn: ") or " ERROR " in line or " WARNING " in line
    ]
    assert "Traceback" not in err, err
    assert proc.returncode == status, err
    assert len(said) == 1 and culprit in said[0], err
    asides = list(path.parent.glob("store.npz.broken-*"))
    if status == 0:  # a damaged store: moved aside whole, the device started empty
        assert len(asides) == 1 and asides[0].read_bytes() == before
        assert str(asides[0]) in said[0] and str(path) in said[0]
        assert "stopped" in err.splitlines()[-1]
        assert not (tmp_path / "state" / "pwned").exists(), "the pickle was never run"
    else:  # left exactly where and as it was
        assert not asides
        if before is not None:
            assert path.read_bytes() == before
        if store is not None:
            assert str(path) in said[0], "the line names the store file"
        if store == "folder":
            assert path.is_dir()


def test_a_store_broken_twice_in_one_second_keeps_both(tmp_path, model_id):
    from edgeknn.device.build import open_store
    from edgeknn.model.embedder import Embedder

    cfg = config_from(good_config(tmp_path))
    embedder = Embedder(MODEL, 1)
    path = tmp_path / "state" / "store.npz"
    path.parent.mkdir()
    originals = []
    for _ in range(3):
        write_truncated(path, model_id)
        originals.append(path.read_bytes())
        path.write_bytes(originals[-1][: len(originals[-1]) - len(originals)])  # each one different
        originals[-1] = path.read_bytes()
        assert len(open_store(cfg, embedder, path)) == 0
    kept = sorted(p.read_bytes() for p in path.parent.glob("store.npz.broken-*"))
    assert kept == sorted(originals), "a broken store was overwritten by the next one"


def config_from(data: dict):
    from edgeknn import config

    return config.from_dict(data)


# --- 7. soak ---------------------------------------------------------------------------------------


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(resident kB, open fds, threads) of a process; fds and threads as the least of a few samples,
    so a file the replay has open for a moment does not count."""
    fds, threads = [], []
    for _ in range(5):
        fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        threads.append(len(os.listdir(f"/proc/{pid}/task")))
        time.sleep(0.1)
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss, min(fds), min(threads)


@needs_mosquitto
@pytest.mark.slow
def test_soak_replay_commands_and_broker_flaps(tmp_path):
    """`edgeknn run` for EDGEKNN_SOAK_S seconds (default 120) of replay, MQTT commands and broker flaps:
    memory, threads and file descriptors stay flat after warm-up."""
    duration = float(os.environ.get("EDGEKNN_SOAK_S", "120"))
    flap_every = max(10.0, duration / 5)
    b = Broker(tmp_path / "broker").start()
    base = "edgeknn/soak"
    data = {
        "classes": CLASSES,
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(MODEL), "threads": 1},
        "store": {"rule": "nearest", "capacity": 10, "autosave_s": 1.0},
        "camera": {"source": f"replay:{tmp_path / 'photos'}?fps=25"},
        "panel": {"kind": "none"},
        "mqtt": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": b.port,
            "device_id": "soak",
            "heartbeat_s": 5.0,
        },
        "web": {"enabled": False},
    }
    photo_folders(tmp_path)  # makes tmp_path/photos/<class>/
    (tmp_path / "edgeknn.toml").write_text(toml(data))
    log_file = tmp_path / "daemon.log"  # a file, not a pipe: an undrained pipe would block the daemon
    with open(log_file, "w") as log_out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeknn", "run", "--config", str(tmp_path / "edgeknn.toml")],
            stderr=log_out,
            cwd=tmp_path,
        )
    rng = random.Random(7)
    sent, flaps, answered, names = 0, 0, 0, list(CLASSES)
    try:
        watcher = Subscriber(b.port, [f"{base}/#"])

        def online() -> bool:
            said = watcher.on(f"{base}/availability")
            return bool(said) and said[-1].text == "online"

        def command() -> None:
            nonlocal sent
            kind = rng.choice(
                ["add_example"] * 4 + ["forget_class", "save", "set_threshold", "rename_class", "bogus"]
            )
            args: dict = {}
            if kind == "add_example":
                args = {"class": rng.choice(names), "count": rng.randint(1, 3)}
            elif kind == "forget_class":
                args = {"class": rng.choice(names)}
            elif kind == "set_threshold":
                args = {"value": rng.choice([0.0, 0.1, -0.5])}
            elif kind == "rename_class":
                i = rng.randrange(len(names))
                new = names[i] + "x" if len(names[i]) < 4 else names[i][:1]
                args, names[i] = {"class": names[i], "new_name": new}, new
            watcher.publish(f"{base}/cmd/{kind}", json.dumps(args))
            sent += 1

        def flap() -> None:
            nonlocal flaps, answered
            b.kill()
            time.sleep(3)
            b.start()
            flaps += 1
            answered += len(watcher.on(f"{base}/cmd/result"))
            watcher.clear()
            assert wait_for(online, 30), "the daemon reconnected"

        assert wait_for(online, 60), log_file.read_text()[-3000:]
        started = time.monotonic()
        warm_until = started + max(15.0, duration / 4)
        next_flap = started + flap_every / 2
        baseline = None
        while time.monotonic() - started < duration:
            assert proc.poll() is None, log_file.read_text()[-3000:]
            if time.monotonic() >= next_flap and time.monotonic() - started < duration - 12:
                flap()
                next_flap += flap_every
            if baseline is None and time.monotonic() >= warm_until and flaps:
                baseline = proc_figures(proc.pid)
            command()
            time.sleep(0.25)
        assert baseline is not None and flaps >= 2
        # every command is answered, but for one caught in each broker kill (the watcher keeps no session);
        # once the last ones are, compare like with like: connected, camera ok
        assert wait_for(lambda: answered + len(watcher.on(f"{base}/cmd/result")) >= sent - flaps, 30)
        assert wait_for(online)
        final = proc_figures(proc.pid)
        answered += len(watcher.on(f"{base}/cmd/result"))
        assert answered >= sent - flaps, f"{answered} of {sent} commands answered"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        err = log_file.read_text()
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "stopped" in err.splitlines()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        b.kill()
    growth_kb = final[0] - baseline[0]
    report(
        f"soak: {duration:.0f} s, {sent} commands ({answered} answered), {flaps} broker flaps; resident "
        f"memory {baseline[0] / 1024:.1f} MB after warm-up -> {final[0] / 1024:.1f} MB "
        f"({growth_kb / 1024:+.1f} MB); fds {baseline[1]} -> {final[1]}; threads {baseline[2]} -> {final[2]}"
    )
    assert growth_kb < 10 * 1024, f"resident memory grew {growth_kb / 1024:.1f} MB after warm-up"
    assert final[1] <= baseline[1], f"file descriptors {baseline[1]} -> {final[1]}"
    assert final[2] <= baseline[2], f"threads {baseline[2]} -> {final[2]}"
