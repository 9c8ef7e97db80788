"""Buttons and LEDs: the controls that teach the device and the lights that answer.

`GpioPanel` drives gpiozero buttons and LEDs; `KeyboardPanel` offers the same controls as typed
lines, for a desk with a USB webcam. Neither touches the store: each press becomes a command passed
to ``submit`` (the daemon's queue), and the main loop runs it between frames.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from gpiozero import LED, BadPinFactory, Button, GPIOZeroError, PinFactoryFallback
from gpiozero.pins import Factory

from edgeknn.commands import AddExample, Command, ForgetClass, Reset, Save
from edgeknn.config import PanelConfig
from edgeknn.outputs import Reading

log = logging.getLogger(__name__)

Submit = Callable[[Command], None]

BLINK_S = 0.15  # the example-added confirmation
SLOW_BLINK = (1.0, 1.0)  # status: camera or broker down (on, off seconds)
FAST_BLINK = (0.1, 0.1)  # status: error
MIN_PRESS_S = 0.02  # presses shorter than this are contact bounce, not a press


class PanelError(Exception):
    """The panel cannot start; the message says, in one line, what to change."""


@dataclass
class _Key:
    """What one class button is doing; gpiozero's own ``is_held`` is gone by ``when_released``."""

    pressed_at: float | None = None  # monotonic time of the press, None while up
    recording: bool = False  # held past hold_time: adding examples at hold_rate
    selecting: bool = False  # pressed with the clear button: picks a class to forget, adds nothing


