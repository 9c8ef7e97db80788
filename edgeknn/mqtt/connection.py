"""The MQTT transport: one paho client kept connected, its outages logged once, its acknowledgements tracked.

paho-mqtt's own thread does all network I/O, so nothing here blocks the caller. The connection boots
with the broker down and connects when it appears (paho retries with backoff). On every connect it
subscribes, waits for paho's re-sent backlog, lets its owner publish what a connect publishes
(``announce``), then says ``online`` on the availability topic; the last will says ``offline``. An owner
made with ``wait_for_owner`` has nothing to announce at first (the daemon's first state): a connect
waits for its ``owner_ready`` before announcing, so ``online`` never goes out without it.
It knows no topic but that one: what is published and what the messages mean is ``link.MqttLink``'s.
The paho client itself (MQTT 5, limits, login, TLS) is made in ``client.py``; what is held until a
connect is announced, and what is dropped when a queue is full, is ``outbox``'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeknn.config import MqttConfig
from edgeknn.mqtt.client import connect_properties, make_client
from edgeknn.mqtt.outbox import Outbox
from edgeknn.throttle import Throttle

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"

CLOSE_TIMEOUT_S = 2.0  # how long close() waits for "offline" to reach the broker
BACKLOG_WAIT_S = 10.0  # after a reconnect, announce at the latest this long after, even if acks are missing
LOGIN_REFUSED = ("Bad user name or password", "Not authorized")
CLIENT_ID_REFUSED = "Client identifier not valid"
TAKEN_OVER = "Session taken over"  # MQTT 5 reason 0x8E: another client connected with our client id
SHORT_SESSION_S = 60.0  # a connection lost sooner than this is a short session
SHORT_SESSIONS = 3  # this many in a row: the broker closes us on purpose (mosquitto 2.0 gives no reason)


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """For paho callbacks: an exception would end paho's network thread, so log it instead."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            log.exception("mqtt: error in %s", method.__name__)

    return wrapper


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
    through (just before ``online``), and ``message`` for every message. ``wait_for_owner``: announce
    nothing until the owner calls ``owner_ready`` (then ``announce`` runs on the caller's thread).
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
        wait_for_owner: bool = False,
    ):
        self._config = config
        self._client_id = client_id
        self._where = f"{config.host}:{config.port}"
        self._availability = availability
        self._subscriptions = subscriptions
        self._on_connected, self._on_announce, self._on_incoming = connected, announce, message
        self._lock = threading.Lock()
        self._connected = False
        self._outage_logged = False
        self._takeovers = Throttle(log, 600.0)  # two devices with one client id take turns for ever
        self._connected_at = 0.0
        self._short_sessions = 0  # connections in a row that the broker closed within SHORT_SESSION_S
        self.acks = Acks()
        self._outbox = Outbox()  # what waits until the connection is ready, and what was dropped
        self._started = False
        self._closed = False
        self._owner_ready = not wait_for_owner  # the owner has what a connect publishes
        self._announce_due = False  # a connect waits for the owner to be ready
        client = make_client(config, client_id=client_id, will_topic=availability)
        self._client = self.client = client  # ``client``: read-only use by the owner (its address)
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
    def ready(self) -> bool:
        """Connected and announced: what is published now goes straight to the broker."""
        return self._outbox.ready

    @property
    def dropped(self) -> int:
        """Messages dropped because a queue was full (ours while not ready, or paho's outgoing one)."""
        return self._outbox.dropped

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Connect in the background; returns at once, even with the broker down."""
        if self._started or self._closed:
            return
        self._started = True
        self._client.connect_async(
            self._config.host,
            self._config.port,
            self._config.keepalive,
            clean_start=True,
            properties=connect_properties(),
        )
        self._client.loop_start()

    def owner_ready(self) -> None:
        """The owner now has what a connect publishes: a connect that waited for it announces now."""
        with self._lock:
            due, self._announce_due = self._announce_due, False
            self._owner_ready = True
        if due:
            self._announce()

    def close(self) -> None:
        """Publish ``offline``, wait (bounded) for it to be sent, then disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._started:
            return
        if self._connected:
            info = self._send(self._availability, "offline", retain=True, qos=1)
            with contextlib.suppress(ValueError, RuntimeError):  # queue full or connection lost
                info.wait_for_publish(CLOSE_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected = False

    def publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        qos: int | None = None,
        properties: Properties | None = None,
    ) -> None:
        """Hand one message to paho (``qos``: mqtt.qos unless given), or hold it until the connection is
        ready: from a disconnect until paho's re-sent backlog is through and the owner has announced.

        Held messages go out in order before anything newer, so a message published just after a
        reconnect never overtakes older ones (paho re-sends its backlog only after on_connect returns).
        """
        message = (topic, payload, retain, self._config.qos if qos is None else qos, properties)
        if not self._outbox.hold(message):
            self._send(*message)

    def _send(
        self, topic: str, payload: str | bytes, retain: bool, qos: int, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # paho keeps it
            self.acks.sent(info.mid)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._outbox.drop()
        elif info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._outbox.flowing()
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
        self._connected_at = time.monotonic()
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
        with self._lock:
            if not self._owner_ready:  # nothing to announce yet: owner_ready() announces
                self._announce_due = True
                return
        self._outbox.release(self._send)  # what waited goes first; the owner's go straight out from now on
        self._on_announce()
        self._send(self._availability, "online", retain=True, qos=1)

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
        elif reason == CLIENT_ID_REFUSED:
            log.error(
                'mqtt: broker at %s refused the client id "%s": %s; set mqtt.client_id (or mqtt.device_id) '
                "to one it accepts; retrying",
                self._where,
                self._client_id,
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
        self._outbox.stop()
        with self._lock:
            self._announce_due = False  # the next connect decides again
        self.acks.disconnected()
        if self._closed:
            return
        if was_connected:
            short = time.monotonic() - self._connected_at < SHORT_SESSION_S
            self._short_sessions = self._short_sessions + 1 if short else 0
        if str(reason) == TAKEN_OVER or self._short_sessions >= SHORT_SESSIONS:
            self._outage_logged = True
            self._takeovers.log(
                logging.ERROR,
                "mqtt: broker at %s closed our session %s: another device probably uses the same client id "
                '"%s" (two devices with one mqtt.device_id?); give each its own mqtt.device_id or '
                "mqtt.client_id; retrying",
                self._where,
                "(session taken over)" if str(reason) == TAKEN_OVER else "soon after each connect",
                self._client_id,
            )
            return
        if self._outage_logged:
            return
        self._outage_logged = True  # once per outage: cleared by the next connect
        why = "connection lost" if reason == "Unspecified error" else str(reason)  # paho's word for EOF
        if was_connected:
            log.warning("mqtt: lost connection to broker at %s (%s); retrying", self._where, why)
        else:  # the TCP connection was made, but no CONNACK came (paho gives up after keepalive)
            log.warning(
                "mqtt: %s accepted the connection but did not answer the MQTT CONNECT (%s): is it an MQTT "
                "broker, and is mqtt.tls right for that port? retrying",
                self._where,
                why,
            )

    @_guarded
    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.error("mqtt: broker at %s refused a subscription: %s", self._where, code)
