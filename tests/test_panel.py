"""The panel, driven through gpiozero's own MockFactory: pins are pressed and LEDs read as on a Pi.

What each gesture means, and when, is tested without sleeps in test_gestures.py; these tests check
that pin edges and the panel's timer reach the gestures, and that the LEDs show what they should.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import types

import pytest
from gpiozero import Device
from rig import wait_for

from edgeknn.commands import AddExample, ForgetClass, Reset, Save
from edgeknn.config import PanelConfig
from edgeknn.device.build import open_panel
from edgeknn.outputs import Reading
from edgeknn.panel import gpio as panel_mod
from edgeknn.panel.gpio import GpioPanel, PanelError
from edgeknn.panel.keyboard import KeyboardPanel
from edgeknn.store.names import UNKNOWN

CLASSES = ["one", "two", "three"]
B1, B2, B3, CLEAR = 17, 27, 22, 26
L1, L2, L3, STATUS = 5, 6, 13, 19
FORGET, RESET = 0.2, 0.4  # short clear durations keep the suite fast
FAST = PanelConfig(hold_time=0.2, hold_rate=20.0)


def reading(label: str) -> Reading:
    return Reading(label, 1.0, {}, 0.9, 1, time.time(), 1.0, True)


class Recorder:
    """A thread-safe ``submit`` that remembers the commands and when they came."""

    def __init__(self):
        self.commands: list = []
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, command) -> None:
        with self._lock:
            self.commands.append(command)
            self.times.append(time.monotonic())


@pytest.fixture
def make(factory):
    """Build GpioPanels on the mock factory; close them after the test."""
    panels = []

    def build(config=FAST, submit=None, classes=CLASSES):
        submit = submit if submit is not None else Recorder()
        p = GpioPanel(classes, submit, config, pin_factory=factory, forget_time=FORGET, reset_time=RESET)
        panels.append(p)
        return p, submit

    yield build
    for p in panels:
        p.close()


def test_only_gpiozeros_warnings_are_logged_as_warnings(make, factory, monkeypatch, caplog):
    # On Python 3.12+ lgpio's SWIG module warns "builtin type SwigPyPacked has no __module__ attribute" (a
    # DeprecationWarning) while the first pin opens, as on Pi OS Trixie and in scripts/check-device-vm.sh.
    import warnings

    from gpiozero import PinNonPhysical

    opened = factory.pin

    def pin(name):
        swig = "builtin type SwigPyPacked has no __module__ attribute"
        warnings.warn(swig, DeprecationWarning, stacklevel=1)
        warnings.warn(f"no physical pin {name}", PinNonPhysical, stacklevel=1)
        return opened(name)

    monkeypatch.setattr(factory, "pin", pin)
    with caplog.at_level("DEBUG", logger="edgeknn.panel.gpio"):
        make()
    warned = {r.getMessage() for r in caplog.records if r.levelname == "WARNING"}
    assert any(m.startswith("no physical pin") for m in warned)
    assert not any("SwigPyPacked" in m for m in warned)
    assert any("DeprecationWarning: builtin type SwigPyPacked" in r.getMessage() for r in caplog.records)


def press(pin, seconds: float = 0.05) -> None:
    """A pull-up button: pressing drives the pin low."""
    pin.drive_low()
    time.sleep(seconds)
    pin.drive_high()


def add(name: str) -> AddExample:
    """A button adds to its class slot, whatever the class is called then."""
    return AddExample(slot=CLASSES.index(name), count=1, source="button")


# Buttons


def test_short_press_adds_exactly_one_example_of_its_class(make, factory):
    _, rec = make()
    press(factory.pin(B2))
    assert wait_for(lambda: rec.commands)
    time.sleep(FAST.hold_time + 0.05)  # nothing more turns up once the hold time has passed
    assert rec.commands == [add("two")]


def test_hold_records_until_release(make, factory):
    """The panel's timer drives hold-to-record; its timing is in test_gestures.py."""
    _, rec = make()
    pin = factory.pin(B3)
    start = time.monotonic()
    pin.drive_low()
    assert wait_for(lambda: len(rec.commands) >= 3)
    pin.drive_high()
    time.sleep(0.1)  # a tick that ran just before the release may still be submitting
    count = len(rec.commands)
    time.sleep(0.2)
    assert len(rec.commands) == count, "examples kept coming after the release"
    assert set(rec.commands) == {add("three")}
    assert rec.times[0] - start >= FAST.hold_time - 0.01  # the first comes after hold_time


