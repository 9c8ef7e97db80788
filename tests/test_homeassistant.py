"""Home Assistant's side: discovery payloads against HA's MQTT discovery documentation, the enum
prediction's options following the classes, the training class kept across a restart, the threshold
controls, and snapshots published as an MQTT image (real Mosquitto, the daemon in-process)."""

from __future__ import annotations

import io
import json
import queue
import re
import time
from pathlib import Path

import pytest
from conftest import DIGITS, MODEL
from mqttclient import Subscriber
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image
from rig import Running, Scene, needs_mosquitto, wait_for

from edgeknn import config
from edgeknn.commands import AddClass, RenameClass, SelectClass
from edgeknn.config import MqttConfig
from edgeknn.device.build import build
from edgeknn.mqtt import discovery, homeassistant
from edgeknn.mqtt.homeassistant import Page
from edgeknn.mqtt.link import MqttLink
from edgeknn.outputs import Reading
from edgeknn.store.names import UNKNOWN

# --- what Home Assistant's documentation allows ------------------------------------------------------
# Top-level keys of each MQTT platform, copied from the {% configuration %} blocks of
# home-assistant.io/source/_integrations/<platform>.mqtt.markdown (pages "MQTT Sensor", "MQTT binary
# sensor", "MQTT Select", "MQTT button", "MQTT Number", "MQTT Switch", "MQTT Image"). Discovery adds
# `origin` (page "MQTT", section "Discovery payload"): unknown keys are ignored by HA, not refused, so a
# misspelt key would silently do nothing; this test is what catches it.
DOCUMENTED_KEYS: dict[str, set[str]] = {
    "sensor": {
        "availability", "availability_mode", "availability_template", "availability_topic", "device",
        "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture",
        "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic",
        "last_reset_value_template", "name", "object_id", "options", "payload_available",
        "payload_not_available", "platform", "suggested_display_precision", "qos", "state_class",
        "state_topic", "unique_id", "unit_of_measurement", "value_template",
    },
    "binary_sensor": {
        "availability", "availability_mode", "availability_template", "availability_topic", "device",
        "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture",
        "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic", "name",
        "object_id", "off_delay", "payload_available", "payload_not_available", "payload_off", "payload_on",
        "platform", "qos", "state_topic", "unique_id", "value_template",
    },
    "select": {
        "availability", "availability_topic", "availability_mode", "availability_template",
        "command_template", "command_topic", "device", "enabled_by_default", "encoding", "entity_category",
        "entity_picture", "icon", "json_attributes_template", "json_attributes_topic", "name", "object_id",
        "optimistic", "options", "platform", "qos", "retain", "state_topic", "unique_id", "value_template",
    },
    "button": {
        "availability", "availability_mode", "availability_template", "availability_topic",
        "command_template", "command_topic", "device", "device_class", "enabled_by_default", "encoding",
        "entity_category", "entity_picture", "icon", "json_attributes_template", "json_attributes_topic",
        "name", "object_id", "payload_available", "payload_not_available", "payload_press", "platform", "qos",
        "retain", "unique_id",
    },
    "number": {
        "availability", "availability_topic", "availability_mode", "command_template", "command_topic",
        "device", "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture",
        "icon", "json_attributes_template", "json_attributes_topic", "min", "max", "mode", "name",
        "object_id", "optimistic", "payload_reset", "platform", "qos", "retain", "state_topic", "step",
        "unique_id", "unit_of_measurement", "value_template",
    },
    "switch": {
        "availability", "availability_mode", "availability_template", "availability_topic",
        "command_template", "command_topic", "device", "device_class", "enabled_by_default", "encoding",
        "entity_category", "entity_picture", "icon", "json_attributes_template", "json_attributes_topic",
        "name", "object_id", "optimistic", "payload_available", "payload_not_available", "payload_off",
        "payload_on", "platform", "qos", "retain", "state_off", "state_on", "state_topic", "unique_id",
        "value_template",
    },
    "image": {
        "availability", "availability_mode", "availability_template", "availability_topic", "content_type",
        "device", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
        "image_encoding", "image_topic", "json_attributes_template", "json_attributes_topic", "name",
        "object_id", "unique_id", "url_template", "url_topic",
    },
    # pages "MQTT Event" and "MQTT Text" (and homeassistant/components/mqtt/event.py, text.py: their
    # schemas are MQTT_RO_SCHEMA / MQTT_RW_SCHEMA plus these, and MQTT_ENTITY_COMMON_SCHEMA)
    "event": {
        "availability", "availability_mode", "availability_template", "availability_topic", "device",
        "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture", "event_types",
        "icon", "json_attributes_template", "json_attributes_topic", "name", "object_id",
        "payload_available", "payload_not_available", "platform", "qos", "state_topic", "unique_id",
        "value_template",
    },
    "text": {
        "availability", "availability_mode", "availability_template", "availability_topic",
        "command_template", "command_topic", "device", "enabled_by_default", "encoding", "entity_category",
        "entity_picture", "icon", "json_attributes_template", "json_attributes_topic", "max", "min", "mode",
        "name", "object_id", "optimistic", "pattern", "payload_available", "payload_not_available",
        "platform", "qos", "retain", "state_topic", "unique_id", "value_template",
    },
}  # fmt: skip
REQUIRED_KEYS = {  # "required: true" on the same pages (image: image_topic or url_topic, exclusive)
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "select": {"command_topic", "options"},
    "button": {"command_topic"},
    "number": {"command_topic"},
    "switch": {"command_topic"},
    "image": {"image_topic"},
    "event": {"state_topic", "event_types"},
    "text": {"command_topic"},
}
DEVICE_KEYS = {  # the `device` map, same pages
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}  # page "MQTT", "Discovery payload"
# developers.home-assistant.io/docs/core/entity#generic-properties: entity_category is "config" or
# "diagnostic"; the sensor pages: "When set, the entity category must be `diagnostic` for sensors."
READ_ONLY = ("sensor", "binary_sensor")
# Device classes whose icon Home Assistant picks by state (binary_sensor/icons.json): given no icon
STATE_ICONS = {
    ("binary_sensor", "connectivity"),
    ("binary_sensor", "problem"),
    ("binary_sensor", "occupancy"),
}

