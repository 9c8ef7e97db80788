"""The whole daemon against a real Mosquitto: availability, predictions, commands, broker outages.

`edgeknn run` runs as a subprocess where signals and the command line matter; in-process (``build``
with a switchable replay source and MockFactory buttons) where the test shows the camera a class or
presses a button. Every broker listens on a free port on 127.0.0.1 (edgeknn.bench.broker).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, MODEL
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rig import Recorder, Running, Scene, digit_folders, needs_mosquitto, wait_for

from edgeknn import config
from edgeknn.bench.broker import Broker, free_port
from edgeknn.device.build import build
from edgeknn.device.daemon import Daemon
from edgeknn.mqtt.link import MqttLink
from edgeknn.store.knn import KnnStore

pytestmark = needs_mosquitto

CLASSES = ["1", "2", "5"]
BUTTONS, LEDS = [17, 27, 22], [5, 6, 13]
BASE = "edgeknn/test"
AVAIL, STATE, PREDICTION = f"{BASE}/availability", f"{BASE}/state", f"{BASE}/prediction"
EVENT, RESULT = f"{BASE}/event", f"{BASE}/cmd/result"
REPLY = "test/reply"  # MQTT 5 response topic of the test's requests
TOPICS = [f"{BASE}/#", REPLY]
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PREDICTION_KEYS = {"label", "confidence", "scores", "similarity", "frame", "ts", "latency_ms", "seq"}


def body(m) -> dict:
    return json.loads(m.payload)


def is_online(m) -> bool:
    return m.topic == AVAIL and m.text == "online"


def is_offline(m) -> bool:
    return m.topic == AVAIL and m.text == "offline"


def predictions(messages) -> list[dict]:
    return [body(m) for m in messages if m.topic == PREDICTION]


def frames(messages) -> set[int]:
    return {p["frame"] for p in predictions(messages)}


def deduped(labels) -> list[str]:
    return [x for i, x in enumerate(labels) if i == 0 or labels[i - 1] != x]


def request(sub, name: str, payload, tag: str, timeout: float = 20.0) -> dict:
    """Publish ``<base>/cmd/<name>`` with a response topic; return the reply that carries ``tag``."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = REPLY
    props.CorrelationData = tag.encode()
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sub.publish(f"{BASE}/cmd/{name}", data, properties=props)
    reply = sub.wait_for(
        lambda m: m.topic == REPLY and m.properties.CorrelationData == tag.encode(),
        timeout=timeout,
        what=f"reply to {tag}",
    )
    return body(reply)


# --- `edgeknn run` as a subprocess ------------------------------------------------------------------


