"""What the main loop tells its outputs (LEDs, MQTT), and the base class every output extends.

Outputs must never block the loop: an output that does I/O hands it to its own thread. Each
method does nothing by default, so an output implements only what it shows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """One classified frame after stabilising."""

    label: str  # the stable label, or store.UNKNOWN
    confidence: float  # scores[label]: of the stable label in this frame (0 for unknown)
    scores: dict[str, float]  # per-class confidence of this frame, summing to 1 (empty if no examples)
    similarity: float  # the unknown score (store.Prediction.similarity: to the nearest examples; 0 if none)
    frame: int  # frame number from the camera
    ts: float  # capture time, seconds since the epoch
    latency_ms: float  # from capture to now
    changed: bool  # the stable label changed with this frame
    inference_ms: float = 0.0  # embedding time of this frame
    candidate: str = ""  # this frame's own label while it differs from the stable one (it may settle to it)
    results: tuple[tuple[str, float], ...] = ()  # a classifier model's top-k (label, confidence), best first


class Output:
    """Something that shows the device's answers and state: the LED panel, the MQTT link."""

    def start(self) -> None:
        """Begin work that needs the loop running (connect, start threads); called once."""

    def show(self, reading: Reading) -> None:
        """Called for every classified frame; the output decides what to act on."""

    def event(self, event: dict) -> None:
        """A one-off happening: ``{"event": "example_added", "class": "cup", "count": 12, ...}``."""

    def state(self, state: dict) -> None:
        """The device's state changed (classes, counts, camera/broker health, settings)."""

    def close(self) -> None:
        """Release hardware or connections; called once at shutdown."""