BASE = "edgeknn/dev1"
NODE = "homeassistant/{}/edgeknn_dev1/{}/config"
# What a person finds where: no category = the device page's main card (and the default dashboard).
EXPECTED = {
    ("sensor", "prediction"): None,
    ("binary_sensor", "class_cup"): None,
    ("binary_sensor", "class_pen"): None,
    ("event", "events"): None,
    ("sensor", "examples"): None,
    ("select", "training_class"): None,
    ("button", "snapshot"): None,
    ("image", "snapshot_image"): None,
    ("button", "add_example"): "config",  # not on the default dashboard, nor pressed by "press every button"
    ("text", "new_class"): "config",
    ("text", "rename_class"): "config",
    ("button", "forget_class"): "config",
    ("button", "reset"): "config",
    ("number", "threshold"): "config",
    ("switch", "threshold_auto"): "config",
    ("binary_sensor", "broker"): "diagnostic",
    ("binary_sensor", "camera"): "diagnostic",
    ("sensor", "error"): "diagnostic",
    ("sensor", "fps"): "diagnostic",
    ("sensor", "inference_ms"): "diagnostic",
}


def configs_for(classes: list[str], page_url: str = "", **fields) -> dict[str, dict]:
    return discovery.discovery_configs(
        MqttConfig(**fields),
        base_topic=BASE,
        device_id="dev1",
        classes=classes,
        version="0.1.0",
        page_url=page_url,
    )


