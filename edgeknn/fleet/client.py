"""The fleet's own MQTT client: a second, quiet connection beside the MQTT link, for packs.

Why not the link's connection: a pack is hundreds of retained chunks of 256 KiB, and the link's outbox
drops what does not fit its queue, while its predictions and commands must never wait behind a pack. Here
every chunk waits for its PUBACK before the next goes (one in flight: a pack never floods the broker or
this process), and subscriptions are kept across reconnects. Same broker settings, login and TLS as the
link (``mqtt/client.py``); its client id is the link's with ``-fleet`` after it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edgeknn.config import MqttConfig
from edgeknn.mqtt.client import connect_properties, make_client

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


class FleetClient:
    """Publish with a wait for each acknowledgement; subscribe with a handler per filter."""

    def __init__(self, config: MqttConfig, *, client_id: str, base: str):
        self.base = base
        self._config = config
        self._online = f"{base}/fleet/online"
        self._client = make_client(config, client_id=f"{client_id}-fleet"[:64], will_topic=self._online)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._said_down = False
        self.connects = 0  # how many times a connection was made: a reconnect may have lost retained messages
        self.on_reconnect: Callable[[], None] | None = None
        self._client.on_disconnect = lambda *args: self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._client.connect_async(
            self._config.host, self._config.port, self._config.keepalive, properties=connect_properties()
        )
        self._client.loop_start()

    def close(self) -> None:
        if self.connected:
            self._client.publish(self._online, "offline", qos=1, retain=True).wait_for_publish(2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._handlers[topic_filter] = handler
        if self.connected:
            self._client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes | str, retain: bool = True, timeout: float = 30.0) -> bool:
        """Publish at QoS 1 and wait for the broker's acknowledgement; False if it did not come."""
        if not self.connected:
            return False
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError) as e:  # paho: not connected any more, queue full
            log.debug("fleet: publish to %s failed: %s", topic, e)
            return False

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        if reason.is_failure:
            if not self._said_down:
                self._said_down = True
                log.warning("fleet: the broker refused the fleet's connection: %s", reason)
            return
        self._said_down = False
        self.connects += 1
        client.publish(self._online, "online", qos=1, retain=True)
        with self._lock:
            filters = list(self._handlers)
        for topic_filter in filters:
            client.subscribe(topic_filter, qos=1)
        self._connected.set()
        if self.connects > 1 and self.on_reconnect is not None:
            self.on_reconnect()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for f, h in self._handlers.items() if mqtt.topic_matches_sub(f, msg.topic)]
        for handler in handlers:
            try:
                handler(msg.topic, bytes(msg.payload))
            except Exception:  # a handler's bug must not stop the network thread
                log.exception("fleet: handling %s failed", msg.topic)
