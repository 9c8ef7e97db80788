"""Classes as slots, examples one by one, and the settings a restart keeps.

Button i and LED i belong to the class in slot i whatever its name; classes made, removed and renamed
at runtime (MQTT) are the store's and survive a restart, as do the threshold and the Home Assistant
training class set by a command. The daemon runs in-process on replayed sign digits, with MockFactory
pins and, where MQTT matters, a real Mosquitto.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rig import BUTTONS, LEDS, Running, Scene, make_config, needs_mosquitto, photo_folders, teach, wait_for

from edgeknn import config
from edgeknn.commands import AddExample, RenameClass, Result
from edgeknn.device.build import build
from edgeknn.device.runtime import RuntimeSettings
from edgeknn.store.names import UNKNOWN

BASE = "edgeknn/test"
REPLY = "test/reply"
BUTTON4, LED4 = 23, 24  # a fourth slot's pins, for a class made at runtime


def run_command(run: Running, command_of) -> Result:
    """Submit ``command_of(reply)`` to the running daemon; wait for its result."""
    results: list[Result] = []
    run.daemon.submit(command_of(results.append))
    assert wait_for(lambda: results), "no result"
    return results[0]


def press(pin) -> None:
    """A short press (well under hold_time) of a pull-up button: one example."""
    pin.drive_low()
    time.sleep(0.1)
    pin.drive_high()


def lit(factory, i: int) -> bool:
    return [bool(factory.pin(p).state) for p in LEDS] == [j == i for j in range(len(LEDS))]


def test_a_renamed_class_keeps_its_button_and_led_and_its_name_after_a_restart(tmp_path, factory):
    cfg = make_config(tmp_path)
    scene = Scene(photo_folders(tmp_path))
    run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
    try:
        teach(run, scene)
        rename = run_command(
            run, lambda r: RenameClass(class_name="5", new_name="fist", source="test", reply=r)
        )
        assert rename.ok, rename
        scene.shown = "5"
        assert wait_for(lambda: run.daemon.stabilizer.label == "fist" and lit(factory, 2)), [
            factory.pin(p).state for p in LEDS
        ]
        taught = run.daemon.store.counts()["fist"]
        press(factory.pin(BUTTONS[2]))
        assert wait_for(lambda: run.daemon.store.counts()["fist"] == taught + 1), run.daemon.store.counts()
    finally:
        run.stop()
    run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
    try:
        assert run.daemon.store.classes == ["1", "2", "fist"]  # no "5" back, nothing piled up
        press(factory.pin(BUTTONS[2]))
        assert wait_for(lambda: run.daemon.store.counts()["fist"] == taught + 2), run.daemon.store.counts()
    finally:
        run.stop()


# --- over MQTT --------------------------------------------------------------------------------------


def mqtt_config(tmp_path: Path, port: int, **overrides) -> config.Config:
    """The rig's config on a broker, with pins for a fourth slot (three classes)."""
    return make_config(
        tmp_path,
        **{
            "panel.buttons": [*BUTTONS, BUTTON4],
            "panel.leds": [*LEDS, LED4],
            "mqtt": {
                "host": "127.0.0.1",
                "port": port,
                "device_id": "test",
                "keepalive": 5,
                "discovery": False,
            },
            **overrides,
        },
    )


class Device:
    """A daemon on a broker, with a test client that sends requests and reads their replies."""

    def __init__(self, cfg: config.Config, sub, factory, scene: Scene):
        self.cfg, self.sub, self.factory, self.scene = cfg, sub, factory, scene
        self.run: Running | None = None
        self._tags = 0
        self.start()

    def start(self) -> None:
        online = len([m for m in self.sub.on(f"{BASE}/availability") if m.text == "online"])
        self.run = Running(build(self.cfg, opener=self.scene.opener, pin_factory=self.factory))
        assert wait_for(
            lambda: len([m for m in self.sub.on(f"{BASE}/availability") if m.text == "online"]) > online, 30
        ), "the daemon did not come online"

    def restart(self, cfg: config.Config | None = None) -> None:
        assert self.run is not None
        self.run.stop()
        self.cfg = cfg or self.cfg
        self.start()

    @property
    def daemon(self):
        assert self.run is not None
        return self.run.daemon

    def request(self, name: str, payload) -> dict:
        """Publish ``<base>/cmd/<name>`` with a response topic; return its reply."""
        self._tags += 1
        tag = f"{name}-{self._tags}".encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = REPLY, tag
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.sub.publish(f"{BASE}/cmd/{name}", data, properties=props)
        reply = self.sub.wait_for(
            lambda m: m.topic == REPLY and m.properties.CorrelationData == tag,
            timeout=30,
            what=f"reply {tag}",
        )
        return json.loads(reply.payload)

    def stop(self) -> None:
        if self.run is not None and self.run.thread.is_alive():
            self.run.stop()


