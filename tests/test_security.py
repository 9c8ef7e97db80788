"""Security: hostile MQTT commands (fuzzed), TLS with client certificates and passwords, command
switches, no pickle anywhere, the payload limit and the systemd unit's exposure.

The fuzz drives a running daemon: most payloads go through ``parse_command`` straight onto its queue
(what the MQTT link does with each message paho delivers), a few hundred more through the real broker.
Every invalid command must get an error result and leave the store as it was; valid ones must do
exactly what they say.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqttclient import make_certs
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rig import Running, Scene, make_config, needs_mosquitto, photo_folders, teach, wait_for

from edgeknn.bench.broker import Broker, Certs
from edgeknn.commands import Result
from edgeknn.device.build import build
from edgeknn.mqtt.commands import COMMANDS, CommandError, parse_command
from edgeknn.mqtt.link import MqttLink
from edgeknn.store.file import StoreError
from edgeknn.store.knn import KnnStore, StoreSettings
from edgeknn.store.names import CLASS_NAME_RE, class_name_error

REPO = Path(__file__).resolve().parent.parent
BASE = "edgeknn/sec"
REPLIES = "fuzz/replies"


def report(text: str) -> None:
    print(f"\n[figures] {text}")


def mqtt_settings(port: int, **more) -> dict:
    return {
        "mqtt.enabled": True,
        "mqtt.host": "127.0.0.1",
        "mqtt.port": port,
        "mqtt.device_id": "sec",
        "mqtt.discovery": False,
        "mqtt.heartbeat_s": 0.0,
        **{f"mqtt.{k}": v for k, v in more.items()},
    }


def link_of(run: Running) -> MqttLink:
    return next(o for o in run.daemon.outputs if isinstance(o, MqttLink))


def no_delay(sock) -> None:
    """Send small packets at once: without it a request waits ~40 ms for a delayed ACK (Nagle)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listening(run: Running, broker: Broker) -> bool:
    """Connected, and the broker has taken the command subscription (a command sent sooner is lost)."""
    subscribed = re.search(rf"edgeknn-sec \d+ {BASE}/cmd/\+", broker.log())
    return run.daemon.broker_status() == "ok" and bool(subscribed)


class Client:
    """A test MQTT client with optional login and TLS; records messages; ``request`` waits for the reply."""

    def __init__(self, port: int, *, username: str = "", password: str = "", certs: Certs | None = None,
                 client_cert: bool = True, topics=(REPLIES, f"{BASE}/#")):  # fmt: skip
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.refused: str = ""
        self.connected = threading.Event()  # connected and subscribed: the broker acknowledged it
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username:
            c.username_pw_set(username, password)
        if certs:
            c.tls_set(
                ca_certs=str(certs.ca),
                certfile=str(certs.client_cert) if client_cert else None,
                keyfile=str(certs.client_key) if client_cert else None,
            )
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *args: self.connected.set()
        c.on_message = self._on_message
        c.on_socket_open = lambda client, userdata, sock: no_delay(sock)
        self.topics = list(topics)
        self.client = c
        try:
            c.connect("127.0.0.1" if not certs else "localhost", port, 30)
        except (OSError, ssl.SSLError) as e:
            self.refused = f"{type(e).__name__}: {e}"
            return
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            return
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def request(self, name: str, payload: bytes, correlation: bytes, timeout: float = 30.0) -> dict | None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = REPLIES
        props.CorrelationData = correlation
        self.client.publish(f"{BASE}/cmd/{name}", payload, qos=1, properties=props).wait_for_publish(5)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.topic == REPLIES and getattr(m.properties, "CorrelationData", None) == correlation:
                        return json.loads(m.payload)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- 4. hostile commands ---------------------------------------------------------------------------

ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _.-")
valid_names = st.from_regex(CLASS_NAME_RE, fullmatch=True)
hostile_names = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda s: class_name_error(s) is not None),
    st.sampled_from(["+", "#", "a/b", "cup/#", "+/+", "../reset", "\x00", "cup\n", " cup", "x" * 33, "",
                     "caf\u00e9", "\u202ecup", "cup\u200b", "\ud800", "\U0001f600", "\x1b[31mred"]),
    st.builds(lambda a, b: a + b, valid_names, st.sampled_from(["+", "#", "/", "\t", "\x7f", "\xa0", "\n"])),
)  # fmt: skip
not_strings = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
required = ["add_example", "forget_class", "rename_class", "reset", "set_threshold"]