def write_config(tmp_path: Path, **mqtt) -> Path:
    lines = [f"classes = {json.dumps(CLASSES)}", f"state_dir = {json.dumps(str(tmp_path))}", ""]
    lines += ["[store]", "autosave_s = 0.5", "", "[web]", "enabled = false", "", "[mqtt]", "keepalive = 5"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in mqtt.items()]
    path = tmp_path / "edgeknn.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """`edgeknn run` with its stderr collected line by line by a thread."""

    def __init__(
        self, tmp_path: Path, config_file: Path, mqtt: str, shown: str = "1", notify: str = "", web: str = ""
    ):
        skip = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "INVOCATION_ID", "JOURNAL_STREAM")
        env = {k: v for k, v in os.environ.items() if k not in skip}
        if notify:
            env["NOTIFY_SOCKET"] = notify
        self.store = tmp_path / "store.npz"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeknn", "run", "--config", str(config_file), "--mqtt", mqtt,
             "--device-id", "test", "--panel", "none", "--model", str(MODEL), "--store", str(self.store),
             "--source", f"replay:{DIGITS / shown}?fps=20"] + (["--web", web] if web else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**env, "HOME": str(tmp_path)},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 30.0) -> str:
        found = wait_for(
            lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout
        )
        line = next((line for line in self.lines if text in line), None)
        assert found and line is not None, f"no log line with {text!r}:\n{self.log}"
        return line

    def finish(self, sig: int, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


@pytest.fixture
def run_daemon():
    """``run_daemon(tmp_path, config_file, mqtt)`` starts `edgeknn run`; any still running is killed after."""
    made: list[DaemonProcess] = []

    def make(*args, **kw) -> DaemonProcess:
        made.append(DaemonProcess(*args, **kw))
        return made[-1]

    yield make
    for p in made:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        if p.proc.stderr:
            p.proc.stderr.close()


@pytest.mark.parametrize("web", [False, True], ids=["no-page", "page"])
def test_run_online_then_predictions_then_offline_on_sigterm(tmp_path, broker, subscriber, run_daemon, web):
    """With the web page on too: starting it delays the loop's first state, never ``online`` ahead of it."""
    live = subscriber(broker.port, TOPICS)
    cfg = write_config(tmp_path, heartbeat_s=1.0)
    page = f"127.0.0.1:{free_port()}" if web else ""
    daemon = run_daemon(tmp_path, cfg, mqtt=f"127.0.0.1:{broker.port}", web=page)
    live.wait_for(is_online, timeout=30)
    if web:  # the page really is on, beside MQTT (wait_line fails the test otherwise)
        daemon.wait_line(f"web: the page is at http://{page} ")
    topics = [m.topic for m in live.messages]
    assert STATE in topics and topics.index(STATE) < topics.index(AVAIL), "state goes out before online"
    state = body(live.wait_for(lambda m: m.topic == STATE and body(m)["broker"] == "ok"))
    assert state["classes"] == {"1": 0, "2": 0, "5": 0} and state["model_file"] == MODEL.name
    assert isinstance(state["seq"], int) and TS_RE.match(state["ts"])
    late = subscriber(broker.port, [AVAIL, STATE])  # a newcomer gets both retained
    assert late.wait_for(lambda m: m.topic == AVAIL).retain and late.on(AVAIL)[0].text == "online"
    assert late.wait_for(lambda m: m.topic == STATE).retain

    result = request(live, "add_example", {"class": "1", "count": 3}, "teach")
    assert result["ok"] is True and result["command"] == "add_example" and result["count"] == 3
    first = live.wait_for(lambda m: m.topic == PREDICTION and body(m)["label"] == "1", what="label 1")
    live.wait_for(
        lambda m: m.topic == PREDICTION and body(m)["frame"] > body(first)["frame"], what="heartbeat"
    )
    shown = [p for p in predictions(live.messages) if p["label"] == "1"]
    for p in shown:
        # "candidate" rides along while the label settles (docs: MQTT): what this frame alone says
        assert set(p) - {"candidate"} == PREDICTION_KEYS, p
        assert p["scores"] == {"1": 1.0} and p["confidence"] == 1.0, p  # the only class with examples
        # a cosine in the head's centred space: a frame less like the examples than the frames seen on
        # average is below 0 (such a frame answers unrecognized on its own, as ``candidate``, while the
        # stable label stays "1"), so only its range is sure here
        assert -1.0 <= p["similarity"] <= 1.0 and p["latency_ms"] >= 0 and TS_RE.match(p["ts"]), p
    frames, seqs = [p["frame"] for p in shown], [p["seq"] for p in shown]
    assert frames == sorted(set(frames)) and seqs == sorted(set(seqs)), shown

    assert daemon.finish(signal.SIGTERM) == 0, daemon.log
    assert "stopped" in daemon.lines[-1], daemon.log
    live.wait_for(is_offline, timeout=10)
    assert [m.text for m in live.on(AVAIL)] == ["online", "offline"]
    after = subscriber(broker.port, [AVAIL])
    assert after.wait_for(lambda m: m.topic == AVAIL).text == "offline" and after.on(AVAIL)[0].retain
    assert KnnStore.load(daemon.store, state["model"]).counts() == {"1": 3, "2": 0, "5": 0}


def test_mqtt_option_overrides_config_and_lwt_says_offline_after_sigkill(
    tmp_path, broker, subscriber, run_daemon
):
    sub = subscriber(broker.port, [AVAIL])
    nobody = free_port()  # the config names a port where no broker listens
    cfg = write_config(tmp_path, host="127.0.0.1", port=nobody)
    daemon = run_daemon(tmp_path, cfg, mqtt=f"127.0.0.1:{broker.port}")
    sub.wait_for(is_online, timeout=30)
    assert f"mqtt 127.0.0.1:{broker.port}," in daemon.wait_line("running:")
    assert str(nobody) not in daemon.log and "cannot reach broker" not in daemon.log
    assert "as edgeknn-test" in broker.log()  # mosquitto: "New client connected from ... as edgeknn-test"
    daemon.finish(signal.SIGKILL)  # no chance to say goodbye: the broker publishes the will
    assert daemon.proc.returncode == -signal.SIGKILL
    sub.wait_for(is_offline, timeout=20)
    assert [m.text for m in sub.on(AVAIL)] == ["online", "offline"]
    after = subscriber(broker.port, [AVAIL])
    assert after.wait_for(lambda m: m.topic == AVAIL).text == "offline" and after.on(AVAIL)[0].retain


