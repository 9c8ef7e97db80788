"""The MQTT link against a real Mosquitto started by the tests (edgeknn.bench.broker)."""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import sys
import time
from hashlib import sha256

import numpy as np
import pytest
from mqttclient import Subscriber, make_certs
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rig import needs_mosquitto, wait_for

from edgeknn.bench.broker import Broker
from edgeknn.commands import (
    AddExample,
    ForgetClass,
    RenameClass,
    Reset,
    Result,
    Save,
    SelectClass,
    SetThreshold,
    Snapshot,
)
from edgeknn.config import MqttConfig
from edgeknn.mqtt import discovery
from edgeknn.mqtt.client import MqttError
from edgeknn.mqtt.commands import CommandError, parse_command
from edgeknn.mqtt.link import MqttLink
from edgeknn.outputs import Reading
from edgeknn.store.names import UNKNOWN

pytestmark = needs_mosquitto

BASE = "edgeknn/dev1"
AVAIL = f"{BASE}/availability"
STATE = f"{BASE}/state"
PREDICTION = f"{BASE}/prediction"
RESULT = f"{BASE}/cmd/result"
CLASSES = ["cup", "pen", "two words"]
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def make_link():
    """``make_link(port, **MqttConfig fields)`` -> (link, queue of submitted commands); closed after."""
    links: list[MqttLink] = []

    def make(port: int, *, classes=CLASSES, start=True, device_id="dev1", base=BASE, **fields):
        fields.setdefault("host", "127.0.0.1")
        submitted: queue.Queue = queue.Queue()
        link = MqttLink(
            MqttConfig(port=port, **fields),
            base_topic=base,
            device_id=device_id,
            classes=list(classes),
            submit=submitted.put,
            version="0.1.0",
        )
        links.append(link)
        if start:
            link.start()
        return link, submitted

    yield make
    for link in links:
        link.close()


def is_online(m) -> bool:
    return m.topic == AVAIL and m.text == "online"


def reading(label: str, *, changed: bool, frame: int, ts: float = 1700000000.25) -> Reading:
    scores = {"cup": 0.75, "pen": 0.25} if label != UNKNOWN else {}
    return Reading(label, 0.75, scores, 0.8123456, frame, ts, 41.234, changed, inference_ms=5.5)


