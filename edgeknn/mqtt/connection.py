"""The MQTT transport: one paho client kept connected, its outages logged once, its acknowledgements tracked.

paho-mqtt's own thread does all network I/O, so nothing here blocks the caller. The connection boots
with the broker down and connects when it appears (paho retries with backoff). On every connect it
subscribes, waits for paho's re-sent backlog, lets its owner publish what a connect publishes
(``announce``), then says ``online`` on the availability topic; the last will says ``offline``.
It knows no topic but that one: what is published and what the messages mean is ``link.MqttLink``'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeknn.config import MqttConfig

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"

MAX_QUEUED = 1000  # outgoing QoS>0 messages paho keeps while the broker is away
CLOSE_TIMEOUT_S = 2.0  # how long close() waits for "offline" to reach the broker
BACKLOG_WAIT_S = 10.0  # after a reconnect, announce at the latest this long after, even if acks are missing
LOGIN_REFUSED = ("Bad user name or password", "Not authorized")


class MqttError(Exception):
    """The MQTT settings cannot be used (a password or certificate file cannot be read)."""


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """For paho callbacks: an exception would end paho's network thread, so log it instead."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            log.exception("mqtt: error in %s", method.__name__)

    return wrapper


def _password(config: MqttConfig) -> str:
    path = config.password_file
    if not path:
        return config.password
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise MqttError(f"mqtt.password_file: cannot read {path} ({reason})") from None


def make_client(config: MqttConfig, *, client_id: str, will_topic: str) -> mqtt.Client:
    """A paho MQTT 5 client with the last will, reconnect backoff, a bounded queue, login and TLS.

    Raises MqttError naming the key when a password or certificate file cannot be read.
    """
    c = config
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.will_set(will_topic, "offline", qos=1, retain=True)
    client.reconnect_delay_set(1, 30)
    client.max_queued_messages_set(MAX_QUEUED)
    if c.username:
        client.username_pw_set(c.username, _password(c) or None)
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
    return client