class GpioPanel:
    """One button and one LED per class, a clear button and a status LED, on gpiozero.

    A class button adds one example when released before ``config.hold_time``; held longer, it
    adds one example at once and then ``config.hold_rate`` per second until released. Adding on
    release (not on press) is what keeps a hold from also counting as a press.

    The clear button only ever acts when held: together with a class button (pressed in either
    order) for ``forget_time`` seconds it forgets that class; alone for ``reset_time`` seconds it
    forgets everything. While it is down, class buttons select and never add.

    LEDs: a class LED is lit while its class is the stable prediction and inverts for ``BLINK_S``
    to confirm an added example. The status LED is steady when all is well, blinks slowly while the
    camera or the broker is not ok, and fast on an error.
    """

    def __init__(
        self,
        classes: list[str],
        submit: Submit,
        config: PanelConfig,
        pin_factory: Factory | None = None,
        *,
        forget_time: float = 3.0,
        reset_time: float = 6.0,
    ):
        if len(config.buttons) < len(classes) or len(config.leds) < len(classes):
            raise PanelError(
                f"panel.buttons and panel.leds: expected one pin per class ({len(classes)}), "
                f"got {len(config.buttons)} and {len(config.leds)}"
            )
        self._classes = list(classes)
        self._submit = submit
        self._hold_time = config.hold_time
        self._hold_interval = 1.0 / config.hold_rate
        self._forget_time = forget_time
        self._reset_time = reset_time
        self._lock = threading.Lock()
        self._closed = False
        self._keys = [_Key() for _ in classes]
        self._clear_down = False
        self._clear_used = False  # a class took part, or the gesture already fired: no reset
        self._gesture: threading.Timer | None = None
        self._gesture_gen = 0
        self._gesture_target: int | None = None
        self._lit: int | None = None  # index of the class whose LED is steady on
        self._blink_gen = [0] * len(classes)
        self._blinks: dict[int, threading.Timer] = {}
        self._pattern = "off"
        self._devices: list = []
        self._buttons: list[Button] = []
        self._leds: list[LED] = []
        self._status: LED | None = None
        self._open(config, pin_factory)

    def _open(self, config: PanelConfig, pin_factory: Factory | None) -> None:
        if config.pull_up:
            polarity = {"pull_up": True}
        else:
            polarity = {"pull_up": None, "active_state": config.active_high}
        # bounce_time stays None: MockPin ignores it and RPi.GPIO's bouncetime can swallow a release
        # edge (gpiozero#550); MIN_PRESS_S filters bounce the same way on every pin factory.
        button = dict(polarity, bounce_time=None, pin_factory=pin_factory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                for i in range(len(self._classes)):
                    key = f"panel.buttons[{i}]"
                    b = self._device(
                        key, config.buttons[i], Button, hold_time=self._hold_time, hold_repeat=True, **button
                    )
                    b.when_pressed = self._handler(self._class_pressed, i)
                    b.when_held = self._handler(self._class_held, i)
                    b.when_released = self._handler(self._class_released, i)
                    self._buttons.append(b)
                if config.clear_button != "":
                    clear = self._device("panel.clear_button", config.clear_button, Button, **button)
                    clear.when_pressed = self._handler(self._clear_pressed)
                    clear.when_released = self._handler(self._clear_released)
                self._leds = [
                    self._device(f"panel.leds[{i}]", config.leds[i], LED, pin_factory=pin_factory)
                    for i in range(len(self._classes))
                ]
                if config.status_led != "":
                    self._status = self._device(
                        "panel.status_led", config.status_led, LED, pin_factory=pin_factory
                    )
            except BadPinFactory as e:
                self._close_devices()
                fallbacks = [w for w in caught if issubclass(w.category, PinFactoryFallback)]
                tried = [str(w.message).removeprefix("Falling back from ") for w in fallbacks]
                raise PanelError(
                    f'panel.kind = "gpio" but no GPIO found here ({"; ".join(tried) or e}); '
                    'set panel.kind = "keyboard" or "none"'
                ) from None
            except BaseException:
                self._close_devices()
                raise
        for w in caught:
            log.warning("%s", w.message)

    def _device(self, key: str, pin, kind, **kwargs):
        try:
            device = kind(pin, **kwargs)
        except BadPinFactory:
            raise
        except GPIOZeroError as e:
            raise PanelError(f"{key} = {pin!r}: {e}") from None
        self._devices.append(device)
        return device

    def _handler(self, step: Callable[..., list[Command]], *args) -> Callable[[], None]:
        """A gpiozero callback: run ``step`` under the lock, then submit its commands; never raise."""

        def run() -> None:
            try:
                with self._lock:
                    if self._closed:
                        return
                    commands = step(*args)
                for command in commands:
                    self._send(command)
            except Exception:
                log.exception("panel: %s failed", step.__name__)

        return run

    def _send(self, command: Command) -> None:
        try:
            self._submit(command)
        except Exception:
            log.exception("panel: submitting %r failed", command)

    def _add(self, i: int) -> AddExample:
        return AddExample(class_name=self._classes[i], count=1, source="button")

    # The steps below run under self._lock and return the commands to submit.

    def _class_pressed(self, i: int) -> list[Command]:
        key = self._keys[i]
        key.pressed_at, key.recording, key.selecting = time.monotonic(), False, self._clear_down
        if self._clear_down:
            self._clear_used = True
            self._arm(i, self._forget_time)
        return []

    def _class_held(self, i: int) -> list[Command]:
        key = self._keys[i]
        if key.pressed_at is None or key.selecting:  # a late hold event (gpiozero#697), or selecting
            return []
        if not key.recording:  # the hold starts: from now gpiozero's hold thread repeats at hold_rate
            key.recording = True
            self._buttons[i].hold_time = self._hold_interval
        return [self._add(i)]

    def _class_released(self, i: int) -> list[Command]:
        key = self._keys[i]
        pressed_at, key.pressed_at = key.pressed_at, None
        if self._gesture_target == i:
            self._disarm()
        if key.recording:
            self._stop_recording(i)
            return []
        if key.selecting or pressed_at is None or time.monotonic() - pressed_at < MIN_PRESS_S:
            return []
        return [self._add(i)]

    def _stop_recording(self, i: int) -> None:
        self._keys[i].recording = False
        self._buttons[i].hold_time = self._hold_time

    def _clear_pressed(self) -> list[Command]:
        self._clear_down, self._clear_used = True, False
        down = [i for i, key in enumerate(self._keys) if key.pressed_at is not None]
        for i in down:
            self._keys[i].selecting = True
            if self._keys[i].recording:
                self._stop_recording(i)
        if down:
            self._clear_used = True
            self._arm(max(down, key=lambda i: self._keys[i].pressed_at), self._forget_time)
        else:
            self._arm(None, self._reset_time)
        return []

    def _clear_released(self) -> list[Command]:
        self._clear_down = False
        self._disarm()
        return []

    def _arm(self, target: int | None, seconds: float) -> None:
        """Start the clear gesture's timer: forget class ``target``, or reset when None."""
        self._disarm()
        self._gesture_gen += 1
        self._gesture_target = target
        self._gesture = threading.Timer(seconds, self._handler(self._fire, self._gesture_gen))
        self._gesture.daemon = True
        self._gesture.start()

    def _disarm(self) -> None:
        if self._gesture is not None:
            self._gesture.cancel()
        self._gesture, self._gesture_target = None, None
        self._gesture_gen += 1  # a timer already running finds itself stale

    def _fire(self, gen: int) -> list[Command]:
        if gen != self._gesture_gen or not self._clear_down:
            return []
        target = self._gesture_target
        self._gesture, self._gesture_target = None, None
        if target is not None and self._keys[target].pressed_at is not None:
            self._clear_used = True
            log.info("panel: forgetting class %s", self._classes[target])
            return [ForgetClass(class_name=self._classes[target], source="button")]
        if target is None and not self._clear_used:
            self._clear_used = True
            log.info("panel: resetting every class")
            return [Reset(source="button")]
        return []

    # Output

    def show(self, reading: Reading) -> None:
        """Light the LED of the stable label; "unknown" or a label without an LED lights none."""
        lit = self._classes.index(reading.label) if reading.label in self._classes else None
        with self._lock:
            if self._closed or lit == self._lit:
                return
            old, self._lit = self._lit, lit
            for i in (old, lit):
                if i is not None:
                    self._leds[i].value = i == lit

    def event(self, event: dict) -> None:
        """Blink a class LED (inverted for BLINK_S) to confirm an added example."""
        if event.get("event") != "example_added" or event.get("class") not in self._classes:
            return
        i = self._classes.index(event["class"])
        with self._lock:
            if self._closed:
                return
            self._leds[i].value = i != self._lit
            self._blink_gen[i] += 1
            if i in self._blinks:
                self._blinks[i].cancel()
            self._blinks[i] = timer = threading.Timer(BLINK_S, self._end_blink, (i, self._blink_gen[i]))
            timer.daemon = True
            timer.start()

    def _end_blink(self, i: int, gen: int) -> None:
        try:
            with self._lock:
                if not self._closed and gen == self._blink_gen[i]:
                    self._leds[i].value = i == self._lit
                    del self._blinks[i]
        except Exception:
            log.exception("panel: ending a blink failed")

    def state(self, state: dict) -> None:
        """Set the status LED's pattern from ``camera``, ``broker`` and ``error``; only on a change."""
        if state.get("error"):
            pattern = "fast"
        elif state.get("camera", "ok") == "ok" and state.get("broker", "ok") in ("ok", "disabled"):
            pattern = "on"
        else:
            pattern = "slow"  # down, starting, or anything not known to be fine
        with self._lock:
            if self._closed or self._status is None or pattern == self._pattern:
                return
            self._pattern = pattern
            if pattern == "on":
                self._status.on()
            else:
                on, off = FAST_BLINK if pattern == "fast" else SLOW_BLINK
                self._status.blink(on_time=on, off_time=off)

    def close(self) -> None:
        """Stop the timers and release every pin."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._gesture is not None:
                self._gesture.cancel()
            for timer in self._blinks.values():
                timer.cancel()
        # outside the lock: closing a button joins its hold thread, which may be waiting for the lock
        self._close_devices()

    def _close_devices(self) -> None:
        # Each Button.close() joins its hold thread, which notices only every 0.1 s: telling them
        # all first makes closing take 0.1 s instead of 0.1 s per button.
        for device in self._devices:
            thread = getattr(device, "_hold_thread", None)
            if thread is not None:
                thread.stopping.set()
        for device in reversed(self._devices):
            try:
                device.close()
            except Exception:
                log.exception("panel: closing %r failed", device)
        self._devices.clear()


KEYBOARD_HELP = """\
edgeknn keys (type one, then Enter):
  1..{n}   add an example of that class ({names})
  f1..f{n} forget that class
  reset    forget every class
  s        save the store now
  ?        this help"""


class KeyboardPanel:
    """The panel's controls as typed lines, for a desk with a USB webcam and no buttons.

    One command per line (Enter sends it), so a terminal, a pipe and a test's StringIO behave the
    same; ``?`` lists them. A reader thread submits the commands; end of input stops it quietly.
    The stable label is logged when it changes.
    """

    def __init__(self, classes: list[str], submit: Submit, stream: TextIO | None = None):
        self._classes = list(classes)
        self._submit = submit
        self._label: str | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._read,
            args=(sys.stdin if stream is None else stream,),
            name="edgeknn-keys",
            daemon=True,
        )
        self._thread.start()

    def _read(self, stream: TextIO) -> None:
        try:
            for line in stream:
                if self._closed:
                    return
                try:
                    command = self._parse(line.strip().lower())
                    if command is not None:
                        self._submit(command)
                except Exception:
                    log.exception("keyboard: %r failed", line.strip())
        except (OSError, ValueError):  # stdin closed or not readable (a service, pytest)
            pass

    def _parse(self, text: str) -> Command | None:
        if not text:
            return None
        if text in ("?", "h", "help"):
            names = ", ".join(f"{n}={name}" for n, name in enumerate(self._classes, 1))
            print(KEYBOARD_HELP.format(n=len(self._classes), names=names), file=sys.stderr)
            return None
        if text == "s":
            return Save(source="keyboard")
        if text == "reset":
            return Reset(source="keyboard")
        forget = text.startswith("f")
        number = text[1:] if forget else text
        if number.isdigit() and 1 <= int(number) <= len(self._classes):
            name = self._classes[int(number) - 1]
            if forget:
                return ForgetClass(class_name=name, source="keyboard")
            return AddExample(class_name=name, count=1, source="keyboard")
        print(f"edgeknn: unknown key {text!r}; type ? for help", file=sys.stderr)
        return None

    def show(self, reading: Reading) -> None:
        if reading.label != self._label:
            self._label = reading.label
            log.info("stable label: %s", reading.label)

    def event(self, event: dict) -> None:
        if event.get("event") == "example_added":
            log.info("example added: %s (%s)", event.get("class"), event.get("count", "?"))

    def state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Ignore further input; the reader thread is a daemon and ends with the process."""
        self._closed = True


def open_panel(
    kind: str,
    classes: list[str],
    submit: Submit,
    config: PanelConfig,
    pin_factory: Factory | None = None,
) -> GpioPanel | KeyboardPanel | None:
    """The panel for ``kind`` ("gpio", "keyboard" or "none"); None when there is none."""
    if kind == "gpio":
        return GpioPanel(classes, submit, config, pin_factory)
    if kind == "keyboard":
        return KeyboardPanel(classes, submit)
    if kind == "none":
        return None
    raise PanelError(f'panel.kind: expected "gpio", "keyboard" or "none", got "{kind}"')