def request(sub: Subscriber, name: str, payload, correlation: str, *, base: str = BASE) -> dict:
    """Publish a command with an MQTT 5 response topic; return the JSON reply that carries ``correlation``."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "test/replies"
    props.CorrelationData = correlation.encode()
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sub.publish(f"{base}/cmd/{name}", data, properties=props)
    msg = sub.wait_for(
        lambda m: (
            m.topic == "test/replies"
            and getattr(m.properties, "CorrelationData", None) == correlation.encode()
        ),
        what=f"reply to {name} {correlation}",
    )
    return json.loads(msg.payload)


# -- availability


def test_state_then_online_retained_offline_on_close(broker, subscriber, make_link):
    sub = subscriber(broker.port, [f"{BASE}/#"])
    link, _ = make_link(broker.port, discovery=False, start=False)
    assert link.status == "down"
    link.state({"classes": {"cup": 2, "pen": 0, "two words": 1}, "k": 3, "fps": np.float32(29.5)})
    link.start()
    sub.wait_for(is_online)
    topics = [m.topic for m in sub.messages]
    assert topics.index(STATE) < topics.index(AVAIL), "state must be published before online"
    state = json.loads(sub.on(STATE)[0].payload)
    assert state["classes"] == {"cup": 2, "pen": 0, "two words": 1} and state["fps"] == 29.5
    assert isinstance(state["seq"], int) and TS_RE.match(state["ts"])
    assert link.connected and link.status == "ok"

    late = subscriber(broker.port, [AVAIL, STATE])  # retained copies for a late subscriber
    late.wait_for(lambda m: m.topic == AVAIL and m.retain and m.text == "online")
    late.wait_for(lambda m: m.topic == STATE and m.retain and json.loads(m.payload)["k"] == 3)

    link.close()
    link.close()  # idempotent
    sub.wait_for(lambda m: m.topic == AVAIL and m.text == "offline")
    assert not link.connected and link.status == "down"
    after = subscriber(broker.port, [AVAIL])
    after.wait_for(lambda m: m.retain and m.text == "offline")


def test_wait_for_state_says_online_only_after_the_first_state(broker, subscriber):
    """The daemon's link (``wait_for_state``) connects before its loop's first state: online waits for it,
    then follows it, so Home Assistant never sees the device online without its retained state."""
    sub = subscriber(broker.port, [f"{BASE}/#"])
    config = MqttConfig(host="127.0.0.1", port=broker.port)
    common = {"base_topic": BASE, "device_id": "dev1", "classes": CLASSES, "submit": print, "version": "0"}
    link = MqttLink(config, **common, wait_for_state=True)
    try:
        link.start()
        assert wait_for(lambda: link.connected), "no connection"
        link.event({"event": "early"})  # held until the announce: still before online
        link.state({"classes": {"cup": 1, "pen": 0, "two words": 0}, "k": 3})
        sub.wait_for(is_online)
        topics = [m.topic for m in sub.messages]
        assert topics.index(f"{BASE}/event") < topics.index(STATE) < topics.index(AVAIL), topics
        assert topics.count(STATE) == 1, topics  # announced once, not again by the state() that allowed it
        assert link.status == "ok" and json.loads(sub.on(STATE)[0].payload)["k"] == 3
    finally:
        link.close()


CHILD = """
import sys, time
from edgeknn.config import MqttConfig
from edgeknn.mqtt.link import MqttLink
link = MqttLink(MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), discovery=False), base_topic=sys.argv[2],
                device_id="child", classes=["a"], submit=lambda c: None, version="t")
link.start()
while not link.connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""


def test_lwt_offline_when_the_process_dies(broker, subscriber):
    sub = subscriber(broker.port, [AVAIL])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(broker.port), BASE], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"connected"
        sub.wait_for(is_online)
        sub.clear()
        child.kill()
        child.wait(5)
        msg = sub.wait_for(lambda m: m.text == "offline", what="LWT offline")
        assert msg.topic == AVAIL
    finally:
        child.kill()
        child.wait(5)
        child.stdout.close()


# -- predictions


def test_predictions_on_change_and_heartbeat(broker, subscriber, make_link):
    sub = subscriber(broker.port, [PREDICTION])
    link, _ = make_link(broker.port, discovery=False, heartbeat_s=0.4)
    # announced, not only connected: until then the outbox keeps the newest prediction only (under
    # load frame 2 replaced frame 1 there)
    assert wait_for(lambda: link._connection.ready)
    link.show(reading(UNKNOWN, changed=False, frame=1))  # the first one after connecting always goes out
    link.show(reading("cup", changed=True, frame=2))
    link.show(reading("cup", changed=False, frame=3))
    link.show(reading("cup", changed=False, frame=4))
    time.sleep(0.45)
    link.show(reading("cup", changed=False, frame=5))  # heartbeat
    link.show(reading("cup", changed=False, frame=6))
    link.show(reading("pen", changed=True, frame=7))
    sub.wait_for(lambda m: json.loads(m.payload)["frame"] == 7)
    payloads = [json.loads(m.payload) for m in sub.messages]
    assert [p["frame"] for p in payloads] == [1, 2, 5, 7]
    seqs = [p["seq"] for p in payloads]
    assert seqs == sorted(set(seqs)), "seq must increase strictly"
    first = payloads[1]
    assert set(first) == {"label", "confidence", "scores", "similarity", "frame", "ts", "latency_ms", "seq"}
    assert first["label"] == "cup" and first["scores"] == {"cup": 0.75, "pen": 0.25}
    assert first["similarity"] == 0.8123 and first["latency_ms"] == 41.2
    assert first["ts"] == "2023-11-14T22:13:20.250Z" and TS_RE.match(first["ts"])
    assert not any(m.retain for m in sub.messages)


