"""Home Assistant MQTT discovery as plain payload functions (the way mqtt-io's home_assistant.py does it).

Each function returns one entity's config dict; ``discovery_configs`` puts them under their topics
with the shared ``device``, ``origin`` and ``availability`` blocks; ``homeassistant`` publishes them.
- primary: Prediction (``enum``: the classes and ``store.UNKNOWN``), a binary sensor per class (on
  while it is the stable prediction), Events, Examples, Training class (select), Take snapshot, Snapshot;
- config: Add example and Forget class (acting on the selected class; never from "press every
  button"), New class and Rename training class (text), Threshold, Automatic threshold, Reset (disabled
  until a person enables it);
- diagnostic: Broker (connectivity), Camera (problem): no icon of their own, Home Assistant's follows
  the state; Error, Frame rate, Inference time.
Every entity is unavailable when the device's last will says ``offline``; Broker alone has no
availability: it reads "Disconnected" then.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from edgeknn.config import MqttConfig
from edgeknn.store.names import CLASS_NAME_RE, UNKNOWN

SUPPORT_URL = "https://github.com/edgeknn/edgeknn"
# Entities whose config names the classes read under ha/<tag>/ (``tag``: the class list's digest; the
# homeassistant module says why): the selected training class, the prediction again (both retained)
SELECT_STATE = "ha/{tag}/class"
PREDICTION = "ha/{tag}/prediction"
TAGGED = (SELECT_STATE, PREDICTION)  # the retained topics of one class list
SELECT_SET = "ha/class/set"  # Home Assistant selects a class here
PRESS = "ha/press"  # Home Assistant's buttons publish their command name here
AUTO_SET = "ha/threshold_auto/set"  # the Automatic threshold switch: ON / OFF
NEW_CLASS = "ha/add_class"  # the New class text: a name to add
RENAME = "ha/rename_class"  # the Rename training class text: the selected class's new name
EVENTS = "ha/event"  # the event entity's topic: {"event_type": ..., ...}, not retained
EVENT_TYPES = ("prediction_changed", "example_added")
MAX_CLASS_SENSORS = 32  # one binary sensor per class up to this many (a classifier model has ~1000 labels)
NAME_PATTERN = f"^{CLASS_NAME_RE.pattern}$"  # Home Assistant's text uses re.match: anchored, it is the rule
SNAPSHOT = "snapshot"  # the newest snapshot's JPEG (retained): the image entity's image_topic
PRESS_CLASS = ("add_example", "forget_class")  # presses that act on the selected class


def tag(classes: list[str]) -> str:
    """The class list's digest: names the topics its entities read (a new list, new topics)."""
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]


def class_object_id(name: str) -> str:
    """A class's binary sensor's object id: the name where it is safe, else made safe plus a digest
    (two names that differ only in unsafe characters never share one)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"class_{safe}" if safe == name else f"class_{safe}_{digest}"


def node_id(device_id: str) -> str:
    """The device's discovery node id: ``edgeknn_`` and the device id, safe for Home Assistant."""
    return "edgeknn_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


# -- one function per entity: (component, object_id, config) -------------------------------------

Entity = tuple[str, str, dict[str, Any]]


def prediction(base: str, classes: list[str], tag_: str, extra: tuple[str, ...] = ()) -> Entity:
    """The stable label as an enum sensor; attributes are confidence and similarity to 0.01, not the
    per-message ``seq``/``ts``/``frame`` (each would make every heartbeat a new state in the recorder).

    No ``expire_after``: Home Assistant sets an expiring sensor unavailable on *every* discovery update
    (``_setup_from_config``), so each class change would show ``unavailable``. The device's own word
    stands in: the sensor is unavailable while the state says the camera is not ``ok`` (no frames, no
    predictions) and, like every entity, when the device is offline. ``extra``: a label Home
    Assistant may still hold from before a rename or removal, kept valid until it has the new one.
    """
    config: dict[str, Any] = {
        "name": "Prediction",
        "state_topic": f"{base}/{PREDICTION.format(tag=tag_)}",
        "value_template": "{{ value_json.label }}",
        "device_class": "enum",
        "options": [*dict.fromkeys([*classes, UNKNOWN, *extra])],
        "json_attributes_topic": f"{base}/{PREDICTION.format(tag=tag_)}",
        "json_attributes_template": (
            "{{ {'confidence': value_json.confidence | round(2),"
            " 'similarity': value_json.similarity | round(2)} | tojson }}"
        ),
        **classifying(base),
        "icon": "mdi:eye",
    }
    return "sensor", "prediction", config


def classifying(base: str) -> dict[str, Any]:
    """Available while the device is online and its state says the camera is ``ok``: what the
    prediction's entities need to mean anything (without ``expire_after``, see ``prediction``)."""
    return {
        "availability": [
            {"topic": f"{base}/availability"},
            {
                "topic": f"{base}/state",
                "value_template": "{{ 'online' if value_json.camera == 'ok' else 'offline' }}",
            },
        ],
        "availability_mode": "all",
    }


def class_present(base: str, name: str, tag_: str) -> Entity:
    """On while ``name`` is the stable prediction ("cat present"): an automation's plain trigger."""
    return (
        "binary_sensor",
        class_object_id(name),
        {
            "name": name,
            "state_topic": f"{base}/{PREDICTION.format(tag=tag_)}",
            "value_template": f"{{{{ 'ON' if value_json.label == '{name}' else 'OFF' }}}}",
            "device_class": "occupancy",
            **classifying(base),
        },
    )


def events(base: str) -> Entity:
    """The stable prediction changed, an example was added: for automations and the logbook."""
    return (
        "event",
        "events",
        {
            "name": "Events",
            "state_topic": f"{base}/{EVENTS}",
            "event_types": list(EVENT_TYPES),
            "icon": "mdi:bell-ring-outline",
        },
    )