def by_entity(configs: dict[str, dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for topic, payload in configs.items():
        _, component, _, object_id, _ = topic.split("/")
        out[(component, object_id)] = payload
    return out


def test_discovery_payloads_use_only_documented_keys_and_categories():
    entities = by_entity(configs_for(["cup", "pen"]))
    assert {key: e.get("entity_category") for key, e in entities.items()} == EXPECTED
    for (component, object_id), entity in entities.items():
        where = f"{component}/{object_id}"
        assert set(entity) <= DOCUMENTED_KEYS[component] | {"origin"}, (
            where, set(entity) - DOCUMENTED_KEYS[component])  # fmt: skip
        assert REQUIRED_KEYS[component] <= set(entity), where
        assert set(entity["device"]) <= DEVICE_KEYS and entity["device"]["identifiers"] == ["edgeknn_dev1"]
        assert entity["origin"] == {
            "name": "edgeknn",
            "sw_version": "0.1.0",
            "support_url": discovery.SUPPORT_URL,
        }
        assert set(entity["origin"]) <= ORIGIN_KEYS
        for item in entity.get("availability", []):
            assert set(item) <= AVAILABILITY_KEYS
        if component in READ_ONLY and "entity_category" in entity:
            assert entity["entity_category"] == "diagnostic", where
        if (component, entity.get("device_class")) in STATE_ICONS:  # HA's icon follows the state
            assert "icon" not in entity, where
        else:
            assert re.fullmatch(r"mdi:[a-z0-9-]+", entity["icon"]), where
        assert entity["unique_id"] == f"edgeknn_dev1_{object_id}"
    assert len({e["unique_id"] for e in entities.values()}) == len(entities)

    prediction = entities[("sensor", "prediction")]
    assert prediction["device_class"] == "enum" and prediction["options"] == ["cup", "pen", UNKNOWN]
    # no expire_after: Home Assistant makes an expiring sensor unavailable on every discovery update
    assert "expire_after" not in prediction
    tagged = f"{BASE}/ha/{discovery.tag(['cup', 'pen'])}"
    assert prediction["state_topic"] == f"{tagged}/prediction"
    assert entities[("select", "training_class")]["state_topic"] == f"{tagged}/class"
    cup = entities[("binary_sensor", "class_cup")]
    assert cup["name"] == "cup" and cup["state_topic"] == f"{tagged}/prediction"
    assert cup["value_template"] == "{{ 'ON' if value_json.label == 'cup' else 'OFF' }}"
    assert entities[("event", "events")]["event_types"] == ["prediction_changed", "example_added"]
    for text in ("new_class", "rename_class"):
        pattern = re.compile(entities[("text", text)]["pattern"])
        assert pattern.match("cup 2") and not pattern.match("cup/2") and not pattern.match(" cup")
    assert entities[("text", "rename_class")]["state_topic"] == f"{tagged}/class"
    classifying = [
        {"topic": f"{BASE}/availability"},
        {
            "topic": f"{BASE}/state",
            "value_template": "{{ 'online' if value_json.camera == 'ok' else 'offline' }}",
        },
    ]
    assert "state_class" not in prediction and "unit_of_measurement" not in prediction  # not with options
    for noise in ("seq", "ts", "frame"):  # HA stores attributes: nothing that changes with every message
        assert noise not in prediction["json_attributes_template"]
    assert "classes" in entities[("sensor", "examples")]["json_attributes_template"]  # per-class counts
    assert entities[("button", "reset")]["enabled_by_default"] is False
    assert all(e.get("enabled_by_default", True) for k, e in entities.items() if k != ("button", "reset"))
    number = entities[("number", "threshold")]
    assert number["min"] < number["max"] and number["step"] >= 0.001  # "Smallest value 0.001"
    assert "round(2)" in number["value_template"] and "stricter" in number["json_attributes_template"]
    assert number["command_topic"] == f"{BASE}/cmd/set_threshold"
    image = entities[("image", "snapshot_image")]
    assert image["image_topic"] == f"{BASE}/snapshot" and image["content_type"] == "image/jpeg"
    assert "url_topic" not in image  # exclusive with image_topic
    broker = entities[("binary_sensor", "broker")]
    assert broker["state_topic"] == f"{BASE}/availability" and "availability" not in broker
    assert broker["device_class"] == "connectivity"
    assert entities[("binary_sensor", "camera")]["device_class"] == "problem"
    for key, e in entities.items():
        if e is not broker:
            reads_prediction = key == ("sensor", "prediction") or key[1].startswith("class_")
            expected = classifying if reads_prediction else [{"topic": f"{BASE}/availability"}]
            assert e["availability"] == expected, key
    assert all("configuration_url" not in e["device"] for e in entities.values())  # no page: no link
    labels = [f"label{i}" for i in range(discovery.MAX_CLASS_SENSORS + 1)]  # a classifier model's
    assert not any(k[1].startswith("class_") for k in by_entity(configs_for(labels)))
    device = by_entity(configs_for(["cup"], page_url="http://192.0.2.7:8080/"))[("sensor", "prediction")][
        "device"
    ]
    assert device["configuration_url"] == "http://192.0.2.7:8080/"


def test_discovery_offers_only_the_commands_allowed():
    entities = by_entity(configs_for(["cup"], allowed_commands=["add_example"], snapshot_interval_s=0))
    controls = {k for k in entities if k[0] in ("button", "number", "switch", "select", "image", "text")}
    assert controls == {("select", "training_class"), ("button", "add_example")}
    entities = by_entity(configs_for(["cup"], allowed_commands=["add_class", "rename_class"]))
    assert {k for k in entities if k[0] == "text"} == {("text", "new_class"), ("text", "rename_class")}
    assert ("image", "snapshot_image") in entities  # every 10 s by default, with no button
    entities = by_entity(configs_for(["cup"], commands=False, snapshot_interval_s=5.0))
    assert {k for k in entities if k[0] in ("button", "number", "switch", "select")} == set()
    assert ("image", "snapshot_image") in entities  # published every 5 s, with no button
    assert discovery.press_payload("snapshot", "cup") == b"{}"
    assert json.loads(discovery.press_payload("add_example", "cup")) == {"class": "cup"}
    assert json.loads(discovery.press_payload("reset", "cup")) == {"confirm": True}


# --- the link against a real broker ------------------------------------------------------------------


@pytest.fixture
def link(broker):
    submitted: queue.Queue = queue.Queue()
    made = MqttLink(
        MqttConfig(host="127.0.0.1", port=broker.port),
        base_topic=BASE,
        device_id="dev1",
        classes=["cup", "pen"],
        submit=submitted.put,
        version="0.1.0",
    )
    made.start()
    yield made, submitted
    made.close()


def config_of(sub: Subscriber, component: str, object_id: str, after: int = 0) -> dict:
    topic = NODE.format(component, object_id)
    msg = sub.wait_for(lambda m: m.topic == topic and sub.messages.index(m) >= after, what=topic)
    return json.loads(msg.payload)


@needs_mosquitto
def test_enum_options_and_training_class_follow_the_classes(broker, subscriber, link, monkeypatch):
    made, submitted = link
    sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#"])
    sub.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.text == "online")
    assert config_of(sub, "sensor", "prediction")["options"] == ["cup", "pen", UNKNOWN]

    made.state({"classes": {"cup": 2, "pen": 1}, "training_class": "pen"})
    selected = f"{BASE}/ha/{discovery.tag(['cup', 'pen'])}/class"
    sub.wait_for(lambda m: m.topic == selected and m.text == "pen")  # the daemon's choice

    mark = len(sub.messages)  # "pen" renamed "mug" (its slot), and the training class follows it
    made.state({"classes": {"cup": 2, "mug": 1}, "training_class": "mug"})
    assert config_of(sub, "sensor", "prediction", mark)["options"] == ["cup", "mug", UNKNOWN]
    # "pen" stays an option while Home Assistant may still show it: it applies the new options before
    # it reads the new topic's "mug" (a current option not among the options is shown as unknown)
    assert config_of(sub, "select", "training_class", mark)["options"] == ["cup", "mug", "pen"]
    sub.wait_for(
        lambda m: (
            m.topic == f"{BASE}/ha/{discovery.tag(['cup', 'mug'])}/class"
            and m.text == "mug"
            and sub.messages.index(m) >= mark
        )
    )
    monkeypatch.setattr(homeassistant, "SETTLE_S", 0.0)  # settled: the next prediction drops "pen"
    mark = len(sub.messages)
    made.show(Reading("mug", 0.9, {"mug": 0.9}, 0.8, 1, time.time(), 5.0, True))
    assert config_of(sub, "select", "training_class", mark)["options"] == ["cup", "mug"]

    mark = len(sub.messages)  # a class added
    made.state({"classes": {"cup": 2, "mug": 1, "fist": 0}, "training_class": "mug"})
    assert config_of(sub, "sensor", "prediction", mark)["options"] == ["cup", "mug", "fist", UNKNOWN]
    assert config_of(sub, "select", "training_class", mark)["options"] == ["cup", "mug", "fist"]

    sub.publish(f"{BASE}/ha/class/set", "fist")  # Home Assistant's select: the daemon is asked to keep it
    command = submitted.get(timeout=10)
    assert command == SelectClass(class_name="fist", source="mqtt")
    sub.publish(f"{BASE}/ha/press", "add_example")
    assert submitted.get(timeout=10).class_name == "fist"
    sub.publish(f"{BASE}/ha/class/set", "ghost")  # not a class: nothing is asked, the selection stays
    sub.publish(f"{BASE}/ha/press", "snapshot")
    assert type(submitted.get(timeout=10)).__name__ == "Snapshot"

    mark = len(sub.messages)  # every class removed: no select to offer, so Home Assistant is told to drop it
    made.state({"classes": {}, "training_class": ""})
    # "mug", the label Home Assistant shows, stays valid until it has the new one (the label it is sent)
    assert config_of(sub, "sensor", "prediction", mark)["options"] == [UNKNOWN, "mug"]
    ha_prediction = f"{BASE}/ha/{discovery.tag([])}/prediction"
    assert json.loads(sub.wait_for(lambda m: m.topic == ha_prediction).payload)["label"] == UNKNOWN
    select = NODE.format("select", "training_class")
    assert sub.wait_for(lambda m: m.topic == select and sub.messages.index(m) >= mark).payload == b""


@needs_mosquitto
def test_text_event_and_class_entities_and_the_page_link(broker, subscriber):
    submitted: queue.Queue = queue.Queue()
    made = MqttLink(
        MqttConfig(host="127.0.0.1", port=broker.port),
        base_topic=BASE,
        device_id="dev1",
        classes=["cup", "pen"],
        submit=submitted.put,
        version="0.1.0",
        page=Page("http", 8080),
    )
    made.start()
    try:
        sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#"])
        sub.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.text == "online", 10)
        device = config_of(sub, "sensor", "prediction")["device"]
        assert device["configuration_url"] == "http://127.0.0.1:8080/"  # where the broker sees us from
        made.state({"classes": {"cup": 1, "pen": 0}, "training_class": "pen", "camera": "ok"})

        sub.publish(f"{BASE}/{discovery.NEW_CLASS}", "mug")  # the New class text
        assert submitted.get(timeout=10) == AddClass(class_name="mug", source="mqtt")
        sub.publish(f"{BASE}/{discovery.RENAME}", "pencil")  # Rename training class: the selected one
        assert submitted.get(timeout=10) == RenameClass(class_name="pen", new_name="pencil", source="mqtt")
        sub.publish(f"{BASE}/{discovery.RENAME}", "no/slash")  # refused like the command, nothing queued
        refused = sub.wait_for(lambda m: m.topic == f"{BASE}/cmd/result" and b"new_name" in m.payload, 10)
        assert not json.loads(refused.payload)["ok"] and submitted.empty()

        def reading(label: str, changed: bool) -> Reading:
            return Reading(label, 0.9, {label: 0.9}, 0.8, 1, time.time(), 5.0, changed)

        made.show(reading("cup", True))
        made.show(reading("pen", True))  # the stable label changed: the event entity fires
        made.event({"event": "example_added", "class": "pen", "count": 2, "source": "button"})
        events = f"{BASE}/{discovery.EVENTS}"
        changed = sub.wait_for(lambda m: m.topic == events and b"prediction_changed" in m.payload, 10)
        assert json.loads(changed.payload)["label"] == "pen" and not changed.retain
        added_msg = sub.wait_for(lambda m: m.topic == events and b"example_added" in m.payload)
        added = json.loads(added_msg.payload)
        assert added["event_type"] == "example_added" and added["class"] == "pen" and added["count"] == 2
        assert set(discovery.EVENT_TYPES) >= {json.loads(m.payload)["event_type"] for m in sub.on(events)}
        # Home Assistant's copy of the prediction is retained: an entity made later reads it at once
        late = subscriber(broker.port, [f"{BASE}/ha/{discovery.tag(['cup', 'pen'])}/prediction"])
        assert json.loads(late.wait_for(lambda m: m.retain, 10).payload)["label"] == "pen"
    finally:
        made.close()