def test_predictions_every_frame(broker, subscriber, make_link):
    sub = subscriber(broker.port, [PREDICTION])
    link, _ = make_link(broker.port, discovery=False, publish="every_frame", heartbeat_s=0.0)
    assert wait_for(lambda: link._connection.ready)  # announced: nothing is coalesced from here on
    for frame in range(1, 6):
        link.show(reading("cup", changed=False, frame=frame))
    sub.wait_for(lambda m: json.loads(m.payload)["frame"] == 5)
    payloads = [json.loads(m.payload) for m in sub.messages]
    assert [p["frame"] for p in payloads] == [1, 2, 3, 4, 5]
    assert all(b["seq"] > a["seq"] for a, b in zip(payloads, payloads[1:], strict=False))


def test_seq_is_one_counter_across_topics(broker, subscriber, make_link):
    sub = subscriber(broker.port, [f"{BASE}/#"])
    link, _ = make_link(broker.port, discovery=False)
    sub.wait_for(is_online)
    link.show(reading("cup", changed=True, frame=1))
    link.event({"event": "example_added", "class": "cup", "count": 12, "source": "button"})
    link.state({"classes": {"cup": 12, "pen": 0, "two words": 0}})
    sub.wait_for(lambda m: m.topic == STATE)
    event = json.loads(sub.wait_for(lambda m: m.topic == f"{BASE}/event").payload)
    assert event["event"] == "example_added" and event["count"] == 12 and TS_RE.match(event["ts"])
    seqs = [json.loads(m.payload)["seq"] for m in sub.messages if m.topic != AVAIL]
    assert seqs == sorted(set(seqs)) and len(seqs) == 3


# -- commands


