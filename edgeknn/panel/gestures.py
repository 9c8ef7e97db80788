"""The panel's gestures as a pure state machine: button events in, commands out.

No hardware, no threads, no sleeps: every event carries its time (seconds on one monotonic clock)
and ``tick`` stands for time passing. The GPIO panel feeds it gpiozero's edges and calls ``tick``
when ``next_due`` says something falls due; the tests feed it timestamps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgeknn.commands import AddExample, Command, ForgetClass, Reset

log = logging.getLogger(__name__)

MIN_PRESS_S = 0.02  # presses shorter than this are contact bounce, not a press


@dataclass
class _Key:
    """What one class button is doing."""

    pressed_at: float | None = None  # time of the press, None while up
    recording: bool = False  # held past hold_time: adding examples at hold_rate
    selecting: bool = False  # pressed with the clear button: picks a class to forget, adds nothing
    add_due: float | None = None  # when hold-to-record adds its next example, None if it will not


@dataclass
class _Clear:
    """The clear gesture in progress: forget class ``target`` (reset when None) at ``due``."""

    target: int | None
    due: float


class Gestures:
    """Press, hold-to-record, clear+class and clear alone, for ``buttons`` class buttons and a clear button.

    Button i acts on class slot i, whatever that class is called when the command runs: the commands
    carry the slot (``AddExample(slot=i)``), and the loop looks the class up, so a renamed class keeps
    its button.

    A class button adds one example when released before ``hold_time``; held longer, it adds one
    example at ``hold_time`` and then one every ``1 / hold_rate`` seconds until released. Adding on
    release (not on press) is what keeps a hold from also counting as a press.

    The clear button only ever acts when held: together with a class button (pressed in either
    order) for ``forget_time`` seconds it forgets that class; alone for ``reset_time`` seconds it
    forgets everything. While it is down, class buttons select and never add.

    Each method takes the time of the event and returns the commands to submit, in order.
    """

    def __init__(
        self,
        buttons: int,
        *,
        hold_time: float,
        hold_rate: float,
        forget_time: float = 3.0,
        reset_time: float = 6.0,
    ):
        self._hold_time = hold_time
        self._hold_interval = 1.0 / hold_rate
        self._forget_time = forget_time
        self._reset_time = reset_time
        self._keys = [_Key() for _ in range(buttons)]
        self._clear_down = False
        self._clear_used = False  # a class took part, or the gesture already fired: no reset
        self._clear: _Clear | None = None

    def press(self, i: int, t: float) -> list[Command]:
        """Class button ``i`` went down at ``t``."""
        key = self._keys[i]
        key.pressed_at, key.recording, key.selecting = t, False, self._clear_down
        key.add_due = None if self._clear_down else t + self._hold_time
        if self._clear_down:
            self._clear_used = True
            self._clear = _Clear(i, t + self._forget_time)
        return []

    def release(self, i: int, t: float) -> list[Command]:
        """Class button ``i`` came up at ``t``: one example for a press, nothing after a hold."""
        key = self._keys[i]
        pressed_at, key.pressed_at, key.add_due = key.pressed_at, None, None
        if self._clear is not None and self._clear.target == i:
            self._clear = None
        if key.recording:
            key.recording = False
            return []
        if key.selecting or pressed_at is None or t - pressed_at < MIN_PRESS_S:
            return []
        return [self._add(i)]

    def press_clear(self, t: float) -> list[Command]:
        """The clear button went down at ``t``: class buttons already down now select instead."""
        self._clear_down, self._clear_used = True, False
        down = [i for i, key in enumerate(self._keys) if key.pressed_at is not None]
        for i in down:
            key = self._keys[i]
            key.selecting, key.recording, key.add_due = True, False, None
        if down:
            self._clear_used = True
            latest = max(down, key=lambda i: self._keys[i].pressed_at or 0.0)
            self._clear = _Clear(latest, t + self._forget_time)
        else:
            self._clear = _Clear(None, t + self._reset_time)
        return []

    def release_clear(self, t: float) -> list[Command]:
        """The clear button came up at ``t``: whatever it was about to do, it does not."""
        self._clear_down, self._clear = False, None
        return []

    def tick(self, t: float) -> list[Command]:
        """Time is now ``t``: the hold examples and the clear gesture that have fallen due."""
        commands: list[Command] = []
        for i, key in enumerate(self._keys):
            if key.add_due is not None and key.add_due <= t:
                key.recording, key.add_due = True, t + self._hold_interval
                commands.append(self._add(i, held=True))
        if self._clear is not None and self._clear.due <= t:
            commands.extend(self._fire_clear())
        return commands

    def next_due(self) -> float | None:
        """The earliest time ``tick`` may have something to do; None while nothing is pending."""
        dues = [key.add_due for key in self._keys if key.add_due is not None]
        if self._clear is not None:
            dues.append(self._clear.due)
        return min(dues, default=None)

    def _fire_clear(self) -> list[Command]:
        assert self._clear is not None
        target, self._clear = self._clear.target, None
        if target is not None and self._keys[target].pressed_at is not None:
            self._clear_used = True
            log.info("clear held with button %d: forgetting its class", target + 1)
            return [ForgetClass(slot=target, source="button")]
        if target is None and not self._clear_used:
            self._clear_used = True
            log.info("clear held alone: resetting every class")
            return [Reset(source="button")]
        return []

    def _add(self, i: int, held: bool = False) -> AddExample:
        return AddExample(slot=i, count=1, source="button", held=held)
