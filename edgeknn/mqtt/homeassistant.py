"""Home Assistant's side of the link: which entities exist, their configs, and the state they read.

``discovery`` says what each entity's config is; this publishes them (retained) on every connect, when
the classes change and when Home Assistant comes back, and removes an entity gone since. It keeps the
select's state (the class the Add example / Forget class buttons act on, as the daemon's state says
(``training_class``) or as Home Assistant chose) and Home Assistant's retained copy of the prediction.

The order is what keeps Home Assistant from showing ``unknown`` or ``unavailable`` while the classes
change. Home Assistant applies a discovery update in a task it starts after the config message, so a
state sent right after the config may be checked against the old options (and refused: "Invalid
option"), and re-sending it later is a race. Instead, the entities whose config names the classes read
topics under ``ha/<tag>/`` (``discovery.tag``: a digest of the class list). On a new class list their
retained states go to the new topics first, then the configs: Home Assistant subscribes to a new topic
only once it has applied the config that names it, so the retained state it gets then is checked
against the new options. The tag before the previous one is cleared (an empty retained message) once
nothing reads it. The prediction on ``<base>/prediction`` is re-sent after the configs as well.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgeknn.config import MqttConfig
from edgeknn.mqtt import discovery
from edgeknn.mqtt.client import local_address
from edgeknn.mqtt.commands import show
from edgeknn.mqtt.connection import Connection
from edgeknn.store.names import UNKNOWN

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"

SETTLE_S = 10.0  # after this long, a label kept valid across a rename (``extra``) is dropped
KEEP_TAGS = 2  # the tags whose retained topics stay: the one in use and the one before


@dataclass(frozen=True)
class Page:
    """Where the web page listens: its URL is the device page's ``configuration_url``. ``host`` empty:
    the address this device reaches the broker from (the one Home Assistant's network sees)."""

    scheme: str
    port: int
    host: str = ""

    def url(self, local_address: str | None) -> str:
        host = self.host or local_address or ""
        if not host:
            return ""
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}/"


def renamed(before: list[str], after: list[str]) -> dict[str, str]:
    """The renames between two class lists: a rename keeps the class's slot, an add appends, a removal
    shifts the later ones down; so a list of the same length that differs in one slot is a rename."""
    if len(before) != len(after):
        return {}
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    return dict(changed) if len(changed) == 1 else {}