class Acks:
    """The QoS>0 messages paho holds unacknowledged, and the backlog a reconnect waits for.

    After a reconnect, paho first re-sends what it still holds (queued in the outage, or not yet
    acknowledged when the link fell); announcing before that would put state and "online" ahead of
    older messages, out of seq order. Publishers and paho's thread both call in, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unacked: set[int] = set()
        self._acked_early: deque[int] = deque(maxlen=64)  # acknowledged before sent() recorded them
        self._backlog: set[int] | None = None  # what must be acknowledged before we announce

    def sent(self, mid: int) -> None:
        """paho holds message ``mid`` until the broker acknowledges it."""
        with self._lock:
            if mid in self._acked_early:
                self._acked_early.remove(mid)
            else:
                self.unacked.add(mid)

    def acked(self, mid: int) -> bool:
        """The broker acknowledged ``mid``; True if that was the last of the backlog (time to announce)."""
        with self._lock:
            if mid in self.unacked:
                self.unacked.discard(mid)
            else:
                self._acked_early.append(mid)
            backlog = self._backlog
            if backlog is None or mid not in backlog:
                return False
            backlog.discard(mid)
            if backlog:
                return False
            self._backlog = None
            return True

    def connected(self) -> set[int] | None:
        """On connect: the backlog paho re-sends, to wait for; None if there is none (announce now)."""
        with self._lock:
            self._backlog = backlog = set(self.unacked) or None
        return backlog

    def give_up(self, backlog: set[int]) -> bool:
        """The wait for ``backlog`` ran out: True if it is still the one waited for (then forget it)."""
        with self._lock:
            if self._backlog is not backlog:  # acknowledged, or the link fell meanwhile
                return False
            self._backlog = None
            self.unacked -= backlog  # paho will not acknowledge them: do not wait for them again
        return True

    def disconnected(self) -> None:
        with self._lock:
            self._backlog = None  # the next connect decides again


class Connection:
    """A paho client kept connected to the broker, for one owner.

    The owner gives the subscriptions and three callbacks, all called on paho's thread (or a helper
    thread for ``announce``): ``connected`` at once on every connect, ``announce`` when paho's backlog is
    through (just before ``online``), and ``message`` for every message.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        availability: str,
        subscriptions: list[tuple[str, SubscribeOptions]],
        connected: Callable[[], None],
        announce: Callable[[], None],
        message: Callable[[mqtt.MQTTMessage], None],
    ):
        self._config = config
        self._where = f"{config.host}:{config.port}"
        self._availability = availability
        self._subscriptions = subscriptions
        self._on_connected, self._on_announce, self._on_incoming = connected, announce, message
        self._lock = threading.Lock()
        self._connected = False
        self._outage_logged = False
        self._queue_full_logged = False
        self.acks = Acks()
        self._started = False
        self._closed = False
        self._client = client = make_client(config, client_id=client_id, will_topic=availability)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Connect in the background; returns at once, even with the broker down."""
        if self._started or self._closed:
            return
        self._started = True
        self._client.connect_async(
            self._config.host, self._config.port, self._config.keepalive, clean_start=True
        )
        self._client.loop_start()

    def close(self) -> None:
        """Publish ``offline``, wait (bounded) for it to be sent, then disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._started:
            return
        if self._connected:
            info = self.publish(self._availability, "offline", retain=True, qos=1)
            with contextlib.suppress(ValueError, RuntimeError):  # queue full or connection lost
                info.wait_for_publish(CLOSE_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False

    def publish(
        self,
        topic: str,
        payload: str,
        *,
        retain: bool = False,
        qos: int | None = None,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Hand one message to paho (``qos``: mqtt.qos unless given); paho queues it during an outage."""
        qos = self._config.qos if qos is None else qos
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # paho keeps it
            self.acks.sent(info.mid)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE and not self._queue_full_logged:
            self._queue_full_logged = True
            log.warning("mqtt: %d messages wait for the broker; dropping new ones", MAX_QUEUED)
        elif info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._queue_full_logged = False
        return info

    # -- paho callbacks (paho's thread)

    @_guarded
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._refused(str(reason))
            return
        log.info("mqtt: connected to %s", self._where)
        self._outage_logged = False
        self._connected = True
        self._on_connected()
        if self._subscriptions:
            client.subscribe(self._subscriptions)
        backlog = self.acks.connected()
        if backlog is None:
            self._announce()
            return
        # _on_publish announces once paho's re-sent backlog is acknowledged; never wait forever
        timer = threading.Timer(BACKLOG_WAIT_S, self._backlog_overdue, (backlog,))
        timer.daemon = True
        timer.start()

    @_guarded
    def _backlog_overdue(self, backlog: set[int]) -> None:
        if self.acks.give_up(backlog):
            log.debug("mqtt: %d re-sent messages not acknowledged; announcing anyway", len(backlog))
            self._announce()

    @_guarded
    def _announce(self) -> None:
        """What a connect publishes: the owner's part (discovery, the retained state), then ``online``."""
        if not self._connected:
            return
        self._on_announce()
        self.publish(self._availability, "online", retain=True, qos=1)

    @_guarded
    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if self.acks.acked(mid):
            # paho holds its message lock while it calls us, and publishing takes ours: announce elsewhere
            threading.Thread(target=self._announce, name="edgeknn-mqtt-announce", daemon=True).start()

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_incoming(msg)

    def _refused(self, reason: str) -> None:
        if self._outage_logged:
            log.debug("mqtt: %s refused the connection again: %s", self._where, reason)
            return
        self._outage_logged = True
        if reason in LOGIN_REFUSED:
            username = self._config.username
            who = f'mqtt.username "{username}"' if username else "an empty mqtt.username"
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
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
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
    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected, self._connected = self._connected, False
        self.acks.disconnected()
        if was_connected and not self._closed and not self._outage_logged:
            self._outage_logged = True
            why = "connection lost" if reason == "Unspecified error" else str(reason)  # paho's word for EOF
            log.warning("mqtt: lost connection to broker at %s (%s); retrying", self._where, why)

    @_guarded
    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.error("mqtt: broker at %s refused a subscription: %s", self._where, code)
