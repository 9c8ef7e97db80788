"""The MQTT link: predictions, state and events out; commands in; Home Assistant discovery.

The daemon sees an Output and a command source. It never touches the store: a request is parsed by
``commands.parse_command``, a valid one goes on the daemon's queue (``submit``) and its result comes
back through ``Command.reply``. Bad commands are answered with an error result and change nothing.
The broker connection (reconnects, acknowledgements, ``online``/``offline``) is ``connection``'s;
what Home Assistant sees (discovery configs, the Training class select) is ``homeassistant``'s, its
payloads ``discovery``'s; snapshots go out, retained, on ``<base>/snapshot`` (``publish_image``, Home
Assistant's image entity).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeknn.commands import AddClass, Command, RemoveClass, RenameClass, Result, SelectClass
from edgeknn.config import MqttConfig
from edgeknn.mqtt import discovery
from edgeknn.mqtt.commands import CommandError, parse_command, reply_topic, result_body, show
from edgeknn.mqtt.connection import Connection
from edgeknn.mqtt.homeassistant import HomeAssistant, Page
from edgeknn.mqtt.prediction import Predictions
from edgeknn.outputs import Output, Reading
from edgeknn.throttle import Throttle

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"


def iso_ts(ts: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds: ``2026-11-22T10:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _after(classes: list[str], command: Command) -> list[str]:
    """The class names once ``command`` (a class change) has run."""
    if isinstance(command, AddClass):
        return [*classes, command.class_name] if command.class_name not in classes else classes
    if isinstance(command, RemoveClass):
        return [c for c in classes if c != command.class_name]
    if isinstance(command, RenameClass):
        return [command.new_name if c == command.class_name else c for c in classes]
    return classes


def _plain(v: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in a state dict."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


HA_COMMANDS = (  # Home Assistant's entities' command topics
    discovery.SELECT_SET,
    discovery.PRESS,
    discovery.AUTO_SET,
    discovery.NEW_CLASS,
    discovery.RENAME,
)


def subscriptions(config: MqttConfig, base: str) -> list[tuple[str, SubscribeOptions]]:
    """What the link listens to: commands and Home Assistant's entities (live messages only, not our
    own), and Home Assistant's status (it came back: publish discovery again)."""
    topics = []
    if config.commands:
        no_echo = SubscribeOptions(
            qos=1,
            noLocal=True,
            retainAsPublished=True,
            retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
        )
        commands = ("cmd/+", *HA_COMMANDS)
        topics += [(f"{base}/{t}", no_echo) for t in commands]
    if config.discovery:
        topics.append((f"{config.discovery_prefix}/status", SubscribeOptions(qos=1)))
    return topics