class HomeAssistant:
    """The device's entities, its selected training class and Home Assistant's copy of the prediction,
    published over ``connection``."""

    def __init__(
        self,
        config: MqttConfig,
        connection: Connection,
        *,
        base_topic: str,
        device_id: str,
        classes: list[str],
        version: str,
        page: Page | None = None,
    ):
        self._config = config
        self._connection = connection
        self._base = base_topic
        self._device_id = device_id
        self._version = version
        self._page = page
        self.selected = classes[0] if classes else ""  # the state's training_class wins
        self._selected_sent = ""  # what the select's state topic says now
        self._discovered: set[str] = set()  # the discovery topics published in this run
        self._stated = False  # a state came: it says which class is selected
        self._classes = list(classes)  # as the configs published last say
        self._tags: list[str] = []  # the tags published in this run, oldest first
        self._prediction: dict | None = None  # the newest prediction body (without seq/ts)
        self._shown = ""  # the label Home Assistant was last given
        # A label and a selected class kept among the options while Home Assistant may still show them
        # (a rename, a removal): it applies new options before it reads the new topic's state.
        self._extra: dict[str, tuple[str, ...]] = {}
        self._extra_since = 0.0
        # The loop's thread (state, predictions) and paho's (a connect, Home Assistant's status) both
        # publish: one sequence of retained states and configs at a time, never two interleaved.
        self._lock = threading.RLock()

    @property
    def tag(self) -> str:
        return discovery.tag(self._classes)

    def _topic(self, template: str, tag: str | None = None) -> str:
        return f"{self._base}/{template.format(tag=self.tag if tag is None else tag)}"

    def follow(self, training: Any, classes: list[str]) -> None:
        """A state came; its ``training_class`` is the daemon's: kept across restarts, follows a rename."""
        self._stated = True
        if isinstance(training, str) and (training in classes or not training):
            self.selected = training

    def classes_changed(self, classes: list[str]) -> None:
        """The classes changed: the selected one stays if it is still there, else the first one."""
        if self.selected not in classes:
            self.selected = classes[0] if classes else ""

    def publish_discovery(self, classes: list[str], force: bool = False) -> bool:
        """Every entity's config (retained), after the retained states its topics need; an entity gone
        since (the select once no class is left, a removed class's sensor) gets the empty config that
        removes it from Home Assistant. ``force``: a connect, or Home Assistant came back. True if the
        class list changed (the caller re-sends the prediction after the configs)."""
        with self._lock:
            return self._publish_discovery(classes, force)

    def _publish_discovery(self, classes: list[str], force: bool) -> bool:
        before, changed = self._classes, classes != self._classes
        self._classes = list(classes)
        if changed or force or not self._tags:
            self._before_configs(before)
        configs = discovery.discovery_configs(
            self._config,
            base_topic=self._base,
            device_id=self._device_id,
            classes=self._classes,
            version=self._version,
            extra=self._extra,
            page_url=self._page.url(local_address(self._connection.client)) if self._page else "",
        )
        for topic in self._discovered - set(configs):
            self._connection.publish(topic, "", retain=True, qos=1)
        self._discovered = set(configs)
        for topic, config in configs.items():
            self._connection.publish(topic, json.dumps(config), retain=True, qos=1)
        self._clear_old_tags()
        return changed

    def _before_configs(self, before: list[str]) -> None:
        """The new tag's retained states: the selected class, and the newest prediction with its label
        as it reads now (renamed with its class, ``UNKNOWN`` once its class is gone)."""
        if self.tag in self._tags:
            self._tags.remove(self.tag)
        self._tags.append(self.tag)
        gone = {"labels": self._shown, "selected": self._selected_sent}
        gone = {k: v for k, v in gone.items() if v and v not in (*self._classes, UNKNOWN)}
        if gone:
            self._extra = {k: (v,) for k, v in gone.items()}
            self._extra_since = time.monotonic()
        self.publish_selected(force=True)
        if self._prediction is not None:
            label = self._prediction["label"]
            label = renamed(before, self._classes).get(label, label)
            self._prediction["label"] = label if label in self._classes else UNKNOWN
            self._publish_prediction()

    def _clear_old_tags(self) -> None:
        while len(self._tags) > KEEP_TAGS:
            old = self._tags.pop(0)
            for template in discovery.TAGGED:
                self._connection.publish(self._topic(template, old), "", retain=True, qos=1)

    def publish_selected(self, force: bool = False) -> None:
        """The select's state: the class its buttons act on (retained), once a state said which it is,
        and again only when it changed (or ``force``: a connect, a new tag)."""
        if not (
            self._connection.connected and self._config.discovery and self._config.commands and self.selected
        ):
            return
        with self._lock:
            if self._stated and (force or self.selected != self._selected_sent):
                self._selected_sent = self.selected
                topic = self._topic(discovery.SELECT_STATE)
                self._connection.publish(topic, self.selected, retain=True, qos=1)

    def choose(self, choice: str, classes: list[str]) -> bool:
        """Home Assistant chose a training class: True if it is one (then it is selected at once)."""
        if choice not in classes:
            log.info("mqtt: ignored unknown training class %s from Home Assistant", show(choice))
            self.publish_selected(force=True)
            return False
        self.selected = choice
        self.publish_selected()
        return True

    def text_command(self, topic: str, payload: bytes | bytearray) -> tuple[str, bytes] | None:
        """A text entity's input (``topic`` under the base) as the command it asks for: New class is
        ``add_class``, Rename training class is ``rename_class`` of the selected class; else None."""
        text = payload.decode("utf-8", "replace")
        if topic == discovery.NEW_CLASS:
            return "add_class", json.dumps({"class": text}).encode()
        if topic == discovery.RENAME:
            return "rename_class", json.dumps({"class": self.selected, "new_name": text}).encode()
        return None

    # -- what the entities read besides the state

    def prediction(self, body: dict) -> None:
        """A prediction went out on ``<base>/prediction``: Home Assistant's retained copy (a new entity,
        or one that subscribes anew, gets the current label at once), and the event when it changed."""
        if self._config.discovery:
            with self._lock:
                self._new_prediction(body)

    def _new_prediction(self, body: dict) -> None:
        fresh = {k: v for k, v in body.items() if k not in ("seq", "ts")}
        changed = self._prediction is not None and fresh["label"] != self._prediction["label"]
        self._prediction = fresh
        self._publish_prediction()
        if changed:
            self._event(
                "prediction_changed",
                {k: fresh[k] for k in ("label", "confidence", "similarity") if k in fresh},
            )
        if self._extra and time.monotonic() - self._extra_since >= SETTLE_S:
            self._extra = {}  # Home Assistant has long had the new ones: the old ones go
            self.publish_discovery(self._classes)

    def event(self, event: dict) -> None:
        """A daemon event: an added example goes to the event entity."""
        if self._config.discovery and event.get("event") == "example_added":
            detail = {k: v for k, v in event.items() if k in ("class", "count", "source")}
            self._event("example_added", detail)

    def _publish_prediction(self) -> None:
        if self._prediction is None or not self._connection.connected:
            return
        self._shown = self._prediction["label"]
        payload = json.dumps(self._prediction, default=str)
        self._connection.publish(self._topic(discovery.PREDICTION), payload, retain=True)

    def _event(self, event_type: str, detail: dict) -> None:
        payload = json.dumps({"event_type": event_type, **detail}, default=str)
        self._connection.publish(f"{self._base}/{discovery.EVENTS}", payload)