def broker_safe(c: str) -> bool:
    """Mosquitto refuses topics with control characters, surrogates and Unicode non-characters."""
    n = ord(c)
    return not (
        n < 0x20
        or 0x7F <= n <= 0x9F
        or 0xD800 <= n <= 0xDFFF
        or 0xFDD0 <= n <= 0xFDEF
        or n & 0xFFFE == 0xFFFE
    )


def deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


def payload(obj) -> bytes:
    return json.dumps(obj).encode()


@st.composite
def hostile(draw, known: list[str], topic_safe: bool = False):
    """(command name, payload bytes, why it is invalid) for a command that must be refused."""
    name_text = st.text(min_size=0, max_size=30)
    if topic_safe:  # a name the broker takes as one topic level (it drops a client that sends others)
        name_text = name_text.filter(lambda s: not any(c in "+#/" or not broker_safe(c) for c in s))
    kind = draw(
        st.sampled_from(
            ["bytes", "not utf-8", "deep", "huge", "wrong type", "unknown class", "hostile name",
             "hostile new name", "command name", "extra field", "not an object", "oversize", "missing",
             "bad count", "bad threshold", "no confirm", "rename onto existing"]
        )
    )  # fmt: skip
    cmd = draw(st.sampled_from(required))
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict) or not data.strip():
            data = b"\xff" + data  # random bytes that happen to be a JSON object (or empty) are not random
        return cmd, data, kind
    if kind == "not utf-8":
        return cmd, b'{"class": "' + draw(st.binary(min_size=1, max_size=20)) + b'\xc3\x28"}', kind
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        field = {"add_example": "class", "forget_class": "class", "rename_class": "new_name",
                 "reset": "confirm", "set_threshold": "value"}[cmd]  # fmt: skip
        body = "{" + (f'"class": "{known[0]}", ' if cmd == "rename_class" else "") + f'"{field}": '
        return cmd, (body + deep(depth) + "}").encode(), kind
    if kind == "huge":
        size = draw(st.sampled_from([33, 100, 4000, 4096, 5000, 70_000, 1_000_000]))
        return draw(st.sampled_from(["add_example", "forget_class"])), payload({"class": "A" * size}), kind
    if kind == "wrong type":
        field, value = draw(
            st.one_of(
                st.tuples(st.just("class"), not_strings),
                st.tuples(st.just("count"), st.one_of(st.text(max_size=5), st.floats(), st.booleans())),
            )
        )
        args = {"class": known[0], "count": 1, field: value}
        return "add_example", json.dumps(args, allow_nan=True).encode(), kind
    if kind == "unknown class":
        name = draw(valid_names.filter(lambda s: s not in known))
        return (
            draw(st.sampled_from(["add_example", "forget_class", "rename_class"])),
            payload({"class": name} | ({"new_name": "fresh"} if cmd == "rename_class" else {})),
            kind,
        )
    if kind == "hostile name":
        return (
            draw(st.sampled_from(["add_example", "forget_class"])),
            payload({"class": draw(hostile_names)}),
            kind,
        )
    if kind == "hostile new name":
        return (
            "rename_class",
            payload({"class": draw(st.sampled_from(known)), "new_name": draw(hostile_names)}),
            kind,
        )
    if kind == "command name":
        name = draw(name_text.filter(lambda s: s not in COMMANDS and s != "result"))
        return name, payload({"class": known[0]}), kind
    if kind == "extra field":
        extra = draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in ("class", "count")))
        return "add_example", payload({"class": known[0], extra: 1}), kind
    if kind == "not an object":
        value = draw(st.one_of(not_strings.filter(lambda v: not isinstance(v, dict)), st.text(max_size=20)))
        return cmd, json.dumps(value).encode(), kind
    if kind == "oversize":  # a valid command padded past max_payload (4096 bytes)
        pad = draw(st.integers(4097, 20_000))
        text = json.dumps({"class": known[0]})
        return "forget_class", (text[:-1] + " " * (pad - len(text)) + "}").encode(), kind
    if kind == "missing":
        return cmd, b"{}", kind
    if kind == "bad count":
        count = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=101)))
        return "add_example", payload({"class": known[0], "count": count}), kind
    if kind == "bad threshold":
        value = draw(st.one_of(st.floats().filter(lambda v: not -1 <= v <= 1), st.just(float("nan"))))
        return "set_threshold", json.dumps({"value": value}, allow_nan=True).encode(), kind
    if kind == "no confirm":
        return (
            "reset",
            payload(draw(st.sampled_from([{}, {"confirm": False}, {"confirm": "true"}, {"confirm": 1}]))),
            kind,
        )
    # rename onto existing
    a, b = draw(st.permutations(known))[:2]
    return "rename_class", payload({"class": a, "new_name": b}), kind


