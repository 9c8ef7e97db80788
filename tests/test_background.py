"""A class taught as "nothing here" (Teachable Machine's Background): the device answers it as no
class, so the page, the LEDs, MQTT and Home Assistant (all fed the reading's label) show none."""

from __future__ import annotations

from pathlib import Path

from gpiozero.pins.mock import MockFactory
from rig import LEDS, Running, Scene, digit_folders, make_config, wait_for

from edgeknn.commands import AddExample, Result
from edgeknn.device.build import build
from edgeknn.store.names import UNKNOWN


def taught_device(tmp_path: Path, background: list[str], factory: MockFactory) -> tuple[Running, Scene]:
    """Classes "1", "2" and "Background" (the photos of "5") taught, the threshold fixed below
    every similarity so that only the background rule can answer no class."""
    folders = digit_folders()
    scene = Scene({"1": folders["1"], "2": folders["2"], "Background": folders["5"]})
    cfg = make_config(
        tmp_path,
        **{"classes": ["1", "2", "Background"], "store.threshold": -1.0, "store.background": background},
    )
    run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
    results: list[Result] = []
    for i, name in enumerate(["1", "2", "Background"]):
        scene.shown = name
        assert run.classified()
        run.daemon.submit(AddExample(class_name=name, count=3, source="test", reply=results.append))
        assert wait_for(lambda i=i: len(results) > i, 120), f"teaching {name}: no result"
        assert results[-1].ok, results[-1]
    return run, scene


def test_a_background_class_is_answered_as_no_class(tmp_path, factory: MockFactory):
    run, scene = taught_device(tmp_path, ["background", "nothing"], factory)  # the default; any case
    try:
        scene.shown = "Background"
        assert run.classified(3)
        start = run.recorder.frames
        assert run.classified(20, timeout=60)
        shown = run.recorder.readings[start:]
        won = [r for r in shown if r.scores and max(r.scores, key=r.scores.__getitem__) == "Background"]
        assert len(won) >= len(shown) // 2, "the background photos: mostly its class on top"
        assert all(r.label != "Background" and r.candidate != "Background" for r in shown)
        assert wait_for(lambda: run.daemon.stabilizer.label == UNKNOWN, 60)
        assert wait_for(lambda: not any(factory.pin(p).state for p in LEDS), 30), "no LED for no class"
        scene.shown = "1"
        assert wait_for(lambda: run.daemon.stabilizer.label == "1", 60), "a taught class is still answered"
    finally:
        run.stop()


def test_with_no_background_names_it_is_a_class_like_the_others(tmp_path, factory: MockFactory):
    run, scene = taught_device(tmp_path, [], factory)
    try:
        scene.shown = "Background"
        assert wait_for(lambda: run.daemon.stabilizer.label == "Background", 60)
        assert factory.pin(LEDS[2]).state, "its LED lights as any class's"
    finally:
        run.stop()