RIG_ALLOWED = ["add_example", "forget_class", "rename_class", "reset", "save", "set_threshold"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One broker, link and subscriber for the command tables (snapshot is not allowed here)."""
    b = Broker(tmp_path_factory.mktemp("rig")).start()
    submitted: queue.Queue = queue.Queue()
    link = MqttLink(
        MqttConfig(host="127.0.0.1", port=b.port, discovery=False, allowed_commands=RIG_ALLOWED),
        base_topic=BASE,
        device_id="dev1",
        classes=list(CLASSES),
        submit=submitted.put,
        version="0.1.0",
    )
    sub = Subscriber(b.port, ["test/replies", RESULT, AVAIL])
    link.start()
    sub.wait_for(is_online)
    yield link, sub, submitted
    link.close()
    sub.close()
    b.kill()


VALID = [
    ("add_example", {"class": "cup", "count": 3}, AddExample(class_name="cup", count=3, source="mqtt")),
    ("add_example", {"class": "two words"}, AddExample(class_name="two words", count=1, source="mqtt")),
    ("forget_class", {"class": "pen"}, ForgetClass(class_name="pen", source="mqtt")),
    (
        "rename_class",
        {"class": "pen", "new_name": "marker"},
        RenameClass(class_name="pen", new_name="marker", source="mqtt"),
    ),
    ("reset", {"confirm": True}, Reset(source="mqtt")),
    ("save", {}, Save(source="mqtt")),
    ("save", b"", Save(source="mqtt")),
    ("set_threshold", {"value": 0.5}, SetThreshold(value=0.5, source="mqtt")),
    ("set_threshold", {"value": -1}, SetThreshold(value=-1.0, source="mqtt")),
]


@pytest.mark.parametrize(("name", "payload", "expected"), VALID)
def test_valid_command_is_submitted(rig, name, payload, expected):
    _, sub, submitted = rig
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sub.publish(f"{BASE}/cmd/{name}", data)
    command = submitted.get(timeout=5)
    assert command == expected and command.source == "mqtt" and callable(command.reply)
    assert submitted.empty()
    command.reply(Result(ok=False, error="not run here"))  # the shared link counts a queued class change
    sub.wait_for(lambda m: m.topic == RESULT and b"not run here" in m.payload)
    sub.clear()


def test_reply_goes_to_result_and_response_topic(rig):
    _, sub, submitted = rig
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "test/replies"
    props.CorrelationData = b"req-42"
    sub.clear()
    sub.publish(f"{BASE}/cmd/add_example", json.dumps({"class": "cup", "count": 2}), properties=props)
    command = submitted.get(timeout=5)
    assert command == AddExample(class_name="cup", count=2, source="mqtt")
    command.reply(Result(ok=True, detail={"class": "cup", "count": 14}))
    result = json.loads(sub.wait_for(lambda m: m.topic == RESULT).payload)
    reply = sub.wait_for(lambda m: m.topic == "test/replies")
    assert reply.properties.CorrelationData == b"req-42"
    for body in (result, json.loads(reply.payload)):
        assert body["command"] == "add_example" and body["ok"] is True and "error" not in body
        assert body["count"] == 14 and isinstance(body["seq"], int) and TS_RE.match(body["ts"])
    sub.clear()
    command.reply(Result(ok=False, error="camera: no frame yet"))
    failed = json.loads(sub.wait_for(lambda m: m.topic == RESULT).payload)
    assert failed["ok"] is False and failed["error"] == "camera: no frame yet"


def j(obj) -> bytes:
    return json.dumps(obj).encode()


MALFORMED = [
    ("add_example", b"{not json", "payload"),
    ("add_example", b"\xff\xfe{}", "payload"),  # not UTF-8
    ("add_example", b'["cup"]', "payload"),  # a JSON array
    ("add_example", b'"cup"', "payload"),
    ("add_example", b"null", "payload"),
    ("add_example", b"[" * 3000, "payload"),  # nested too deeply for the parser
    ("add_example", j({"class": "cup", "pad": "x" * 5000}), "payload"),  # over max_payload
    ("dance", b"{}", "command"),  # unknown command
    ("snapshot", b"{}", "command"),  # known but not in allowed_commands
    ("add_example", b"", "class"),  # missing field
    ("add_example", j({"count": 2}), "class"),
    ("add_example", j({"class": 5}), "class"),
    ("add_example", j({"class": "cup", "count": True}), "count"),  # bool is not an int
    ("add_example", j({"class": "cup", "count": 0}), "count"),
    ("add_example", j({"class": "cup", "count": 101}), "count"),
    ("add_example", j({"class": "cup", "count": 2.5}), "count"),
    ("add_example", j({"class": "cup", "count": "3"}), "count"),
    ("add_example", j({"class": "mug"}), "class"),  # valid name, not a known class
    ("add_example", j({"class": "cup+"}), "class"),
    ("add_example", j({"class": "cup#"}), "class"),
    ("add_example", j({"class": "a/b"}), "class"),
    ("add_example", j({"class": "cup\u0007"}), "class"),  # a control character
    ("add_example", j({"class": "x" * 33}), "class"),  # too long
    ("add_example", j({"class": ""}), "class"),
    ("add_example", j({"class": " cup"}), "class"),
    ("add_example", j({"class": "cup", "colour": "red"}), "colour"),  # extra field
    ("save", j({"now": True}), "now"),
    ("forget_class", j({"class": "ghost"}), "class"),
    ("rename_class", j({"class": "cup", "new_name": "pen"}), "new_name"),  # already exists
    ("rename_class", j({"class": "cup", "new_name": "a+b"}), "new_name"),
    ("rename_class", j({"class": "cup"}), "new_name"),
    ("reset", b"{}", "confirm"),
    ("reset", j({"confirm": "yes"}), "confirm"),
    ("set_threshold", j({"value": 2}), "value"),
    ("set_threshold", j({"value": "0.5"}), "value"),
    ("set_threshold", b'{"value": NaN}', "value"),
    ("set_threshold", j({"value": False}), "value"),
]


@pytest.mark.parametrize(
    ("index", "name", "payload", "field"), [(i, *case) for i, case in enumerate(MALFORMED)]
)
def test_malformed_command_gets_an_error_and_submits_nothing(rig, index, name, payload, field):
    _, sub, submitted = rig
    result = request(sub, name, payload, f"bad-{index}")
    assert result["command"] == name and result["ok"] is False
    assert result["error"].startswith(f"{field}: "), result["error"]
    assert "\n" not in result["error"] and isinstance(result["seq"], int) and TS_RE.match(result["ts"])
    sub.wait_for(lambda m: m.topic == RESULT and json.loads(m.payload)["seq"] == result["seq"] - 1)
    assert submitted.empty()


@pytest.mark.parametrize(("name", "payload", "expected"), VALID)
def test_parse_command_builds_the_command(name, payload, expected):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    config = MqttConfig(allowed_commands=RIG_ALLOWED)
    command = parse_command(name, data, classes=CLASSES, config=config, reply=print)
    assert command == expected and command.reply is print


@pytest.mark.parametrize(("name", "payload", "field"), MALFORMED)
def test_parse_command_refuses_naming_the_field(name, payload, field):
    config = MqttConfig(allowed_commands=RIG_ALLOWED)
    with pytest.raises(CommandError) as refused:
        parse_command(name, payload, classes=CLASSES, config=config)
    assert str(refused.value).startswith(f"{field}: ") and "\n" not in str(refused.value)


def test_own_topics_and_retained_commands_are_ignored(broker, subscriber, make_link):
    sub = subscriber(broker.port, [f"{BASE}/#"])
    sub.publish(
        f"{BASE}/cmd/add_example", j({"class": "cup"}), retain=True
    )  # retained before the link starts
    link, submitted = make_link(broker.port, discovery=False)
    sub.wait_for(is_online)
    sub.publish(f"{BASE}/cmd/forget_class", j({"class": "cup"}), retain=True)  # retained, live
    sub.publish(RESULT, j({"command": "reset", "confirm": True}))  # our own output topic
    sub.publish(f"{BASE}/cmd/save", b"{}")
    assert submitted.get(timeout=5) == Save(source="mqtt")
    time.sleep(0.2)
    assert submitted.empty()
    assert [m.payload for m in sub.on(RESULT)] == [j({"command": "reset", "confirm": True})]


def test_commands_disabled_subscribes_nothing(broker, subscriber, make_link):
    sub = subscriber(broker.port, ["#"])
    on, _ = make_link(broker.port, discovery=False, device_id="on", base="edgeknn/on")
    off, submitted = make_link(
        broker.port, discovery=False, commands=False, device_id="off", base="edgeknn/off"
    )
    sub.wait_for(lambda m: m.topic == "edgeknn/on/availability" and m.text == "online")
    sub.wait_for(lambda m: m.topic == "edgeknn/off/availability" and m.text == "online")
    # the control: a subscription shows in the log
    assert wait_for(lambda: "edgeknn/on/cmd/+" in broker.log())
    assert "edgeknn/off/" not in broker.log()
    sub.publish("edgeknn/off/cmd/add_example", j({"class": "cup"}))
    sub.publish("edgeknn/off/cmd/save", b"{}")
    time.sleep(0.3)
    assert submitted.empty() and not [m for m in sub.messages if m.topic == "edgeknn/off/cmd/result"]


def test_failing_submit_and_callback_bugs_leave_the_link_working(
    broker, subscriber, make_link, caplog, monkeypatch
):
    sub = subscriber(broker.port, [f"{BASE}/#", "test/replies"])
    link, submitted = make_link(broker.port, discovery=False)
    sub.wait_for(is_online)
    calls = []

    def submit(command):
        calls.append(command)
        if len(calls) == 1:
            raise RuntimeError("queue full")
        submitted.put(command)

    link._submit = submit
    result = request(sub, "save", b"{}", "first")
    assert (
        result["ok"] is False and result["error"].startswith("command: ") and "queue full" in result["error"]
    )
    sub.publish(f"{BASE}/cmd/save", b"{}")
    assert submitted.get(timeout=5) == Save(source="mqtt")

    with monkeypatch.context() as patch:  # a bug inside paho's callback: logged, the thread lives on
        patch.setattr("edgeknn.mqtt.link.parse_command", None)
        sub.publish(f"{BASE}/cmd/save", b"{}")
        assert wait_for(lambda: "mqtt: error in _on_message" in caplog.text)
    sub.publish(f"{BASE}/cmd/snapshot", b"{}")
    assert submitted.get(timeout=5) == Snapshot(source="mqtt")
    assert link.connected and submitted.empty()


# -- broker outages


def test_boot_with_broker_down_then_connects(tmp_path, subscriber, make_link, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    b = Broker(tmp_path / "b")  # not started yet
    try:
        link, _ = make_link(b.port, discovery=False)
        time.sleep(1.5)  # two attempts fail (at 0 s and 1 s)
        assert not link.connected and link.status == "down"
        outages = [r.getMessage() for r in caplog.records if "cannot reach broker" in r.getMessage()]
        assert outages == [f"mqtt: cannot reach broker at 127.0.0.1:{b.port}: Connection refused; retrying"]
        b.start()
        sub = subscriber(b.port, [AVAIL])
        sub.wait_for(is_online, timeout=8)
        assert link.connected
        assert f"mqtt: connected to 127.0.0.1:{b.port}" in caplog.text
    finally:
        b.kill()


def test_unresolvable_host_is_logged_once(make_link, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    link, _ = make_link(1883, host="edgeknn-test.invalid", discovery=False)
    time.sleep(1.3)
    assert not link.connected
    outages = [r.getMessage() for r in caplog.records if "cannot reach broker" in r.getMessage()]
    assert len(outages) == 1 and outages[0].startswith(
        "mqtt: cannot reach broker at edgeknn-test.invalid:1883: "
    )
    started = time.monotonic()
    link.close()
    assert time.monotonic() - started < 3


def test_reconnects_after_broker_kill_and_delivers_changes(tmp_path, subscriber, make_link, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    b = Broker(tmp_path / "b", persistence=True).start()
    try:
        sub = subscriber(b.port, [f"{BASE}/#"], client_id="test-sub", session_expiry=300)
        link, _ = make_link(b.port, discovery=False)
        link.state({"classes": {"cup": 1, "pen": 0, "two words": 0}, "n": 1})
        sub.wait_for(is_online)
        time.sleep(1.2)  # autosave_interval 1: the subscriber's persistent session is on disk
        b.kill()
        assert wait_for(lambda: not link.connected)
        sub.clear()
        link.state({"classes": {"cup": 2, "pen": 0, "two words": 0}, "n": 2})
        link.event({"event": "example_added", "class": "cup", "count": 2, "source": "button"})
        link.state({"classes": {"cup": 3, "pen": 0, "two words": 0}, "n": 3})
        link.show(reading("cup", changed=False, frame=98))  # live data: not queued
        link.show(reading("pen", changed=True, frame=99))  # a change of the stable label: queued
        b.start()
        sub.wait_for(lambda m: m.topic == f"{BASE}/event" and json.loads(m.payload)["count"] == 2, timeout=10)
        sub.wait_for(lambda m: is_online(m) and not m.retain)  # live, not the copy the broker kept
        live = [m for m in sub.messages if not m.retain]
        states = [json.loads(m.payload)["n"] for m in live if m.topic == STATE]
        assert states == [3], "the latest state is re-published on connect (before online)"
        topics = [m.topic for m in live]
        assert topics.index(STATE) < topics.index(AVAIL)
        sub.wait_for(lambda m: m.topic == PREDICTION and json.loads(m.payload)["frame"] == 99)
        assert [json.loads(m.payload)["frame"] for m in sub.on(PREDICTION)] == [99]
        link.show(reading("cup", changed=False, frame=100))  # the first after reconnecting goes out
        sub.wait_for(lambda m: m.topic == PREDICTION and json.loads(m.payload)["frame"] == 100)
        log_lines = [r.getMessage() for r in caplog.records]
        assert sum("lost connection to broker" in line for line in log_lines) == 1
        assert sum("cannot reach broker" in line for line in log_lines) == 0  # one line per outage
        assert sum(line == f"mqtt: connected to 127.0.0.1:{b.port}" for line in log_lines) == 2
    finally:
        b.kill()


# -- Home Assistant discovery


def test_discovery_configs_and_training_controls(broker, subscriber, make_link):
    sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#"])
    link, submitted = make_link(broker.port, heartbeat_s=30.0)
    sub.wait_for(is_online)
    topics = [m.topic for m in sub.messages]
    configs = {m.topic: json.loads(m.payload) for m in sub.messages if m.topic.endswith("/config")}
    assert max(topics.index(t) for t in configs) < topics.index(AVAIL), "discovery before online"
    node = "homeassistant/{}/edgeknn_dev1/{}/config"
    expected = {
        node.format("sensor", "prediction"),
        node.format("sensor", "fps"),
        node.format("sensor", "inference_ms"),
        node.format("sensor", "examples"),
        node.format("select", "training_class"),
        node.format("button", "add_example"),
        node.format("button", "forget_class"),
        node.format("button", "reset"),
        node.format("button", "snapshot"),
        node.format("image", "snapshot_image"),
        node.format("number", "threshold"),
        node.format("switch", "threshold_auto"),
        node.format("binary_sensor", "broker"),
        node.format("binary_sensor", "camera"),
        node.format("sensor", "error"),
        node.format("event", "events"),
        node.format("text", "new_class"),
        node.format("text", "rename_class"),
        *(node.format("binary_sensor", discovery.class_object_id(name)) for name in CLASSES),
    }
    assert set(configs) == expected
    assert node.format("binary_sensor", "class_two_words_" + sha256(b"two words").hexdigest()[:6]) in configs
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    for config in configs.values():
        assert (
            config["device"]["identifiers"] == ["edgeknn_dev1"] and config["device"]["sw_version"] == "0.1.0"
        )
        assert config.get("availability", [{"topic": AVAIL}])[0] == {"topic": AVAIL}
    prediction = configs[node.format("sensor", "prediction")]
    tagged = f"{BASE}/ha/{discovery.tag(CLASSES)}"
    assert prediction["state_topic"] == f"{tagged}/prediction" == prediction["json_attributes_topic"]
    assert prediction["value_template"] == "{{ value_json.label }}" and "expire_after" not in prediction
    assert configs[node.format("sensor", "fps")]["entity_category"] == "diagnostic"
    assert configs[node.format("sensor", "fps")]["state_topic"] == STATE
    select = configs[node.format("select", "training_class")]
    assert select["options"] == CLASSES and "entity_category" not in select  # a primary control
    assert all(
        configs[node.format("button", b)]["entity_category"] == "config" for b in ("forget_class", "reset")
    )
    retained = subscriber(broker.port, [node.format("sensor", "prediction")])
    assert retained.wait_for(lambda m: m.retain).payload == json.dumps(prediction).encode()

    sub.clear()
    sub.publish("homeassistant/status", "online")  # Home Assistant restarted
    assert wait_for(lambda: len([m for m in sub.messages if m.topic.endswith("/config")]) == len(configs))

    sub.clear()
    link.state({"classes": {"cup": 1, "pen": 0, "two words": 0, "mug": 0}})
    new = sub.wait_for(lambda m: m.topic == node.format("select", "training_class"))
    assert json.loads(new.payload)["options"] == [*CLASSES, "mug"]

    sub.publish(f"{BASE}/ha/class/set", "mug")
    selected = f"{BASE}/ha/{discovery.tag([*CLASSES, 'mug'])}/class"
    sub.wait_for(lambda m: m.topic == selected and m.text == "mug")
    assert submitted.get(timeout=5) == SelectClass(class_name="mug", source="mqtt")  # the daemon keeps it
    sub.publish(f"{BASE}/ha/press", "add_example")
    assert submitted.get(timeout=5) == AddExample(class_name="mug", count=1, source="mqtt")
    sub.publish(f"{BASE}/ha/press", "reset")
    assert submitted.get(timeout=5) == Reset(source="mqtt")
    sub.clear()
    sub.publish(f"{BASE}/ha/class/set", "ghost")  # not a class: the selection stays
    sub.wait_for(lambda m: m.topic == selected and m.text == "mug")
    assert submitted.empty()


# -- security


def test_tls_with_client_certificate(tmp_path, subscriber, make_link, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    certs = make_certs(tmp_path / "pki")
    b = Broker(tmp_path / "b", certs=certs).start()
    try:
        sub = subscriber(b.port, [AVAIL, "edgeknn/bad/availability"])
        tls = dict(
            tls=True, ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
        )
        link, _ = make_link(b.tls_port, host="localhost", discovery=False, **tls)
        sub.wait_for(is_online)
        assert link.connected
        tls["ca_file"] = str(certs.client_cert)  # not the CA that signed the server: verification fails
        bad, _ = make_link(b.tls_port, discovery=False, device_id="bad", base="edgeknn/bad", **tls)
        assert wait_for(lambda: "cannot reach broker" in caplog.text)
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text and not bad.connected
    finally:
        b.kill()


def test_wrong_password_is_logged_clearly(tmp_path, make_link, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    b = Broker(tmp_path / "b", users={"edge": "s3cret"}).start()
    try:
        secret = tmp_path / "password"
        secret.write_text("wrong\n")
        link, _ = make_link(b.port, discovery=False, username="edge", password_file=str(secret))
        time.sleep(1.5)  # two attempts
        refused = [r for r in caplog.records if "refused the login" in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR
        assert 'refused the login of mqtt.username "edge": ' in refused[0].getMessage()
        assert (
            "Bad user name or password" in refused[0].getMessage()
            or "Not authorized" in refused[0].getMessage()
        )
        assert not link.connected and "connected to" not in caplog.text
        secret.write_text("s3cret\nsecond line ignored\n")
        good, _ = make_link(
            b.port, discovery=False, username="edge", password_file=str(secret), device_id="good"
        )
        assert wait_for(lambda: good.connected)
    finally:
        b.kill()


def test_unreadable_files_raise_naming_the_key(tmp_path):
    missing = str(tmp_path / "nope")
    common = dict(base_topic=BASE, device_id="dev1", classes=CLASSES, submit=lambda c: None, version="t")
    with pytest.raises(MqttError, match=r"^mqtt\.password_file: cannot read .*nope"):
        MqttLink(MqttConfig(username="u", password_file=missing), **common)
    with pytest.raises(MqttError, match=r"^mqtt\.ca_file: cannot read"):
        MqttLink(MqttConfig(tls=True, ca_file=missing), **common)


def test_close_without_broker_is_quick(make_link):
    link, _ = make_link(1, discovery=False)  # nothing listens on port 1
    link.show(reading("cup", changed=True, frame=1))
    link.event({"event": "example_added"})
    started = time.monotonic()
    link.close()
    link.close()
    assert time.monotonic() - started < 3 and not link.connected