@needs_mosquitto
def test_a_class_made_over_mqtt_survives_a_restart_with_its_button_and_led(
    tmp_path, broker, subscriber, factory
):
    scene = Scene(photo_folders(tmp_path))
    device = Device(
        mqtt_config(tmp_path, broker.port), subscriber(broker.port, [f"{BASE}/#", REPLY]), factory, scene
    )
    try:
        made = device.request("add_class", {"class": "four"})
        assert made == {**made, "ok": True, "class": "four", "slot": 3}, made
        press(factory.pin(BUTTON4))
        assert wait_for(lambda: device.daemon.store.counts()["four"] == 1), device.daemon.store.counts()
        device.restart()
        assert device.daemon.store.classes == ["1", "2", "5", "four"]
        press(factory.pin(BUTTON4))  # the fourth button is the fourth class's after a restart too
        assert wait_for(lambda: device.daemon.store.counts()["four"] == 2), device.daemon.store.counts()
        scene.shown = "5"  # taught as "four": the fourth LED lights alone
        taught = device.request("add_example", {"class": "four", "count": 3})
        assert taught["ok"] and taught["count"] == 5, taught
        assert wait_for(lambda: device.daemon.stabilizer.label == "four" and factory.pin(LED4).state)
        assert not any(factory.pin(p).state for p in LEDS)
        removed = device.request("remove_class", {"class": "1"})  # later classes move down one slot
        assert removed == {**removed, "ok": True, "class": "1", "removed": 0}, removed
        assert device.daemon.store.classes == ["2", "5", "four"]
        assert wait_for(lambda: lit(factory, 2)), "the class now in slot 2 has LED 2"
    finally:
        device.stop()


@needs_mosquitto
def test_examples_listed_with_pictures_and_one_deleted_over_mqtt(tmp_path, broker, subscriber, factory):
    scene = Scene(photo_folders(tmp_path))
    device = Device(
        mqtt_config(tmp_path, broker.port), subscriber(broker.port, [f"{BASE}/#", REPLY]), factory, scene
    )
    try:
        assert device.request("add_example", {"class": "1", "count": 2})["ok"]
        scene.shown = "2"
        assert device.run is not None and device.run.classified()
        assert device.request("add_example", {"class": "2"})["ok"]
        listed = device.request("list_examples", {})["examples"]
        assert [(e["class"], e["picture"]) for e in listed] == [("1", True), ("1", True), ("2", True)]
        assert all(isinstance(e["id"], int) and e["added"].endswith("Z") for e in listed)
        picture = device.daemon.store.picture(listed[0]["id"])
        assert picture is not None and picture.startswith(b"\xff\xd8") and len(picture) <= 15_000
        ones = device.request("list_examples", {"class": "1"})["examples"]
        assert ones == listed[:2]

        deleted = device.request("delete_example", {"example": listed[0]["id"]})
        assert deleted == {**deleted, "ok": True, "example": listed[0]["id"], "class": "1", "count": 1}
        assert device.daemon.store.counts() == {"1": 1, "2": 1, "5": 0}
        assert device.request("list_examples", {})["examples"] == listed[1:]
        device.restart()
        assert device.request("list_examples", {})["examples"] == listed[1:]
    finally:
        device.stop()


