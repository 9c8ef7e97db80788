"""The order of what the device publishes while its classes change, as Home Assistant receives it: a
real Mosquitto, the daemon in-process with the real model, a subscriber recording the retained and live
stream, and ``hamodel`` replaying it the way Home Assistant's MQTT integration would (its discovery
updates applied late, new subscriptions fed the retained state).

The claim (issue 23, findings 1-3): renaming the selected class, adding and removing classes, and
removing the selected one never show ``unknown`` or ``unavailable`` for the Training class select,
the Prediction or a class's binary sensor; each entity's retained state is on its new topic before
its config; the prediction is sent again after the configs.
"""

from __future__ import annotations

import json

from conftest import DIGITS
from hamodel import UNAVAILABLE, UNKNOWN, record
from mqttclient import Subscriber
from rig import Running, Scene, needs_mosquitto, wait_for
from test_homeassistant import BASE, daemon_config, request, state_says

from edgeknn.device.build import build

NODE = "homeassistant/{}/edgeknn_dev1/{}/config"
SELECT = NODE.format("select", "training_class")
PREDICTION = NODE.format("sensor", "prediction")


def configs(sub: Subscriber, topic: str) -> list[int]:
    """Where in the stream ``topic``'s (non-empty) configs are."""
    return [i for i, m in enumerate(sub.messages) if m.topic == topic and m.payload]


def retained_before(sub: Subscriber, index: int, topic: str) -> bytes | None:
    """The retained payload of ``topic`` as the broker held it when message ``index`` arrived."""
    value = None
    for m in sub.messages[:index]:
        if m.topic == topic and m.retain:
            value = m.payload or None
    return value


@needs_mosquitto
def test_class_changes_never_show_unknown_or_unavailable_in_home_assistant(tmp_path, broker, subscriber):
    sub = subscriber(broker.port, ["homeassistant/#", f"{BASE}/#", "test/reply"], retain_as_published=True)
    scene = Scene({"2": DIGITS / "2"}, fps=20)
    run = Running(build(daemon_config(tmp_path, broker.port), opener=scene.opener))
    try:
        sub.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.text == "online", 30)
        assert run.classified()
        assert request(sub, "add_example", {"class": "2", "count": 3}, "teach")["ok"]
        assert wait_for(lambda: run.daemon.stabilizer.label == "2", 30), "the taught class is not predicted"
        mark = len(sub.messages)
        sub.publish(f"{BASE}/ha/class/set", "2")  # Home Assistant's select: "2", also the predicted class
        state_says(sub, "training_class", "2", mark)

        # 1: rename the selected (and predicted) class
        mark = len(sub.messages)
        assert request(sub, "rename_class", {"class": "2", "new_name": "zwei"}, "rename")["ok"]
        state_says(sub, "training_class", "zwei", mark)
        # 2: add a class, remove one that is not selected
        assert request(sub, "add_class", {"class": "drei"}, "add")["ok"]
        assert request(sub, "remove_class", {"class": "1"}, "rm1")["ok"]
        # 3: select a class, then remove it (finding 3): the select moves on, and so does the daemon
        mark = len(sub.messages)
        sub.publish(f"{BASE}/ha/class/set", "drei")
        state_says(sub, "training_class", "drei", mark)
        mark = len(sub.messages)
        assert request(sub, "remove_class", {"class": "drei"}, "rm3")["ok"]
        state_says(sub, "training_class", "zwei", mark)
        assert json.loads((tmp_path / "runtime.json").read_text())["training_class"]["value"] == "zwei"
        mark = len(sub.messages)
        sub.publish(f"{BASE}/ha/press", "add_example")  # acts on the class Home Assistant shows
        result = sub.wait_for(
            lambda m: m.topic == f"{BASE}/cmd/result" and sub.messages.index(m) >= mark, 30, "press result"
        )
        assert json.loads(result.payload)["class"] == "zwei", result.text
        # a class of the removed one's name again: it is not selected behind anyone's back
        assert request(sub, "add_class", {"class": "drei"}, "again")["ok"]
        state_says(sub, "classes", {"zwei": 4, "drei": 0}, mark)
        assert json.loads(sub.on(f"{BASE}/state")[-1].payload)["training_class"] == "zwei"
        last_config = max(i for i, m in enumerate(sub.messages) if m.topic.endswith("/config"))
        sub.wait_for(  # the prediction goes out again after the configs
            lambda m: m.topic == f"{BASE}/prediction" and sub.messages.index(m) > last_config, 30
        )
    finally:
        run.stop()

    messages = list(sub.messages)
    model = record(messages)
    assert model.glitches() == {}, model.glitches()
    assert model.state_of("select", "training_class") == "zwei"
    label = json.loads(sub.on(f"{BASE}/prediction")[-1].payload)["label"]  # the device's last word
    assert model.state_of("sensor", "prediction") == label
    assert model.state_of("binary_sensor", "class_zwei") == ("ON" if label == "zwei" else "OFF")
    assert model.state_of("binary_sensor", "class_drei") == "OFF"
    history = model.entities[PREDICTION].states + model.entities[SELECT].states
    assert UNKNOWN not in history[1:] and UNAVAILABLE not in history

    # the order itself: each select config names a state topic whose retained state came first and is
    # one of its options (Home Assistant subscribes to a new topic once it has applied the config)
    for i in configs(sub, SELECT):
        config = json.loads(messages[i].payload)
        state = retained_before(sub, i, config["state_topic"])
        assert state is not None and state.decode() in config["options"], (config, state)
    # the prediction's: no expire_after, and its retained label is one of its options before it
    for i in configs(sub, PREDICTION):
        config = json.loads(messages[i].payload)
        assert "expire_after" not in config
        retained = retained_before(sub, i, config["state_topic"])
        if retained is not None:
            assert json.loads(retained)["label"] in config["options"]
    # at most two class lists' retained topics are left on the broker
    tagged = {m.topic.split("/")[3] for m in messages if m.topic.startswith(f"{BASE}/ha/") and m.retain}
    left = {t for t in tagged if retained_before(sub, len(messages), f"{BASE}/ha/{t}/prediction")}
    assert len(tagged) >= 4 and len(left) <= 2, (tagged, left)
