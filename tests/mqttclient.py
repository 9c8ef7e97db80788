"""The tests' side of MQTT: a recording test client, and TLS certificates made with the openssl CLI.

The broker itself is the package's launcher (``edgeknn.bench.broker.Broker``), shared with the bench.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeknn.bench.broker import Certs


def make_certs(directory: Path) -> Certs:
    """Generate a throwaway PKI with the openssl CLI (EC keys: fast)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=edgeknn test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name, extra in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extra
        )
        subject = f"/CN=edgeknn test {name}"
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    d = directory
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


class Subscriber:
    """A paho client (MQTT 5) that records every message it receives; ``wait_for`` a predicate."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        client_id: str = "",
        session_expiry: int = 0,
        host: str = "127.0.0.1",
        retain_as_published: bool = False,
    ):
        self.topics = topics
        self._options = SubscribeOptions(qos=1, retainAsPublished=retain_as_published)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if session_expiry:  # a persistent session: the broker keeps our subscriptions and queued messages
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        self.client.connect(host, port, 30, clean_start=not session_expiry, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(5), "test subscriber did not subscribe"

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            client.subscribe([(t, self._options) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate, timeout: float = 5.0, what: str = "") -> Message:
        """The first message (in arrival order) matching ``predicate``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {m.topic} {m.text[:120]}" for m in self.messages[-20:])
                    what = what or str(predicate)
                    raise AssertionError(f"no message {what} within {timeout} s; last seen:\n{seen}")
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, properties=None) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
