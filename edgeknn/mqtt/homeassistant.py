"""Home Assistant's side of the link: which entities exist, their configs, the Training class select.

``discovery`` says what each entity's config is; this publishes them (retained) on every connect, when
the classes change and when Home Assistant comes back, and removes an entity gone since. It also keeps
the select's state: the class the Add example / Forget class buttons act on, as the daemon's state says
(``training_class``) or as Home Assistant chose. Apart from ``link.MqttLink`` so that the link reads as
the daemon's output and command source, and this as what Home Assistant sees of the device.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from edgeknn.config import MqttConfig
from edgeknn.mqtt import discovery
from edgeknn.mqtt.commands import show
from edgeknn.mqtt.connection import Connection

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"


class HomeAssistant:
    """The device's entities and its selected training class, published over ``connection``."""

    def __init__(
        self,
        config: MqttConfig,
        connection: Connection,
        *,
        base_topic: str,
        device_id: str,
        classes: list[str],
        version: str,
    ):
        self._config = config
        self._connection = connection
        self._base = base_topic
        self._device_id = device_id
        self._version = version
        self.selected = classes[0] if classes else ""  # the state's training_class wins
        self._selected_sent = ""  # what <base>/ha/class says now
        self._discovered: set[str] = set()  # the discovery topics published in this run
        self._stated = False  # a state came: it says which class is selected

    def follow(self, training: Any, classes: list[str]) -> None:
        """A state came; its ``training_class`` is the daemon's: kept across restarts, follows a rename."""
        self._stated = True
        if isinstance(training, str) and (training in classes or not training):
            self.selected = training

    def classes_changed(self, classes: list[str]) -> None:
        """The classes changed: the selected one stays if it is still there, else the first one."""
        if self.selected not in classes:
            self.selected = classes[0] if classes else ""

    def publish_discovery(self, classes: list[str]) -> None:
        """Every entity's config (retained); an entity gone since (the select, once no class is left)
        gets the empty config that removes it from Home Assistant."""
        configs = discovery.discovery_configs(
            self._config,
            base_topic=self._base,
            device_id=self._device_id,
            classes=classes,
            version=self._version,
        )
        for topic in self._discovered - set(configs):
            self._connection.publish(topic, "", retain=True, qos=1)
        self._discovered = set(configs)
        for topic, config in configs.items():
            self._connection.publish(topic, json.dumps(config), retain=True, qos=1)

    def publish_selected(self, force: bool = False) -> None:
        """The Home Assistant select's state: the class its buttons act on (retained), once a state said
        which it is, and again only when it changed (or ``force``: on connect)."""
        if not (
            self._connection.connected and self._config.discovery and self._config.commands and self.selected
        ):
            return
        if self._stated and (force or self.selected != self._selected_sent):
            self._selected_sent = self.selected
            self._connection.publish(f"{self._base}/{discovery.SELECT_STATE}", self.selected, retain=True)

    def choose(self, choice: str, classes: list[str]) -> bool:
        """Home Assistant chose a training class: True if it is one (then it is selected at once)."""
        if choice not in classes:
            log.info("mqtt: ignored unknown training class %s from Home Assistant", show(choice))
            self.publish_selected(force=True)
            return False
        self.selected = choice
        self.publish_selected()
        return True
