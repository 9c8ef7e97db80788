"""Buttons and LEDs on gpiozero: the controls that teach the device and the lights that answer.

The gestures (what a press, a hold or the clear button means) live in :mod:`edgeknn.panel.gestures`;
this module turns pin edges into its events, runs one timer thread for what falls due, and passes
the resulting commands to ``submit`` (the daemon's queue). It never touches the store.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from gpiozero import (
    LED,
    BadPinFactory,
    Device,
    DigitalInputDevice,
    GPIOZeroError,
    GPIOZeroWarning,
    PinFactoryFallback,
)
from gpiozero.pins import Factory

from edgeknn.commands import Command
from edgeknn.config import PanelConfig
from edgeknn.outputs import Output, Reading
from edgeknn.panel import PanelError
from edgeknn.panel.gestures import Gestures

log = logging.getLogger(__name__)

Submit = Callable[[Command], None]

BLINK_S = 0.15  # the example-added confirmation
SLOW_BLINK = (1.0, 1.0)  # status: camera or broker down (on, off seconds)
FAST_BLINK = (0.1, 0.1)  # status: error


class GpioPanel(Output):
    """A button and an LED per class slot (``panel.buttons[i]``/``panel.leds[i]`` for the class in slot
    i, whatever its name), a clear button and a status LED, on gpiozero.

    The panel opens every configured pin: a class made later (MQTT, the web page) in a slot that has
    pins gets them. Buttons submit by slot; the LEDs follow the class names of the latest state.

    The buttons are plain ``DigitalInputDevice`` inputs: the hold and clear timings belong to
    :class:`~edgeknn.panel.gestures.Gestures`, so gpiozero's hold thread (one per ``Button``) is not needed.

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
        fixed: bool = False,
    ):
        self._classes = list(classes)  # the class in each slot: the store's, updated by ``state``
        self._fixed = fixed  # a classifier model: the LEDs keep panel.led_labels whatever the state says
        self._submit = submit
        self._gestures = Gestures(
            len(config.buttons),
            hold_time=config.hold_time,
            hold_rate=config.hold_rate,
            forget_time=forget_time,
            reset_time=reset_time,
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the timer thread waits here for what falls due
        self._closed = False
        self._lit: int | None = None  # index of the class whose LED is steady on
        self._blink_gen = [0] * len(config.leds)
        self._blinks: dict[int, threading.Timer] = {}
        self._pattern = "off"
        self._devices: list[Device] = []
        self._leds: list[LED] = []
        self._status: LED | None = None
        self._open(config, pin_factory)
        self._timer = threading.Thread(target=self._run_timer, name="edgeknn-panel", daemon=True)
        self._timer.start()

    def _open(self, config: PanelConfig, pin_factory: Factory | None) -> None:
        polarity: dict[str, Any]
        if config.pull_up:
            polarity = {"pull_up": True}
        else:
            polarity = {"pull_up": None, "active_state": config.active_high}
        # bounce_time stays None: MockPin ignores it and RPi.GPIO's bouncetime can swallow a release
        # edge (gpiozero#550); gestures.MIN_PRESS_S filters bounce the same way on every pin factory.
        button = dict(polarity, bounce_time=None, pin_factory=pin_factory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                for i in range(len(config.buttons)):
                    b = self._device(f"panel.buttons[{i}]", config.buttons[i], DigitalInputDevice, **button)
                    b.when_activated = self._handler(self._gestures.press, i)
                    b.when_deactivated = self._handler(self._gestures.release, i)
                if config.clear_button != "":
                    clear = self._device(
                        "panel.clear_button", config.clear_button, DigitalInputDevice, **button
                    )
                    clear.when_activated = self._handler(self._gestures.press_clear)
                    clear.when_deactivated = self._handler(self._gestures.release_clear)
                self._leds = [
                    self._device(f"panel.leds[{i}]", config.leds[i], LED, pin_factory=pin_factory)
                    for i in range(len(config.leds))
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
            if issubclass(w.category, GPIOZeroWarning):
                log.warning("%s", w.message)
            else:  # not gpiozero's: lgpio's SWIG types warn on Python 3.12+ ("builtin type SwigPyPacked")
                log.debug("panel: %s: %s", w.category.__name__, w.message)

    def _device(self, key: str, pin: Any, kind: type, **kwargs: Any) -> Any:
        """Make one gpiozero device; a bad pin becomes a PanelError naming its config key."""
        try:
            device = kind(pin, **kwargs)
        except BadPinFactory:
            raise
        except GPIOZeroError as e:
            raise PanelError(f"{key} = {pin!r}: {e}") from None
        self._devices.append(device)
        return device

    # Input: gpiozero's callbacks and the timer thread feed the gestures, then submit what they return.

    def _handler(self, step: Callable[..., list[Command]], *args: int) -> Callable[[], None]:
        """A gpiozero callback: run ``step`` at the time of the edge, then submit; never raise."""

        def run() -> None:
            try:
                with self._lock:
                    if self._closed:
                        return
                    commands = step(*args, time.monotonic())
                    self._wake.notify()  # the next due time may have moved
                self._send(commands)
            except Exception:
                log.exception("panel: %s failed", step.__name__)

        return run

    def _run_timer(self) -> None:
        """Call the gestures' ``tick`` whenever something falls due, until closed."""
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    due, now = self._gestures.next_due(), time.monotonic()
                    if due is None or due > now:
                        self._wake.wait(None if due is None else due - now)
                        continue
                    commands = self._gestures.tick(now)
                self._send(commands)
        except Exception:
            log.exception("panel: the timer failed; holds and the clear button no longer act")

    def _send(self, commands: list[Command]) -> None:
        for command in commands:
            try:
                self._submit(command)
            except Exception:
                log.exception("panel: submitting %r failed", command)

    # Output

    def _led_of(self, name: object) -> int | None:
        """The LED of class ``name``: that of its slot, if there are that many LEDs."""
        classes = self._classes
        i = classes.index(name) if isinstance(name, str) and name in classes else None
        return i if i is not None and i < len(self._leds) else None

    def show(self, reading: Reading) -> None:
        """Light the LED of the stable label; the no-class answer or a class without an LED lights none."""
        lit = self._led_of(reading.label)
        with self._lock:
            if self._closed or lit == self._lit:
                return
            old, self._lit = self._lit, lit
            for i in (old, lit):
                if i is not None:
                    self._leds[i].value = i == lit

    def event(self, event: dict) -> None:
        """Blink a class LED (inverted for BLINK_S) to confirm an added example."""
        i = self._led_of(event.get("class"))
        if event.get("event") != "example_added" or i is None:
            return
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
        """Take the class of each slot from ``classes`` (renamed, added, removed), and set the status
        LED's pattern from ``camera``, ``broker`` and ``error``; only on a change."""
        classes = state.get("classes")
        if isinstance(classes, dict | list) and not self._fixed:
            self._classes = list(classes)
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
            self._wake.notify()
            for timer in self._blinks.values():
                timer.cancel()
        self._timer.join()
        self._close_devices()

    def _close_devices(self) -> None:
        for device in reversed(self._devices):
            try:
                device.close()
            except Exception:
                log.exception("panel: closing %r failed", device)
        self._devices.clear()