class MqttLink(Output):
    """The device's MQTT presence: an Output for the daemon plus a command source.

    ``submit`` receives valid commands (it may be called from paho's thread). Call ``start()`` once;
    ``close()`` publishes ``offline`` and disconnects. Raises MqttError if the settings cannot be used.
    ``wait_for_state``: say ``online`` only once ``state()`` gave a state (the daemon's links: the first
    state comes when its loop begins, and Home Assistant must not see the device online without one).
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        base_topic: str,
        device_id: str,
        classes: list[str],
        submit: Callable[[Command], None],
        version: str,
        wait_for_state: bool = False,
        page: Page | None = None,
    ):
        self._config = config
        self._base = base_topic.rstrip("/")
        self._classes = list(classes)
        self._changing: list[Command] = []  # class changes queued, not yet run (under _changing_lock)
        self._changing_lock = threading.Lock()
        self._submit = submit
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # seq order == publish order
        self._last_state: dict | None = None
        self._predictions = Predictions(config)  # which readings go out, and their body
        self._refusals = Throttle(log)  # a flood of bad requests logs one line per interval, not one each
        self._connection = Connection(
            config,
            client_id=config.client_id or f"edgeknn-{device_id}",
            availability=self._topic("availability"),
            subscriptions=subscriptions(config, self._base),
            connected=self._on_connected,
            announce=self._announce,
            message=self._on_message,
            wait_for_owner=wait_for_state,
        )
        self._home = HomeAssistant(
            config,
            self._connection,
            base_topic=self._base,
            device_id=device_id,
            classes=self._classes,
            version=version,
            page=page,
        )

    def _topic(self, name: str) -> str:
        return f"{self._base}/{name}"

    # -- public

    @property
    def connected(self) -> bool:
        return self._connection.connected

    @property
    def status(self) -> str:
        """The broker link's health for the state dict and the status LED: "ok" or "down"."""
        return "ok" if self.connected else "down"

    def start(self) -> None:
        """Connect in the background; returns at once, even with the broker down."""
        self._connection.start()

    def show(self, reading: Reading) -> None:
        """Publish the prediction when it changed, on the heartbeat, or every frame if so configured."""
        body = self._predictions.due(reading, ready=self._connection.ready)
        if body is None:
            return
        self._publish_json(self._topic("prediction"), body, ts=reading.ts)
        self._home.prediction(body)

    def event(self, event: dict) -> None:
        """Publish a one-off event (queued by paho while the broker is away, if QoS > 0)."""
        self._publish_json(self._topic("event"), dict(event))
        self._home.event(event)

    def state(self, state: dict) -> None:
        """Publish the retained state; it is re-published on every connect, so only the latest counts.

        It carries ``dropped_messages``: what paho's full outgoing queue refused (replies in a flood)."""
        self._last_state = {**state, "dropped_messages": self._connection.dropped}
        changed = self._update_classes(state.get("classes"))
        self._home.follow(state.get("training_class"), self._classes)
        if not self._connection.ready:  # announce publishes the newest state once it is
            self._connection.owner_ready()  # the first state: a connect that waited for it announces now
            return
        if changed and self._config.discovery:
            self._discovered()
        self._publish_json(self._topic("state"), dict(self._last_state), retain=True)
        self._home.publish_selected()

    def publish_image(self, jpeg: bytes) -> str | None:
        """Publish a snapshot's JPEG (retained: Home Assistant's image entity shows the newest); the topic,
        or None when the broker is away (an image is live data: not held for a reconnect)."""
        if not self._connection.ready:
            return None
        topic = self._topic(discovery.SNAPSHOT)
        self._connection.publish(topic, jpeg, retain=True)
        return topic

    def close(self) -> None:
        """Publish ``offline``, wait (bounded) for it to be sent, then disconnect. Idempotent."""
        self._connection.close()

    # -- publishing

    def _publish_json(
        self,
        topic: str,
        body: dict,
        *,
        ts: float | None = None,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Every JSON payload carries ``seq`` (one counter across topics) and ``ts``."""
        with self._lock:
            body.update(seq=next(self._seq), ts=iso_ts(time.time() if ts is None else ts))
            payload = json.dumps(body, default=_plain)
            self._connection.publish(topic, payload, retain=retain, properties=properties)

    def _publish_result(
        self, name: str, result: Result, response_topic: str | None, correlation: Any
    ) -> None:
        body = result_body(name, result)
        self._publish_json(self._topic("cmd/result"), dict(body))
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            self._publish_json(response_topic, body, properties=props)

    def _on_connected(self) -> None:
        self._predictions.force = True

    def _discovered(self, force: bool = False) -> None:
        """Discovery for the classes now; after a change, the prediction goes out again, after the
        configs (the next frame's, whatever it is)."""
        if self._home.publish_discovery(self._classes, force=force) or force:
            self._predictions.force = True

    def _announce(self) -> None:
        """Our part of what a connect publishes: discovery and the retained state (``online`` follows)."""
        if self._config.discovery:
            self._discovered(force=True)
        if self._last_state is not None:
            if "broker" in self._last_state:  # kept while we were away: it said "down"
                self._last_state["broker"] = "ok"
            self._last_state["dropped_messages"] = self._connection.dropped
            self._publish_json(self._topic("state"), dict(self._last_state), retain=True)
        self._home.publish_selected(force=True)

    # -- the classes, and what Home Assistant sends (its entities are ``self._home``'s)

    def _update_classes(self, classes: Any) -> bool:
        """Take the class list from a state dict (``{"cup": 12, ...}`` or a list); True if it changed."""
        if not isinstance(classes, dict | list | tuple) or not all(isinstance(k, str) for k in classes):
            return False
        names = list(classes)
        if names == self._classes:
            return False
        self._classes = names
        self._home.classes_changed(names)
        return True

    def _select(self, choice: str) -> None:
        """Home Assistant chose a training class: use it at once, and have the daemon keep it."""
        if not self._home.choose(choice, self._classes):
            return

        def kept(result: Result) -> None:
            if not result.ok:
                log.warning("mqtt: training class %s: %s", show(choice), result.error)

        try:
            self._submit(SelectClass(class_name=choice, source="mqtt", reply=kept))
        except Exception:
            log.exception("mqtt: cannot queue the training class %s", show(choice))

    def _threshold_auto(self, payload: bytes | bytearray, properties: Any) -> None:
        """The Automatic threshold switch: ON calibrates from the store; OFF keeps the one applied now."""
        if payload.strip() == b"ON":
            value: Any = "auto"
        elif payload.strip() != b"OFF":  # anything else changes nothing (it used to mean OFF)
            shown = show(bytes(payload[:40]).decode("utf-8", "replace"))
            self._answer("set_threshold", properties)(
                Result(False, f"value: expected ON or OFF, got {shown}")
            )
            return
        else:
            state = self._last_state or {}
            value = state.get("effective_threshold", state.get("threshold"))
            if not isinstance(value, int | float):  # null would mean "automatic": the opposite of OFF
                self._answer("set_threshold", properties)(
                    Result(False, "value: no threshold applied yet to keep; set a number instead")
                )
                return
        self._command("set_threshold", json.dumps({"value": value}).encode(), properties)

    # -- messages in (paho's thread)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            return  # act only on live messages, never on retained ones
        topic, cmd_prefix = msg.topic, self._topic("cmd/")
        if topic == f"{self._config.discovery_prefix}/status":
            if msg.payload.strip() == b"online":
                self._discovered(force=True)
        elif topic.startswith(cmd_prefix):
            name = topic[len(cmd_prefix) :]
            if name != "result":  # our own output
                self._command(name, msg.payload, msg.properties)
        elif topic == self._topic(discovery.SELECT_SET):
            self._select(msg.payload.decode("utf-8", "replace"))
        elif topic == self._topic(discovery.AUTO_SET):
            self._threshold_auto(msg.payload, msg.properties)
        elif topic == self._topic(discovery.PRESS):
            name = msg.payload.decode("utf-8", "replace")
            self._command(name, discovery.press_payload(name, self._home.selected), msg.properties)
        elif request := self._home.text_command(topic[len(self._base) + 1 :], msg.payload):
            self._command(*request, msg.properties)

    def _answer(self, name: str, properties: Any) -> Callable[[Result], None]:
        """How to reply to a request: on ``cmd/result`` and to its MQTT 5 response topic if any."""
        response = reply_topic(properties, self._base)
        correlation = getattr(properties, "CorrelationData", None)

        def reply(result: Result) -> None:
            try:
                if not self._connection.closed:
                    self._publish_result(name, result, response, correlation)
            except Exception:
                log.exception("mqtt: cannot publish the result of %s", name)

        return reply

    def _command(self, name: str, payload: bytes | bytearray, properties: Any) -> None:
        """Parse one request; submit it, or answer with an error result."""
        answer = self._answer(name, properties)
        queued: list[Command] = []  # the class change this request became, once parsed

        def reply(result: Result) -> None:
            """A class change that ran counts at once: the state that says so may come a frame later."""
            with self._changing_lock:
                if queued and any(c is queued[0] for c in self._changing):
                    self._changing = [c for c in self._changing if c is not queued[0]]
                    if result.ok:
                        self._classes = _after(self._classes, queued[0])
            answer(result)

        with self._changing_lock:  # a command right after add_class/rename_class may name the new class
            known = self._classes
            for change in self._changing:
                known = _after(known, change)
        try:
            command = parse_command(name, payload, classes=known, config=self._config, reply=reply)
        except CommandError as e:
            self._refusals.log(logging.INFO, "mqtt: refused command %s: %s", show(name), e)
            reply(Result(ok=False, error=str(e)))
            return
        if isinstance(command, AddClass | RemoveClass | RenameClass):
            queued.append(command)
            with self._changing_lock:
                self._changing.append(command)
        try:
            self._submit(command)
        except Exception as e:
            log.exception("mqtt: cannot queue command %s", name)
            reply(Result(ok=False, error=f"command: cannot be queued ({e})"))
