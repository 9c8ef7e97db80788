"""The paho client as this device uses it: MQTT 5, the last will, bounded queues and packets, login, TLS.

Its CONNECT announces an MQTT 5 Maximum Packet Size, so the broker drops a publish too big for us
(a 200 MB "command") instead of sending it: such a packet never reaches this process's memory.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeknn.config import MqttConfig

MAX_QUEUED = 1000  # outgoing QoS>0 messages paho keeps while the broker is away
MAX_SECRET_BYTES = 4096  # a password file larger than this is not a password file
# The largest packet we take: 8x mqtt.max_payload's ceiling, so a merely too-big command still reaches
# us and gets its refusal reply; the broker drops anything bigger (a 200 MB publish) without sending it.
MAX_PACKET_BYTES = 8 * 1024 * 1024


class MqttError(Exception):
    """The MQTT settings cannot be used (a password or certificate file cannot be read)."""


def _password(config: MqttConfig) -> str:
    """The password: mqtt.password, or the first line of mqtt.password_file, read at most 4 KiB of it."""
    path = config.password_file
    if not path:
        return config.password
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
        if len(data) > MAX_SECRET_BYTES:
            raise MqttError(
                f"mqtt.password_file: {path} is larger than {MAX_SECRET_BYTES} bytes; "
                "expected a file whose first line is the password"
            )
        return data.decode("utf-8").splitlines()[0] if data else ""
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise MqttError(f"mqtt.password_file: cannot read {path} ({reason})") from None


def connect_properties() -> Properties:
    """CONNECT's properties: the largest packet we accept, so the broker never sends us a bigger one."""
    properties = Properties(PacketTypes.CONNECT)
    properties.MaximumPacketSize = MAX_PACKET_BYTES
    return properties


def make_client(config: MqttConfig, *, client_id: str, will_topic: str) -> mqtt.Client:
    """A paho MQTT 5 client with the last will, reconnect backoff, a bounded queue, login and TLS.

    Raises MqttError naming the key when a password or certificate file cannot be read.
    """
    c = config
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.will_set(will_topic, "offline", qos=1, retain=True)
    client.reconnect_delay_set(1, 30)
    client.max_queued_messages_set(MAX_QUEUED)
    if c.username:
        client.username_pw_set(c.username, _password(c) or None)
    if c.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(c, key)
            try:
                if path:
                    open(path, "rb").close()
            except OSError as e:
                raise MqttError(f"mqtt.{key}: cannot read {path} ({e.strerror})") from None
        try:
            client.tls_set(
                ca_certs=c.ca_file or None, certfile=c.cert_file or None, keyfile=c.key_file or None
            )
        except (OSError, ValueError) as e:
            raise MqttError(f"mqtt.tls: cannot use the TLS files ({e})") from None
    return client


def local_address(client: mqtt.Client) -> str | None:
    """This end's IP address of ``client``'s broker connection (the interface the broker's network
    sees: the address Home Assistant's network reaches this device at), or None while there is none."""
    sock: Any = client.socket()
    try:
        return str(sock.getsockname()[0]) if sock is not None else None
    except (OSError, AttributeError):
        return None