def test_mqtt_none_never_connects(tmp_path, broker, subscriber, run_daemon):
    sub = subscriber(broker.port, [f"{BASE}/#"])
    cfg = write_config(tmp_path, host="127.0.0.1", port=broker.port)  # would work, but is switched off
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # sd_notify: STATUS=ok camera, ...
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    try:
        daemon = run_daemon(tmp_path, cfg, mqtt="none", notify=str(tmp_path / "notify"))
        while "STATUS=ok camera" not in notify.recv(4096).decode():
            pass  # until the loop classifies frames
    finally:
        notify.close()
    assert ", mqtt off," in daemon.wait_line("running:")
    time.sleep(1.0)  # paho would have tried at once: give it the chance to show up
    assert daemon.finish(signal.SIGTERM) == 0, daemon.log
    assert not [line for line in daemon.lines if "edgeknn.mqtt" in line], daemon.log
    assert "edgeknn-test" not in broker.log() and not sub.messages


# --- the daemon in-process: a switchable camera, MockFactory buttons ------------------------------


def daemon_config(tmp_path: Path, port: int, panel: str = "none") -> config.Config:
    return config.from_dict(
        {
            "classes": CLASSES,
            "state_dir": str(tmp_path),
            "model": {"path": str(MODEL), "threads": 2},
            "store": {"autosave_s": 0.5},
            "stabilizer": {"mode": "window", "frames": 5},
            "panel": {"kind": panel, "buttons": BUTTONS, "leds": LEDS, "clear_button": 26, "status_led": 19,
                      "hold_time": 0.3},
            "mqtt": {"host": "127.0.0.1", "port": port, "device_id": "test", "keepalive": 5},
        }
    )  # fmt: skip


@pytest.fixture
def running():
    """``running(daemon)`` loops it in a thread; stopped (store saved, offline sent) after the test."""
    made: list[Running] = []

    def make(daemon: Daemon) -> Running:
        made.append(Running(daemon))
        return made[-1]

    yield make
    for r in made:
        if r.thread.is_alive():
            r.stop()


def wait_frames(daemon: Daemon, n: int = 5) -> None:
    target = daemon.frames_classified + n
    assert wait_for(lambda: daemon.frames_classified >= target), "the daemon classifies no frames"


def saved(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def test_add_example_over_mqtt_teaches_exactly_as_a_button(tmp_path, broker, subscriber, running, factory):
    sub = subscriber(broker.port, TOPICS)
    photo = sorted((DIGITS / "2").glob("*.JPG"))[0]  # one photo, always: every example embeds the same
    scene = Scene({"2": photo}, fps=20)
    run = running(
        build(daemon_config(tmp_path, broker.port, "gpio"), opener=scene.opener, pin_factory=factory)
    )
    d = run.daemon
    sub.wait_for(is_online, timeout=30)
    wait_frames(d)

    def press(i: int) -> None:
        factory.pin(BUTTONS[i]).drive_low()
        time.sleep(0.1)  # a press, not a hold (hold_time 0.3)
        factory.pin(BUTTONS[i]).drive_high()

    def added(source: str, name: str) -> list[dict]:
        events = [body(m) for m in sub.on(EVENT)]
        return [
            e for e in events if e["event"] == "example_added" and (e["source"], e["class"]) == (source, name)
        ]

    press(1)  # the button of class "2"
    assert wait_for(lambda: len(added("button", "2")) == 1), sub.on(EVENT)
    result = request(sub, "add_example", {"class": "2"}, "one")
    assert result == {**result, "command": "add_example", "ok": True, "class": "2", "count": 2}
    assert "error" not in result
    assert body(sub.wait_for(lambda m: m.topic == RESULT and body(m)["class"] == "2"))["count"] == 2
    by_button, by_mqtt = added("button", "2")[0], added("mqtt", "2")[0]
    drop = ("source", "seq", "ts", "count")
    assert {k: v for k, v in by_button.items() if k not in drop} == {
        k: v for k, v in by_mqtt.items() if k not in drop
    }
    assert (by_button["count"], by_mqtt["count"]) == (1, 2)

    result = request(sub, "add_example", {"class": "1", "count": 3}, "three")
    assert result["ok"] is True and result["count"] == 3
    assert [e["count"] for e in added("mqtt", "1")] == [1, 2, 3]
    press(0)
    assert wait_for(lambda: d.store.counts()["1"] == 4)
    assert d.store.counts() == {"1": 4, "2": 2, "5": 0}
    assert wait_for(lambda: any(body(m)["classes"] == {"1": 4, "2": 2, "5": 0} for m in sub.on(STATE)))

    assert request(sub, "save", {}, "save")["ok"] is True
    f = saved(d.store_path)
    rows, labels, example = f["rows"], f["labels"], f["example"]
    assert [str(c) for c in f["classes"]] == CLASSES
    ids = sorted(set(example.tolist()))  # in the order taught: button, mqtt, mqtt x3, button
    assert [CLASSES[labels[example == i][0]] for i in ids] == ["2", "2", "1", "1", "1", "1"]
    views = [rows[example == i] for i in ids]  # an example is one row, or its views (rule-dependent)
    for other in views[1:]:
        np.testing.assert_array_equal(other, views[0])  # the same frame makes the same example
    assert str(f["storage"]) == "uint8", "store.storage auto: the packaged extractor's rows are uint8"
    values = rows.astype(np.float32) * f["scale"][:, None]  # uint8 rows and 1 / their norm
    assert len(rows) == 6 * len(views[0]) and np.allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)