def test_a_raising_submit_does_not_break_later_presses(make, factory, caplog):
    rec = Recorder()
    calls = []

    def submit(command):
        calls.append(command)
        if len(calls) == 1:
            raise RuntimeError("queue exploded")
        rec(command)

    make(submit=submit)
    press(factory.pin(B1))
    assert wait_for(lambda: calls)
    press(factory.pin(B2))
    assert wait_for(lambda: rec.commands == [add("two")])
    assert "queue exploded" in caplog.text


def test_active_high_buttons_without_pull_up(make, factory):
    _, rec = make(PanelConfig(hold_time=0.2, hold_rate=20.0, pull_up=False, active_high=True))
    pin = factory.pin(B1)
    assert pin.pull == "floating"
    pin.drive_high()
    time.sleep(0.05)
    pin.drive_low()
    assert wait_for(lambda: rec.commands == [add("one")])


# The clear button


def test_clear_with_a_class_button_forgets_that_class_and_adds_nothing(make, factory):
    _, rec = make()
    clear, button = factory.pin(CLEAR), factory.pin(B2)
    clear.drive_low()
    time.sleep(0.05)
    button.drive_low()
    assert wait_for(lambda: rec.commands)
    time.sleep(FAST.hold_time)  # held past hold_time: still no examples
    button.drive_high()
    clear.drive_high()
    time.sleep(0.05)
    assert rec.commands == [ForgetClass(slot=1, source="button")]


def test_clear_held_alone_resets_once(make, factory):
    _, rec = make()
    clear = factory.pin(CLEAR)
    clear.drive_low()
    assert wait_for(lambda: rec.commands)
    time.sleep(0.1)
    clear.drive_high()
    assert rec.commands == [Reset(source="button")]


# LEDs


def test_leds_follow_the_stable_label(make, factory):
    p, _ = make()
    leds = [factory.pin(n) for n in (L1, L2, L3)]
    assert [led.state for led in leds] == [False, False, False]
    p.show(reading("two"))
    assert [led.state for led in leds] == [False, True, False]
    p.show(reading("three"))
    assert [led.state for led in leds] == [False, False, True]
    p.show(reading(UNKNOWN))
    assert [led.state for led in leds] == [False, False, False]
    p.show(reading("one"))
    p.show(reading("not-a-class"))
    assert [led.state for led in leds] == [False, False, False]


def test_example_added_blinks_then_returns_to_the_steady_state(make, factory):
    p, _ = make()
    lit, dark = factory.pin(L1), factory.pin(L2)
    p.show(reading("one"))
    p.event({"event": "example_added", "class": "one", "count": 3, "source": "button"})
    p.event({"event": "example_added", "class": "two", "count": 1, "source": "button"})
    assert (lit.state, dark.state) == (False, True)
    assert wait_for(lambda: (lit.state, dark.state) == (True, False))
    assert 0.1 <= lit.states[-1].timestamp <= 0.5  # it was off for about BLINK_S
    p.show(reading("one"))  # every frame: no change, no flicker
    p.event({"event": "prediction"})
    time.sleep(panel_mod.BLINK_S + 0.05)
    assert (lit.state, dark.state) == (True, False)


def test_a_label_change_during_a_blink_wins(make, factory):
    p, _ = make()
    led = factory.pin(L3)
    p.event({"event": "example_added", "class": "three"})
    assert led.state
    p.show(reading("three"))
    time.sleep(panel_mod.BLINK_S + 0.05)
    assert led.state


# The status LED

OK = {"camera": "ok", "broker": "ok", "error": ""}


def toggles(pin, seconds: float, poke=lambda: None) -> list[bool]:
    """Sample ``pin`` every 10 ms for ``seconds``; return the states it changed through."""
    seen = [pin.state]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        poke()
        if pin.state != seen[-1]:
            seen.append(pin.state)
        time.sleep(0.01)
    return seen


def test_status_steady_when_running(make, factory):
    p, _ = make()
    led = factory.pin(STATUS)
    assert not led.state
    p.state(OK)
    assert led.state
    p.state(dict(OK, broker="disabled"))
    assert toggles(led, 0.3) == [True]


