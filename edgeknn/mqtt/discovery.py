"""Home Assistant MQTT discovery as plain payload functions (the way mqtt-io's home_assistant.py does it).

Each function returns one entity's config dict; ``discovery_configs`` puts them under their topics
with the shared ``device``, ``origin`` and ``availability`` blocks, and ``homeassistant`` publishes
them, retained. What a user sees on the device page:

- primary: Prediction (an ``enum`` sensor: the classes and ``store.UNKNOWN``), Examples (per-class
  counts as attributes), Training class (select), Add example, Snapshot (button) and the Snapshot image;
- config: Threshold (number) and Automatic threshold (switch), Forget class, and Reset (disabled
  until a person enables it: one press forgets every example);
- diagnostic: Broker (connectivity, from the availability topic), Camera (problem), Error, Frame rate,
  Inference time.

Home Assistant marks every entity of the device unavailable when the device's last will says
``offline`` and, by itself, when its own broker connection is down; the Broker entity alone has no
availability, so it reads "Disconnected" instead of "unavailable" when the device dropped off the broker.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgeknn.config import MqttConfig
from edgeknn.store.names import UNKNOWN

SUPPORT_URL = "https://github.com/edgeknn/edgeknn"
SELECT_STATE = "ha/class"  # under the base topic: the selected training class (retained)
SELECT_SET = "ha/class/set"  # Home Assistant selects a class here
PRESS = "ha/press"  # Home Assistant's buttons publish their command name here
AUTO_SET = "ha/threshold_auto/set"  # the Automatic threshold switch: ON / OFF
SNAPSHOT = "snapshot"  # the newest snapshot's JPEG (retained): the image entity's image_topic
PRESS_CLASS = ("add_example", "forget_class")  # presses that act on the selected class


def node_id(device_id: str) -> str:
    """The device's discovery node id: ``edgeknn_`` and the device id, safe for Home Assistant."""
    return "edgeknn_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


# -- one function per entity: (component, object_id, config) -------------------------------------

Entity = tuple[str, str, dict[str, Any]]


def prediction(base: str, classes: list[str], heartbeat_s: float) -> Entity:
    """The stable label as an enum sensor; attributes are confidence and similarity to 0.01, not the
    per-message ``seq``/``ts``/``frame`` (each would make every heartbeat a new state in the recorder)."""
    config: dict[str, Any] = {
        "name": "Prediction",
        "state_topic": f"{base}/prediction",
        "value_template": "{{ value_json.label }}",
        "device_class": "enum",
        "options": [*dict.fromkeys([*classes, UNKNOWN])],
        "json_attributes_topic": f"{base}/prediction",
        "json_attributes_template": (
            "{{ {'confidence': value_json.confidence | round(2),"
            " 'similarity': value_json.similarity | round(2)} | tojson }}"
        ),
        "icon": "mdi:eye",
    }
    if heartbeat_s > 0:  # no prediction for two heartbeats: the device is not classifying
        config["expire_after"] = int(heartbeat_s * 2) + 5
    return "sensor", "prediction", config


def examples(base: str) -> Entity:
    """The number of examples; the per-class counts are its attributes."""
    return (
        "sensor",
        "examples",
        {
            "name": "Examples",
            "state_topic": f"{base}/state",
            "value_template": "{{ value_json.classes.values() | sum }}",
            "json_attributes_topic": f"{base}/state",
            "json_attributes_template": "{{ value_json.classes | tojson }}",
            "state_class": "measurement",
            "icon": "mdi:image-multiple",
        },
    )


def training_class(base: str, classes: list[str]) -> Entity:
    return (
        "select",
        "training_class",
        {
            "name": "Training class",
            "command_topic": f"{base}/{SELECT_SET}",
            "state_topic": f"{base}/{SELECT_STATE}",
            "options": list(classes),
            "icon": "mdi:school",
        },
    )


BUTTONS: dict[str, dict[str, Any]] = {  # command name -> what is particular to its button
    "add_example": {"name": "Add example", "icon": "mdi:plus-box"},
    "snapshot": {"name": "Take snapshot", "icon": "mdi:camera"},
    "forget_class": {"name": "Forget class", "icon": "mdi:eraser", "entity_category": "config"},
    "reset": {
        "name": "Reset",
        "icon": "mdi:delete-forever",
        "entity_category": "config",
        "enabled_by_default": False,  # one press forgets every example: a person enables it first
    },
}


def button(base: str, name: str) -> Entity:
    return "button", name, {**BUTTONS[name], "command_topic": f"{base}/{PRESS}", "payload_press": name}


def snapshot_image(base: str) -> Entity:
    return (
        "image",
        "snapshot_image",
        {
            "name": "Snapshot",
            "image_topic": f"{base}/{SNAPSHOT}",
            "content_type": "image/jpeg",
            "icon": "mdi:camera-image",
        },
    )


THRESHOLD_TEMPLATE = "{{ value_json.effective_threshold }}"  # applied now: the calibrated one while automatic