def new_class(base: str) -> Entity:
    """Type a name: a new empty class (``add_class``); it shows the last name typed."""
    return (
        "text",
        "new_class",
        {
            "name": "New class",
            "command_topic": f"{base}/{NEW_CLASS}",
            "min": 1,
            "max": 32,
            "pattern": NAME_PATTERN,
            "entity_category": "config",
            "icon": "mdi:shape-plus",
        },
    )


def rename_class(base: str, tag_: str) -> Entity:
    """The training class's name: edit it to rename that class (``rename_class``)."""
    return (
        "text",
        "rename_class",
        {
            "name": "Rename training class",
            "command_topic": f"{base}/{RENAME}",
            "state_topic": f"{base}/{SELECT_STATE.format(tag=tag_)}",
            "min": 1,
            "max": 32,
            "pattern": NAME_PATTERN,
            "entity_category": "config",
            "icon": "mdi:rename",
        },
    )


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


def training_class(base: str, classes: list[str], tag_: str, extra: tuple[str, ...] = ()) -> Entity:
    """The class the buttons act on; ``extra``: the one Home Assistant may still show (a rename)."""
    return (
        "select",
        "training_class",
        {
            "name": "Training class",
            "command_topic": f"{base}/{SELECT_SET}",
            "state_topic": f"{base}/{SELECT_STATE.format(tag=tag_)}",
            "options": [*dict.fromkeys([*classes, *extra])],
            "icon": "mdi:school",
        },
    )


BUTTONS: dict[str, dict[str, Any]] = {  # command name -> what is particular to its button
    # config: off the default dashboard and out of "press every button"; teach from the page, or a card
    # with the Training class and this button (docs/homeassistant.md)
    "add_example": {"name": "Add example", "icon": "mdi:plus-box", "entity_category": "config"},
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


# applied now (the calibrated one while automatic), to the step's precision
THRESHOLD_TEMPLATE = "{{ value_json.effective_threshold | round(2) }}"
THRESHOLD_HELP = (
    "Similarity (-1..1) a frame needs to its nearest example to be named; below it the answer is "
    f"'{UNKNOWN}'. Higher: stricter (fewer wrong names, more '{UNKNOWN}'). Setting it turns Automatic "
    "threshold off."
)


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
            "json_attributes_topic": f"{base}/state",  # the explanation, as an attribute
            "json_attributes_template": json.dumps({"help": THRESHOLD_HELP}),
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
            "device_class": "connectivity",  # its icon follows the state: lan-connect / lan-disconnect
            "entity_category": "diagnostic",
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
            "device_class": "problem",  # its icon follows the state: check-circle / alert-circle
            "entity_category": "diagnostic",
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
    config: MqttConfig,
    *,
    base_topic: str,
    device_id: str,
    classes: list[str],
    version: str,
    extra: dict[str, tuple[str, ...]] | None = None,
    page_url: str = "",
) -> dict[str, dict[str, Any]]:
    """Home Assistant discovery configs by topic, for this config and these classes. ``extra``: the
    label the Prediction and the class the select may still show ("labels", "selected"; see
    ``prediction``); ``page_url``: the web page, the device page's "Visit" link
    (``configuration_url``), none when the page is off."""
    extra = extra or {}
    node, base, tag_ = node_id(device_id), base_topic, tag(classes)

    def allowed(command: str) -> bool:
        return config.commands and (not config.allowed_commands or command in config.allowed_commands)

    entities = [
        prediction(base, classes, tag_, extra.get("labels", ())),
        *(class_present(base, name, tag_) for name in classes if len(classes) <= MAX_CLASS_SENSORS),
        events(base),
        examples(base),
        broker(base),
        camera(base),
        error(base),
        fps(base),
        inference_ms(base),
    ]
    if classes and (allowed("add_example") or allowed("forget_class")):
        entities.append(training_class(base, classes, tag_, extra.get("selected", ())))
    entities += [
        button(base, name) for name in BUTTONS if allowed(name) and (classes or name not in PRESS_CLASS)
    ]
    if allowed("add_class"):
        entities.append(new_class(base))
    if classes and allowed("rename_class"):
        entities.append(rename_class(base, tag_))
    if allowed("snapshot") or config.snapshot_interval_s > 0:
        entities.append(snapshot_image(base))
    if allowed("set_threshold"):
        entities += [threshold(base), threshold_auto(base)]
    device: dict[str, Any] = {
        "identifiers": [node],
        "name": f"edgeknn {device_id}",
        "model": "edgeknn teachable classifier",
        "manufacturer": "edgeknn",
        "sw_version": version,
    }
    if page_url:
        device["configuration_url"] = page_url
    shared = {
        "device": device,
        "origin": {"name": "edgeknn", "sw_version": version, "support_url": SUPPORT_URL},
    }
    availability = [{"topic": f"{base}/availability"}]
    configs = {}
    for component, object_id, entity in entities:
        entity = {**entity, "unique_id": f"{node}_{object_id}", **shared}
        if component != "binary_sensor" or object_id != "broker":  # it shows the availability itself
            entity.setdefault("availability", availability)
        configs[f"{config.discovery_prefix}/{component}/{node}/{object_id}/config"] = entity
    return configs


def press_payload(name: str, selected: str) -> bytes:
    """The command payload for a Home Assistant button press: reset confirms, add_example and
    forget_class name the selected class, the others take nothing."""
    if name == "reset":
        return b'{"confirm": true}'
    return json.dumps({"class": selected} if name in PRESS_CLASS else {}).encode()
