"""The MQTT link: predictions, state and events out; commands in; Home Assistant discovery.

paho-mqtt's own thread does all network I/O, so nothing here blocks the main loop. The link boots
with the broker down and connects when it appears (paho retries with backoff). It never touches the
store: a valid command goes on the daemon's queue (``submit``) and its result comes back through
``Command.reply``. Bad commands are answered with an error result and change nothing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeknn.commands import (
    MAX_EXAMPLES_PER_COMMAND,
    AddExample,
    Command,
    ForgetClass,
    RenameClass,
    Reset,
    Result,
    Save,
    SetThreshold,
    Snapshot,
    class_name_error,
)
from edgeknn.config import MqttConfig
from edgeknn.outputs import Reading

log = logging.getLogger(__name__)

MAX_QUEUED = 1000  # outgoing QoS>0 messages paho keeps while the broker is away
CLOSE_TIMEOUT_S = 2.0  # how long close() waits for "offline" to reach the broker
BACKLOG_WAIT_S = 10.0  # after a reconnect, announce at the latest this long after, even if acks are missing
LOGIN_REFUSED = ("Bad user name or password", "Not authorized")
REQUIRED = object()


class MqttError(Exception):
    """The MQTT settings cannot be used (a password or certificate file cannot be read)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_EXAMPLES_PER_COMMAND
    return None if ok else f"expected an integer 1..{MAX_EXAMPLES_PER_COMMAND}"


def _threshold(v: Any) -> str | None:
    return None if _is_number(v) and -1.0 <= v <= 1.0 else "expected a number -1..1"


def _confirm(v: Any) -> str | None:
    return None if v is True else "expected true (reset forgets every example of every class)"


# name -> ({field: (check, default or REQUIRED)}, build(args, **common) -> Command)
COMMANDS: dict[str, tuple[dict[str, tuple[Callable[[Any], str | None], Any]], Callable[..., Command]]] = {
    "add_example": (
        {"class": (class_name_error, REQUIRED), "count": (_count, 1)},
        lambda a, **kw: AddExample(class_name=a["class"], count=a["count"], **kw),
    ),
    "forget_class": (
        {"class": (class_name_error, REQUIRED)},
        lambda a, **kw: ForgetClass(class_name=a["class"], **kw),
    ),
    "rename_class": (
        {"class": (class_name_error, REQUIRED), "new_name": (class_name_error, REQUIRED)},
        lambda a, **kw: RenameClass(class_name=a["class"], new_name=a["new_name"], **kw),
    ),
    "reset": ({"confirm": (_confirm, REQUIRED)}, lambda a, **kw: Reset(**kw)),
    "save": ({}, lambda a, **kw: Save(**kw)),
    "snapshot": ({}, lambda a, **kw: Snapshot(**kw)),
    "set_threshold": (
        {"value": (_threshold, REQUIRED)},
        lambda a, **kw: SetThreshold(value=float(a["value"]), **kw),
    ),
}
HA_BUTTONS = {"add_example": "Add example", "forget_class": "Forget class", "reset": "Reset"}