@st.composite
def valid(draw, known: list[str]):
    """(command name, args) of a command that must succeed, given the current classes."""
    cmd = draw(st.sampled_from(["add_example"] * 3 + ["forget_class", "rename_class", "reset", "save",
                                                      "set_threshold"]))  # fmt: skip
    if cmd == "add_example":
        return cmd, {"class": draw(st.sampled_from(known)), "count": draw(st.integers(1, 2))}
    if cmd == "forget_class":
        return cmd, {"class": draw(st.sampled_from(known))}
    if cmd == "rename_class":
        return cmd, {
            "class": draw(st.sampled_from(known)),
            "new_name": draw(valid_names.filter(lambda s: s not in known)),
        }
    if cmd == "reset":
        return cmd, {"confirm": True}
    if cmd == "set_threshold":
        return cmd, {"value": draw(st.floats(-1, 0.2))}
    return cmd, {}


def fingerprint(run: Running) -> tuple:
    store = run.daemon.store
    return tuple(store.classes), tuple(store.counts().items()), len(store), store.threshold


def expect(before: tuple, cmd: str, args: dict) -> tuple:
    """What a valid command does to the fingerprint."""
    classes, counts, rows, threshold = list(before[0]), dict(before[1]), before[2], before[3]
    if cmd == "add_example":
        counts[args["class"]] += args["count"]
        rows += args["count"]
    elif cmd == "forget_class":
        rows -= counts[args["class"]]
        counts[args["class"]] = 0
    elif cmd == "rename_class":
        i = classes.index(args["class"])
        classes[i] = args["new_name"]
        counts = {args["new_name"] if k == args["class"] else k: v for k, v in counts.items()}
    elif cmd == "reset":
        counts, rows = {k: 0 for k in counts}, 0
    elif cmd == "set_threshold":
        threshold = float(args["value"])
    return tuple(classes), tuple(counts.items()), rows, threshold


class Fuzz:
    """Sends commands to a running daemon and checks each result and the store around it."""

    def __init__(self, run: Running):
        self.run = run
        self.link = link_of(run)
        self.results: dict[bytes, tuple[str, Result]] = {}
        self.ids = itertools.count()
        self.sent = {"valid": 0, "invalid": 0}
        self.unintended: list[str] = []
        original = self.link._publish_result

        def record(name, result, response_topic, correlation):
            if correlation is not None:
                self.results[correlation] = (name, result)
            original(name, result, response_topic, correlation)

        self.link._publish_result = record

    def direct(self, name: str, data: bytes) -> Result:
        """Through ``parse_command`` onto the daemon's queue, as the link does with what paho delivers."""
        cid = f"c{next(self.ids)}".encode()

        def reply(result: Result) -> None:
            self.results[cid] = (name, result)

        daemon = self.run.daemon
        try:
            command = parse_command(
                name, data, classes=list(daemon.store.classes), config=daemon.cfg.mqtt, reply=reply
            )
        except CommandError as e:
            reply(Result(ok=False, error=str(e)))
        else:
            daemon.submit(command)
        assert wait_for(lambda: cid in self.results, 15), f"no result for {name!r} {data[:80]!r}"
        return self.results[cid][1]

    def check(self, send, name: str, data: bytes, args: dict | None) -> None:
        """``args`` is None for a command that must be refused."""
        before = fingerprint(self.run)
        result = send(name, data)
        after = fingerprint(self.run)
        assert self.run.thread.is_alive(), "the main loop died"
        if args is None:
            self.sent["invalid"] += 1
            assert not result.ok, f"accepted {name!r} {data[:120]!r}: {result}"
            assert result.error and "internal error" not in result.error, result.error
            if after != before:
                self.unintended.append(f"{name!r} {data[:80]!r}")
            assert after == before, f"{name!r} {data[:120]!r} changed the store: {before} -> {after}"
        else:
            self.sent["valid"] += 1
            assert result.ok, f"refused valid {name} {args}: {result.error}"
            assert after == expect(before, name, args), f"{name} {args}: {before} -> {after}"
        assert all(class_name_error(c) is None for c in self.run.daemon.store.classes)