@needs_mosquitto
def test_threshold_and_training_class_set_over_mqtt_survive_a_restart(tmp_path, broker, subscriber, factory):
    scene = Scene(photo_folders(tmp_path))
    sub = subscriber(broker.port, [f"{BASE}/#", REPLY])
    device = Device(mqtt_config(tmp_path, broker.port, **{"store.threshold": 0.2}), sub, factory, scene)
    try:
        assert device.daemon.state()["training_class"] == "1"  # nothing selected: the first class
        assert device.request("set_threshold", {"value": 0.7})["ok"]
        assert device.request("select_class", {"class": "2"})["ok"]
        state = json.loads(
            sub.wait_for(
                lambda m: m.topic == f"{BASE}/state" and b'"training_class": "2"' in m.payload
            ).payload
        )
        assert state["threshold"] == 0.7
        device.restart()
        assert device.daemon.store.threshold == 0.7
        assert device.daemon.state()["training_class"] == "2"
        assert device.request("rename_class", {"class": "2", "new_name": "two"})["ok"]
        device.restart()
        assert device.daemon.state()["training_class"] == "two"  # the selection follows its class
        # The config's own threshold edited: the config's value applies again.
        device.restart(mqtt_config(tmp_path, broker.port, **{"store.threshold": 0.4}))
        assert device.daemon.store.threshold == 0.4
        device.restart(mqtt_config(tmp_path, broker.port, **{"store.threshold": 0.2}))
        assert device.daemon.store.threshold == 0.2  # and the command's value is not back
        assert device.request("set_threshold", {"value": "auto"})["ok"]  # calibrated from the store
        device.restart()
        assert device.daemon.store.threshold is None
    finally:
        device.stop()


@needs_mosquitto
def test_refused_class_and_example_commands_say_why_in_one_line(tmp_path, broker, subscriber, factory):
    scene = Scene(photo_folders(tmp_path))
    sub = subscriber(broker.port, [f"{BASE}/#", REPLY])
    device = Device(mqtt_config(tmp_path, broker.port, **{"store.max_classes": 4}), sub, factory, scene)
    try:
        assert device.request("add_class", {"class": "four"})["ok"]
        refused = {
            "too many": device.request("add_class", {"class": "five"}),
            "exists": device.request("add_class", {"class": "2"}),
            "reserved": device.request("add_class", {"class": "unknown"}),
            "unknown class": device.request("remove_class", {"class": "ghost"}),
            "unknown to list": device.request("list_examples", {"class": "ghost"}),
            "unknown to select": device.request("select_class", {"class": "ghost"}),
            "no such example": device.request("delete_example", {"example": 999}),
            "negative id": device.request("delete_example", {"example": -1}),
            "id not a number": device.request("delete_example", {"example": "3"}),
            "bad threshold": device.request("set_threshold", {"value": "high"}),
        }
        for what, reply in refused.items():
            assert reply["ok"] is False and reply["error"] and "\n" not in reply["error"], (what, reply)
        errors = {what: reply["error"] for what, reply in refused.items()}
        assert errors["too many"].startswith("class: ") and "store.max_classes" in errors["too many"], errors
        assert errors["exists"] == 'class: class "2" already exists'
        assert errors["reserved"].startswith("class: expected a name that is not reserved")
        assert errors["unknown class"].startswith('class: unknown class "ghost"')
        assert errors["unknown to list"].startswith('class: unknown class "ghost"')
        assert errors["unknown to select"].startswith('class: unknown class "ghost"')
        assert errors["no such example"].startswith("example: no example 999")
        assert errors["negative id"].startswith("example: expected an integer >= 0, got -1")
        assert errors["id not a number"].startswith('example: expected an integer >= 0, got "3"')
        assert errors["bad threshold"].startswith('value: expected a number -1..1, or "auto"')
        assert device.daemon.store.classes == ["1", "2", "5", "four"]
    finally:
        device.stop()