# --- the daemon in-process ----------------------------------------------------------------------------


def daemon_config(tmp_path: Path, port: int, **mqtt) -> config.Config:
    return config.from_dict(
        {
            "classes": ["1", "2"],
            "state_dir": str(tmp_path),
            "model": {"path": str(MODEL), "threads": 2},
            "store": {"autosave_s": 0.5},
            "panel": {"kind": "none"},
            "web": {"enabled": False},
            "mqtt": {"host": "127.0.0.1", "port": port, "device_id": "dev1", "keepalive": 5, **mqtt},
        }
    )


def request(sub: Subscriber, name: str, payload: dict, tag: str) -> dict:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "test/reply"
    props.CorrelationData = tag.encode()
    sub.publish(f"{BASE}/cmd/{name}", json.dumps(payload).encode(), properties=props)
    msg = sub.wait_for(
        lambda m: m.topic == "test/reply" and m.properties.CorrelationData == tag.encode(), 20, f"reply {tag}"
    )
    return json.loads(msg.payload)


def state_says(sub: Subscriber, key: str, value, after: int) -> bool:
    def match(m) -> bool:
        return (
            m.topic == f"{BASE}/state"
            and sub.messages.index(m) >= after
            and json.loads(m.payload).get(key) == value
        )

    sub.wait_for(match, 20, f"state {key} = {value!r}")
    return True


