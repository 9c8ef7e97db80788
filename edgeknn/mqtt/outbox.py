"""What waits to go out: messages held while the connection is not ready, and those dropped when full.

After a disconnect, paho re-sends its own backlog only once the next connect is made; a message handed
to it before then, or before the owner announced, would overtake older ones (out of ``seq`` order, or
ahead of ``online``). So ``connection.Connection`` holds what is published until it is ready, then
sends it in order. A full queue (this one, or paho's own) drops the message: counted for the state's
``dropped_messages`` and said once until messages flow again. Apart from the connection so that its
bookkeeping reads on its own; it knows nothing of paho or the broker.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from paho.mqtt.properties import Properties

from edgeknn.mqtt.client import MAX_QUEUED

log = logging.getLogger(__package__)  # one logger for the package: "edgeknn.mqtt"

Message = tuple[str, str | bytes, bool, int, Properties | None]  # topic, payload, retain, qos, properties


class Outbox:
    """Held messages (until ``release``) and the count of dropped ones; publishers and paho's thread
    both call in, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False  # connected, backlog re-sent and announced: publish straight to paho
        self._held: deque[Message] = deque()
        self.dropped = 0  # messages refused because a queue (ours or paho's outgoing one) was full
        self._full_logged = False

    @property
    def ready(self) -> bool:
        return self._ready

    def hold(self, message: Message) -> bool:
        """Keep ``message`` while not ready: True if kept (or dropped, the queue being full); False if
        ready, and the caller sends it now."""
        with self._lock:
            if self._ready:
                return False
            if len(self._held) < MAX_QUEUED:
                self._held.append(message)
            else:
                self.drop()
            return True

    def release(self, send: Callable[..., object]) -> None:
        """``send`` what waited, in order; from now on ``hold`` lets every message through."""
        with self._lock:
            held, self._held = self._held, deque()
            for message in held:
                send(*message)
            self._ready = True

    def stop(self) -> None:
        """The connection fell: hold what is published until the next ``release``."""
        with self._lock:
            self._ready = False

    def drop(self) -> None:
        """A message was dropped, a queue being full: count it; say so once until messages flow again."""
        self.dropped += 1
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "mqtt: %d messages wait for the broker; dropping new ones (counted in the state's "
                "dropped_messages)",
                MAX_QUEUED,
            )

    def flowing(self) -> None:
        """paho took a message: the next drop is said again."""
        self._full_logged = False