@pytest.fixture
def fast_broker(tmp_path):
    """A broker that sends small packets at once (no Nagle delay): a request and its reply take ~1 ms."""
    b = Broker(tmp_path / "broker")
    with open(b.conf, "a") as f:
        f.write("set_tcp_nodelay true\n")
    yield b.start()
    b.kill()


@pytest.fixture
def fuzz_rig(tmp_path, fast_broker):
    scene = Scene(photo_folders(tmp_path))
    cfg = make_config(tmp_path, **{"panel.kind": "none", **mqtt_settings(fast_broker.port)})
    run = Running(build(cfg, opener=scene.opener))
    try:
        assert wait_for(lambda: listening(run, fast_broker))
        teach(run, scene, per_class=2)
        yield run
    finally:
        run.stop()


FUZZ_SETTINGS = dict(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@needs_mosquitto
@pytest.mark.slow
def test_fuzzed_commands_change_nothing_unless_valid(fuzz_rig, fast_broker, caplog):
    caplog.set_level(logging.INFO, logger="edgeknn")
    run = fuzz_rig
    fuzz = Fuzz(run)

    @settings(max_examples=1200, **FUZZ_SETTINGS)
    @given(st.data())
    def through_the_handler(data):
        known = list(run.daemon.store.classes)
        if data.draw(st.integers(0, 99)) < 8:
            name, args = data.draw(valid(known))
            fuzz.check(fuzz.direct, name, payload(args), args)
        else:
            name, body, _ = data.draw(hostile(known))
            fuzz.check(fuzz.direct, name, body, None)

    through_the_handler()
    direct = dict(fuzz.sent)

    client = Client(fast_broker.port)
    assert client.connected.wait(20)

    def over_the_broker(name: str, body: bytes) -> Result:
        cid = f"b{next(fuzz.ids)}".encode()
        reply = client.request(name, body, cid)
        assert reply is not None, f"no reply to {name!r} {body[:80]!r}"
        assert cid in fuzz.results
        return Result(reply["ok"], reply.get("error", ""))

    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(st.data())
    def through_the_broker(data):
        known = list(run.daemon.store.classes)
        if data.draw(st.integers(0, 99)) < 5:
            name, args = data.draw(valid(known))
            fuzz.check(over_the_broker, name, payload(args), args)
        else:
            name, body, _ = data.draw(hostile(known, topic_safe=True))
            fuzz.check(over_the_broker, name, body, None)

    try:
        through_the_broker()
    finally:
        client.close()
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes[:5]]
    frames = run.recorder.frames
    assert wait_for(lambda: run.recorder.frames > frames + 10), "still classifying"
    total = fuzz.sent["valid"] + fuzz.sent["invalid"]
    assert total >= 1300
    report(
        f"fuzz: {total} commands ({direct['invalid'] + direct['valid']} through the handler, "
        f"{total - direct['invalid'] - direct['valid']} through the broker; {fuzz.sent['valid']} valid), "
        f"{len(crashes)} crashes, {len(fuzz.unintended)} unintended store changes"
    )


# --- 6. security -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


