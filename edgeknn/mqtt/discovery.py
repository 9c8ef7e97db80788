"""Home Assistant MQTT discovery as plain payload functions (the way mqtt-io's home_assistant.py does it).

They take the device's id, base topic and classes and return dicts; the link publishes them, retained.
Home Assistant gets a prediction sensor, three diagnostics, and, when commands are on, a "training class"
select whose buttons act on the selected class.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgeknn.config import MqttConfig

SELECT_STATE = "ha/class"  # under the base topic: the selected training class (retained)
SELECT_SET = "ha/class/set"  # Home Assistant selects a class here
PRESS = "ha/press"  # Home Assistant's buttons publish their command name here
BUTTONS = {"add_example": "Add example", "forget_class": "Forget class", "reset": "Reset"}


def node_id(device_id: str) -> str:
    """The device's discovery node id: ``edgeknn_`` and the device id, safe for Home Assistant."""
    return "edgeknn_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def discovery_configs(
    config: MqttConfig, *, base_topic: str, device_id: str, classes: list[str], version: str
) -> dict[str, dict[str, Any]]:
    """Home Assistant discovery configs by topic: prediction, training controls, diagnostics."""
    node = node_id(device_id)

    def topic(name: str) -> str:
        return f"{base_topic}/{name}"

    device = {
        "identifiers": [node],
        "name": f"edgeknn {device_id}",
        "model": "edgeknn teachable classifier",
        "manufacturer": "edgeknn",
        "sw_version": version,
    }
    common = {"device": device, "availability": [{"topic": topic("availability")}]}
    entities: dict[tuple[str, str], dict[str, Any]] = {
        ("sensor", "prediction"): {
            "name": "Prediction",
            "state_topic": topic("prediction"),
            "value_template": "{{ value_json.label }}",
            "json_attributes_topic": topic("prediction"),
            "icon": "mdi:eye",
        },
        ("sensor", "fps"): {
            "name": "Frame rate",
            "value_template": "{{ value_json.fps }}",
            "unit_of_measurement": "fps",
        },
        ("sensor", "inference_ms"): {
            "name": "Inference time",
            "value_template": "{{ value_json.inference_ms }}",
            "unit_of_measurement": "ms",
            "device_class": "duration",
        },
        ("sensor", "examples"): {
            "name": "Examples",
            "value_template": "{{ value_json.classes.values() | sum }}",
        },
    }
    if config.heartbeat_s > 0:
        entities[("sensor", "prediction")]["expire_after"] = int(config.heartbeat_s * 2) + 5
    for key in ("fps", "inference_ms", "examples"):
        entities[("sensor", key)].update(
            state_topic=topic("state"), entity_category="diagnostic", state_class="measurement"
        )
    if config.commands and classes:
        entities[("select", "training_class")] = {
            "name": "Training class",
            "command_topic": topic(SELECT_SET),
            "state_topic": topic(SELECT_STATE),
            "options": list(classes),
            "entity_category": "config",
        }
        for name, title in BUTTONS.items():
            if not config.allowed_commands or name in config.allowed_commands:
                entities[("button", name)] = {
                    "name": title,
                    "command_topic": topic(PRESS),
                    "payload_press": name,
                    "entity_category": "config",
                }
    return {
        f"{config.discovery_prefix}/{component}/{node}/{object_id}/config": {
            **entity,
            "unique_id": f"{node}_{object_id}",
            **common,
        }
        for (component, object_id), entity in entities.items()
    }


def press_payload(name: str, selected: str) -> bytes:
    """The command payload for a Home Assistant button press: reset confirms, the others name the class."""
    args = {"confirm": True} if name == "reset" else {"class": selected}
    return json.dumps(args).encode()