MALFORMED = [
    ("add_example", b"{not json"),
    ("add_example", b"\xff\xfe{}"),  # not UTF-8
    ("add_example", b'["1"]'),
    ("add_example", b'"1"'),
    ("add_example", b"null"),
    ("add_example", b"[" * 3000),  # nested too deeply
    ("add_example", b""),  # no class
    ("add_example", {"count": 2}),
    ("add_example", {"class": 1}),  # a number, not the class "1"
    ("add_example", {"class": "3"}),  # not a configured class
    ("add_example", {"class": "1", "count": 0}),
    ("add_example", {"class": "1", "count": -1}),
    ("add_example", {"class": "1", "count": 101}),
    ("add_example", {"class": "1", "count": 2.5}),
    ("add_example", {"class": "1", "count": "3"}),
    ("add_example", {"class": "1", "count": True}),
    ("add_example", {"class": "1", "colour": "red"}),
    ("add_example", {"class": "1/2"}),
    ("add_example", {"class": "1+"}),
    ("add_example", {"class": "1", "pad": "x" * 5000}),  # over mqtt.max_payload
    ("forget_class", {}),
    ("forget_class", {"class": "ghost"}),
    ("forget_class", {"class": ["1"]}),
    ("rename_class", {"class": "1", "new_name": "5"}),  # already exists
    ("rename_class", {"class": "1"}),
    ("rename_class", {"class": "1", "new_name": "a#b"}),
    ("reset", {}),
    ("reset", {"confirm": "yes"}),
    ("reset", {"confirm": 1}),
    ("set_threshold", {"value": 2}),
    ("set_threshold", b'{"value": NaN}'),
    ("save", {"now": True}),
    ("dance", {}),
    ("", {}),  # <base>/cmd/
]


def test_malformed_commands_get_errors_and_change_nothing(tmp_path, broker, subscriber, running):
    sub = subscriber(broker.port, TOPICS)
    run = running(
        build(daemon_config(tmp_path, broker.port), opener=Scene({"5": DIGITS / "5"}, fps=20).opener)
    )
    d = run.daemon
    sub.wait_for(is_online, timeout=30)
    assert request(sub, "add_example", {"class": "5", "count": 2}, "teach")["ok"] is True
    assert request(sub, "save", {}, "save")["ok"] is True
    before_bytes, before_mtime = d.store_path.read_bytes(), d.store_path.stat().st_mtime_ns
    counts, threshold, mark = d.store.counts(), d.store.threshold, len(sub.messages)

    for i, (name, payload) in enumerate(MALFORMED):
        result = request(sub, name, payload, f"bad-{i}")
        assert result["command"] == name and result["ok"] is False, (name, payload, result)
        assert result["error"] and "\n" not in result["error"], result
    assert len(MALFORMED) >= 20
    results = [body(m) for m in sub.messages[mark:] if m.topic == RESULT]
    assert len(results) == len(MALFORMED) and not any(r["ok"] for r in results)

    wait_frames(d, 20)  # a second of frames: any change would have been autosaved (autosave_s 0.5)
    assert d.store.counts() == counts and d.store.threshold == threshold
    assert d.store_path.read_bytes() == before_bytes and d.store_path.stat().st_mtime_ns == before_mtime
    later = sub.messages[mark:]
    assert not [m.text for m in later if m.topic == EVENT], "no example_added, class_forgotten, reset ..."
    assert all(body(m)["classes"] == counts for m in later if m.topic == STATE)
    # and the daemon still listens
    assert request(sub, "add_example", {"class": "1"}, "good")["count"] == 1