@needs_mosquitto
def test_tls_client_certificate_and_password(tmp_path, pki, caplog):
    """The daemon logs in over TLS with a client certificate and a password; nobody else gets in."""
    caplog.set_level(logging.DEBUG, logger="edgeknn")
    secret = "s3cret-Pa55"
    b = Broker(tmp_path / "broker", users={"edge": secret, "ops": "ops-pw"}, certs=pki).start()
    (tmp_path / "password").write_text(secret + "\n")
    scene = Scene(photo_folders(tmp_path))
    tls = dict(
        host="localhost", tls=True, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
        key_file=str(pki.client_key), username="edge", password_file=str(tmp_path / "password"),
    )  # fmt: skip
    cfg = make_config(tmp_path, **{"panel.kind": "none", **mqtt_settings(b.tls_port, **tls)})
    run = Running(build(cfg, opener=scene.opener))
    clients: list[Client] = []
    try:
        assert wait_for(lambda: run.daemon.broker_status() == "ok", 15), caplog.text
        ops = Client(b.tls_port, username="ops", password="ops-pw", certs=pki)
        clients.append(ops)
        assert ops.connected.wait(20), ops.refused
        reply = ops.request("add_example", payload({"class": "1"}), b"tls-1")
        assert reply and reply["ok"], reply
        assert run.daemon.store.counts()["1"] == 1
        # Nobody without the password, or without a client certificate, or in plain text:
        wrong = Client(b.tls_port, username="ops", password="guess", certs=pki)
        no_cert = Client(b.tls_port, username="ops", password="ops-pw", certs=pki, client_cert=False)
        anonymous = Client(b.port)
        clients += [wrong, no_cert, anonymous]
        for c in (wrong, no_cert, anonymous):
            assert not c.connected.wait(1.5), "connected without the right credentials"
        assert wrong.refused and anonymous.refused
        assert run.daemon.store.counts()["1"] == 1
        # The password never shows: not in the log, not in anything published
        assert secret not in caplog.text
        assert all(secret.encode() not in m.payload for m in ops.messages)
        assert secret not in json.dumps(run.daemon.state())
    finally:
        for c in clients:
            c.close()
        run.stop()
        b.kill()


@needs_mosquitto
def test_daemon_with_wrong_password_says_so_once_and_stays_out(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="edgeknn")
    b = Broker(tmp_path / "broker", users={"edge": "right"}).start()
    scene = Scene(photo_folders(tmp_path))
    cfg = make_config(
        tmp_path, **{"panel.kind": "none", **mqtt_settings(b.port, username="edge", password="wrong")}
    )
    run = Running(build(cfg, opener=scene.opener))
    try:
        assert wait_for(lambda: "refused the login" in caplog.text)
        time.sleep(1.5)  # more attempts are refused meanwhile: none of them is said again
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "mqtt" in r.name]
        assert len(said) == 1 and 'mqtt.username "edge"' in said[0] and "wrong" not in said[0]
        assert run.daemon.broker_status() == "down"
        assert wait_for(lambda: run.daemon.frames_classified > 0)
    finally:
        run.stop()
        b.kill()


@needs_mosquitto
def test_commands_off_and_allowed_commands(tmp_path, caplog):
    b = Broker(tmp_path / "broker").start()
    scene = Scene(photo_folders(tmp_path))
    try:
        # mqtt.commands = false: nothing subscribed, nothing answered, nothing changed
        cfg = make_config(tmp_path / "off", **{"panel.kind": "none", **mqtt_settings(b.port, commands=False)})
        run = Running(build(cfg, opener=scene.opener))
        client = Client(b.port)
        try:
            assert client.connected.wait(20)
            assert wait_for(lambda: run.daemon.broker_status() == "ok")
            for name, args in [("add_example", {"class": "1"}), ("reset", {"confirm": True}), ("save", {})]:
                assert client.request(name, payload(args), name.encode(), timeout=1.0) is None
            assert sum(run.daemon.store.counts().values()) == 0
            assert not (tmp_path / "off" / "store.npz").exists()
            assert not re.search(r"edgeknn-sec \d+ edgeknn/sec/cmd", b.log()), "subscribed to commands"
        finally:
            client.close()
            run.stop()

        # allowed_commands: only those run; the others are refused by name
        cfg = make_config(
            tmp_path / "some",
            **{"panel.kind": "none", **mqtt_settings(b.port, allowed_commands=["add_example", "save"])},
        )
        run = Running(build(cfg, opener=scene.opener))
        client = Client(b.port)
        try:
            assert client.connected.wait(20)
            assert wait_for(lambda: listening(run, b))
            ok = client.request("add_example", payload({"class": "2", "count": 2}), b"a1")
            assert ok and ok["ok"] and run.daemon.store.counts()["2"] == 2
            for name, args in [("reset", {"confirm": True}), ("forget_class", {"class": "2"}),
                               ("rename_class", {"class": "2", "new_name": "two"})]:  # fmt: skip
                reply = client.request(name, payload(args), name.encode())
                assert reply and not reply["ok"] and "not allowed (mqtt.allowed_commands)" in reply["error"]
            assert run.daemon.store.counts() == {"1": 0, "2": 2, "5": 0}
            saved = client.request("save", b"", b"s1")
            assert saved and saved["ok"]
            assert re.search(r"edgeknn-sec \d+ edgeknn/sec/cmd/\+", b.log()), (
                "(how the log shows a subscription)"
            )
        finally:
            client.close()
            run.stop()
    finally:
        b.kill()