@needs_mosquitto
def test_snapshots_reach_home_assistant_as_an_image(tmp_path, broker, subscriber):
    sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#", "test/reply"])
    scene = Scene({"2": DIGITS / "2"}, fps=20)
    cfg = daemon_config(tmp_path, broker.port, snapshot_interval_s=0.5)
    elsewhere = tmp_path / "elsewhere" / "store.npz"  # --store: the snapshots stay in <state_dir>/snapshots
    run = Running(build(config.replace(cfg, **{"store.path": str(elsewhere)}), opener=scene.opener))
    try:
        sub.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.text == "online", 30)
        assert run.classified()
        # every 0.5 s, unasked, and no file for those
        assert wait_for(lambda: len(sub.on(f"{BASE}/snapshot")) >= 2), "no periodic snapshot"
        assert not list((tmp_path / "snapshots").glob("*.jpg"))

        reply = request(sub, "snapshot", {}, "s1")
        assert reply["ok"] and reply["topic"] == f"{BASE}/snapshot", reply
        jpeg = Path(reply["file"]).read_bytes()
        sub.wait_for(lambda m: m.topic == f"{BASE}/snapshot" and m.payload == jpeg, 20, "the snapshot's JPEG")
        image = Image.open(io.BytesIO(jpeg))
        assert (
            image.format == "JPEG" and image.size == run.daemon.embedder.model.input_size
        )  # the frame as the model sees it
        retained = subscriber(broker.port, [f"{BASE}/snapshot"]).wait_for(lambda m: m.retain, 10)
        Image.open(io.BytesIO(retained.payload)).verify()  # Home Assistant starting later sees the newest

        mark = len(sub.messages)  # Home Assistant's Snapshot button
        sub.publish(f"{BASE}/ha/press", "snapshot")
        result = sub.wait_for(
            lambda m: m.topic == f"{BASE}/cmd/result" and sub.messages.index(m) >= mark, 20, "press result"
        )
        assert json.loads(result.payload)["topic"] == f"{BASE}/snapshot"
        assert len(list((tmp_path / "snapshots").glob("*.jpg"))) == 2
        assert Path(reply["file"]).parent == tmp_path / "snapshots"
        assert not (elsewhere.parent / "snapshots").exists()
    finally:
        run.stop()