class LinkRecorder(Recorder):
    """The rig's recorder, also noting whether the MQTT link was up when each reading was shown."""

    def __init__(self, link: MqttLink):
        super().__init__()
        self.link = link
        self.seen: list[tuple[str, bool, int, bool]] = []  # label, changed, frame, connected

    def show(self, reading) -> None:
        super().show(reading)
        self.seen.append((reading.label, reading.changed, reading.frame, self.link.connected))


def test_broker_restart_loses_no_label_change(tmp_path, subscriber, running):
    b = Broker(tmp_path / "broker", persistence=True).start()
    try:
        # A persistent session (fixed client id, session expiry, QoS 1): the broker keeps what we miss.
        sub = subscriber(b.port, TOPICS, client_id="test-seq", session_expiry=300)
        scene = Scene(digit_folders(), fps=20)
        daemon = build(daemon_config(tmp_path, b.port), opener=scene.opener)
        link = next(o for o in daemon.outputs if isinstance(o, MqttLink))
        recorder = LinkRecorder(link)
        daemon.outputs.append(recorder)
        run = running(daemon)
        sub.wait_for(is_online, timeout=30)
        for name in CLASSES:
            scene.shown = name
            wait_frames(daemon)
            assert request(sub, "add_example", {"class": name, "count": 8}, f"teach-{name}")["ok"] is True
        scene.shown = "1"

        def shown_and_received(label: str) -> bool:  # the latest change is to ``label`` and has arrived
            changes = [r for r in recorder.seen if r[1]]
            return bool(changes) and changes[-1][0] == label and changes[-1][2] in frames(sub.messages)

        assert wait_for(lambda: shown_and_received("1"), 30), recorder.seen[-20:]
        # Mosquitto saves every ~2 s (autosave_interval 1 counts whole seconds): once it has saved after
        # the last message, a SIGKILL cannot revive a delivered message from a stale file as a duplicate.
        quiet, db = time.time(), b.directory / "mosquitto.db"
        assert wait_for(lambda: db.exists() and db.stat().st_mtime > quiet + 0.05, 10), "no broker autosave"

        b.kill()
        assert wait_for(lambda: daemon.broker_status() == "down")
        before = list(sub.messages)
        sub.clear()
        scene.shown = "5"  # the label changes while the broker is away
        assert wait_for(lambda: any(r[:2] == ("5", True) and not r[3] for r in recorder.seen), 30)
        assert daemon.state()["broker"] == "down"
        b.start()

        sub.wait_for(lambda m: is_online(m) and not m.retain, timeout=30, what="online again")
        sub.wait_for(lambda m: m.topic == STATE and not m.retain and body(m)["broker"] == "ok", what="ok")
        sub.wait_for(lambda m: m.topic == PREDICTION and body(m)["label"] == "5", what="the change to 5")
        run.stop()
        sub.wait_for(is_offline)
        received = predictions(before + sub.messages)
        seqs = [p["seq"] for p in received]
        trail = [(p["seq"], p["label"], p["frame"]) for p in received]
        assert all(x < y for x, y in zip(seqs, seqs[1:], strict=False)), (
            f"seq not strictly increasing: {trail}"
        )
        changes = {frame for _, changed, frame, _ in recorder.seen if changed}
        outage = {frame for label, changed, frame, up in recorder.seen if changed and not up}
        assert outage and outage <= frames(before + sub.messages), f"a change in the outage is lost: {trail}"
        assert changes <= frames(before + sub.messages), f"a label change never arrived: {trail}"
        assert deduped([p["label"] for p in received]) == deduped([r[0] for r in recorder.seen])
    finally:
        b.kill()


def test_state_sent_on_reconnect_says_broker_ok(tmp_path, broker, subscriber, running):
    """The state published on (re)connect, just before ``online``, must not say the broker is down."""
    first = subscriber(broker.port, [AVAIL])
    run = running(
        build(daemon_config(tmp_path, broker.port), opener=Scene({"1": DIGITS / "1"}, fps=20).opener)
    )
    first.wait_for(is_online, timeout=30)
    broker.kill()
    assert wait_for(lambda: run.daemon.broker_status() == "down")
    wait_frames(run.daemon)  # the daemon's state now says broker "down", and the link keeps it to re-send
    broker.start()
    sub = subscriber(broker.port, [STATE, AVAIL])
    online = sub.wait_for(is_online, timeout=30)
    sent = [body(m)["broker"] for m in sub.messages[: sub.messages.index(online)] if m.topic == STATE]
    assert sent and all(s == "ok" for s in sent), f"broker in the state sent before online: {sent}"
