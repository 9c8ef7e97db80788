"""Which readings the link publishes on ``<base>/prediction``, and the JSON body of one.

A camera gives a reading every frame; subscribers want changes, a heartbeat and a fresh prediction
after a reconnect, not a flood (unless ``mqtt.publish`` is ``every_frame``). That pacing and the
payload's shape are kept apart from ``link.MqttLink``, which adds ``seq``/``ts`` and publishes it.
"""

from __future__ import annotations

import time

from edgeknn.config import MqttConfig
from edgeknn.outputs import Reading


class Predictions:
    """Decides, reading by reading, whether the prediction goes out; ``force`` sends the next one."""

    def __init__(self, config: MqttConfig):
        self._config = config
        self._last = 0.0  # when the last prediction went out (monotonic)
        self.force = True  # publish the next prediction whatever it is

    def due(self, reading: Reading, *, ready: bool) -> dict | None:
        """The body to publish for ``reading`` (``ready``: the connection is), or None to skip it."""
        if not ready:
            # Live data is not queued during an outage, but a change of the stable label is (QoS 1,
            # bounded queue): a subscriber sees every state change, in order, once we are back.
            self.force = True
            if not reading.changed:
                return None
        now = time.monotonic()
        heartbeat = self._config.heartbeat_s
        if not (
            self._config.publish == "every_frame"
            or reading.changed
            or self.force
            or (heartbeat > 0 and now - self._last >= heartbeat)
        ):
            return None
        self.force = False
        self._last = now
        body = {
            "label": reading.label,
            "confidence": round(float(reading.confidence), 4),
            "scores": {str(k): round(float(v), 4) for k, v in reading.scores.items()},
            "similarity": round(float(reading.similarity), 4),
            "frame": int(reading.frame),
            "latency_ms": round(float(reading.latency_ms), 1),
        }
        if reading.candidate:  # the label is settling: what this frame says (README, MQTT)
            body["candidate"] = reading.candidate
        if reading.results:  # a classifier model: its top-k, ml5's result shape
            body["results"] = [{"label": k, "confidence": round(float(v), 4)} for k, v in reading.results]
        return body