@needs_mosquitto
def test_payload_size_limit(tmp_path):
    b = Broker(tmp_path / "broker").start()
    scene = Scene(photo_folders(tmp_path))
    cfg = make_config(tmp_path, **{"panel.kind": "none", **mqtt_settings(b.port, max_payload=256)})
    run = Running(build(cfg, opener=scene.opener))
    client = Client(b.port)
    try:
        assert client.connected.wait(20)
        assert wait_for(lambda: listening(run, b))

        def padded(size: int) -> bytes:
            text = json.dumps({"class": "1"})
            return (text[:-1] + " " * (size - len(text)) + "}").encode()

        at_limit = client.request("add_example", padded(256), b"p256")
        assert at_limit and at_limit["ok"], at_limit
        over = client.request("add_example", padded(257), b"p257")
        assert over and not over["ok"] and over["error"] == "payload: expected at most 256 bytes, got 257"
        huge = client.request("add_example", padded(4_000_000), b"p4m")
        assert huge and not huge["ok"] and "expected at most 256 bytes" in huge["error"]
        assert run.daemon.store.counts()["1"] == 1 and run.thread.is_alive()
    finally:
        client.close()
        run.stop()
        b.kill()


PICKLE_MODULES = r"(c?[Pp]ickle|_pickle|dill|shelve|marshal|joblib|cloudpickle)"