def template_keys(entity: dict) -> set[str]:
    """The payload keys an entity's templates read (``value_json.<key>``)."""
    text = " ".join(v for k, v in entity.items() if k.endswith("_template"))
    return set(re.findall(r"value_json\.(\w+)", text))


@needs_mosquitto
def test_training_class_and_threshold_set_from_home_assistant_survive_a_restart(tmp_path, broker, subscriber):
    sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#", "test/reply"])
    scene = Scene({"2": DIGITS / "2"}, fps=20)
    run = Running(build(daemon_config(tmp_path, broker.port), opener=scene.opener))
    try:
        sub.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.text == "online", 30)
        assert run.classified()
        mark = len(sub.messages)
        sub.publish(f"{BASE}/ha/class/set", "2")  # the Training class select
        state_says(sub, "training_class", "2", mark)
        assert request(sub, "set_threshold", {"value": 0.7}, "number")["ok"]  # the Threshold number's payload
        state_says(sub, "threshold", 0.7, mark)
        assert json.loads(sub.on(f"{BASE}/state")[-1].payload)["effective_threshold"] == 0.7

        def switch(payload: str) -> dict:
            mark = len(sub.messages)
            sub.publish(f"{BASE}/ha/threshold_auto/set", payload)
            result = sub.wait_for(
                lambda m: m.topic == f"{BASE}/cmd/result" and sub.messages.index(m) >= mark, 20, payload
            )
            return json.loads(result.payload)

        mark = len(sub.messages)
        assert switch("ON")["threshold"] is None  # automatic: calibrated from the store
        state_says(sub, "threshold", None, mark)
        applied = json.loads(sub.on(f"{BASE}/state")[-1].payload)["effective_threshold"]
        mark = len(sub.messages)
        assert switch("OFF")["threshold"] == applied  # off: the threshold applied now stays, fixed
        state_says(sub, "threshold", applied, mark)
        assert switch("ON")["ok"]
        refused = switch("MAYBE")  # not a switch payload: refused, the automatic threshold stays
        assert not refused["ok"] and refused["error"] == 'value: expected ON or OFF, got "MAYBE"', refused
        assert run.daemon.store.threshold is None
        mark = len(sub.messages)
        applied = switch("OFF")["threshold"]  # (the calibrated one may have moved meanwhile)
        assert isinstance(applied, float), applied
        state_says(sub, "threshold", applied, mark)

        # every template reads keys the daemon's payloads really have
        state = json.loads(sub.on(f"{BASE}/state")[-1].payload)
        prediction = json.loads(sub.wait_for(lambda m: m.topic == f"{BASE}/prediction", 20).payload)
        tagged = f"{BASE}/ha/{discovery.tag(['1', '2'])}/prediction"  # Home Assistant's copy: the same body
        payloads = {f"{BASE}/state": state, f"{BASE}/prediction": prediction, tagged: prediction}
        checked = 0
        for topic, message in {m.topic: m for m in sub.messages if m.topic.endswith("/config")}.items():
            entity = json.loads(message.payload)
            source = payloads.get(entity.get("state_topic") or entity.get("json_attributes_topic", ""))
            if source is not None:
                assert template_keys(entity) <= set(source), (topic, template_keys(entity) - set(source))
                checked += 1
        assert checked == 10, (
            "prediction, 2 classes, examples, camera, error, fps, inference, threshold, auto"
        )
    finally:
        run.stop()
    selected = f"{BASE}/ha/{discovery.tag(['1', '2'])}/class"
    sub.publish(selected, "", retain=True)  # forget the retained choice: the next run must say it

    mark = len(sub.messages)
    run = Running(build(daemon_config(tmp_path, broker.port), opener=scene.opener))
    try:
        sub.wait_for(
            lambda m: m.topic == selected and m.text == "2" and sub.messages.index(m) >= mark,
            30,
            "the training class kept across the restart",
        )
        state_says(sub, "threshold", applied, mark)
    finally:
        run.stop()