def test_status_fast_blink_on_error_is_not_restarted_by_repeated_state(make, factory):
    p, _ = make()
    led = factory.pin(STATUS)
    broken = dict(OK, error="model failed to load")
    p.state(broken)
    seen = [led.state]

    def blinked_four_times() -> bool:  # on 0.1 s / off 0.1 s, however often the same state comes
        p.state(broken)
        if led.state != seen[-1]:
            seen.append(led.state)
        return len(seen) >= 4

    assert wait_for(blinked_four_times), seen
    p.state(OK)
    assert toggles(led, 0.25) == [True]


def test_status_slow_blink_when_camera_or_broker_down(make, factory):
    p, _ = make()
    led = factory.pin(STATUS)
    p.state(dict(OK, camera="down"))
    assert toggles(led, 0.8, poke=lambda: p.state(dict(OK, camera="down"))) == [True]
    assert wait_for(lambda: not led.state)  # off after SLOW_BLINK's 1 s on
    p.state(dict(OK, broker="down"))  # still "slow": the blink keeps its rhythm
    assert not led.state


def test_no_status_led_and_no_clear_button(factory):
    rec = Recorder()
    p = GpioPanel(CLASSES, rec, PanelConfig(clear_button="", status_led=""), pin_factory=factory)
    try:
        p.state(dict(OK, error="x"))
        press(factory.pin(B1))
        assert wait_for(lambda: rec.commands == [add("one")])
        assert factory.pin(STATUS).function == "input"  # never claimed
    finally:
        p.close()


def test_close_releases_every_pin(factory):
    config = PanelConfig()
    GpioPanel(CLASSES, Recorder(), config, pin_factory=factory).close()
    p = GpioPanel(CLASSES, Recorder(), config, pin_factory=factory)  # would raise GPIOPinInUse
    p.close()
    p.close()
    p.show(reading("one"))  # after close: a no-op, not an error
    assert not factory.pin(L1).state
    assert not [t for t in threading.enumerate() if t.name == "edgeknn-panel"], "the timer thread lives on"


# Errors


def test_no_gpio_gives_one_clear_line(monkeypatch):
    """Whatever machine runs the suite, gpiozero's default pin factories fail to load as off a Pi."""
    factories = {
        "lgpio": "LGPIOFactory",
        "rpigpio": "RPiGPIOFactory",
        "pigpio": "PiGPIOFactory",
        "native": "NativeFactory",
    }
    for name, cls in factories.items():

        def no_gpio(name: str = name):
            raise ModuleNotFoundError(f"No module named '{name}'")

        module = types.ModuleType(f"gpiozero.pins.{name}")
        setattr(module, cls, no_gpio)
        monkeypatch.setitem(sys.modules, module.__name__, module)  # what `import` finds: the public classes
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    with pytest.raises(PanelError) as e:
        GpioPanel(CLASSES, Recorder(), PanelConfig())
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith('panel.kind = "gpio" but no GPIO found here (lgpio: No module named')
    assert message.endswith('set panel.kind = "keyboard" or "none"')


@pytest.mark.skipif(sys.platform != "linux", reason="gpiozero's default factories are for Linux")
def test_no_gpio_on_this_machine(monkeypatch):
    """The real default pin factory, on a machine without GPIO (skipped where there is GPIO)."""
    from pathlib import Path

    if any(Path("/dev").glob("gpiochip*")) or Path("/proc/device-tree/model").exists():
        pytest.skip("this machine has GPIO")
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    with pytest.raises(PanelError, match=r'^panel.kind = "gpio" but no GPIO found here \(.+\); set'):
        open_panel("gpio", CLASSES, Recorder(), PanelConfig())
    assert Device.pin_factory is None


def test_a_bad_pin_names_its_key_and_frees_the_pins_already_taken(factory):
    two = ["one", "two"]
    with pytest.raises(PanelError, match=r"^panel.leds\[1\] = 'GPIO99': "):
        GpioPanel(two, Recorder(), PanelConfig(leds=[5, "GPIO99"]), pin_factory=factory)
    with pytest.raises(PanelError, match=r"^panel.status_led = 17: "):  # already a button
        GpioPanel(two, Recorder(), PanelConfig(status_led=17), pin_factory=factory)
    GpioPanel(two, Recorder(), PanelConfig(), pin_factory=factory).close()