def test_no_pickle_in_the_package():
    """No module that unpickles; every numpy load says allow_pickle=False; nothing says allow_pickle=True."""
    sources = sorted((REPO / "edgeknn").rglob("*.py"))
    assert sources
    loads = 0
    for path in sources:
        text = path.read_text()
        assert not re.search(rf"^\s*(import|from)\s+{PICKLE_MODULES}\b", text, re.M), f"{path} imports pickle"
        assert not re.search(rf"\b{PICKLE_MODULES}\.loads?\b", text), f"{path} unpickles"
        assert not re.search(r"allow_pickle\s*=\s*True", text), f"{path} allows pickles"
        assert not re.search(r"torch\.load|(?<![\w.])(eval|exec)\(", text), f"{path} evaluates code"
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
            ):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("np", "numpy"):
                    loads += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    assert (
                        isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                    ), f"{path}:{node.lineno}: np.load without allow_pickle=False"
    assert loads >= 1


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_store_carrying_a_pickle_is_refused_unopened(tmp_path):
    path = tmp_path / "store.npz"
    store = KnnStore(8, "m" * 64, StoreSettings(rule="nearest"))
    store.add("cup", np.ones(8, np.float32))
    for array in ("classes", "rows", "center"):
        store.save(path)
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays[array] = np.array([Payload(str(tmp_path / f"ran-{array}"))], dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        with pytest.raises(StoreError, match="store holds pickled objects, refused") as e:
            KnnStore.load(path, "m" * 64)
        assert e.value.corrupt
        assert not (tmp_path / f"ran-{array}").exists(), "the pickle ran"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_exposure():
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(REPO / "systemd" / "edgeknn.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for edgeknn\.service: (\d+\.\d+)", proc.stdout + proc.stderr)
    if found is None and "offline" in proc.stderr.lower():
        pytest.skip(f"this systemd-analyze cannot check a unit offline: {proc.stderr.strip()[:200]}")
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    exposure = float(found.group(1))
    report(f"systemd unit exposure {exposure}")
    assert exposure <= 2.5


# --- files the device reads, and running out of descriptors (issue 20, findings 4 and 1) ------------


def _returns(call, timeout: float = 10.0):
    """``call()``'s result, failing if it blocks (a FIFO opened for reading waits for a writer for ever)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = call()
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked: the file was opened without being checked"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_a_fifo_or_a_huge_file_in_place_of_runtime_json_config_or_password_is_one_line(tmp_path, caplog):
    """Finding 4: a FIFO at runtime.json hung the start for ever with no line; a 200 MB one took
    VmHWM to 465 MB. Each file is stat-ed first: one line, the config's values, nothing read."""
    import os
    import tracemalloc

    from edgeknn import config
    from edgeknn.device.runtime import RuntimeSettings
    from edgeknn.web.auth import AuthError, Passwords

    runtime = tmp_path / "runtime.json"
    os.mkfifo(runtime)
    settings = _returns(lambda: RuntimeSettings.load(tmp_path, {"threshold": None}))
    assert settings.get("threshold", 0.25) == 0.25
    assert "is a FIFO" in caplog.text and caplog.text.count("runtime.json") == 1
    runtime.unlink()
    with open(runtime, "wb") as f:
        f.truncate(200 << 20)
    tracemalloc.start()
    settings = RuntimeSettings.load(tmp_path, {"threshold": None})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    report(f"a 200 MB runtime.json: refused, {peak / 1e6:.2f} MB allocated at the peak")
    assert peak < 1e6 and "larger than" in caplog.text
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    web = config.from_dict({"web": {"password_file": str(fifo)}}).web
    with pytest.raises(AuthError, match="is a FIFO"):
        _returns(lambda: Passwords(web, tmp_path).current())
    with pytest.raises(config.ConfigError, match="is a FIFO"):
        _returns(lambda: config.load(fifo))


def test_a_picture_file_is_checked_before_it_is_read(tmp_path, caplog):
    """Finding 4: a FIFO in place of a picture blocked the page's thread; a 50 MB file was read whole
    (+47 MB) before its size was checked. Now: that picture is gone (one line each), nothing read."""
    import os
    import tracemalloc
    import zlib

    from edgeknn.store.pictures import Pictures, picture_path

    jpeg = b"\xff\xd8" + bytes(15_000)
    folder = tmp_path / "store.npz.pictures"
    folder.mkdir()
    known = {
        1: (len(jpeg), zlib.crc32(jpeg)),
        2: (len(jpeg), zlib.crc32(jpeg)),
        3: (len(jpeg), zlib.crc32(jpeg)),
    }
    pictures = Pictures(folder, dict(known))
    os.mkfifo(picture_path(folder, 1))
    with open(picture_path(folder, 2), "wb") as f:
        f.truncate(50 << 20)
    picture_path(folder, 3).write_bytes(jpeg)
    assert _returns(lambda: pictures.get(1)) is None
    tracemalloc.start()
    assert pictures.get(2) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    report(f"a 50 MB file in place of a picture: refused, {peak / 1e6:.2f} MB allocated at the peak")
    assert peak < 1e6
    assert pictures.get(3) == jpeg
    assert "is a FIFO" in caplog.text and "larger than" in caplog.text


def test_out_of_descriptors_is_a_passing_fault_for_the_replay_and_the_pictures(tmp_path):
    """Finding 1: with every descriptor taken, the replay said each image was unreadable, dropped it,
    then "no readable images" (a SourceError: exit 78). Now running out is an OSError the camera
    thread retries (EMFILE), no image is dropped, and a picture is not lost for it either."""
    import errno
    import os
    import resource
    import zlib

    from edgeknn.camera.sources import ReplaySource
    from edgeknn.store.pictures import Pictures, picture_path

    replay = ReplaySource(photo_folders(tmp_path)["1"], fps=0, loop=True, size=(224, 224))
    jpeg = b"\xff\xd8" + bytes(1000)
    folder = tmp_path / "pictures"
    folder.mkdir()
    picture_path(folder, 7).write_bytes(jpeg)
    pictures = Pictures(folder, {7: (len(jpeg), zlib.crc32(jpeg))})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(6):  # more than the folder's 3 images: each would have been dropped
            with pytest.raises(OSError) as raised:
                replay.read()
            assert raised.value.errno == errno.EMFILE
        assert pictures.get(7) is None
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert replay.read().shape[2] == 3, "every image still there"
    assert pictures.get(7) == jpeg, "the picture was not dropped"
