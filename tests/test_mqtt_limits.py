"""Limits that keep the device up under floods and mistakes: admission control for commands, the MQTT 5
Maximum Packet Size, checked MQTT identities, bounded secret files, and log lines that name the cause.

Real Mosquitto throughout (the ``broker`` fixture); the floods run `edgeknn run` as a subprocess with an
sd_notify listener, so the watchdog's pings are measured as systemd would see them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import DIGITS, MODEL
from paho.mqtt.enums import CallbackAPIVersion
from rig import NotifyListener, wait_for

from edgeknn import config
from edgeknn.commands import AddExample, Result
from edgeknn.device.teaching import Teacher
from edgeknn.mqtt import client
from edgeknn.mqtt.client import MqttError
from edgeknn.mqtt.link import MqttLink
from edgeknn.store.knn import KnnStore

CLASSES = ["1", "2", "5"]


def body(m) -> dict:
    return json.loads(m.payload)


# --- admission control: the Teacher's pending work --------------------------------------------------


def test_pending_examples_are_bounded_and_a_frame_serves_a_bounded_number():
    from edgeknn.device.teaching import ADDS_PER_FRAME, MAX_PENDING_EXAMPLES

    store = KnnStore(4, "test")
    for name in CLASSES:
        store.add_class(name)
    replies: list[Result] = []
    teacher = Teacher(store, lambda: None, lambda e, c: None, lambda c, r: replies.append(r))
    results = [teacher.queue_examples(AddExample(class_name="1", count=100)) for _ in range(5000)]
    accepted = [r for r in results if r is None]
    busy = [r for r in results if r is not None]
    assert len(accepted) == MAX_PENDING_EXAMPLES // 100
    assert busy and all(not r.ok and r.error.startswith("busy:") for r in busy), busy[:1]
    teacher.add_pending(np.ones((1, 4), np.float32))
    assert 0 < len(store) <= ADDS_PER_FRAME, "one frame must not add an example for every pending command"


# --- admission control: the daemon under a flood (subprocess, real broker, sd_notify listener) -----


def write_config(tmp_path: Path) -> Path:
    lines = [f"classes = {json.dumps(CLASSES)}", f"state_dir = {json.dumps(str(tmp_path))}", ""]
    lines += ["[store]", "autosave_s = 5.0", "", "[web]", "enabled = false", ""]
    lines += ["[mqtt]", "keepalive = 5", 'publish = "every_frame"']
    path = tmp_path / "edgeknn.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Flood:
    """`edgeknn run` (device id "flood") with a recording subscriber and a NOTIFY_SOCKET listener."""

    def __init__(self, tmp_path: Path, port: int, subscriber):
        self.base = "edgeknn/flood"
        self.sub = subscriber(port, [f"{self.base}/#"])
        self.notify = NotifyListener(tmp_path / "notify")
        env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
        env.update(self.notify.environ(watchdog_usec=2_000_000), HOME=str(tmp_path))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeknn", "run", "--config", str(write_config(tmp_path)),
             "--mqtt", f"127.0.0.1:{port}", "--device-id", "flood", "--panel", "none",
             "--model", str(MODEL), "--store", str(tmp_path / "store.npz"),
             "--source", f"replay:{DIGITS / '1'}?fps=20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.sub.wait_for(lambda m: m.topic == f"{self.base}/availability" and m.text == "online", 60)
        self.publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.publisher.max_inflight_messages_set(1000)
        self.publisher.connect("127.0.0.1", port)
        self.publisher.loop_start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def frames_per_second(self, seconds: float) -> float:
        """Predictions (one a frame: publish = every_frame) per second over the next ``seconds``."""
        start = time.monotonic()
        before = len(self.sub.on(f"{self.base}/prediction"))
        time.sleep(seconds)
        return (len(self.sub.on(f"{self.base}/prediction")) - before) / (time.monotonic() - start)

    def send(self, name: str, payloads: list[str]) -> None:
        for payload in payloads:
            self.publisher.publish(f"{self.base}/cmd/{name}", payload, qos=1)

    def max_gap(self, since: float) -> float:
        pings = [t for t, m in list(self.notify.messages) if "WATCHDOG=1" in m and t >= since]
        return max(b - a for a, b in zip(pings, pings[1:], strict=False)) if len(pings) > 1 else float("inf")

    def close(self) -> int:
        self.publisher.loop_stop()
        self.publisher.disconnect()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.notify.close()
        return code


@pytest.mark.slow
def test_a_flood_of_commands_keeps_the_loop_and_the_watchdog_going(tmp_path, broker, subscriber):
    flood = Flood(tmp_path, broker.port, subscriber)
    try:
        quiet_fps = flood.frames_per_second(5)
        start = time.monotonic()
        predictions = len(flood.sub.on(f"{flood.base}/prediction"))
        flood.send("add_example", [json.dumps({"class": "1", "count": 100})] * 5000)
        flood.send("add_example", ['{"class": "nope"}'] * 15000)  # refused by the parser
        busy_fps = flood.frames_per_second(10)
        time.sleep(5)
        gap = flood.max_gap(start)
        results = [body(m) for m in flood.sub.on(f"{flood.base}/cmd/result")]
        state = body(flood.sub.on(f"{flood.base}/state")[-1])
        print(
            f"\nfps quiet {quiet_fps:.1f}, during the flood {busy_fps:.1f}; max WATCHDOG gap {gap:.2f} s; "
            f"{len(results)} results, {sum(r.get('error', '').startswith('busy') for r in results)} busy; "
            f"busy_refusals {state.get('busy_refusals')}, dropped_messages {state.get('dropped_messages')}"
        )
        # systemd's WatchdogSec is 30 s (systemd/edgeknn.service): keep well inside it, even on 2 shared cores
        assert gap < 15.0, f"WATCHDOG gap {gap:.1f} s"
        assert wait_for(lambda: len(flood.sub.on(f"{flood.base}/prediction")) > predictions, 60), (
            "no frame classified during the flood"
        )
        assert any(r.get("error", "").startswith("busy:") for r in results)
        assert state["busy_refusals"] > 0 and "dropped_messages" in state
        logged = [line for line in flood.lines if "refused" in line]
        assert len(logged) < 50, f"{len(logged)} refusal lines for 20 000 commands"
    finally:
        assert flood.close() == 0, "\n".join(flood.lines[-20:])


# --- MQTT: links in this process ------------------------------------------------------------------


def make_link(port: int, **fields) -> MqttLink:
    cfg = config.from_dict({"mqtt": {"host": "127.0.0.1", "port": port, "discovery": False, **fields}})
    return MqttLink(
        cfg.mqtt,
        base_topic="edgeknn/lim",
        device_id="lim",
        classes=CLASSES,
        submit=lambda c: None,
        version="t",
    )


def test_a_publish_larger_than_announced_never_reaches_the_link(broker, subscriber):
    link = make_link(broker.port)
    results = subscriber(broker.port, ["edgeknn/lim/cmd/result"])
    link.start()
    try:
        assert wait_for(lambda: link.connected)
        sender = subscriber(broker.port, ["unused/#"])
        big = b"x" * (client.MAX_PACKET_BYTES + 1)
        sender.client.publish("edgeknn/lim/cmd/add_example", big, qos=1).wait_for_publish(20)
        sender.client.publish("edgeknn/lim/cmd/nonsense", b"{}", qos=1).wait_for_publish(10)
        first = results.wait_for(lambda m: True, timeout=10)
        assert body(first)["command"] == "nonsense", "the 8 MiB publish was delivered to the device"
        time.sleep(0.5)
        assert len(results.messages) == 1, [m.text[:80] for m in results.messages]
    finally:
        link.close()


def test_refused_commands_are_logged_once_per_burst_and_dropped_messages_are_counted(
    broker, subscriber, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    link = make_link(broker.port)
    results = subscriber(broker.port, ["edgeknn/lim/cmd/result", "edgeknn/lim/state"])
    link.start()
    try:
        assert wait_for(lambda: link.connected)
        sender = subscriber(broker.port, ["unused/#"])
        for _ in range(300):
            sender.client.publish("edgeknn/lim/cmd/nonsense", b"{}", qos=1)
        assert wait_for(lambda: len(results.on("edgeknn/lim/cmd/result")) == 300)
        refused = [r for r in caplog.records if "refused command" in r.getMessage()]
        assert 1 <= len(refused) <= 2, f"{len(refused)} log lines for 300 refused commands"
        monkeypatch.setattr(link._connection._client, "_max_queued_messages", 1)
        monkeypatch.setattr(link._connection._client, "_out_messages", {1: None})  # paho's queue: full
        link.event({"event": "test"})
        monkeypatch.undo()
        link.state({"classes": {c: 0 for c in CLASSES}})
        state = body(results.wait_for(lambda m: m.topic == "edgeknn/lim/state"))
        assert state["dropped_messages"] == 1
    finally:
        link.close()


def test_a_session_taken_over_is_logged_once_naming_the_client_id(broker, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    first, second = make_link(broker.port, client_id="twin"), make_link(broker.port, client_id="twin")
    first.start()
    try:
        assert wait_for(lambda: first.connected)
        second.start()
        time.sleep(6)  # paho reconnects after 1 s: the two take turns
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        takeovers = [line for line in lines if 'client id "twin"' in line and "same client id" in line]
        assert 1 <= len(takeovers) <= 2, lines  # once per link, not once per takeover
        assert len([line for line in lines if "lost connection" in line]) <= 2 * 2, lines
    finally:
        first.close()
        second.close()


def test_a_listener_that_never_answers_connect_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="edgeknn.mqtt")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    link = make_link(silent.getsockname()[1], keepalive=5)
    link.start()
    try:
        found = wait_for(
            lambda: any("did not answer the MQTT CONNECT" in r.getMessage() for r in caplog.records), 20
        )
        assert found, [r.getMessage() for r in caplog.records]
    finally:
        link.close()
        silent.close()


# --- MQTT identity and secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mqtt_fields",
    [
        {"device_id": "kitchen/#"},
        {"device_id": "a+b"},
        {"device_id": "x" * 49},
        {"client_id": "edge knn"},
        {"client_id": "c" * 65},
        {"password": "p" * 5000},
    ],
)
def test_unusable_mqtt_names_are_config_errors(mqtt_fields):
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"mqtt": mqtt_fields})
    (line,) = e.value.errors
    assert line.startswith(f"mqtt.{next(iter(mqtt_fields))}:") and len(line) < 200, line
    assert "p" * 50 not in line, "a password is never echoed"


def test_run_with_a_wildcard_device_id_exits_78_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeknn", "run", "--config", str(write_config(tmp_path)),
         "--device-id", "dev#1", "--panel", "none", "--source", "replay:/nonexistent"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mqtt.device_id" in lines[0], proc.stderr


def test_the_default_device_id_differs_between_machines_of_one_host_name(tmp_path, monkeypatch):
    ids = []
    for machine in ("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "00112233445566778899aabbccddeeff"):
        (tmp_path / "machine-id").write_text(machine + "\n")
        monkeypatch.setattr(config, "MACHINE_ID", tmp_path / "machine-id")
        monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "raspberrypi", "", "", "")))
        ids.append(config.Config().resolved_device_id())
        monkeypatch.undo()
    assert ids[0] != ids[1] and all(i.startswith("raspberrypi-") for i in ids), ids
    assert all(config.from_dict({"mqtt": {"device_id": i}}) for i in ids)


def test_a_huge_password_file_is_refused_before_paho_sees_it(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"p" * 10_000_000)
    with pytest.raises(MqttError, match=r"mqtt.password_file: .* larger than 4096 bytes"):
        make_link(1883, username="edge", password_file=str(secret))
    secret.write_text("s3cret\nsecond line\n")
    assert client._password(config.from_dict({"mqtt": {"password_file": str(secret)}}).mqtt) == "s3cret"