def test_classes_beyond_the_pins_have_no_button_or_led(factory):
    """The store may hold more classes than there are pins (made over MQTT): the panel still starts.
    (The config's own classes must have pins: test_config checks that.)"""
    rec = Recorder()
    p = GpioPanel(CLASSES, rec, PanelConfig(buttons=[17, 27], leds=[5, 6]), pin_factory=factory)
    try:
        p.show(reading("three"))
        assert [factory.pin(n).state for n in (L1, L2, L3)] == [False, False, False]
        assert factory.pin(B3).function == "input" and factory.pin(L3).function == "input"  # never claimed
        press(factory.pin(B2))
        assert wait_for(lambda: rec.commands == [add("two")])
    finally:
        p.close()


# Class slots: button i and LED i belong to the class in slot i, whatever its name


def test_buttons_submit_slots_and_leds_follow_renamed_and_added_classes(factory):
    """Four configured pins for three classes: the fourth waits for a class made later."""
    rec = Recorder()
    config = PanelConfig(buttons=[B1, B2, B3, 23], leds=[L1, L2, L3, 24], hold_time=0.2)
    p = GpioPanel(CLASSES, rec, config, pin_factory=factory)
    leds = [factory.pin(n) for n in (L1, L2, L3, 24)]
    try:
        p.state({"classes": {"one": 0, "two": 0, "fist": 0}})  # "three" renamed in the store
        p.show(reading("fist"))
        assert [led.state for led in leds] == [False, False, True, False]
        p.state({"classes": {"one": 0, "two": 0, "fist": 0, "four": 0}})  # a class made over MQTT
        p.show(reading("four"))
        assert [led.state for led in leds] == [False, False, False, True]
        p.event({"event": "example_added", "class": "fist", "count": 1})
        assert leds[2].state  # the blink of slot 2
        press(factory.pin(B3))
        press(factory.pin(23))
        assert wait_for(lambda: len(rec.commands) == 2)
        assert rec.commands == [AddExample(slot=2, source="button"), AddExample(slot=3, source="button")]
    finally:
        p.close()


def test_keyboard_keys_follow_the_classes_of_the_state(capsys):
    rec = Recorder()
    lines = io.StringIO()
    p = KeyboardPanel(["a", "b"], rec, stream=lines)
    p.state({"classes": {"a": 1, "b": 0, "c": 0}})
    p._line("3")
    p._line("?")
    assert rec.commands == [AddExample(slot=2, source="keyboard")]
    assert "1=a, 2=b, 3=c" in capsys.readouterr().err
    p.close()


# open_panel and the keyboard


def test_open_panel(factory):
    assert open_panel("none", CLASSES, Recorder(), PanelConfig()) is None
    p = open_panel("gpio", CLASSES, Recorder(), PanelConfig(), pin_factory=factory)
    assert isinstance(p, GpioPanel)
    p.close()
    with pytest.raises(PanelError, match="panel.kind"):
        open_panel("usb", CLASSES, Recorder(), PanelConfig())


def test_keyboard_panel_turns_lines_into_commands(capsys):
    rec = Recorder()
    p = KeyboardPanel(CLASSES, rec, stream=io.StringIO("1\n 2 \nf3\ns\n?\nbogus\n\n9\nF1\nreset\n"))
    assert wait_for(lambda: not p._thread.is_alive())
    assert rec.commands == [
        AddExample(slot=0, source="keyboard"),
        AddExample(slot=1, source="keyboard"),
        ForgetClass(slot=2, source="keyboard"),
        Save(source="keyboard"),
        ForgetClass(slot=0, source="keyboard"),
        Reset(source="keyboard"),
    ]
    err = capsys.readouterr().err
    assert "1=one, 2=two, 3=three" in err  # the help
    assert "unknown key 'bogus'" in err and "unknown key '9'" in err
    p.close()


def test_keyboard_panel_logs_the_label_when_it_changes(caplog):
    caplog.set_level("INFO", logger="edgeknn.panel.keyboard")
    p = KeyboardPanel(CLASSES, Recorder(), stream=io.StringIO(""))  # EOF at once, quietly
    for label in ("one", "one", UNKNOWN, UNKNOWN, "two"):
        p.show(reading(label))
    assert [r.getMessage() for r in caplog.records] == [
        "stable label: one",
        f"stable label: {UNKNOWN}",
        "stable label: two",
    ]
    p.close()
