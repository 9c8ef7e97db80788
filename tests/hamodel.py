"""What Home Assistant makes of an MQTT message stream: a model of its MQTT integration, as far as the
states of a select, an enum sensor and a binary sensor go, read from its source (2024.3 to 2025.4,
homeassistant/components/mqtt/: mixins.py, subscription.py, select.py, sensor.py, binary_sensor.py).

What the model keeps of it:

- A discovery update is applied in a task Home Assistant starts *after* the config message, so a
  state message that arrives after the config on a topic the entity already reads may still be
  checked against the old config: such a message must be valid under both (``_race``).
- An update subscribes anew only if the state topic changed (``subscription._should_resubscribe``);
  a new subscription gets the topic's retained message, after the new config is in place.
- The select refuses a state not in its options ("Invalid option", select.py) and shows ``unknown``
  when its current option is not among the new options (``SelectEntity.state``).
- An enum sensor with options (honoured from 2024.9) ignores a state not in them, and a stale state not
  in the new options fails the update's write; a sensor with ``expire_after`` is ``unavailable`` after
  every update until a message comes (``_setup_from_config`` sets ``_expired = True``).

``HomeAssistantModel.feed`` takes the recorded messages in order (published retained or not) and
keeps every state each entity took; ``glitches`` are the ``unknown``/``unavailable`` states (and the
refused ones) after an entity first showed a real state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UNKNOWN, UNAVAILABLE = "unknown", "unavailable"


@dataclass
class Entity:
    component: str
    config: dict
    value: str | None = None  # what its state topic last said (after its template)
    states: list[str] = field(default_factory=list)  # every state it showed, in order
    refused: list[str] = field(default_factory=list)  # states it refused or could not write
    previous: dict | None = None  # the config before an update that kept the topic: the next message
    # on that topic may reach Home Assistant before the update is applied


class HomeAssistantModel:
    def __init__(self, prefix: str = "homeassistant"):
        self.prefix = prefix
        self.entities: dict[str, Entity] = {}  # by discovery topic
        self.removed: dict[str, Entity] = {}
        self.retained: dict[str, bytes] = {}

    # -- the stream

    def feed(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        if topic.startswith(self.prefix + "/") and topic.endswith("/config"):
            self._config(topic, payload)
            return
        for entity in list(self.entities.values()):
            if entity.config.get("state_topic") == topic:
                raced, entity.previous = entity.previous, None
                self._state(entity, payload, raced=raced)

    def _config(self, topic: str, payload: bytes) -> None:
        component = topic.split("/")[1]
        if not payload:
            if topic in self.entities:
                self.removed[topic] = self.entities.pop(topic)
            return
        config = json.loads(payload)
        entity = self.entities.get(topic)
        if entity is None:  # new: subscribes, gets the retained state if any
            entity = self.entities[topic] = Entity(component, config)
            self._subscribe(entity)
            return
        old, entity.config = entity.config, config
        if config.get("state_topic") != old.get("state_topic"):
            entity.previous = None  # a new topic: read only once the update is applied
            self._write(entity, after_update=True)
            self._subscribe(entity)
        else:
            entity.previous = old
            self._write(entity, after_update=True)

    def _subscribe(self, entity: Entity) -> None:
        retained = self.retained.get(entity.config.get("state_topic", ""))
        if retained is not None:
            self._state(entity, retained, raced=None)
        elif not entity.states:
            entity.states.append(UNKNOWN)

    # -- one entity's state

    def _render(self, entity: Entity, payload: bytes) -> str:
        text = payload.decode()
        config = entity.config
        if entity.component == "binary_sensor" and "value_json.label ==" in config.get("value_template", ""):
            name = config["value_template"].split("value_json.label == '")[1].split("'")[0]
            return "ON" if json.loads(text).get("label") == name else "OFF"
        if config.get("value_template") == "{{ value_json.label }}":
            return str(json.loads(text).get("label"))
        return text

    def _valid(self, config: dict, value: str) -> bool:
        options = config.get("options")
        return options is None or value in options

    def _state(self, entity: Entity, payload: bytes, raced: dict | None) -> None:
        if entity.component not in ("select", "sensor", "binary_sensor"):
            return
        value = self._render(entity, payload)
        if raced is not None and not self._valid(raced, value):  # processed before the update: refused
            entity.refused.append(value)
            return
        if not self._valid(entity.config, value):
            entity.refused.append(value)
            return
        entity.value = value
        self._write(entity)

    def _write(self, entity: Entity, after_update: bool = False) -> None:
        config = entity.config
        if after_update and config.get("expire_after"):
            entity.states.append(UNAVAILABLE)  # _setup_from_config: _expired = True
            return
        if entity.value is None:
            if after_update and entity.states:
                entity.states.append(UNKNOWN)
            return
        if not self._valid(config, entity.value):
            if entity.component == "select":
                entity.states.append(UNKNOWN)  # current option not among the options
            else:
                entity.refused.append(entity.value)  # the enum's write fails; the old state stays
            return
        entity.states.append(entity.value)

    # -- the verdict

    def glitches(self) -> dict[str, list[str]]:
        """Per entity: ``unknown``/``unavailable`` states after its first real one, and refused states."""
        found = {}
        for topic, entity in {**self.removed, **self.entities}.items():
            states = entity.states
            first = next((i for i, s in enumerate(states) if s not in (UNKNOWN, UNAVAILABLE)), len(states))
            bad = [s for s in states[first:] if s in (UNKNOWN, UNAVAILABLE)]
            bad += [f"refused {value!r}" for value in entity.refused]
            if bad:
                found[topic] = bad
        return found

    def state_of(self, component: str, object_id: str) -> str | None:
        for topic, entity in self.entities.items():
            if topic.split("/")[1] == component and topic.split("/")[3] == object_id:
                return entity.states[-1] if entity.states else None
        return None


def record(messages: list[Any], prefix: str = "homeassistant") -> HomeAssistantModel:
    """Feed recorded messages (``topic``, ``payload``, ``retain``) to a fresh model."""
    model = HomeAssistantModel(prefix)
    for m in messages:
        model.feed(m.topic, m.payload, m.retain)
    return model