def iso_ts(ts: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds: ``2026-11-22T10:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(v: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in a state dict."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


def _json_kind(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), "a number"
    )


def _guarded(method: Callable) -> Callable:
    """For paho callbacks: an exception would end paho's network thread, so log it instead."""

    @functools.wraps(method)
    def wrapper(self: MqttLink, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            log.exception("mqtt: error in %s", method.__name__)

    return wrapper


class MqttLink:
    """The device's MQTT presence: an Output for the daemon plus a command source.

    ``submit`` receives valid commands (it may be called from paho's thread). Call ``start()`` once;
    ``close()`` publishes ``offline`` and disconnects.
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
    ):
        self._config = config
        self._base = base_topic.rstrip("/")
        self._device_id = device_id
        self._node = "edgeknn_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)
        self._classes = list(classes)
        self._selected = self._classes[0] if self._classes else ""
        self._submit = submit
        self._version = version
        self._where = f"{config.host}:{config.port}"
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # seq order == publish order
        self._last_state: dict | None = None
        self._last_prediction = 0.0
        self._force = True  # publish the next prediction whatever it is
        self._connected = False
        self._outage_logged = False
        self._queue_full_logged = False
        # After a reconnect, paho first re-sends what it still holds (queued in the outage, or not yet
        # acknowledged when the link fell); announcing before that would put state and "online" ahead
        # of older messages, out of seq order. So we track unacknowledged messages by mid.
        self._ack_lock = threading.Lock()
        self._unacked: set[int] = set()
        self._acked_early: deque[int] = deque(maxlen=64)  # acknowledged before _publish recorded them
        self._backlog: set[int] | None = None  # what must be acknowledged before we announce
        self._started = False
        self._closed = False
        self._client = self._make_client()

    # -- topics

    def _topic(self, name: str) -> str:
        return f"{self._base}/{name}"

    # -- public

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def status(self) -> str:
        """The broker link's health for the state dict and the status LED: "ok" or "down"."""
        return "ok" if self._connected else "down"

    def start(self) -> None:
        """Connect in the background; returns at once, even with the broker down."""
        if self._started or self._closed:
            return
        self._started = True
        self._client.connect_async(
            self._config.host, self._config.port, self._config.keepalive, clean_start=True
        )
        self._client.loop_start()

    def show(self, reading: Reading) -> None:
        """Publish the prediction when it changed, on the heartbeat, or every frame if so configured."""
        if not self._connected:
            # Live data is not queued during an outage, but a change of the stable label is (QoS 1,
            # bounded queue): a subscriber sees every state change, in order, once we are back.
            self._force = True
            if not reading.changed:
                return
        now = time.monotonic()
        heartbeat = self._config.heartbeat_s
        if not (
            self._config.publish == "every_frame"
            or reading.changed
            or self._force
            or (heartbeat > 0 and now - self._last_prediction >= heartbeat)
        ):
            return
        self._force = False
        self._last_prediction = now
        body = {
            "label": reading.label,
            "confidence": round(float(reading.confidence), 4),
            "scores": {str(k): round(float(v), 4) for k, v in reading.scores.items()},
            "similarity": round(float(reading.similarity), 4),
            "frame": int(reading.frame),
            "latency_ms": round(float(reading.latency_ms), 1),
        }
        self._publish_json(self._topic("prediction"), body, ts=reading.ts)

    def event(self, event: dict) -> None:
        """Publish a one-off event (queued by paho while the broker is away, if QoS > 0)."""
        self._publish_json(self._topic("event"), dict(event))

    def state(self, state: dict) -> None:
        """Publish the retained state; it is re-published on every connect, so only the latest counts."""
        self._last_state = dict(state)
        changed = self._update_classes(state.get("classes"))
        if not self._connected:
            return
        if changed and self._config.discovery:
            self._publish_discovery()
            self._publish_selected()
        self._publish_json(self._topic("state"), dict(self._last_state), retain=True)

    def close(self) -> None:
        """Publish ``offline``, wait (bounded) for it to be sent, then disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._started:
            return
        if self._connected:
            info = self._publish(self._topic("availability"), "offline", retain=True, qos=1)
            with contextlib.suppress(ValueError, RuntimeError):  # queue full or connection lost
                info.wait_for_publish(CLOSE_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False

    # -- setup

    def _make_client(self) -> mqtt.Client:
        c = self._config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=c.client_id or f"edgeknn-{self._device_id}",
            protocol=mqtt.MQTTv5,
        )
        client.will_set(self._topic("availability"), "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(MAX_QUEUED)
        if c.username:
            client.username_pw_set(c.username, self._password() or None)
        if c.tls:
            for key in ("ca_file", "cert_file", "key_file"):
                path = getattr(c, key)
                try:
                    if path:
                        open(path, "rb").close()
                except OSError as e:
                    raise MqttError(f"mqtt.{key}: cannot read {path} ({e.strerror})") from None
            try:
                client.tls_set(
                    ca_certs=c.ca_file or None, certfile=c.cert_file or None, keyfile=c.key_file or None
                )
            except (OSError, ValueError) as e:
                raise MqttError(f"mqtt.tls: cannot use the TLS files ({e})") from None
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _password(self) -> str:
        path = self._config.password_file
        if not path:
            return self._config.password
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise MqttError(f"mqtt.password_file: cannot read {path} ({reason})") from None

    # -- publishing

    def _publish(
        self, topic: str, payload: str, *, retain: bool = False, qos: int | None = None, properties=None
    ) -> mqtt.MQTTMessageInfo:
        qos = self._config.qos if qos is None else qos
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # paho keeps it
            with self._ack_lock:
                if info.mid in self._acked_early:
                    self._acked_early.remove(info.mid)
                else:
                    self._unacked.add(info.mid)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE and not self._queue_full_logged:
            self._queue_full_logged = True
            log.warning("mqtt: %d messages wait for the broker; dropping new ones", MAX_QUEUED)
        elif info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._queue_full_logged = False
        return info

    def _publish_json(
        self, topic: str, body: dict, *, ts: float | None = None, retain: bool = False, properties=None
    ) -> None:
        with self._lock:
            body.update(seq=next(self._seq), ts=iso_ts(time.time() if ts is None else ts))
            self._publish(topic, json.dumps(body, default=_plain), retain=retain, properties=properties)

    def _publish_result(
        self, name: str, result: Result, response_topic: str | None, correlation: Any
    ) -> None:
        body: dict[str, Any] = {"command": name, "ok": result.ok}
        if not result.ok:
            body["error"] = result.error
        body.update({k: v for k, v in result.detail.items() if k not in (*body, "error", "seq", "ts")})
        self._publish_json(self._topic("cmd/result"), dict(body))
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            self._publish_json(response_topic, body, properties=props)

    # -- Home Assistant discovery

    def _update_classes(self, classes: Any) -> bool:
        """Take the class list from a state dict (``{"cup": 12, ...}`` or a list); True if it changed."""
        if not isinstance(classes, dict | list | tuple) or not all(isinstance(k, str) for k in classes):
            return False
        names = list(classes)
        if names == self._classes:
            return False
        self._classes = names
        if self._selected not in names:
            self._selected = names[0] if names else ""
        return True

    def discovery(self) -> dict[str, dict]:
        """Home Assistant discovery configs by topic: prediction, training controls, diagnostics."""
        c, node = self._config, self._node
        device = {
            "identifiers": [node],
            "name": f"edgeknn {self._device_id}",
            "model": "edgeknn teachable classifier",
            "manufacturer": "edgeknn",
            "sw_version": self._version,
        }
        common = {"device": device, "availability": [{"topic": self._topic("availability")}]}
        state = self._topic("state")
        entities: dict[tuple[str, str], dict] = {
            ("sensor", "prediction"): {
                "name": "Prediction",
                "state_topic": self._topic("prediction"),
                "value_template": "{{ value_json.label }}",
                "json_attributes_topic": self._topic("prediction"),
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
        if c.heartbeat_s > 0:
            entities[("sensor", "prediction")]["expire_after"] = int(c.heartbeat_s * 2) + 5
        for key in ("fps", "inference_ms", "examples"):
            entities[("sensor", key)].update(
                state_topic=state, entity_category="diagnostic", state_class="measurement"
            )
        if c.commands and self._classes:
            entities[("select", "training_class")] = {
                "name": "Training class",
                "command_topic": self._topic("ha/class/set"),
                "state_topic": self._topic("ha/class"),
                "options": list(self._classes),
                "entity_category": "config",
            }
            for name, title in HA_BUTTONS.items():
                if not c.allowed_commands or name in c.allowed_commands:
                    entities[("button", name)] = {
                        "name": title,
                        "command_topic": self._topic("ha/press"),
                        "payload_press": name,
                        "entity_category": "config",
                    }
        return {
            f"{c.discovery_prefix}/{component}/{node}/{object_id}/config": {
                **entity,
                "unique_id": f"{node}_{object_id}",
                **common,
            }
            for (component, object_id), entity in entities.items()
        }

    def _publish_selected(self) -> None:
        """The Home Assistant select's state: the class its buttons act on (retained)."""
        if self._connected and self._config.discovery and self._config.commands and self._selected:
            self._publish(self._topic("ha/class"), self._selected, retain=True)

    def _publish_discovery(self) -> None:
        for topic, config in self.discovery().items():
            self._publish(topic, json.dumps(config), retain=True, qos=1)

    # -- paho callbacks (paho's thread)

    @_guarded
    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self._refused(str(reason))
            return
        log.info("mqtt: connected to %s", self._where)
        self._outage_logged = False
        self._connected = True
        self._force = True
        topics = []
        if self._config.commands:
            no_echo = SubscribeOptions(
                qos=1,
                noLocal=True,
                retainAsPublished=True,
                retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
            )
            topics += [(self._topic(t), no_echo) for t in ("cmd/+", "ha/class/set", "ha/press")]
        if self._config.discovery:
            topics.append((f"{self._config.discovery_prefix}/status", SubscribeOptions(qos=1)))
        if topics:
            client.subscribe(topics)
        with self._ack_lock:
            self._backlog = backlog = set(self._unacked) or None
        if backlog is None:
            self._announce()
            return
        # _on_publish announces once paho's re-sent backlog is acknowledged; never wait forever
        timer = threading.Timer(BACKLOG_WAIT_S, self._backlog_overdue, (backlog,))
        timer.daemon = True
        timer.start()

    @_guarded
    def _backlog_overdue(self, backlog: set[int]) -> None:
        with self._ack_lock:
            if self._backlog is not backlog:  # acknowledged, or the link fell meanwhile
                return
            self._backlog = None
            self._unacked -= backlog  # paho will not acknowledge them: do not wait for them again
        log.debug("mqtt: %d re-sent messages not acknowledged; announcing anyway", len(backlog))
        self._announce()

    @_guarded
    def _announce(self) -> None:
        """What a connect publishes: discovery, the retained state, then ``online``."""
        if not self._connected:
            return
        if self._config.discovery:
            self._publish_discovery()
        if self._last_state is not None:
            if "broker" in self._last_state:  # kept while we were away: it said "down"
                self._last_state["broker"] = "ok"
            self._publish_json(self._topic("state"), dict(self._last_state), retain=True)
        self._publish_selected()
        self._publish(self._topic("availability"), "online", retain=True, qos=1)

    @_guarded
    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack_lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._acked_early.append(mid)
            backlog = self._backlog
            if backlog is None or mid not in backlog:
                return
            backlog.discard(mid)
            if backlog:
                return
            self._backlog = None
        # paho holds its message lock while it calls us, and publishing takes ours: announce elsewhere
        threading.Thread(target=self._announce, name="edgeknn-mqtt-announce", daemon=True).start()

    def _refused(self, reason: str) -> None:
        if self._outage_logged:
            log.debug("mqtt: %s refused the connection again: %s", self._where, reason)
            return
        self._outage_logged = True
        if reason in LOGIN_REFUSED:
            who = (
                f'mqtt.username "{self._config.username}"'
                if self._config.username
                else "an empty mqtt.username"
            )
            log.error(
                "mqtt: broker at %s refused the login of %s: %s; check mqtt.username and "
                "mqtt.password / mqtt.password_file; retrying",
                self._where,
                who,
                reason,
            )
        else:
            log.warning("mqtt: broker at %s refused the connection: %s; retrying", self._where, reason)

    @_guarded
    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError`, so the exception is still at hand
        error = sys.exc_info()[1]
        reason = (
            (getattr(error, "strerror", None) or str(error) or type(error).__name__) if error else "failed"
        )
        if self._outage_logged:
            log.debug("mqtt: cannot reach broker at %s: %s", self._where, reason)
            return
        self._outage_logged = True
        log.warning("mqtt: cannot reach broker at %s: %s; retrying", self._where, reason)

    @_guarded
    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        was_connected, self._connected = self._connected, False
        with self._ack_lock:
            self._backlog = None  # the next connect decides again
        if was_connected and not self._closed and not self._outage_logged:
            self._outage_logged = True
            why = "connection lost" if reason == "Unspecified error" else str(reason)  # paho's word for EOF
            log.warning("mqtt: lost connection to broker at %s (%s); retrying", self._where, why)

    @_guarded
    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.error("mqtt: broker at %s refused a subscription: %s", self._where, code)

    @_guarded
    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            return  # act only on live messages, never on retained ones
        topic, cmd_prefix = msg.topic, self._topic("cmd/")
        if topic == f"{self._config.discovery_prefix}/status":
            if msg.payload.strip() == b"online":
                self._publish_discovery()
                self._force = True
        elif topic.startswith(cmd_prefix):
            name = topic[len(cmd_prefix) :]
            if name != "result":  # our own output
                self._command(name, msg.payload, msg.properties)
        elif topic == self._topic("ha/class/set"):
            choice = msg.payload.decode("utf-8", "replace")
            if choice in self._classes:
                self._selected = choice
            else:
                log.info("mqtt: ignored unknown training class %s from Home Assistant", _show(choice))
            self._publish_selected()
        elif topic == self._topic("ha/press"):
            name = msg.payload.decode("utf-8", "replace")
            args = {"confirm": True} if name == "reset" else {"class": self._selected}
            self._command(name, json.dumps(args).encode(), msg.properties)

    # -- commands

    def _command(self, name: str, payload: bytes, properties: Any) -> None:
        """Validate one command; submit it, or answer with an error result."""
        response = getattr(properties, "ResponseTopic", None)
        if response and (response.startswith(self._base + "/") or "+" in response or "#" in response):
            response = None  # never publish replies onto our own topics
        correlation = getattr(properties, "CorrelationData", None)

        def reply(result: Result) -> None:
            try:
                if not self._closed:
                    self._publish_result(name, result, response, correlation)
            except Exception:
                log.exception("mqtt: cannot publish the result of %s", name)

        try:
            command = self._parse(name, payload, reply)
        except ValueError as e:
            log.info("mqtt: refused command %s: %s", _show(name), e)
            reply(Result(ok=False, error=str(e)))
            return
        try:
            self._submit(command)
        except Exception as e:
            log.exception("mqtt: cannot queue command %s", name)
            reply(Result(ok=False, error=f"command: cannot be queued ({e})"))

    def _parse(self, name: str, payload: bytes, reply: Callable[[Result], None]) -> Command:
        """The Command for a request, or ValueError with one line naming the field."""
        c = self._config
        if len(payload) > c.max_payload:
            raise ValueError(f"payload: expected at most {c.max_payload} bytes, got {len(payload)}")
        if name not in COMMANDS:
            raise ValueError(f"command: unknown command {_show(name)} (known: {', '.join(COMMANDS)})")
        if c.allowed_commands and name not in c.allowed_commands:
            raise ValueError(f"command: {_show(name)} is not allowed (mqtt.allowed_commands)")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("payload: expected UTF-8 text") from None
        try:
            args = json.loads(text) if text.strip() else {}
        except ValueError as e:
            raise ValueError(
                f"payload: expected a JSON object, got invalid JSON ({getattr(e, 'msg', e)})"
            ) from None
        except RecursionError:
            raise ValueError("payload: expected a JSON object, got JSON nested too deeply") from None
        if not isinstance(args, dict):
            raise ValueError(f"payload: expected a JSON object, got {_json_kind(args)}")
        fields, build = COMMANDS[name]
        for key in args:
            if key not in fields:
                field = json.dumps(key)[1:-1][:32]
                raise ValueError(f"{field}: unknown field (known: {', '.join(fields) or 'none'})")
        values = {}
        for key, (check, default) in fields.items():
            if key not in args:
                if default is REQUIRED:
                    raise ValueError(f"{key}: missing")
                values[key] = default
                continue
            problem = check(args[key])
            if problem:
                raise ValueError(f"{key}: {problem}, got {_show(args[key])}")
            values[key] = args[key]
        known = list(self._classes)
        if "class" in values and values["class"] not in known:
            raise ValueError(f"class: unknown class {_show(values['class'])} (known: {', '.join(known)})")
        if "new_name" in values and values["new_name"] in known:
            raise ValueError(f"new_name: class {_show(values['new_name'])} already exists")
        return build(values, source="mqtt", reply=reply)
