"""The panel's gestures as a pure state machine: events with explicit times in, commands out, no sleeps."""

from __future__ import annotations

from edgeknn.commands import AddExample, ForgetClass, Reset
from edgeknn.panel.gestures import MIN_PRESS_S, Gestures

CLASSES = ["one", "two", "three"]
HOLD_TIME, HOLD_RATE = 0.2, 20.0  # one hold example every 0.05 s
FORGET, RESET = 0.2, 0.4


def make() -> Gestures:
    return Gestures(
        len(CLASSES), hold_time=HOLD_TIME, hold_rate=HOLD_RATE, forget_time=FORGET, reset_time=RESET
    )


def add(name: str) -> AddExample:
    """A button adds to its class slot, whatever the class is called then."""
    return AddExample(slot=CLASSES.index(name), count=1, source="button")


def forget(name: str) -> ForgetClass:
    return ForgetClass(slot=CLASSES.index(name), source="button")


def run_until(g: Gestures, end: float) -> list[tuple[float, object]]:
    """Tick ``g`` at each time it asks for, up to ``end``; return (time, command) pairs."""
    out = []
    while (due := g.next_due()) is not None and due <= end:
        out.extend((due, command) for command in g.tick(due))
    return out


# Buttons


def test_short_press_adds_exactly_one_example_of_its_class():
    g = make()
    assert g.press(1, 10.0) == []
    assert g.release(1, 10.05) == [add("two")]
    assert g.next_due() is None
    assert g.tick(10.05 + HOLD_TIME + 0.05) == []  # nothing more turns up once the hold time has passed


def test_contact_bounce_is_not_a_press():
    g = make()
    g.press(0, 1.0)
    assert g.release(0, 1.0 + MIN_PRESS_S / 2) == []
    g.press(0, 2.0)
    assert g.release(0, 2.05) == [add("one")]


def test_hold_records_at_hold_rate_and_stops_on_release():
    g = make()
    start = 5.0
    g.press(2, start)
    assert g.tick(start + HOLD_TIME - 0.01) == []  # not before hold_time
    held = run_until(g, start + 0.5)
    assert g.release(2, start + 0.5) == []  # the hold already added: no press example on top
    assert g.next_due() is None
    assert g.tick(start + 1.0) == [], "examples kept coming after the release"
    times = [t for t, _ in held]
    assert {command for _, command in held} == {add("three")}
    # the first comes at hold_time, then one per 1/hold_rate (0.05 s): 7 in 0.5 s
    assert times[0] - start >= HOLD_TIME - 0.01
    assert 3 <= len(held) <= 8
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.03 <= sum(gaps) / len(gaps) <= 0.1
    assert len(held) == 7 and times[0] == start + HOLD_TIME


def test_a_late_tick_adds_one_example_and_counts_the_interval_from_it():
    """As gpiozero's hold thread did: the next example is one interval after the last one added."""
    g = make()
    g.press(0, 0.0)
    assert g.tick(0.5) == [add("one")]
    assert g.next_due() == 0.5 + 1 / HOLD_RATE


def test_hold_then_short_press_uses_the_hold_time_again():
    g = make()
    g.press(0, 0.0)
    held = run_until(g, 0.3)
    assert len(held) >= 2
    g.release(0, 0.3)
    assert g.press(0, 0.35) == []  # shorter than hold_time, longer than the repeat interval
    assert g.tick(0.35 + 0.1) == []
    assert g.release(0, 0.45) == [add("one")]
    assert g.tick(1.0) == []


def test_buttons_of_two_classes_record_side_by_side():
    g = make()
    g.press(0, 0.0)
    g.press(1, 0.1)
    held = [command for _, command in run_until(g, HOLD_TIME + 0.1)]
    assert held == [add("one"), add("one"), add("one"), add("two")]


# The clear button


def test_a_short_press_of_clear_destroys_nothing():
    g = make()
    g.press_clear(0.0)
    assert g.release_clear(0.1) == []
    assert g.next_due() is None
    assert g.tick(RESET + 0.1) == []


def test_clear_with_a_class_button_forgets_that_class_and_adds_nothing():
    g = make()
    g.press_clear(0.0)
    g.press(1, 0.05)
    assert g.next_due() == 0.05 + FORGET
    assert run_until(g, 0.05 + FORGET + HOLD_TIME) == [
        (0.05 + FORGET, forget("two"))
    ]  # held past hold_time: still no examples
    assert g.release(1, 0.5) == []
    assert g.release_clear(0.5) == []
    assert g.tick(10.0) == []


def test_class_button_first_then_clear_also_forgets():
    g = make()
    g.press(2, 0.0)
    g.press_clear(0.05)
    commands = [command for _, command in run_until(g, 1.0)]
    assert commands == [forget("three")]
    assert g.release_clear(1.0) == [] and g.release(2, 1.0) == []


def test_clear_stops_a_hold_in_progress_and_forgets_instead():
    g = make()
    g.press(0, 0.0)
    assert run_until(g, HOLD_TIME) == [(HOLD_TIME, add("one"))]
    g.press_clear(0.3)
    assert run_until(g, 0.3 + FORGET) == [(0.3 + FORGET, forget("one"))]
    assert g.release(0, 1.0) == []


def test_the_class_pressed_last_is_the_one_forgotten():
    g = make()
    g.press(0, 0.0)
    g.press(1, 0.01)
    g.press_clear(0.1)
    assert [command for _, command in run_until(g, 1.0)] == [forget("two")]


def test_releasing_the_class_button_early_cancels_the_forget_and_the_reset():
    g = make()
    g.press_clear(0.0)
    g.press(0, 0.0)
    assert g.release(0, FORGET / 2) == []
    assert g.tick(RESET + 0.1) == []  # clear alone long enough for a reset, but a class took part
    assert g.release_clear(RESET + 0.1) == []
    assert g.next_due() is None


def test_clear_held_alone_resets_once():
    g = make()
    g.press_clear(0.0)
    assert g.tick(FORGET + 0.05) == [], "a forget-length hold must not reset"
    assert g.next_due() == RESET
    assert g.tick(RESET) == [Reset(source="button")]
    assert g.tick(RESET + 10) == []
    assert g.release_clear(RESET + 10) == []


def test_a_class_pressed_after_the_reset_selects_and_forgets():
    g = make()
    g.press_clear(0.0)
    assert g.tick(RESET) == [Reset(source="button")]
    g.press(0, 1.0)
    assert g.release(0, 1.05) == []  # selecting: no example
    g.press(1, 1.1)
    assert g.tick(1.1 + FORGET) == [forget("two")]


def test_a_class_still_down_after_clear_is_released_adds_nothing():
    g = make()
    g.press_clear(0.0)
    g.press(0, 0.05)
    g.release_clear(0.1)
    assert g.next_due() is None
    assert g.tick(5.0) == []
    assert g.release(0, 5.0) == []
    g.press(0, 6.0)
    assert g.release(0, 6.05) == [add("one")]  # and the next press is an ordinary one