@needs_mosquitto
def test_commands_sent_right_after_a_class_change_may_name_the_new_class(
    tmp_path, broker, subscriber, factory
):
    """A script does not wait for the state: add_class then select_class/add_example/rename_class on it,
    back to back, all run (the link counts queued class changes, and a change that ran at once)."""
    scene = Scene(photo_folders(tmp_path))
    sub = subscriber(broker.port, [f"{BASE}/#", REPLY])
    device = Device(mqtt_config(tmp_path, broker.port), sub, factory, scene)
    try:
        first = [
            ("add_class", {"class": "cup"}),
            ("select_class", {"class": "cup"}),
            ("add_example", {"class": "cup"}),
        ]
        then = [  # an add_example takes a later frame: a rename right behind it would win the race
            ("rename_class", {"class": "cup", "new_name": "mug"}),
            ("add_example", {"class": "mug"}),
            ("remove_class", {"class": "1"}),
            ("add_class", {"class": "1"}),
        ]
        for n, burst in enumerate((first, then)):
            for i, (name, payload) in enumerate(burst):
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic, props.CorrelationData = REPLY, f"burst-{n}-{i}".encode()
                sub.publish(f"{BASE}/cmd/{name}", json.dumps(payload).encode(), properties=props)
            for i, (name, _) in enumerate(burst):
                tag = f"burst-{n}-{i}".encode()
                reply = json.loads(
                    sub.wait_for(
                        lambda m, tag=tag: m.topic == REPLY and m.properties.CorrelationData == tag,
                        timeout=30,
                        what=f"reply {tag!r}",
                    ).payload
                )
                assert reply["ok"], (name, reply)
        assert device.daemon.store.classes == ["2", "5", "mug", "1"]
        assert device.daemon.store.counts()["mug"] == 2
        assert device.daemon.state()["training_class"] == "mug"
    finally:
        device.stop()


# --- runtime.json -----------------------------------------------------------------------------------


def test_runtime_settings_kept_and_a_damaged_file_costs_one_line(tmp_path, caplog):
    settings = RuntimeSettings.load(tmp_path, {"threshold": 0.0})
    settings.set("threshold", 0.6)
    settings.set("training_class", "cup")
    again = RuntimeSettings.load(tmp_path, {"threshold": 0.0})
    assert (again.get("threshold", 0.0), again.get("training_class")) == (0.6, "cup")
    edited = RuntimeSettings.load(tmp_path, {"threshold": 0.3})  # the config's value changed meanwhile
    assert (edited.get("threshold", 0.3), edited.get("training_class")) == (0.3, "cup")

    for damage in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"threshold": {"value": "high"}}'):
        (tmp_path / "runtime.json").write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgeknn.device.runtime"):
            damaged = RuntimeSettings.load(tmp_path, {"threshold": 0.0})
        assert damaged.get("threshold", 0.0) == 0.0, damage
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "runtime.json" in lines[0], (damage, lines)


def test_a_damaged_runtime_file_does_not_stop_the_device(tmp_path, factory, caplog):
    (tmp_path / "runtime.json").write_text('{"threshold": ')
    cfg = make_config(tmp_path, **{"store.threshold": 0.3})
    with caplog.at_level(logging.WARNING, logger="edgeknn.device.runtime"):
        run = Running(build(cfg, opener=Scene(photo_folders(tmp_path)).opener, pin_factory=factory))
    try:
        assert run.daemon.store.threshold == 0.3
        assert [r.getMessage() for r in caplog.records if r.name == "edgeknn.device.runtime"][0].startswith(
            f"{tmp_path / 'runtime.json'}: cannot read it (not valid JSON"
        )
        result = run_command(run, lambda r: AddExample(slot=0, source="test", reply=r))
        assert result.ok and result.detail["class"] == "1"
    finally:
        run.stop()


def test_examples_waiting_for_frames_follow_a_rename():
    """`add_example cup` then at once `rename_class cup -> mug`: the examples still to come go to mug."""
    from edgeknn.device.teaching import Teacher
    from edgeknn.store.knn import KnnStore

    store = KnnStore(4, "test")
    store.add_class("cup")
    replies: list[Result] = []
    teacher = Teacher(store, lambda: None, lambda e, c: None, lambda c, r: replies.append(r))
    assert teacher.queue_examples(AddExample(class_name="cup", count=2)) is None
    assert teacher.rename_class(RenameClass(class_name="cup", new_name="mug")).ok
    for _ in range(2):
        teacher.add_pending(np.ones((1, 4), np.float32))
    assert store.counts() == {"mug": 2}
    assert replies and all(r.ok for r in replies), replies