def threshold(base: str) -> Entity:
    """The threshold: shows the one applied now; setting it fixes it (the switch below goes off)."""
    return (
        "number",
        "threshold",
        {
            "name": "Threshold",
            "command_topic": f"{base}/cmd/set_threshold",
            "command_template": '{"value": {{ value }}}',
            "state_topic": f"{base}/state",
            "value_template": THRESHOLD_TEMPLATE,
            "min": -1.0,
            "max": 1.0,
            "step": 0.01,
            "mode": "box",
            "entity_category": "config",
            "icon": "mdi:tune-vertical",
        },
    )


def threshold_auto(base: str) -> Entity:
    """ON: the threshold is calibrated from the store; OFF: it stays at the value applied now."""
    return (
        "switch",
        "threshold_auto",
        {
            "name": "Automatic threshold",
            "command_topic": f"{base}/{AUTO_SET}",
            "state_topic": f"{base}/state",
            "value_template": "{{ 'ON' if value_json.threshold is none else 'OFF' }}",
            "entity_category": "config",
            "icon": "mdi:auto-fix",
        },
    )


def broker(base: str) -> Entity:
    """Connected to the broker: the availability topic itself (the last will makes it "off")."""
    return (
        "binary_sensor",
        "broker",
        {
            "name": "Broker",
            "state_topic": f"{base}/availability",
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "icon": "mdi:lan-connect",
        },
    )


def camera(base: str) -> Entity:
    """A camera problem (down or stalled); its attribute ``error`` says why."""
    return (
        "binary_sensor",
        "camera",
        {
            "name": "Camera",
            "state_topic": f"{base}/state",
            "value_template": "{{ 'ON' if value_json.camera == 'down' else 'OFF' }}",
            "json_attributes_topic": f"{base}/state",
            "json_attributes_template": "{{ {'error': value_json.camera_error} | tojson }}",
            "device_class": "problem",
            "entity_category": "diagnostic",
            "icon": "mdi:camera-off",
        },
    )


def error(base: str) -> Entity:
    """The device's error text (a save that failed, else the camera's), ``ok`` when there is none."""
    return (
        "sensor",
        "error",
        {
            "name": "Error",
            "state_topic": f"{base}/state",
            "value_template": "{{ (value_json.error or value_json.camera_error or 'ok')[:255] }}",
            "entity_category": "diagnostic",
            "icon": "mdi:alert-circle-outline",
        },
    )


def fps(base: str) -> Entity:
    return (
        "sensor",
        "fps",
        {
            "name": "Frame rate",
            "state_topic": f"{base}/state",
            "value_template": "{{ value_json.fps }}",
            "unit_of_measurement": "fps",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "icon": "mdi:speedometer",
        },
    )


def inference_ms(base: str) -> Entity:
    return (
        "sensor",
        "inference_ms",
        {
            "name": "Inference time",
            "state_topic": f"{base}/state",
            "value_template": "{{ value_json.inference_ms }}",
            "unit_of_measurement": "ms",
            "device_class": "duration",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "icon": "mdi:timer-outline",
        },
    )


# -- all of them -------------------------------------------------------------------------------------


def discovery_configs(
    config: MqttConfig, *, base_topic: str, device_id: str, classes: list[str], version: str
) -> dict[str, dict[str, Any]]:
    """Home Assistant discovery configs by topic, for this config and these classes."""
    node, base = node_id(device_id), base_topic

    def allowed(command: str) -> bool:
        return config.commands and (not config.allowed_commands or command in config.allowed_commands)

    entities = [
        prediction(base, classes, config.heartbeat_s),
        examples(base),
        broker(base),
        camera(base),
        error(base),
        fps(base),
        inference_ms(base),
    ]
    if classes and (allowed("add_example") or allowed("forget_class")):
        entities.append(training_class(base, classes))
    entities += [
        button(base, name) for name in BUTTONS if allowed(name) and (classes or name not in PRESS_CLASS)
    ]
    if allowed("snapshot") or config.snapshot_interval_s > 0:
        entities.append(snapshot_image(base))
    if allowed("set_threshold"):
        entities += [threshold(base), threshold_auto(base)]
    shared = {
        "device": {
            "identifiers": [node],
            "name": f"edgeknn {device_id}",
            "model": "edgeknn teachable classifier",
            "manufacturer": "edgeknn",
            "sw_version": version,
        },
        "origin": {"name": "edgeknn", "sw_version": version, "support_url": SUPPORT_URL},
    }
    availability = [{"topic": f"{base}/availability"}]
    configs = {}
    for component, object_id, entity in entities:
        entity = {**entity, "unique_id": f"{node}_{object_id}", **shared}
        if component != "binary_sensor" or object_id != "broker":  # it shows the availability itself
            entity["availability"] = availability
        configs[f"{config.discovery_prefix}/{component}/{node}/{object_id}/config"] = entity
    return configs


def press_payload(name: str, selected: str) -> bytes:
    """The command payload for a Home Assistant button press: reset confirms, add_example and
    forget_class name the selected class, the others take nothing."""
    if name == "reset":
        return b'{"confirm": true}'
    return json.dumps({"class": selected} if name in PRESS_CLASS else {}).encode()