def test_examples_waiting_for_frames_never_land_in_a_new_class_of_the_same_name():
    """`add_example cup` (3 to come), `remove_class cup`, `add_class cup`: the new cup stays empty and
    the request is answered (refused) at once; a reset answers the ones still waiting too."""
    from edgeknn.commands import AddClass, RemoveClass, Reset
    from edgeknn.device.teaching import Teacher
    from edgeknn.store.knn import KnnStore

    store = KnnStore(4, "test")
    store.add_class("cup")
    store.add_class("pen")
    replies: list[Result] = []
    teacher = Teacher(store, lambda: None, lambda e, c: None, lambda c, r: replies.append(r))
    assert teacher.queue_examples(AddExample(class_name="cup", count=3)) is None
    assert teacher.remove_class(RemoveClass(class_name="cup")).ok
    assert [r.error for r in replies] == ["class: 'cup' was removed"]
    assert teacher.add_class(AddClass(class_name="cup")).ok
    for _ in range(3):
        teacher.add_pending(np.ones((1, 4), np.float32))
    assert store.counts() == {"pen": 0, "cup": 0}

    assert teacher.queue_examples(AddExample(class_name="pen", count=5)) is None
    assert teacher.reset(Reset()).ok
    assert not teacher.pending and not replies[-1].ok and replies[-1].error.startswith("reset:")


def test_saved_counts_examples_not_their_rows(tmp_path, caplog):
    """A view rule stores six rows per example: "saved N examples" says N examples all the same."""
    from edgeknn.device.saving import Saver
    from edgeknn.store.knn import KnnStore

    store = KnnStore(4, "test")
    store.add_class("cup")
    for _ in range(2):
        store.add("cup", np.ones((6, 4), np.float32))  # one example: its six views
    assert len(store) == 12
    with caplog.at_level(logging.INFO, logger="edgeknn.device.saving"):
        saver = Saver(store, tmp_path / "store.npz", 5.0, lambda event: None)
        saver.changed()
        assert saver.save()
    assert f"saved 2 examples to {tmp_path / 'store.npz'}" in caplog.messages


def test_the_stable_label_follows_a_renamed_or_removed_class():
    from edgeknn.device.daemon import Stabilizer

    for mode in ("consecutive", "window"):
        s = Stabilizer(mode, 3)
        for _ in range(3):
            s.update("cup")
        assert s.label == "cup"
        assert s.relabel("cup", "mug") and s.label == "mug"
        assert not s.update("mug")  # the frames before the rename count for the new name
        assert not s.relabel("pen", None) and s.label == "mug"
        assert s.relabel("mug", None) and s.label == UNKNOWN


def test_a_held_button_adds_one_example_per_frame_however_slow_the_frames():
    """Hold-to-record asks every 1 / hold_rate s; where frames come slower (a busy device), its asks
    must not pile up into copies of the next frame, nor go on adding after the release: a held
    button's repeated ask joins the one of its class still waiting for a frame. Separate presses and
    requests that name a count (MQTT, the page) still get one frame per example."""
    from edgeknn.device.teaching import Teacher
    from edgeknn.store.knn import KnnStore

    store = KnnStore(4, "test")
    store.add_class("cup")
    store.add_class("pen")
    replies: list[Result] = []
    teacher = Teacher(store, lambda: None, lambda e, c: None, lambda c, r: replies.append(r))
    frames = iter(np.eye(4, dtype=np.float32)[:, np.newaxis])
    for _ in range(2):  # two frames' time held, five asks each: one example from each frame
        held = [teacher.queue_examples(AddExample(slot=0, source="button", held=True)) for _ in range(5)]
        assert held[0] is None and all(r is not None and r.ok for r in held[1:]), held
        teacher.add_pending(next(frames))
    assert store.counts() == {"cup": 2, "pen": 0} and not teacher.pending
    assert len(np.unique(store.rows(), axis=0)) == 2, "each example is a frame of its own"
    # another button, or a count asked from elsewhere, waits for its frames as before
    assert teacher.queue_examples(AddExample(slot=1, source="button")) is None
    assert teacher.queue_examples(AddExample(class_name="cup", count=1, source="mqtt")) is None
    assert teacher.queue_examples(AddExample(class_name="cup", count=1, source="mqtt")) is None
    teacher.add_pending(next(frames))
    teacher.add_pending(next(frames))
    assert store.counts() == {"cup": 4, "pen": 1} and not teacher.pending
    # two presses of a key before the next frame: two examples, as a person means them
    assert teacher.queue_examples(AddExample(slot=1, source="keyboard")) is None
    assert teacher.queue_examples(AddExample(slot=1, source="keyboard")) is None
    teacher.add_pending(next(frames, np.ones((1, 4), np.float32)))
    teacher.add_pending(np.full((1, 4), 0.5, np.float32))
    assert store.counts()["pen"] == 3
